"""nca_fast: Growing Neural Cellular Automata with fused Triton kernels and a PyTorch reference."""
from .config import NCAConfig, FILTER_BANKS
from .model import NCA
from . import io  # nca_fast.io.load_target etc. after `import nca_fast`, as the README uses it

__version__ = "0.1.0"


def load(path, *, backend="auto"):
    """Load a model written by ``NCA.save`` (safetensors weights + JSON config)."""
    from .io import load as _load
    return _load(path, backend=backend)


def load_distill(path, *, backend="auto"):
    """Load a Distill WebGL 8-bit export (``ex*_NAME.json``) as an ``NCA``."""
    from .io import load_distill as _load_distill
    return _load_distill(path, backend=backend)


__all__ = ["NCA", "NCAConfig", "FILTER_BANKS", "io", "load", "load_distill", "__version__"]
