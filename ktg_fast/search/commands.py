"""The ``python -m ktg_fast.train`` command lines a search prints and records: retrain a found graph
(export), or replay one trial alone exactly (each ``trial.json``'s ``"replay"``)."""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any, Optional

from ..data import canonical_name
from ..recipe import TrainConfig
from ..steps import CPU_AUTO_KIND
from .config import SearchConfig

__all__ = ["retrain_command", "replay_command"]


def _absolute(path: "str | Path") -> str:
    """A path as the commands print it: absolute, so that they run from any folder."""
    return str(Path(path).expanduser().absolute())


def _recipe_flags(cfg: SearchConfig) -> list[str]:
    """The search's dataset, epochs, subsets and recipe, as ``train`` flags (defaults left out)."""
    parts = ["--dataset", canonical_name(cfg.dataset)]
    if cfg.data_root:
        parts += ["--data-root", _absolute(cfg.data_root)]
    parts += ["--epochs", str(cfg.epochs)]
    for flag, value in (("--train-subset", cfg.train_subset), ("--eval-subset", cfg.eval_subset)):
        if value:
            parts += [flag, str(value)]
    for name in ("batch_size", "lr", "momentum", "weight_decay", "gamma"):
        if getattr(cfg, name) != getattr(TrainConfig, name):
            parts += ["--" + name.replace("_", "-"), str(getattr(cfg, name))]
    if cfg.milestones is not None:
        parts += ["--milestones", *map(str, cfg.milestones)]
    if not cfg.nesterov:
        parts.append("--no-nesterov")
    if not cfg.augment:
        parts.append("--no-augment")
    return parts


def retrain_command(cfg: SearchConfig, graph: Path, frozen: bool) -> str:
    """``python -m ktg_fast.train`` of ``graph`` with the search's dataset, epochs, subsets and recipe.

    A graph with frozen nodes keeps the search's validation split and teacher folder (its teachers were
    pre-trained on that split); otherwise it trains on the whole training set and reports test accuracy.
    """
    parts = ["python", "-m", "ktg_fast.train", "--graph", _absolute(graph), *_recipe_flags(cfg)]
    if frozen:
        parts += ["--val-size", str(cfg.resolved_val_size()), "--teachers", _absolute(cfg.teacher_dir())]
    out = Path(cfg.out).absolute()
    parts += ["--out", str(out.parent / f"{out.name}-best")]
    return " ".join(shlex.quote(p) for p in parts)


def replay_command(cfg: SearchConfig, info: dict[str, Any], folder: Path, *, threads: Optional[int] = None,
                   frozen: bool = False) -> str:
    """``python -m ktg_fast.train`` that trains one trial alone as the search did: its graph, seed, validation
    split, teachers, step path and precision, and (a packed trial) the pack's batches (``--data-seed``,
    ``--data-offset``).  With ``threads`` (the worker's CPU threads) a CPU run of the eager step of a trial
    that trained alone ends with its weights bit for bit; otherwise they agree up to float32 rounding (a
    pack's loss and fused groups sum over more nodes).

    Args:
        cfg: the search's settings.
        info: the trial's ``trial.json`` fields (``seed``, ``val_size``, ``data_seed``/``data_offset`` if packed).
        folder: the trial's folder (its ``graph.yaml``; the replay goes to ``<folder>/replay``).
        threads: the CPU threads the trial ran with (a CPU run); None on a GPU.
        frozen: the graph has frozen nodes (their teachers come from the search's teacher folder).
    """
    parts = ["python", "-m", "ktg_fast.train", "--graph", _absolute(folder / "graph.yaml"), *_recipe_flags(cfg),
             "--val-size", str(info["val_size"])]
    if frozen:
        parts += ["--teachers", _absolute(cfg.teacher_dir())]
    parts += ["--seeds", str(info["seed"])]
    packed = info.get("data_seed") is not None
    if packed:
        parts += ["--data-seed", str(info["data_seed"]), "--data-offset", str(info.get("data_offset", 0))]
    if cfg.step != "auto":
        parts += ["--step", cfg.step]
    elif packed and threads:
        parts += ["--step", CPU_AUTO_KIND]  # a CPU pack never compiles; a long lone run on auto would
    if cfg.precision:
        parts += ["--precision", cfg.precision]
    if cfg.channels_last:
        parts.append("--channels-last")
    if threads:
        parts += ["--cpu-threads", str(threads)]
    parts += ["--out", _absolute(folder / "replay")]
    return " ".join(shlex.quote(p) for p in parts)
