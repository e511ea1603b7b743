"""A run's ``checkpoint.pt``: what it holds, writing it, reading and checking it, restoring a step from it.

A checkpoint holds plain types and tensors only (it is read back with ``weights_only=True``):

- ``epoch``, ``step``: the epochs and optimizer steps done;
- ``fingerprint``: the settings that must match for a resume (:func:`run_fingerprint`);
- ``nets``, ``momentum``: each node's ``state_dict`` and SGD momentum buffers by parameter name;
- ``torch_rng``: the CPU generator's state;
- ``loss_scale`` (fp16 runs; absent from older checkpoints): each node's loss scale and growth
  tracker (:meth:`~ktg_fast.steps.TrainStep.loss_scale_state`);
- ``batchnorm`` (optional): what BatchNorm normalised over (the global batch, or each process's slice).

Checkpoints of earlier versions still resume: recipe fields added since take their defaults
(:func:`upgrade_fingerprint`), and one without ``loss_scale`` starts its scales afresh.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from .data.spec import DataSpec
from .graph import Graph
from .io import CheckpointError, atomic_torch_save, check_state_dict, load_checkpoint
from .recipe import TrainConfig
from .run_files import fingerprint_diff
from .steps import TrainStep

if TYPE_CHECKING:
    from .distributed import DistContext

__all__ = ["REQUIRED_KEYS", "checkpoint_payload", "run_fingerprint", "upgrade_fingerprint", "save_checkpoint", "read_checkpoint",
           "restore_checkpoint", "checkpoint_to_resume", "RunExistsError"]

log = logging.getLogger("ktg_fast")


class RunExistsError(FileExistsError):
    """The output folder already holds a run and ``resume`` was not asked for."""

# What every training checkpoint holds ("loss_scale" is optional: fp16 runs since it was added).
REQUIRED_KEYS = ("epoch", "step", "fingerprint", "nets", "momentum", "torch_rng")


def run_fingerprint(graph: Graph, data: DataSpec, cfg: TrainConfig) -> dict:
    """What must match for a checkpoint to be resumed."""
    return {"graph": graph.to_dict(), "dataset": data.dataset, "val_size": data.val_size,
            "train_subset": data.train_subset, "config": cfg.to_dict()}


def upgrade_fingerprint(old: Any) -> Any:
    """A checkpoint's settings as this version names them: recipe fields added since take their
    defaults, fields since removed are dropped (checkpoints of earlier versions still resume)."""
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return old
    defaults = TrainConfig().to_dict()
    cfg = {k: v for k, v in old["config"].items() if k in defaults}
    return {**old, "config": {**{k: v for k, v in defaults.items() if k not in cfg}, **cfg}}


def checkpoint_payload(*, epoch: int, step: int, fingerprint: dict, nets: list, momentum: list,
                       loss_scale: Optional[dict]) -> dict:
    """What ``checkpoint.pt`` holds (see the module's docstring); the CPU generator's state is taken now."""
    return {"epoch": epoch, "step": step, "fingerprint": fingerprint, "nets": nets, "momentum": momentum,
            "torch_rng": torch.get_rng_state(), "loss_scale": loss_scale}


def save_checkpoint(path: Path, *, epoch: int, step: int, fingerprint: dict, train_step: TrainStep,
                    batchnorm: Optional[str] = None) -> None:
    """Write ``train_step``'s state after ``epoch`` epochs and ``step`` steps to ``path``, atomically.

    ``batchnorm``: what the BatchNorm layers normalised over (``"global batch"``, or a data-parallel
    run's per-process slice), so a resume that changes it can say so.
    """
    payload = checkpoint_payload(epoch=epoch, step=step, fingerprint=fingerprint, nets=train_step.node_state_dicts(),
                                 momentum=train_step.momentum_buffers(), loss_scale=train_step.loss_scale_state())
    if batchnorm is not None:
        payload["batchnorm"] = batchnorm
    atomic_torch_save(payload, path)


def read_checkpoint(path: Path, fingerprint: dict) -> dict:
    """Load ``path`` (tensors and plain types only) and check it was written with ``fingerprint``'s settings.

    Raises:
        CheckpointError: not a readable training checkpoint of ktg_fast.
        ValueError: written with other settings (the message lists the differences).
    """
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path} is not a training checkpoint of ktg_fast (it lacks "
                              f"{[k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]}); "
                              "move it away or choose another --out folder")
    diffs = fingerprint_diff(upgrade_fingerprint(ckpt["fingerprint"]), fingerprint)
    if diffs:
        raise ValueError(f"{path} was written with other settings: {'; '.join(diffs)}. Resume with the "
                         "same settings, or use another --out folder for a new run")
    return ckpt


def restore_checkpoint(ckpt: dict, path: Path, train_step: TrainStep, graph: Graph) -> tuple[int, int]:
    """Load a checked checkpoint's weights, momentum, loss scales and RNG into ``train_step``;
    return its (epoch, step).

    Raises:
        CheckpointError: its networks, buffers or loss scales do not fit ``graph``'s nodes.
    """
    if len(ckpt["nets"]) != len(train_step.nets):
        raise CheckpointError(f"{path} holds {len(ckpt['nets'])} networks, the graph has {len(train_step.nets)}")
    for t, (net, state, node) in enumerate(zip(train_step.nets, ckpt["nets"], graph.nodes), start=1):
        check_state_dict(net, state, path, what=f"node {t} ({node.model})")
    try:
        train_step.load_node_state_dicts(ckpt["nets"])
        train_step.load_momentum_buffers(ckpt["momentum"])
        train_step.load_loss_scale_state(ckpt.get("loss_scale"))
        torch.set_rng_state(ckpt["torch_rng"])
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path} does not fit this run: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return ckpt["epoch"], ckpt["step"]


def checkpoint_to_resume(out: Path, fingerprint: dict, *, resume: bool,
                         dist: Optional["DistContext"] = None) -> Optional[dict]:
    """The checked ``<out>/checkpoint.pt`` to resume, or None for a fresh run; nothing is written.

    With several processes (``dist``) rank 0 reads it (the others need not see the file) and hands it, or
    its error, to every rank, so all of them raise or resume alike.

    Raises:
        ValueError: ``out`` is a file; a checkpoint written with other settings.
        RunExistsError: a run is there and ``resume`` is False; a finished run without its checkpoint.
        CheckpointError: an unreadable checkpoint.
    """
    path = out / "checkpoint.pt"
    ckpt, err = None, None
    if dist is None or dist.is_main:
        try:
            if out.exists() and not out.is_dir():
                raise ValueError(f"--out {out} is a file, not a folder: choose a folder path for the run")
            if path.exists():
                if not resume:
                    raise RunExistsError(f"{out} already holds a run: pass --resume to continue it, "
                                         "or choose another --out")
                ckpt = read_checkpoint(path, fingerprint)
            elif resume and (out / "final.json").exists():
                # A finished run whose checkpoint is gone: training anew would overwrite its results.
                raise RunExistsError(f"{out} holds a finished run (final.json) but no checkpoint.pt to resume: "
                                     "nothing to continue, and its results stay as they are; to train it again, "
                                     "choose another --out")
            elif resume:
                log.info("no checkpoint in %s to resume: starting a fresh run", out)
        except Exception as e:
            if dist is None:
                raise
            err = e
    if dist is not None:
        ckpt, err = dist.broadcast_object((ckpt, err))
        if err is not None:
            dist.raise_main_error(err)
    if err is not None:
        raise err
    return ckpt
