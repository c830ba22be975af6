"""nca_fast: Growing Neural Cellular Automata with fused Triton kernels and a PyTorch reference.

Layout (data flows one way): ``kernels/`` (installed as ``nca_fast.kernels``) <- ``functional``
(the custom op) <- ``backends`` (``torch_backend``, ``triton_backend``: one signature) <- ``model``
(``NCA``) <- ``training``, ``train``, ``cli``. ``reference`` is the readable oracle; ``config``,
``params``, ``rng`` hold the model's facts; ``formats`` (model files), ``media`` (images and
videos) and ``files`` (atomic writes) its input and output. The maths: docs/MODEL.md.
"""
from . import media  # nca_fast.media.load_target etc. after `import nca_fast` (README)
from .config import FILTER_BANKS, NCAConfig
from .model import NCA, load, load_distill

__version__ = "0.1.0"

__all__ = ["NCA", "NCAConfig", "FILTER_BANKS", "media", "load", "load_distill", "__version__"]
