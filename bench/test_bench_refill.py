"""What refilling a trial pack costs: a newcomer taking free places in place, against rebuilding the step.

    pytest bench/test_bench_refill.py --benchmark-only -s

A search prunes after nearly every epoch, so a pack (``search --pack K``) is
refilled about as often as it trains an epoch.  A newcomer whose node kinds
match free places takes them in place (weights, momentum and gates written into
the existing step: ``ktg_fast/pack_trainer.py``); otherwise the step is rebuilt,
which on CUDA means a new CUDA-graph capture, and under ``--step compiled`` a
recompile.  For each step path, in the same run: the median time of a pack epoch
without a change (plain), of one in which a member is replaced in place, and of
one in which it is replaced by a rebuild (in-place placement switched off); the
refill's cost is its epoch's time minus the plain one.

Sizes: K = 4 members of 3 nodes (resnet8 target, resnet8 / wrn10_1 auxiliaries),
batch 16, 4 steps and 32 validation images per epoch on the CPU; on a GPU the
paper's nodes (resnet32 target, resnet32 / wrn28_2 auxiliaries), batch 64, 20
steps.  The compiled step is measured on a GPU, and on the CPU with
``KTG_BENCH_FULL=1`` (a cold compile there takes minutes).  A JSON record goes
to bench/results/.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchutil import QUICK, write_result
from ktg_fast.data.spec import DataSpec
from ktg_fast.graph import Graph, Node
from ktg_fast.pack_trainer import PackTrainer
from ktg_fast.recipe import TrainConfig

CUDA = torch.cuda.is_available()
FULL = os.environ.get("KTG_BENCH_FULL", "0") not in ("", "0")
K, ROUNDS = 4, (2 if QUICK else 3)
if CUDA:
    TARGET, AUX, BATCH, STEPS = "resnet32", ("resnet32", "wrn28_2"), 64, 20
    # bench/gpu.sh (QUICK, a capped phase): the search's own path first, without the compiled step's
    # recompile per rebuild (about a minute each).
    KINDS = ("cudagraph", "fused") if QUICK else ("fused", "cudagraph", "compiled")
else:
    TARGET, AUX, BATCH, STEPS = "resnet8", ("resnet8", "wrn10_1"), 16, 4
    KINDS = ("eager", "fused") + (("compiled",) if FULL else ())


def _graph(i: int) -> Graph:
    """Member i: the target, then the two auxiliaries; gates vary with i, node kinds do not."""
    g = ["through", "linear", "correct"]
    return Graph([Node(TARGET), Node(AUX[0]), Node(AUX[1])],
                 [["cutoff", "through", g[i % 3], "through"],
                  ["cutoff", "cutoff", "through", g[(i + 1) % 3]],
                  ["cutoff", g[(i + 2) % 3], "cutoff", "cutoff"],
                  ["cutoff", "linear", "through", "cutoff"]])


def _timed_epoch(pack: PackTrainer) -> float:
    t0 = time.perf_counter()
    pack.run_epoch()
    return time.perf_counter() - t0


def measure(kind: str, in_place: bool, folder: Path) -> dict:
    """Plain and refill epoch medians (s) of a pack of K members on the ``kind`` step."""
    data = DataSpec(dataset="synthetic", loader="auto", val_size=BATCH * 2,
                    train_subset=BATCH * STEPS, eval_subset=BATCH * 2, test=False)
    pack = PackTrainer(data, batch_size=BATCH, augment=False, device="auto", step=kind, save_checkpoints=False)
    if not in_place:
        pack._place = lambda member, free: None  # every newcomer rebuilds the step
    cfg = TrainConfig(batch_size=BATCH, augment=False, epochs=1000, lr=0.01)
    members = [pack.add(i, _graph(i), cfg, folder / f"m{i}") for i in range(K)]
    for _ in range(3):  # build, compile or capture, warm
        pack.run_epoch()
    plain = [_timed_epoch(pack) for _ in range(ROUNDS)]
    refill = []
    for r in range(ROUNDS):
        k = K + r
        pack.remove(members[r % K])
        members[r % K] = pack.add(k, _graph(k), cfg, folder / f"m{k}")
        refill.append(_timed_epoch(pack))
    return {"plain_s": statistics.median(plain), "refill_epoch_s": statistics.median(refill),
            "refill_s": max(0.0, statistics.median(refill) - statistics.median(plain)),
            "refills_in_place": pack.refills, "step_builds": pack.rebuilds, "step_path": pack.train_step.kind}


def test_pack_refill(benchmark, bench_report):
    benchmark.pedantic(_measure, args=(bench_report,), rounds=1, iterations=1)


def _measure(bench_report: list) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            inplace = measure(kind, True, Path(tmp) / f"{kind}-in-place")
            rebuild = measure(kind, False, Path(tmp) / f"{kind}-rebuild")
            assert inplace["step_builds"] == 1 and inplace["refills_in_place"] == ROUNDS, inplace
            assert rebuild["step_builds"] == 1 + ROUNDS and rebuild["refills_in_place"] == 0, rebuild
            rows.append({"step": kind, "path": inplace["step_path"], "in_place": inplace, "rebuild": rebuild,
                         "rebuild_vs_in_place": (rebuild["refill_epoch_s"] / inplace["refill_epoch_s"])})
            _save(rows)  # after every step path: a run cut short by its time cap keeps what it measured
    head = (f"pack refill, K = {K} x ({TARGET}, {', '.join(AUX)}), batch {BATCH}, {STEPS} steps/epoch, "
            f"medians of {ROUNDS}:")
    lines = [head, "| step | plain epoch s | refill in place: epoch s (cost s) | rebuild: epoch s (cost s) | "
             "rebuild / in-place epoch |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        a, b = r["in_place"], r["rebuild"]
        lines.append(f"| {r['step']} ({r['path']}) | {a['plain_s']:.3f} | {a['refill_epoch_s']:.3f} "
                     f"({a['refill_s']:.3f}) | {b['refill_epoch_s']:.3f} ({b['refill_s']:.3f}) | "
                     f"{r['rebuild_vs_in_place']:.2f}x |")
    print("\n" + "\n".join(lines))
    bench_report.extend(lines)
    _save(rows, complete=True)


def _save(rows: list, complete: bool = False) -> None:
    write_result("pack_refill", {"members": K, "nodes": [TARGET, *AUX], "batch": BATCH, "steps_per_epoch": STEPS,
                                 "rounds": ROUNDS, "rows": rows, "complete": complete})
