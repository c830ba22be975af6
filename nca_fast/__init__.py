"""nca_fast: Growing Neural Cellular Automata with fused Triton kernels and a PyTorch reference."""
from .config import NCAConfig, FILTER_BANKS
from .model import NCA

__version__ = "0.1.0"


def load(path):
    """Load a model written by ``NCA.save`` (safetensors weights + JSON config)."""
    from .io import load as _load
    return _load(path)


def load_distill(path):
    """Load a Distill WebGL 8-bit export (``ex*_NAME.json``) as an ``NCA``."""
    from .io import load_distill as _load_distill
    return _load_distill(path)


__all__ = ["NCA", "NCAConfig", "FILTER_BANKS", "load", "load_distill", "__version__"]
