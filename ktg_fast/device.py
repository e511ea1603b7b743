"""The one home of device choice: parse a device name, make a CUDA device current."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "use_device", "autotune_convolutions"]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; unknown or absent devices get a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA device is available: use the CPU "
                         "(--device cpu, device='cpu')")
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {device!r} asked for but this machine has {n} CUDA device"
                             f"{'s' if n != 1 else ''} (cuda:0 to cuda:{n - 1})")
        if dev.index is None:  # an explicit index, so device comparisons are exact
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def use_device(dev: torch.device) -> torch.device:
    """Make ``dev`` the current CUDA device (with an explicit index); a CPU device is returned as it is.

    Triton kernels, CUDA streams and graph captures work on the *current* device, so a run on
    ``cuda:1`` must make it current, not just put its tensors there.
    """
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def autotune_convolutions(dev: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape (``cudnn.benchmark``).

    Training repeats a handful of shapes (the batch, the evaluation batch), so the timing is paid once;
    vmap's grouped convolutions (one per node group) are where cuDNN's default choice is weakest.
    A CUDA graph captures after its warm-up calls, so the algorithms are chosen before it.
    """
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
