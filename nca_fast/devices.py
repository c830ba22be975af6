"""Device names as the command lines take them ("auto", "cpu", "cuda", "cuda:N"), resolved."""
from __future__ import annotations

from typing import Optional

import torch


def resolve_device(name: str, *, index: Optional[int] = None) -> torch.device:
    """The torch device ``name`` means: "auto" is CUDA when torch sees a CUDA device, else the
    CPU; "cuda" without an index is ``index`` (a DDP process's local rank) or torch's current
    device. Raises ValueError("NAME: reason") for a name that is not a CPU or an existing CUDA
    device; command lines put their flag in front."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: not a torch device (try cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name}: expected cpu, cuda or cuda:N")
    if device.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"{name}: no CUDA device is visible to torch here")
    count = torch.cuda.device_count()
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device() if index is None else index)
    if device.index >= count:
        raise ValueError(f"{name}: there are {count} CUDA devices here (cuda:0 .. "
                         f"cuda:{count - 1})")
    return device
