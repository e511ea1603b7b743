"""Networks of a graph's nodes: building them, model checkpoints, teacher look-up."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .graph import PRETRAINED, Graph
from .io import CheckpointError, atomic_torch_save, check_state_dict, load_checkpoint
from .models import canonical_model_name, get_model

__all__ = [
    "TeacherNotFoundError",
    "build_nodes",
    "describe_checkpoint",
    "load_model_checkpoint",
    "save_model_checkpoint",
    "teacher_path",
    "default_teacher_dir",
]


log = logging.getLogger("ktg_fast")


class TeacherNotFoundError(FileNotFoundError):
    """A frozen node's checkpoint is missing; the message says how to make it."""


def default_teacher_dir() -> Path:
    """``$KTG_TEACHERS`` or ./teachers: where ``python -m ktg_fast.pretrain`` writes and graphs look."""
    return Path(os.environ.get("KTG_TEACHERS", "teachers"))


def teacher_path(teacher_dir: str | os.PathLike, dataset: str, model: str, val_size: int = 0) -> Path:
    """Checkpoint path of a label-only teacher.

    Teachers for a search are trained on the search's training split (the
    validation images held out), so the split is part of the name.
    """
    tag = dataset if val_size == 0 else f"{dataset}-val{val_size}"
    return Path(teacher_dir) / tag / f"{canonical_model_name(model)}.pt"


def save_model_checkpoint(path: str | os.PathLike, model: nn.Module, *, name: str, num_classes: int,
                          in_channels: int, **meta: Any) -> Path:
    """Atomically write one network with what is needed to rebuild it."""
    return atomic_torch_save(
        {"model": canonical_model_name(name), "num_classes": num_classes, "in_channels": in_channels,
         "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **meta},
        path,
    )


def load_model_checkpoint(path: str | os.PathLike, model: nn.Module, *, expect_model: Optional[str] = None) -> dict:
    """Load a checkpoint written by :func:`save_model_checkpoint` (or a bare state dict) into ``model``."""
    path = Path(path)
    ckpt = load_checkpoint(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds no state dict")
    if expect_model and "model" in ckpt and ckpt["model"] != canonical_model_name(expect_model):
        raise CheckpointError(f"{path} holds a {ckpt['model']} but the graph's node is a {expect_model}")
    check_state_dict(model, state, path, what=f"the node's {expect_model or type(model).__name__}")
    model.load_state_dict(state)
    return ckpt


def describe_meta(ckpt: dict) -> str:
    """What a model checkpoint says of itself: ``resnet8, 2 epochs on 1280 training images, test 38.6 %``
    (the parts it records; older files lack the training-set size)."""
    parts = [str(ckpt["model"])] if ckpt.get("model") else []
    if ckpt.get("epochs") is not None:
        n = int(ckpt["epochs"])
        on = ""
        if "train_subset" in ckpt:
            on = f" on {ckpt['train_subset']} training images" if ckpt["train_subset"] else " on the whole training split"
        parts.append(f"{n} epoch{'' if n == 1 else 's'}{on}")
    for split in ("test", "val"):
        acc = ckpt.get(f"{split}_acc")
        if isinstance(acc, (int, float)):
            parts.append(f"{split} {acc:.1f} %")
    return ", ".join(parts) or "no description stored"


def describe_checkpoint(path: str | os.PathLike) -> str:
    """:func:`describe_meta` of the checkpoint file at ``path`` (read with ``weights_only=True``).

    Raises:
        CheckpointError: the file cannot be read as a checkpoint.
    """
    ckpt = load_checkpoint(Path(path))
    return describe_meta(ckpt) if isinstance(ckpt, dict) else "a bare state dict"


def resolve_checkpoint(checkpoint: str, *, model: str, dataset: str, teacher_dir: str | os.PathLike,
                       val_size: int = 0, base_dir: Optional[str | os.PathLike] = None) -> Path:
    """A node's checkpoint path: itself (a relative one taken from ``base_dir``, the graph file's folder,
    when given), or the teacher folder's when it reads ``pretrained``."""
    if checkpoint == PRETRAINED:
        path = teacher_path(teacher_dir, dataset, model, val_size)
        if not path.is_file():
            split = f" --val-size {val_size}" if val_size else ""
            raise TeacherNotFoundError(
                f"no pre-trained {model} for {dataset} at {path}: run `python -m ktg_fast.pretrain --model {model} "
                f"--dataset {dataset}{split} --teachers {teacher_dir}` first"
            )
        return path
    path = Path(checkpoint).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = Path(base_dir) / path
    if not path.is_file():
        raise TeacherNotFoundError(f"checkpoint {path} not found (from the graph file); fix the path or retrain it")
    return path


def build_nodes(graph: Graph, *, num_classes: int, in_channels: int, dataset: str, device: torch.device,
                teacher_dir: str | os.PathLike | None = None, val_size: int = 0) -> list[nn.Module]:
    """One network per graph node, in node order, on ``device``.

    Frozen nodes are loaded from their checkpoints, put in eval mode and have
    ``requires_grad`` off; trainable nodes start from their checkpoint when
    one is set, else from the models' own initialisation (seed beforehand).
    """
    teacher_dir = default_teacher_dir() if teacher_dir is None else teacher_dir
    nets: list[nn.Module] = []
    for t, node in enumerate(graph.nodes, start=1):
        net = get_model(node.model, num_classes=num_classes, in_channels=in_channels)
        if node.checkpoint:
            path = resolve_checkpoint(node.checkpoint, model=node.model, dataset=dataset,
                                      teacher_dir=teacher_dir, val_size=val_size, base_dir=graph.base_dir)
            ckpt = load_model_checkpoint(path, net, expect_model=node.model)
            if graph.is_frozen(t):  # which teacher a run learns from, in its log
                log.info("frozen node %d: %s (%s)", t, path, describe_meta(ckpt))
        net.to(device)
        if graph.is_frozen(t):
            net.eval()
            net.requires_grad_(False)
        nets.append(net)
    return nets
