"""``--loader auto|tensor|dali|torch``: build the loader asked for, or pick one and say why."""
from __future__ import annotations

import logging

import torch

from .dali import DaliLoader, dali_status, require_dali
from .dataset import ArrayDataset, ImageFolder
from ..device import resolve_device
from .loader import BatchLoader
from .plan import EpochLoader, Normalize

LOADER_KINDS = ("auto", "tensor", "dali", "torch")
log = logging.getLogger(__name__)


def choose_loader(source: ArrayDataset | ImageFolder, device: torch.device | str) -> tuple[str, str]:
    """The kind ``auto`` picks, and why: the tensor loader for in-memory data on a GPU, DALI for
    image folders (when installed), the plain torch path elsewhere."""
    dev = resolve_device(device)
    if isinstance(source, ImageFolder):
        ok, msg = dali_status()
        if ok:
            where = "mixed GPU" if dev.type == "cuda" else "CPU"
            return "dali", f"image folder: DALI file reader with {where} JPEG decoding ({msg})"
        kind = "tensor" if dev.type == "cuda" else "torch"
        return kind, f"image folder decoded into memory with PIL, since DALI is unusable: {msg}"
    if dev.type == "cuda":
        return "tensor", "in-memory dataset on a GPU: uint8 split kept on the device"
    return "torch", f"no GPU ({dev}): in-memory batches assembled (and augmented) on the CPU"


def make_loader(kind: str, source: ArrayDataset | ImageFolder, batch_size: int, *, train: bool,
                seed: int, device: torch.device | str = "cpu", augment: bool = True,
                normalize: Normalize | None = None, reason: str | None = None,
                **kw) -> tuple[EpochLoader, str, str]:
    """Build a loader of ``kind`` in ``auto``/``tensor``/``dali``/``torch``.

    Every kind yields (x float32 (B, C, H, W), y int64 (B,)) on ``device`` with the same epochs:
    for the same seed and epoch, the same samples in the same order with the same crops/flips.
    ``reason`` says why the caller chose ``kind`` (then the choice is logged at debug level only;
    default "requested --loader <kind>"). ``kw`` passes loader-specific options (``pad``,
    ``crop_flip``, ``out``; ``storage`` for tensor, ``num_threads`` for dali).

    Returns:
        (loader, chosen kind, reason for the choice); the choice is also logged.

    Raises:
        ValueError: unknown kind. DaliUnavailableError: ``dali`` without a usable DALI.
    """
    if kind not in LOADER_KINDS:
        raise ValueError(f"loader kind must be one of {LOADER_KINDS}, got {kind!r}")
    if not isinstance(source, (ArrayDataset, ImageFolder)):
        raise TypeError(f"make_loader needs an ArrayDataset or ImageFolder; got {type(source).__name__}")
    common = dict(train=train, seed=seed, device=device, augment=augment, normalize=normalize)
    level = logging.INFO
    if kind == "auto":
        kind, reason = choose_loader(source, device)
    elif reason is None:
        reason = f"requested --loader {kind}"
    else:
        level = logging.DEBUG  # the caller chose the kind and says so itself
    loader: EpochLoader
    if kind == "dali":
        require_dali()
        loader = DaliLoader(source, batch_size, **common, **kw)
    else:
        if isinstance(source, ImageFolder):
            log.info("decoding %d images of %s into memory", len(source), source.name)
            source = source.decode()
        # tensor: the split on the device when it fits; torch: the split stays in host memory
        kw.setdefault("storage", "auto" if kind == "tensor" else "host")
        loader = BatchLoader(source, batch_size, **common, **kw)
        if kind == "tensor" and loader.device.type == "cuda" and loader.storage == "host":
            reason += "; the split does not fit in GPU memory, so it is kept in pinned host memory"
    log.log(level, "loader: %s (%s)", kind, reason)
    return loader, kind, reason
