"""Running a search: preflight checks, the study, the local workers (inline or as processes), the outcome."""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from tqdm.contrib.logging import logging_redirect_tqdm

from ..data import canonical_name, dataset_info, load_dataset
from .config import SearchConfig
from .ledger import ATTR_FAIL, Ledger
from .progress import Progress
from .space import SearchError
from .storage import checkpoint_sqlite, storage_errors
from .storage_url import mask_url, sqlite_path
from .study import BUDGET_ATTR, create_or_join, open_for_reading
from .teachers import missing_teachers, pretrain_hint, teacher_file
from ..cli_common import interrupted_exit
from ..report import plural
from .worker import Worker, raise_interrupt

__all__ = ["run_search", "make_worker", "resolve_pack"]

log = logging.getLogger("ktg_fast.search")


def _preflight(cfg: SearchConfig) -> None:
    """Check what a worker would stumble on, before any trial starts."""
    name = canonical_name(cfg.dataset)
    dataset_info(name)
    if name != "tiny-imagenet":  # loading its JPEG folder takes long; its workers report a missing folder
        n = len(load_dataset(name, cfg.data_root, split="train"))
        val = cfg.resolved_val_size()
        if not 0 < val < n:
            raise SearchError(f"--val-size {val} does not fit the {n} training images of {name}")
        if cfg.train_subset and cfg.train_subset < cfg.batch_size:
            raise SearchError(f"--train-subset {cfg.train_subset} is smaller than one batch ({cfg.batch_size})")
    if not cfg.pretrain and "cutoff" in cfg.space().gates:
        missing = missing_teachers(cfg, cfg.space().models)
        if missing:
            raise SearchError("--no-pretrain is set but auxiliary nodes may be frozen and these teachers are missing: "
                              + "; ".join(f"{m} ({teacher_file(cfg, m)})" for m in missing)
                              + f". Train them first, e.g. `{pretrain_hint(cfg, missing[0])}`, "
                              "or drop --no-pretrain")


# ---------------------------------------------------------------------- pack
def make_worker(cfg: SearchConfig, worker_id: int, pack: int) -> Worker:
    """The lone-trial worker for ``pack`` 1, else a :class:`~.pack_worker.PackWorker` of ``pack`` slots."""
    if pack <= 1:
        return Worker(cfg, worker_id)
    from .pack_worker import PackWorker  # local: imports the pack trainer only when packing

    return PackWorker(cfg, worker_id, pack=pack)


def resolve_pack(cfg: SearchConfig) -> int:
    """``--pack``: the number given, or for ``auto`` the probe's choice on this machine's device, with the
    CPU threads one worker gets (printed with its measurements)."""
    if isinstance(cfg.pack, int):
        return cfg.pack
    import torch

    from ..device import resolve_device
    from .pack_probe import PROBE_SIZES, describe_probe, probe_pack

    device = resolve_device(cfg.device)
    # A pack larger than a worker's share of the trials would leave slots empty: not worth probing.
    share = -(-cfg.trials // cfg.workers)
    sizes = tuple(k for k in PROBE_SIZES if k <= share)
    if len(sizes) <= 1:
        print(f"--pack auto: 1 ({plural(cfg.trials, 'trial')} for {plural(cfg.workers, 'worker')}: nothing to pack)",
              file=sys.stderr)
        return 1
    threads = torch.get_num_threads()
    n = cfg.cpu_threads or (max(1, (os.cpu_count() or 1) // cfg.workers) if cfg.workers > 1 else None)
    try:
        if n and device.type == "cpu":
            torch.set_num_threads(n)
        k, rows = probe_pack(cfg, device, sizes=sizes)
    finally:
        torch.set_num_threads(threads)
    print(describe_probe(k, rows, device), file=sys.stderr)
    return k


# ----------------------------------------------------------------------- run
def run_search(cfg: SearchConfig, *, trials_given: bool, progress: bool = True) -> int:
    """Create or join the study, run the workers to the end, print the outcome."""
    if trials_given:
        cfg.check_budget(cfg.trials)  # before any file is written
    _preflight(cfg)
    study, created = create_or_join(cfg, trials_given=trials_given)
    cfg.study = study.study_name  # saved: a renamed or copied folder resumes this study
    cfg.sampler_seeds = [cfg.sampler_seed(k) for k in range(cfg.workers)]
    cfg.save()
    url = cfg.storage_url()
    pack = resolve_pack(cfg)
    print(f"{'new' if created else 'joined'} study {study.study_name!r} in {mask_url(url)}: "
          f"{cfg.space().describe()}; {plural(cfg.trials, 'trial')} of up to {plural(cfg.epochs, 'epoch')}; "
          f"{plural(cfg.workers, 'worker')} here" + (f", {pack} trials at once each" if pack > 1 else ""),
          file=sys.stderr)
    reader = open_for_reading(url, study.study_name)
    # Inline, the worker announces a new best itself, right after the trial's line.
    prog = Progress(reader, lambda: int(reader.user_attrs.get(BUDGET_ATTR, cfg.trials)), workers=cfg.workers * pack,
                    interval_s=min(2.0, cfg.poll_s), announce=cfg.workers > 1) if progress else None
    with storage_errors(url):
        code = _run_inline(cfg, prog, pack) if cfg.workers == 1 else _run_processes(cfg, prog, pack)
        book = prog.close() if prog else None
        if book is None:
            book = Ledger(reader.get_trials(deepcopy=False), int(reader.user_attrs.get(BUDGET_ATTR, cfg.trials)))
    checkpoint_sqlite(sqlite_path(url))
    best = book.best()
    if book.complete:
        print(f"search complete: {plural(book.done, 'trial')}; best trial {best.number if best else '-'}"
              + (f" (target val {best.value:.2f}%)" if best else "")
              + f". Export: python -m ktg_fast.search export --out {cfg.out}", file=sys.stderr)
    if book.done and book.counts["failed"] == book.done:
        print(f"warning: every trial failed ({_failure_summary(book)}); no graph was trained to the end. Fix the "
              f"cause and start again in another --out (details: python -m ktg_fast.search export --out {cfg.out}, "
              "then trials.md)", file=sys.stderr)
    return code


def _failure_summary(book: Any) -> str:
    """The most frequent failure reasons of a study, e.g. ``3 x non-finite loss ...; 1 x out of memory ...``."""
    reasons = Counter(re.split(r"; |: ", str(ln.latest.user_attrs.get(ATTR_FAIL, "?")))[0][:120]
                      for ln in book.admitted if ln.status == "failed" and ln.latest is not None)
    return "; ".join(f"{n} x {r}" for r, n in reasons.most_common(3))


def _run_inline(cfg: SearchConfig, prog: Any, pack: int = 1) -> int:
    worker = make_worker(cfg, 0, pack)
    if prog is not None:
        prog.start()
    try:
        if prog is not None and prog.tty:
            with logging_redirect_tqdm(loggers=[logging.root]):
                worker.run()
        else:
            worker.run()
    except KeyboardInterrupt as e:
        if prog is not None:
            prog.close()
        return interrupted_exit(e, "run the same command again to continue the search")
    finally:
        if prog is not None:
            prog.close()  # stop its thread whatever happened
    return 0


def _run_processes(cfg: SearchConfig, prog: Any, pack: int = 1) -> int:
    """Start ``cfg.workers`` worker processes (logs in <out>/logs/) and watch them and the study."""
    logs = cfg.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for k in range(cfg.workers):
        f = open(logs / f"worker{k}.log", "a")
        cmd = [sys.executable, "-m", "ktg_fast.search", "worker", "--out", str(cfg.out), "--worker-id", str(k), "--pack", str(pack)]
        procs.append((k, subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT), f))
        time.sleep(0.2)  # staggered starts keep SQLite's first writes apart
    print(f"{cfg.workers} workers started; their logs: {logs}/worker<k>.log", file=sys.stderr)
    failed: list[str] = []
    prev = signal.signal(signal.SIGTERM, raise_interrupt)  # a SIGTERM stops the workers like Ctrl-C
    try:
        return _watch(cfg, procs, prog, logs, failed)
    finally:
        signal.signal(signal.SIGTERM, prev)


def _watch(cfg: SearchConfig, procs: list, prog: Any, logs: Path, failed: list[str]) -> int:
    """Wait for the workers, reporting deaths and progress; Ctrl-C/SIGTERM stops them all."""
    try:
        alive = set(range(len(procs)))
        while alive:
            for k, p, f in procs:
                if k in alive and p.poll() is not None:
                    alive.discard(k)
                    f.close()
                    if p.returncode != 0:
                        why = f"signal {-p.returncode}" if p.returncode < 0 else f"exit code {p.returncode}"
                        last = _last_line(logs / f"worker{k}.log")
                        failed.append(f"worker {k} ended with {why}: {last}")
                        msg = f"worker {k} ended with {why}" + (f": {last}" if last else "") + (
                            "; its trial is re-queued after the heartbeat timeout" if p.returncode < 0 else "")
                        if "pre-training teacher" in last:  # the whole search's problem: stop every worker
                            _stop_all(procs)
                            raise SearchError(_last_line(logs / f"worker{k}.log", limit=None).split("error: ", 1)[-1])
                        (prog._write if prog is not None else lambda m: print(m, file=sys.stderr))(msg)
            if prog is not None:
                try:
                    prog.poll()
                except Exception as e:
                    log.debug("progress poll failed: %s", e)
            time.sleep(0.5 if prog is None else prog.interval_s)
    except KeyboardInterrupt as e:
        _stop_all(procs)  # SIGTERM, not SIGINT: SIGINT may be ignored in background jobs
        return interrupted_exit(e, "run the same command again to continue the search")
    if failed and len(failed) == len(procs):
        raise SearchError("every worker stopped before the search was complete: " + " | ".join(failed)
                          + f"; see {logs}; run the same command again to continue")
    return 0


def _stop_all(procs: list) -> None:
    """SIGTERM every worker still running (each gives its trial back) and wait for them."""
    for k, p, f in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for k, p, f in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
        f.close()


def _last_line(path: Path, limit: Optional[int] = 300) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:limit] if lines else ""


# --------------------------------------------------------------- subcommands
