"""``python -m ktg_fast.pretrain``: train a teacher with labels only, where graphs find it.

    python -m ktg_fast.pretrain --model wrn28_2 --dataset cifar100
    python -m ktg_fast.pretrain --model wrn28_2 --dataset cifar100 --val-size 10000   # for a search's split

The checkpoint lands at ``<teachers>/<dataset>[-val<N>]/<model>.pt``; a graph
node with ``checkpoint: pretrained`` loads it.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

from .cli_common import add_data_args, add_recipe_args, data_from_args, recipe_from_args, run_cli, setup_logging

__all__ = ["pretrain_teacher", "main"]


def pretrain_teacher(model: str, data, cfg, *, teacher_dir: Optional[str | os.PathLike] = None,
                     device: str = "auto", step: str = "auto", progress: bool = True,
                     work_dir: Optional[str | os.PathLike] = None) -> Path:
    """Train ``model`` on the labels alone and write it to the teacher folder; return its path.

    The run itself (resumable) lives in ``work_dir`` (default: beside the
    checkpoint, ``<model>.run/``); the checkpoint is written atomically at the end.
    """
    import shutil

    from .data import canonical_name
    from .graph import preset
    from .nodes import default_teacher_dir, teacher_path
    from .trainer import Trainer

    teacher_dir = default_teacher_dir() if teacher_dir is None else Path(teacher_dir)
    dest = teacher_path(teacher_dir, canonical_name(data.dataset), model, data.val_size)
    run_dir = Path(work_dir) if work_dir else dest.with_suffix(".run")
    trainer = Trainer(preset("vanilla", model=model), data, cfg, run_dir, device=device, step=step,
                      progress=progress)
    trainer.run(resume=True)
    src = next((run_dir / "nodes").glob("node1_*.pt"))
    tmp = dest.with_name(dest.name + ".tmp")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ktg_fast.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registry name, e.g. wrn28_2, resnet110")
    p.add_argument("--teachers", default=None, help="teacher folder (default $KTG_TEACHERS or ./teachers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    add_data_args(p)
    add_recipe_args(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    from .data import canonical_name
    from .models import canonical_model_name

    model = canonical_model_name(args.model)
    data = data_from_args(args, test=args.val_size == 0)
    data.dataset = canonical_name(args.dataset)
    dest = pretrain_teacher(model, data, recipe_from_args(args, args.seed), teacher_dir=args.teachers,
                            device=args.device, step=args.step, progress=not args.no_progress)
    print(f"teacher {model} for {data.dataset} written to {dest}")
    return 0


if __name__ == "__main__":
    run_cli(main)
