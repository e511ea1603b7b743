"""``python -m ktg_fast.train``: train a knowledge transfer graph, over one or several seeds.

    python -m ktg_fast.train --graph dml --dataset fashion-mnist --epochs 2 --out runs/dml
    python -m ktg_fast.train --graph my_graph.yaml --dataset cifar100 --seeds 0 1 2 3 4 --out runs/ktg4

With one seed the run is written into ``<out>`` itself; with several, seed N
trains in ``<out>/seed<N>/``. A markdown table of every node's final accuracy
(mean +- std over the seeds) is printed and saved as ``<out>/results.md``.
``--out`` must be new, empty, or a folder of the same kind of run (``--resume``
continues it); a search's folder or other files are refused.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .cli_common import (CliParser, add_data_args, add_recipe_args, apply_cpu_threads, check_out_dir, check_world_batch,
                         data_from_args, is_launcher_main,
                         out_dir_lock, recipe_from_args, remove_if_empty, run_cli, setup_logging, start_distributed,
                         stop_distributed)
from .graph import PRESETS, Graph, load_graph
from .io import atomic_write_json, atomic_write_text
from .report import seeds_table
from .trainer import Trainer

log = logging.getLogger("ktg_fast")


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m ktg_fast.train", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--graph", required=True, help="a preset (vanilla, dml, kd) or a .yaml/.json graph file")
    p.add_argument("--nodes", type=int, default=None, help="number of nodes of the dml preset (default 2)")
    p.add_argument("--model", default=None, help="model of the presets' nodes (default resnet32)")
    p.add_argument("--teacher", default=None, help="teacher model of the kd preset (default wrn28_2)")
    p.add_argument("--temperature", type=float, default=None, help="override the graph's temperature")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True,
                   help="output folder: the run itself with one seed, <out>/seed<N>/ per seed with several")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run in --out (a run with no checkpoint yet starts fresh)")
    p.add_argument("--teachers", default=None, help="teacher checkpoint folder (default $KTG_TEACHERS or ./teachers)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks with errors")
    add_data_args(p)
    add_recipe_args(p)
    return p


def load_graph_arg(args: argparse.Namespace):
    kw = {k: v for k, v in (("nodes", args.nodes), ("model", args.model), ("teacher", args.teacher)) if v is not None}
    if kw and args.graph not in PRESETS:
        raise ValueError("--nodes/--model/--teacher apply to presets only; edit the graph file instead")
    g = load_graph(args.graph, **kw)
    if args.temperature is not None:
        g.temperature = float(args.temperature)
        g.validate()
    if g.label_free:
        log.warning("no edge of --graph %s leaves the label (node 0) and no node is a pre-trained teacher: no node "
                    "ever sees a label, so all stay near chance accuracy; give a node a label edge (gates[0][t])",
                    args.graph)
    return g


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    apply_cpu_threads(args)
    graph = load_graph_arg(args)
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeats a seed: {args.seeds}")
    check_world_batch(args)
    main_rank = is_launcher_main()  # under torchrun rank 0 alone creates --out (and removes it after a refusal)
    created = main_rank and not Path(args.out).exists()
    out = check_out_dir(args.out, seeds=len(args.seeds), create=main_rank)  # before any data is loaded
    try:
        with out_dir_lock(out):  # a second run into the same --out is refused
            _train(args, graph, out)
    except BaseException:
        if created:  # refused before anything was written (a batch too small to split, a bad device...)
            remove_if_empty(out)
        raise
    return 0


def _train(args: argparse.Namespace, graph: Graph, out: Path) -> None:
    """Train one run per seed into ``out`` and write the table of their final accuracies."""
    dist = start_distributed(args)  # several processes under torchrun: data-parallel, rank 0 writes
    main_rank = dist is None or dist.is_main
    finished = False
    try:
        finals = []
        for seed in args.seeds:
            run_dir = out / f"seed{seed}" if len(args.seeds) > 1 else out
            trainer = Trainer(graph, data_from_args(args), recipe_from_args(args, seed), run_dir, device=args.device,
                              step=args.step, teacher_dir=args.teachers, progress=not args.no_progress,
                              compile_cache=args.compile_cache or out / "inductor-cache", dist=dist)
            final = trainer.run(resume=args.resume)
            finals.append(final)
            metric = "test_acc" if "test_acc" in final else "val_acc"
            accs = ", ".join(f"node {t} {a:.2f}%" for t, a in enumerate(final[metric], start=1))
            if main_rank:
                print(f"seed {seed}: {metric} {accs}  ({run_dir})")
        finished = True
    finally:
        stop_distributed(dist, finished=finished)
    if main_rank:
        metric = "test_acc" if "test_acc" in finals[0] else "val_acc"
        table = seeds_table(finals, metric=metric)
        atomic_write_text(out / "results.md", table)
        atomic_write_json(out / "results.json", finals)
        print(table, end="")


if __name__ == "__main__":
    run_cli(main)
