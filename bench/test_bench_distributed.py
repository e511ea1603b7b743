"""Data-parallel training (torchrun): communication per step, and the 2-process overhead on this machine.

    pytest bench/test_bench_distributed.py --benchmark-only -s

1. Bytes per step for the paper's graphs, from the stacked gradient sizes (fp32 gradients of every
   trainable node; frozen nodes send nothing): graph a (3 x ResNet32) and graph b (ResNet32, WRN-28-2,
   ResNet32, ResNet110), CIFAR-100 heads.  One collective per flat buffer of a fused node group; a ring
   all-reduce moves 2 (W - 1) / W of those bytes in and out of every GPU.  ``--sync-bn`` adds per
   BatchNorm layer a gather of (W, 3, K, C) and an all-reduce of (2, K, C) floats.  On a GPU machine the
   time of those collectives is for a multi-GPU run to measure (this project's GPU sessions have one GPU).
2. On this machine, measured in the same run (gloo, ``bench/dist_step.py``): the fused step of
   3 x ResNet8 at global batch 32 in 1 process and in 2 processes (each its half of the batch, one
   thread each), the time of the gradient sum alone, and the ratios; and for eager nodes the step's
   flat gradient sum against DistributedDataParallel (bucketed, overlapped with the backward).
A JSON record goes to bench/results/.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchutil import RESULTS_DIR, versions
from ktg_fast.models import get_model

REPO = Path(__file__).resolve().parents[1]
GRAPHS = {"a": ["resnet32"] * 3, "b": ["resnet32", "wrn28_2", "resnet32", "resnet110"]}


def _model_stats(name: str) -> tuple[int, list[int]]:
    net = get_model(name, num_classes=100)
    params = sum(p.numel() for p in net.parameters())
    bns = [m.num_features for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    return params, bns


def _bytes_table(world: int = 8) -> list[dict]:
    rows = []
    for g, models in GRAPHS.items():
        stats = {m: _model_stats(m) for m in set(models)}
        grad = 4 * sum(stats[m][0] for m in models)
        groups = len(set(models))
        bn = sum(4 * (world * 3 + 2) * c for m in models for c in stats[m][1])
        rows.append({"graph": g, "models": models, "grad_mb": grad / 2**20, "collectives": groups,
                     "ring_mb_per_gpu": 2 * (world - 1) / world * grad / 2**20, "sync_bn_mb": bn / 2**20,
                     "sync_bn_collectives": 2 * sum(len(stats[m][1]) for m in set(models))})
    return rows


def _run(world: int, threads: int, *extra: str) -> dict:
    cmd = [sys.executable, str(REPO / "bench" / "dist_step.py"), "--steps", "8", *extra]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), *cmd[1:]]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_distributed_step(benchmark):
    benchmark.pedantic(_measure, rounds=1, iterations=1)


def _measure() -> None:
    table = _bytes_table()
    print("\nper-step communication of the paper's graphs (8 GPUs, fp32 gradients):")
    print("| graph | gradient MB/step | collectives | ring all-reduce MB in/out per GPU | --sync-bn MB | "
          "--sync-bn collectives |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in table:
        print(f"| {r['graph']} | {r['grad_mb']:.2f} | {r['collectives']} | {r['ring_mb_per_gpu']:.2f} | "
              f"{r['sync_bn_mb']:.2f} | {r['sync_bn_collectives']} |")
    cores = os.cpu_count() or 1
    one = _run(1, cores)
    one_thread = _run(1, 1) if cores > 1 else one
    two = _run(2, max(1, cores // 2), "--sum-mb", *[f"{r['grad_mb']:.3f}" for r in table])
    assert one["grad_bytes"] == two["grad_bytes"] > 0
    print(f"\nthis machine ({cores} cores), 3 x ResNet8, global batch 32, fused step, medians of 8 steps:")
    print("| processes x threads | step ms | gradient sum ms | vs 1 x all cores | vs 1 x 1 thread |")
    print("|---|---:|---:|---:|---:|")
    for label, r in ((f"1 x {cores}", one), ("1 x 1", one_thread), (f"2 x {max(1, cores // 2)}", two)):
        print(f"| {label} | {r['step_ms']:.1f} | {r['sync_ms']:.2f} | {one['step_ms'] / r['step_ms']:.2f}x | "
              f"{one_thread['step_ms'] / r['step_ms']:.2f}x |")
    print(f"gradient sum: {two['grad_bytes'] / 2**20:.2f} MB in {two['collectives']} collectives, "
          f"{100 * two['sync_ms'] / two['step_ms']:.1f} % of the 2-process step")
    for r in table:
        r["cpu_gloo_2proc_sum_ms"] = two["sum_ms_by_mb"][f"{r['grad_mb']:.3f}"]
        print(f"graph {r['graph']}: summing its {r['grad_mb']:.2f} MB over 2 gloo processes here took "
              f"{r['cpu_gloo_2proc_sum_ms']:.1f} ms (NCCL on GPUs: unmeasured)")
    # Eager nodes: the step's flat gradient sum against DistributedDataParallel's bucketed, overlapped one.
    half = max(1, cores // 2)
    flat, ddp = _run(2, half, "--step", "eager"), _run(2, half, "--step", "eager", "--ddp")
    print(f"eager step, 2 x {half}: flat gradient sum {flat['step_ms']:.1f} ms/step, DistributedDataParallel "
          f"{ddp['step_ms']:.1f} ms/step: flat / DDP time {flat['step_ms'] / ddp['step_ms']:.2f}x")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    record = {"bench": "distributed", **versions(), "paper_graphs": table,
              "cpu": {"one_all_cores": one, "one_thread": one_thread, "two": two, "eager_flat": flat,
                      "eager_ddp": ddp}}
    (RESULTS_DIR / f"distributed_{'cuda' if torch.cuda.is_available() else 'cpu'}.json").write_text(
        json.dumps(record, indent=2) + "\n")
