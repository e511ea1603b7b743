"""``python -m ktg_fast.search``: ASHA over knowledge transfer graphs, on one machine or many.

    python -m ktg_fast.search --nodes 3 --target resnet32 --dataset cifar100 --trials 1500 --out runs/s3
    python -m ktg_fast.search --nodes 3 ... --storage postgresql://user@host/db --study s3   # on every machine
    python -m ktg_fast.search --out runs/s3                  # run again: resumes the same study
    python -m ktg_fast.search export --out runs/s3 --top 5   # best graphs, trials table, plots
    python -m ktg_fast.train --graph runs/s3/best/graph.yaml --dataset cifar100 --out runs/s3-best  # export prints it

A quick real search on CPU (a few minutes):

    python -m ktg_fast.search --nodes 2 --target resnet8 --models resnet8 --dataset fashion-mnist \\
        --trials 6 --epochs 2 --train-subset 5000 --out runs/demo
    python -m ktg_fast.search export --out runs/demo

Trials train on the dataset's search split (e.g. CIFAR 40k train / 10k
validation) and are pruned by successive halving on the target's validation
accuracy; the test set is never read.  ``--trials N`` counts finished trials
(complete, pruned or failed); trials rejected before training (frozen target,
a graph already tried) do not count.  Settings, the study's name and the
sampler seeds are saved in <out>/search.json (a renamed or copied folder resumes its study);
the embedded study is <out>/study.db (open it with
``optuna-dashboard sqlite:///<out>/study.db``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from ..cli_common import CliParser, positive_int, setup_logging, step_flag, subset_size
from ..data.factory import LOADER_KINDS
from ..steps import DEPRECATED_STEP_KINDS, PRECISIONS, STEP_KINDS
from .commands import retrain_command
from .config import CONFIG_FILE, SearchConfig, load_config, spec_differences
from .export import export_study
from ..run_files import format_duration
from .run import make_worker, run_search
from .space import DEFAULT_GATES, DEFAULT_MODELS, SearchError
from .storage import sqlite_path, storage_errors
from .study import open_for_reading

__all__ = ["main", "build_parser"]

log = logging.getLogger("ktg_fast.search")

S = argparse.SUPPRESS  # absent flags stay absent: a rerun keeps the saved settings


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m ktg_fast.search", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=S)
    p.add_argument("--out", required=True, help="output folder: settings, study file, trial folders, exports")
    g = p.add_argument_group("search space (paper: 3 nodes, ResNet32 target)")
    g.add_argument("--nodes", type=int, help="network nodes N, target included (default 3; at least 2)")
    g.add_argument("--target", help="model of the target node 1 (default resnet32)")
    g.add_argument("--models", nargs="+", help=f"choices for the auxiliary nodes (default {' '.join(DEFAULT_MODELS)})")
    g.add_argument("--gates", nargs="+", help=f"choices for every edge (default {' '.join(DEFAULT_GATES)})")
    g.add_argument("--temperature", type=float, help="T of the KL edges (default 1)")
    g = p.add_argument_group("budget and pruning")
    g.add_argument("--trials", type=int, help="finished trials to reach (default 1500); a rerun may raise it")
    g.add_argument("--epochs", type=int, help="epochs of a trial that is never pruned (default 200)")
    g.add_argument("--sampler", choices=["random", "tpe"], help="graph sampler (default random, as in the paper)")
    g.add_argument("--min-resource", type=int, help="epochs before the first rung (default 1)")
    g.add_argument("--reduction-factor", type=int, help="1/rf of the trials pass each rung (default 2)")
    g.add_argument("--min-early-stopping-rate", type=int, help="skip the first rungs (default 0)")
    g = p.add_argument_group("data (the search split; never the test set)")
    g.add_argument("--dataset", help="cifar10, cifar100, fashion-mnist, tiny-imagenet or synthetic")
    g.add_argument("--data-root", help="dataset folder (default $KTG_DATA_ROOT or ./data)")
    g.add_argument("--val-size", type=int, help="validation images held out of train (default: the dataset's "
                                                  "search split, 10000 for CIFAR/Tiny-ImageNet/Fashion-MNIST)")
    g.add_argument("--train-subset", type=subset_size, metavar="N",
                   help="train on only the first N training images (quick runs)")
    g.add_argument("--eval-subset", type=subset_size, metavar="N",
                   help="validate on only the first N validation images (quick runs)")
    g.add_argument("--loader", choices=LOADER_KINDS, help="input pipeline (default auto)")
    g = p.add_argument_group("recipe (defaults: the paper's)")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--no-nesterov", dest="nesterov", action="store_false")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--milestones", type=int, nargs="*", help="epochs of the x0.1 steps (default: scaled to --epochs)")
    g.add_argument("--gamma", type=float)
    g.add_argument("--no-augment", dest="augment", action="store_false")
    g.add_argument("--seed", type=int, help="trial t trains with seed + t; worker k's sampler is seeded from "
                                              "seed and k, so the same flags draw the same graphs (default 0)")
    g = p.add_argument_group("teachers of frozen nodes")
    g.add_argument("--teachers", help="teacher folder (default $KTG_TEACHERS or ./teachers; <out>/teachers "
                                      "with --train-subset)")
    g.add_argument("--teacher-epochs", type=int, help="epochs of teachers pre-trained on demand (default --epochs)")
    g.add_argument("--no-pretrain", dest="pretrain", action="store_false",
                   help="never pre-train: missing teachers are an error")
    g = p.add_argument_group("storage, workers, fault tolerance")
    g.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user@host/db (default "
                                     "sqlite:///<out>/study.db)")
    g.add_argument("--study", help="study name (default: the one saved in <out>/search.json; for a new search "
                                   "the --out folder's name)")
    g.add_argument("--workers", type=int, help="local worker processes (default 1; several per GPU are fine; "
                                               "with several GPUs they are spread over them)")
    g.add_argument("--pack", type=pack_size, metavar="K|auto",
                   help="trials each worker trains at once as one packed computation (default auto: measured on "
                        "the device when the search starts; 1 where packing is no faster). A packed trial equals "
                        "the same trial trained alone on the pack's batches (its data_seed/data_offset)")
    g.add_argument("--heartbeat", type=int, help="seconds between a running trial's heartbeats (default 60)")
    g.add_argument("--grace", type=int, help="seconds without heartbeat before a trial is failed and re-queued "
                                             "(default 2 x --heartbeat)")
    g.add_argument("--max-retry", type=int, help="re-runs of a trial whose worker died (default 3)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    g.add_argument("--step", type=step_flag, choices=(*STEP_KINDS, *DEPRECATED_STEP_KINDS),
                   help="training-step path (default auto)")
    g.add_argument("--precision", choices=PRECISIONS, help="forward arithmetic (default: fp32 on the CPU, bf16 on "
                                                           "a CUDA device that has it)")
    g.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    g.add_argument("--compile-cache", metavar="DIR", help="Inductor's cache, shared by every trial and worker "
                                                          "(default <out>/inductor-cache)")
    g.add_argument("--cpu-threads", type=int, help="torch threads per worker on CPU (default: cores / workers)")
    g.add_argument("--poll", dest="poll_s", type=float, help="seconds between storage polls (default 5)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no live progress line")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def build_export_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m ktg_fast.search export",
                  description="Best graphs (YAML, DOT, PNG), a table of trials and plots of a search. "
                              "Works while the search runs.")
    p.add_argument("--out", required=True, help="the search's output folder")
    p.add_argument("--top", type=positive_int, default=5, help="graphs to export (default 5)")
    p.add_argument("--storage", default=None, help="storage URL (default: the one in <out>/search.json)")
    p.add_argument("--study", default=None, help="study name (default: the one in <out>/search.json)")
    p.add_argument("--to", default=None, help="write here instead of <out>")
    return p


def pack_size(text: str) -> int | str:
    """``--pack``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"give a positive number of trials per worker, or auto; got {text!r}")
    return k


# -------------------------------------------------------------------- config
def resolve_config(args: argparse.Namespace) -> tuple[SearchConfig, bool]:
    """Saved settings of ``--out`` updated by the flags given; returns (config, --trials given)."""
    given = {k: v for k, v in vars(args).items() if k not in ("progress", "verbose", "out")}
    saved = load_config(args.out)
    if saved is None:
        cfg = SearchConfig(out=args.out, **given)
    else:
        cfg = SearchConfig.from_dict({**saved.to_dict(), **given, "out": args.out})
        if given:
            cfg.validate()
            diffs = spec_differences(saved.study_spec(), cfg.study_spec())
            if "teacher_epochs" not in given and any(d.startswith("epochs:") for d in diffs):
                diffs = [d for d in diffs if not d.startswith("teacher_epochs:")]  # it follows --epochs: one fault
            if diffs:
                raise SearchError(f"{args.out} holds a search with other settings (saved vs this command: "
                                  f"{'; '.join(diffs)}). Drop those flags to resume it, or use another --out")
    if isinstance(cfg.models, str) or isinstance(cfg.gates, str):
        raise SearchError("--models and --gates take names separated by spaces")
    cfg.validate()
    return cfg, "trials" in given


# The files and folders a search writes into --out (besides lock and temporary files).
SEARCH_NAMES = frozenset({CONFIG_FILE, "study.db", "study.db-wal", "study.db-shm", "study.db-journal", "trials", "logs",
                          "teachers", "best", "top", "trials.md", "trials.json", "history.png", "intermediate.png",
                          "inductor-cache"})
# What a training run (python -m ktg_fast.train / pretrain) writes.
RUN_NAMES = frozenset({"metrics.jsonl", "checkpoint.pt", "final.json", "graph.yaml", "nodes", "results.md",
                       "config.json", "run.json"})


def check_out(out: str) -> None:
    """Refuse an ``--out`` that is a file or holds another kind of output; a search's own folder is fine."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise SearchError(f"--out {out} is a file: give a folder (a new one, or a search's own to resume it)")
    if not path.is_dir() or (path / CONFIG_FILE).is_file():
        return
    foreign = sorted(n for n in os.listdir(path)
                     if n not in SEARCH_NAMES and not n.endswith(".lock") and not (n.startswith(".") and ".tmp" in n))
    if not foreign:
        return
    if any(n in RUN_NAMES or (n.startswith("seed") and n[4:].isdigit()) for n in foreign):
        what = "a training run (python -m ktg_fast.train)"
    else:
        what = "files that are not a search's"
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    raise SearchError(f"--out {out} already holds {what}: {shown}. A search writes into a new or empty folder, or "
                      f"resumes its own (one with {CONFIG_FILE}): use another --out")


def worker_main(argv: list[str]) -> int:
    """``python -m ktg_fast.search worker --out DIR --worker-id K`` (started by the search itself)."""
    p = CliParser(prog="python -m ktg_fast.search worker")
    p.add_argument("--out", required=True)
    p.add_argument("--worker-id", type=int, default=0)
    p.add_argument("--pack", type=int, default=None, help="trials at once (default: search.json's, auto -> 1)")
    args = p.parse_args(argv)
    cfg = load_config(args.out)
    if cfg is None:
        raise SearchError(f"{args.out} holds no search.json: start the search with `python -m ktg_fast.search ...`")
    k = args.pack or (cfg.pack if isinstance(cfg.pack, int) else 1)
    try:
        with storage_errors(cfg.storage_url()):
            n = make_worker(cfg, args.worker_id, k).run()
    except KeyboardInterrupt:
        return 130
    log.info("worker %d done after %d trial%s", args.worker_id, n, "" if n == 1 else "s")
    return 0


def export_main(argv: list[str]) -> int:
    args = build_export_parser().parse_args(argv)
    cfg = load_config(args.out)
    if cfg is None and args.storage is None:
        if not Path(args.out).exists():
            raise SearchError(f"--out {args.out} does not exist: give the folder a search wrote (the one its "
                              f"`python -m ktg_fast.search ... --out` named), or --storage (and --study)")
        raise SearchError(f"{args.out} holds no search.json: give the folder a search wrote, or --storage "
                          f"(and --study) to export from a storage")
    url = args.storage or cfg.storage_url()
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise SearchError(f"no study file {db}: the search has not started in {args.out} (or give --storage)")
    if db is not None and db.stat().st_size == 0:
        raise SearchError(f"the study file {db} is empty (0 bytes): it holds no study to export; restore it from a "
                          f"backup (each trial's graph and metrics are also in {db.parent / 'trials'})")
    # (a search.json without a study name, in a renamed folder: the embedded storage's only study)
    name = args.study
    if name is None and cfg is not None and args.storage is None:
        name = cfg.study or (None if db is not None else cfg.study_name())
    with storage_errors(url):
        study = open_for_reading(url, name)
        res = export_study(study, args.to or args.out, top=args.top, url=url)
    s = res["summary"]
    print(f"{s['done']}/{s['budget']} trials finished (complete {s['complete']}, pruned {s['pruned']}, "
          f"failed {s['failed']}, running {s['running']})")
    for r in res["top"]:
        print(f"  #{r['rank']}: trial {r['trial']}, target val {r['value']:.2f}%")
    dest = Path(args.to or args.out)
    if res["top"]:
        print(f"best graph: {dest / 'best' / 'graph.yaml'}")
        if cfg is not None:
            print("retrain it with the search's settings" + _retrain_note(res["top"][0], cfg.workers > 1) + ":\n  "
                  + retrain_command(cfg, dest / "best" / "graph.yaml", res["top"][0].get("frozen", False)))
    else:
        print("no completed trial yet: no graph exported")
    for note in res.get("notes", []):
        print(f"warning: {note}", file=sys.stderr)
    print(f"table: {dest / 'trials.md'}; plots: {dest / 'history.png'}, {dest / 'intermediate.png'}")
    return 0


def _retrain_note(top: dict, several_workers: bool) -> str:
    """How long the retrain takes, from the trial's own time (``several_workers``: they shared the machine)."""
    t = top.get("time_s")
    if not t:
        return " (--seeds 0 1 2 3 4 for mean +- std takes 5x as long)"
    shared = " in a pack" if top.get("packed") else " beside other workers" if several_workers else ""
    alone = ": alone, less" if shared else ""
    return (f" (about {format_duration(t)}, as long as trial {top['trial']} took{shared}{alone}; "
            "--seeds 0 1 2 3 4 for mean +- std takes 5x that)")


def _quiet(verbose: bool) -> None:
    """Log the search's own events; the trainer's and loaders' per-run notes only with -v."""
    setup_logging(verbose)
    if not verbose:
        logging.getLogger("ktg_fast").setLevel(logging.WARNING)
        logging.getLogger("ktg_fast.search").setLevel(logging.INFO)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "export":
        setup_logging(False)
        return export_main(argv[1:])
    if argv and argv[0] == "worker":
        _quiet("-v" in argv)
        return worker_main([a for a in argv[1:] if a != "-v"])
    if argv and argv[0] == "run":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    _quiet(getattr(args, "verbose", False))
    check_out(args.out)
    cfg, trials_given = resolve_config(args)
    return run_search(cfg, trials_given=trials_given, progress=getattr(args, "progress", True))
