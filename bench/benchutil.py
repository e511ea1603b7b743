"""Timing and result files shared by the benchmark suites (METHOD.md: warm up, CUDA events, medians)."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from pathlib import Path
from typing import Callable

import torch

from ktg_fast.io import atomic_write_json

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:  # as training runs it (ktg_fast.device.autotune_convolutions), for every variant alike
    torch.backends.cudnn.benchmark = True
# Where result files go: bench/results/ unless KTG_BENCH_RESULTS names another folder (bench/gpu.sh).
RESULTS_DIR = Path(os.environ.get("KTG_BENCH_RESULTS") or Path(__file__).parent / "results")
# KTG_BENCH_QUICK=1: the paper's sizes with few repetitions (bench/gpu.sh, a verification in minutes).
QUICK = os.environ.get("KTG_BENCH_QUICK", "0") not in ("", "0")


def versions() -> dict:
    """Device, torch, Triton and CUDA versions, date: what every result file records."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": torch.cuda.get_device_name(DEVICE) if CUDA else platform.processor() or "cpu",
            "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
            "date": _dt.datetime.now().isoformat(timespec="seconds"), "python": platform.python_version(),
            "quick": QUICK}


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_calls(fn: Callable[[], object], rounds: int, warmup: int = 0) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls: CUDA events on a GPU, the wall clock on the CPU."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(rounds):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


# One stamp per process: a suite that writes its record after every row (so a phase cut short by its time
# cap keeps what it measured) rewrites one file, not one per row.
_STAMP = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def write_result(name: str, record: dict) -> Path:
    """Write ``bench/results/<name>-<stamp>.json`` (atomically; the stamp is this process's start) with the
    device, versions and date added; a later call of the same process with the same name replaces it."""
    full = {"benchmark": name, **versions(), **record}
    return atomic_write_json(RESULTS_DIR / f"{name}-{_STAMP}.json", full)
