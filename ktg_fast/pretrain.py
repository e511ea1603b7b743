"""``python -m ktg_fast.pretrain``: train a teacher with labels only, where graphs find it.

    python -m ktg_fast.pretrain --model wrn28_2 --dataset cifar100
    python -m ktg_fast.pretrain --model wrn28_2 --dataset cifar100 --val-size 10000   # for a search's split

The checkpoint lands at ``<teachers>/<dataset>[-val<N>]/<model>.pt``; a graph
node with ``checkpoint: pretrained`` loads it. The training run itself (metrics,
per-epoch checkpoint) lives in ``--out``, by default beside the checkpoint
(``<model>.run/``); rerunning the same command resumes it. A teacher file that another run wrote is
never replaced silently: that takes ``--replace`` (or another ``--teachers`` folder keeps both).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .cli_common import (CliParser, add_data_args, add_recipe_args, apply_cpu_threads, check_out_dir, check_world_batch,
                         data_from_args, is_launcher_main,
                         recipe_from_args, run_cli, setup_logging, start_distributed, stop_distributed)
from .data import canonical_name
from .models import canonical_model_name
from .nodes import default_teacher_dir, teacher_path
from .teachers import pretrain_teacher, refuse_replacing

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = CliParser(prog="python -m ktg_fast.pretrain", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="registry name, e.g. wrn28_2, resnet110")
    p.add_argument("--teachers", default=None, help="teacher folder (default $KTG_TEACHERS or ./teachers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None,
                   help="folder of the training run (resumed when rerun; default <teachers>/<dataset>/<model>.run)")
    p.add_argument("--replace", action="store_true",
                   help="train a new teacher in place of an existing one that another run wrote (refused without)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks with errors")
    add_data_args(p)
    add_recipe_args(p)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    apply_cpu_threads(args)

    model = canonical_model_name(args.model)
    data = data_from_args(args, test=args.val_size == 0)
    data.dataset = canonical_name(args.dataset)
    teachers = default_teacher_dir() if args.teachers is None else Path(args.teachers)
    dest = teacher_path(teachers, data.dataset, model, data.val_size)
    if dest.is_dir():
        raise ValueError(f"{dest} is a folder, not a teacher checkpoint: move it away or choose other --teachers")
    check_world_batch(args)
    work_path = Path(args.out) if args.out else dest.with_suffix(".run")
    if not args.replace:  # before anything is made (pretrain_teacher checks again under the run's lock)
        refuse_replacing(dest, work_path, model)
    # Under torchrun rank 0 alone creates the run folder.
    work = check_out_dir(work_path, create=is_launcher_main())
    dist = start_distributed(args)  # several processes under torchrun: data-parallel, rank 0 writes
    finished = False
    try:  # (pretrain_teacher refuses a second pretraining into the same folder)
        dest = pretrain_teacher(model, data, recipe_from_args(args, args.seed), teacher_dir=teachers,
                                device=args.device, step=args.step, progress=not args.no_progress, work_dir=work,
                                compile_cache=args.compile_cache or work / "inductor-cache", dist=dist,
                                replace=args.replace)
        finished = True
    finally:
        stop_distributed(dist, finished=finished)
    if dist is None or dist.is_main:
        print(f"teacher {model} for {data.dataset} written to {dest}")
    return 0


if __name__ == "__main__":
    run_cli(main, resume_hint="run the same command again to continue (it resumes its run folder)")
