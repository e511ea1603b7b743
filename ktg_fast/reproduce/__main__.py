"""``python -m ktg_fast.reproduce``: the paper's Tables 1 and 2 in one command.

    python -m ktg_fast.reproduce --dataset cifar100 --out runs/paper
    python -m ktg_fast.reproduce --dataset fashion-mnist --models resnet8 resnet14 wrn10_1 --nodes 2 3 \\
        --epochs 3 --trials 8 --seeds 0 1 2 --train-subset 10000 --out runs/fm --dry-run

Runs the protocol of Tables 1 and 2: each model alone over the seeds; a pre-trained WRN-28-2 teacher and
KD (T = 2) into ResNet32; DML for each node set of Table 2; the graph search for 2, 3 and 4 nodes (target
ResNet32) on the search's validation split, each best graph then retrained from scratch on the whole
training set over the seeds and tested. ``--models`` names the stand-ins of ResNet32, ResNet110 and
WRN-28-2, in that order. Writes ``<out>/results.md`` (both tables, the paper's figure beside ours),
``results.png``, ``commands.sh`` (every sub-run's exact command) and each run's folder under ``runs/``.
Run the same command again to resume: finished sub-runs are skipped, a killed one resumes. ``--dry-run``
prints the plan and its estimated time from a short throughput probe, and trains nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from ..cli_common import (CliParser, add_data_args, add_recipe_args, apply_cpu_threads, dataset_flag,
                          interrupted_exit, remove_if_empty, run_cli, setup_logging)
from ..models import UnknownModelError, available_models, canonical_model_name
from ..report import plural
from ..run_files import format_duration
from ..search.config import SearchConfig
from .paper import ROLE_NAMES, ROLES, TABLE2, model_label
from .plan import Plan, Run, Settings, build_plan, row_keys, settings_key
from .probe import Probe, Sizes, dataset_sizes, device_label, probe_speeds, run_seconds
from .runner import ReproduceError, Runner, check_out
from .table import DATASET_NAMES

__all__ = ["main", "build_parser", "settings_from_args"]

NODE_COUNTS = tuple(sorted({len(r.nodes) for r in TABLE2 if r.kind != "vanilla"}))  # 2, 3, 4
# Flags of the shared data/recipe groups that are not forwarded as they are.
_SPECIAL = {"dataset", "epochs", "val_size", "download", "compile_cache", "no_progress"}
# Flags of this machine: forwarded, but a rerun may change them.
_LOCAL = {"data_root", "loader", "device", "step"}
# Recipe flags reproduce does not take (add_recipe_args(data_order=False)): they retrain one packed search trial
# alone; every run of a reproduction draws its batches from its own seed.
_NOT_TAKEN = {"data_seed", "data_offset"}
RESUME_HINT = "run the same command again to resume (finished sub-runs are kept)"


def build_parser() -> argparse.ArgumentParser:
    p = CliParser(prog="python -m ktg_fast.reproduce", description=__doc__,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder of the reproduction (rerun the command to resume it)")
    p.add_argument("--models", nargs="*", default=list(ROLES), metavar="MODEL",
                   help="stand-ins of ResNet32, ResNet110 and WRN-28-2, in that order (default: those)")
    p.add_argument("--nodes", type=int, nargs="+", default=list(NODE_COUNTS),
                   help="node counts of Table 2 to run (DML, KD, search; default 2 3 4); Table 1 always runs")
    p.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                   help=f"run only these rows (default all): {', '.join(row_keys())}")
    # Read as text and checked by seeds_from_args: an empty or missing value gets a one-line error, not a usage dump.
    p.add_argument("--seeds", nargs="*", default=[0, 1, 2, 3, 4], metavar="SEED",
                   help="seeds of every reported run (default: the paper's five)")
    p.add_argument("--trials", type=int, default=SearchConfig.trials, help="finished trials of each search "
                                                                          f"(default {SearchConfig.trials})")
    p.add_argument("--workers", type=int, default=None, help="worker processes of each search (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time; train nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks with errors")
    add_data_args(p)
    add_recipe_args(p, data_order=False)
    for action in p._actions:
        if action.dest == "val_size":
            action.help = "validation images the searches hold out (default 0: the search's own split); the " \
                          "reported runs train on the whole training set (or --train-subset's images) and test " \
                          "on the test set"
        elif action.dest == "compile_cache":
            action.help = "Inductor's cache for --step compiled, shared by every sub-run (default <out>/inductor-cache)"
    return p


def _flag(action: argparse.Action, value: object) -> list[str]:
    opt = max(action.option_strings, key=len)
    if action.nargs == 0:  # store_true
        return [opt] if value else []
    if action.nargs in ("*", "+"):
        return [opt, *map(str, value)]  # type: ignore[arg-type]
    return [opt, str(value)]


_MODELS_HINT = "--models takes three models: the stand-ins of ResNet32, ResNet110 and WRN-28-2 in that order, " \
               "e.g. --models resnet8 resnet14 wrn10_1"


def seeds_from_args(values: list) -> tuple[int, ...]:
    """``--seeds``' values as whole numbers (``"0 1 2"`` or ``"0,1,2"`` in one value too); at least one."""
    words = [w for v in values for w in str(v).replace(",", " ").split()]
    if not words:
        raise ReproduceError("--seeds: give at least one seed, e.g. --seeds 0 1 2 (or leave the flag out for the "
                             "paper's five, 0 1 2 3 4)")
    seeds, bad = [], []
    for w in words:
        try:
            seeds.append(int(w))
        except ValueError:
            bad.append(w)
    if bad:
        verb = "is not a whole number" if len(bad) == 1 else "are not whole numbers"
        raise ReproduceError(f"--seeds: {', '.join(map(repr, bad))} {verb}; give whole numbers, e.g. --seeds 0 1 2")
    if len(set(seeds)) != len(seeds):
        raise ReproduceError(f"--seeds repeats a seed: {' '.join(map(str, seeds))}; give distinct seeds")
    return tuple(seeds)


def models_from_args(names: list[str]) -> tuple[str, ...]:
    """``--models``' canonical names; an unknown or impossible name, or not three, is a one-sentence error."""
    models, unknown = [], []
    for name in names:
        try:
            models.append(canonical_model_name(name))
        except UnknownModelError:
            unknown.append(name)
        except ValueError as e:  # a pattern with an impossible size (resnet33, wrn27_2): its own reason
            text = (e.args[0] if e.args else str(e)).rstrip(".")
            named = "" if repr(name) in text else f"{name!r}: "
            raise ReproduceError(f"--models: {named}{text} ({_MODELS_HINT})") from None
    if unknown:
        known = [m for m in available_models() if "{" not in m]
        patterns = [m for m in available_models() if "{" in m]
        s = "s" if len(unknown) > 1 else ""
        raise ReproduceError(f"--models: unknown model{s} {', '.join(map(repr, unknown))}; the known models are "
                             f"{', '.join(known)} and any {' or '.join(patterns)} ({_MODELS_HINT})")
    if len(models) != 3:
        raise ReproduceError(f"{_MODELS_HINT}; got {len(models)}")
    return tuple(models)


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Settings:
    """Check the flags and turn them into :class:`~.plan.Settings` (flags forwarded where changed)."""
    models = models_from_args(args.models)
    seeds = seeds_from_args(args.seeds)
    unknown = [r for r in args.rows or () if r not in row_keys()]
    if unknown:
        raise ReproduceError(f"--rows: unknown row {' '.join(unknown)}; the rows are {' '.join(row_keys())} "
                             "(Table 1 by model, then Table 2)")
    bad = [n for n in args.nodes if n not in NODE_COUNTS]
    if bad:
        raise ReproduceError(f"--nodes takes the node counts of Table 2, {' '.join(map(str, NODE_COUNTS))}; got "
                             f"{' '.join(map(str, bad))} (e.g. --nodes 2 3)")
    for flag, value in (("--epochs", args.epochs), ("--trials", args.trials), ("--batch-size", args.batch_size),
                        ("--workers", args.workers or 1)):
        if value < 1:
            raise ReproduceError(f"{flag} must be at least 1; got {value}")
    if args.val_size < 0:
        raise ReproduceError(f"--val-size must be positive, or 0 for the search's own split; got {args.val_size}")
    dataset = dataset_flag(args.dataset)
    shared = argparse.ArgumentParser(add_help=False)
    add_data_args(shared)
    add_recipe_args(shared)
    dests = {a.dest for a in shared._actions} - _SPECIAL - _NOT_TAKEN
    recipe, local = [], []
    for action in parser._actions:
        if action.dest in dests and getattr(args, action.dest) != action.default:
            (local if action.dest in _LOCAL else recipe).extend(_flag(action, getattr(args, action.dest)))
    search_only = (["--val-size", str(args.val_size)] if args.val_size else []) + \
                  (["--workers", str(args.workers)] if args.workers else [])
    return Settings(dataset=dataset, out=Path(args.out), models=models, nodes=tuple(sorted(set(args.nodes))),
                    seeds=seeds, epochs=args.epochs, trials=args.trials, train_subset=args.train_subset,
                    eval_subset=args.eval_subset, val_size=args.val_size, batch_size=args.batch_size,
                    recipe=tuple(recipe), local=tuple(local), rows=tuple(args.rows) if args.rows else None,
                    train_only=("--download",) if args.download else (), search_only=tuple(search_only),
                    cache=Path(args.compile_cache) if args.compile_cache else None)


def measure(plan: Plan, args: argparse.Namespace, cache: Optional[Path] = None) -> tuple[Probe, Sizes, str]:
    """The probe, the dataset's sizes and a note on them (read from ``cache`` when measured the same way).
    A dry run (no ``cache``) or ``--download`` assumes the sizes of a missing dataset; a run without it stops."""
    s = plan.settings
    key = {"dataset": s.dataset, "models": sorted(set(s.models)), "batch_size": s.batch_size, "device": args.device,
           "step": args.step, "precision": args.precision, "channels_last": args.channels_last,
           "val": s.search_val_size()}
    if cache is not None and cache.is_file():
        try:
            d = json.loads(cache.read_text())
            if d["key"] == key:
                return Probe.from_dict(d["probe"]), Sizes(**d["sizes"]), ""
        except (OSError, ValueError, KeyError, TypeError):
            pass
    sizes, note = dataset_sizes(s.dataset, args.data_root, s.search_val_size(),
                                missing_ok=cache is None, download=args.download,
                                fetch=cache is not None and args.download)
    probe = probe_speeds(s.models, dataset=s.dataset, batch_size=s.batch_size, device=args.device, step=args.step,
                         precision=args.precision, channels_last=args.channels_last)
    if cache is not None:
        from ..io import atomic_write_json

        atomic_write_json(cache, {"key": key, "probe": probe.to_dict(), "sizes": asdict(sizes)})
    return probe, sizes, note


def _measure_into(plan: Plan, args: argparse.Namespace) -> tuple[Probe, Sizes, str]:
    """:func:`measure` for a dry run (nothing written) or a run (its probe cached in ``--out``, created here;
    the folders created here and left empty by a failure, e.g. a missing dataset, are removed again)."""
    if args.dry_run:
        return measure(plan, args)
    out = plan.settings.out
    created = [f for f in (out, *out.parents) if not f.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    try:
        return measure(plan, args, out / "probe.json")
    except BaseException:
        for folder in created:
            remove_if_empty(folder)
        raise


def device_hours(seconds: float) -> str:
    """``0.85``, ``12.3``, ``6,166``: hours, to a sensible precision."""
    h = seconds / 3600
    return f"{h:.2f}" if h < 10 else (f"{h:.1f}" if h < 100 else f"{h:,.0f}")


def _what(run: Run, train_subset: Optional[int]) -> str:
    if run.kind == "search":
        return (f"{plural(run.trials, 'trial')} x ~{plural(round(run.work.epochs, 1), 'epoch')} (successive "
                "halving) on the search split, then export")
    if run.kind == "pretrain":
        images = f"the first {train_subset} training images (--train-subset)" if train_subset \
            else "the whole training set"
        return f"teacher: {plural(run.epochs, 'epoch')} on {images}"
    extra = " (+ teachers of its frozen nodes, if any)" if run.kind == "retrain" else ""
    return f"{plural(len(run.seeds), 'seed')} x {plural(run.epochs, 'epoch')}{extra}"


def dry_run_text(plan: Plan, probe: Probe, estimate: Callable[[Run], float]) -> str:
    """The plan: rows, runs in order with their status and estimated time, the total."""
    s = plan.settings
    roles = ", ".join(f"{ROLE_NAMES[r]} -> {model_label(m)}" for r, m in zip(ROLES, s.models))
    ds = DATASET_NAMES.get(s.dataset, s.dataset)
    lines = [f"Plan of the reproduction of Tables 1 and 2 on {ds} in {s.out} (--dry-run: nothing is trained)",
             f"models: {roles}; Table 2 nodes {' '.join(map(str, s.nodes))}; seeds {' '.join(map(str, s.seeds))}; "
             f"{plural(s.epochs, 'epoch')}; {plural(s.trials, 'trial')} per search (validation split of "
             f"{s.search_val_size()} images)"
             + (f"; train subset {s.train_subset}" if s.train_subset else "")
             + (f"; eval subset {s.eval_subset}" if s.eval_subset else ""), "", f"Rows ({len(plan.rows)}):"]
    for row in plan.rows:
        same = plan.same_as(row)
        run = (f"<- {row.run}" + (" (as an earlier row: the stand-ins coincide)" if same else "")) if row.run \
            else "(cited by the paper, not run)"
        lines.append(f"  {row.label:<58} {run}")
    width = max(len(r) for r in plan.runs) + 1
    lines += ["", "Sub-runs, in order:", f"  {'status':<9}{'estimate':>12}  {'run':<{width}} what"]
    total = left = 0.0
    for run in plan.runs.values():
        sec = estimate(run)
        state = "finished" if run.finished() else ("started" if run.started() else "pending")
        total += sec
        left += 0.0 if state == "finished" else sec
        lines.append(f"  {state:<9}{format_duration(sec):>12}  {run.id:<{width}} {_what(run, s.train_subset)}")
    kind = "GPU" if probe.device.startswith("cuda") else "CPU"
    lines += ["", f"Total: {len(plan.runs)} sub-runs, about {format_duration(total)}: {device_hours(total)} "
                  f"{kind}-hours on {device_label(probe.device)}; {format_duration(left)} of it left to run.",
              f"Probe ({probe.step} step, {probe.precision}, batch {probe.batch_size}; a training step, then "
              "evaluating 1,000 images): " + ", ".join(f"{m} {1000 * sp.train_s:.0f} ms, {sp.eval_s * 1000:.2f} s"
                                                         for m, sp in probe.speeds.items()),
              "Run it: the same command without --dry-run (rerun it to resume)."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    apply_cpu_threads(args)
    settings = settings_from_args(parser, args)
    check_out(settings.out, settings_key(settings))  # before anything is measured or written
    plan = build_plan(settings)
    if not plan.rows:
        raise ReproduceError("--rows and --nodes leave no row to run: add rows, or drop --rows")
    if not args.verbose:
        logging.getLogger("ktg_fast").setLevel(logging.WARNING)  # the probe's step notes; sub-runs log their own
        logging.getLogger("ktg_fast.reproduce").setLevel(logging.INFO)
    probe, sizes, note = _measure_into(plan, args)
    if note:
        print(f"note: {note}", file=sys.stderr)

    def estimate(run: Run) -> float:
        return run_seconds(run.work, probe, sizes, train_subset=settings.train_subset,
                           eval_subset=settings.eval_subset)

    if args.dry_run:
        print(dry_run_text(plan, probe, estimate))
        return 0
    try:
        Runner(plan, estimate=estimate, argv=argv, progress=not args.no_progress).run()
    except KeyboardInterrupt as e:  # Ctrl-C (130) or SIGTERM (143), as train and search
        return interrupted_exit(e, RESUME_HINT)
    print((settings.out / "results.md").read_text(), end="")
    print(f"results: {settings.out / 'results.md'}, {settings.out / 'results.png'}; commands: "
          f"{settings.out / 'commands.sh'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run_cli(main, resume_hint=RESUME_HINT)
