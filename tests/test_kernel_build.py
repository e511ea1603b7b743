"""Every graph-loss kernel configuration plan() can choose builds for sm_90 (H100/H200) without spills.

Runs Triton's own compiler and ptxas ahead of time (``python -m ktg_fast.kernels.aot``) in a
subprocess with ``TRITON_INTERPRET`` unset, so no GPU is needed: a kernel change that no longer
compiles for Hopper, or that spills registers to local memory, fails CI instead of a GPU session.
"""
import json
import os
import subprocess
import sys

import pytest


def _run_aot(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "ktg_fast.kernels.aot", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def builds():
    probe = subprocess.run(
        [sys.executable, "-c", "from ktg_fast.kernels.aot import backend_status; ok, why = backend_status(90); "
                               "print(why); raise SystemExit(0 if ok else 3)"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if probe.returncode == 3:
        pytest.skip(f"cannot build for sm_90 here: {probe.stdout.strip()}")
    assert probe.returncode == 0, probe.stderr
    r = _run_aot("--json", "--jobs", str(max(1, min(4, os.cpu_count() or 1))))
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


@pytest.mark.slow
def test_every_planned_kernel_builds_for_sm90_without_spills(builds):
    kernels = {b["kernel"] for b in builds}
    assert kernels == {"_fused_kernel", "_split_stats_kernel", "_split_grad_kernel", "_split_loss_kernel",
                       "_scale_kernel"}
    assert {b["dtype"] for b in builds if b["kernel"] == "_fused_kernel"} == {"fp32", "bf16", "fp16"}
    assert {b["constants"]["M"] for b in builds if b["kernel"] == "_fused_kernel"} >= {1, 2, 3, 7, 16}
    assert {b["constants"]["SAME_T"] for b in builds if b["kernel"] == "_fused_kernel"} == {True, False}
    assert all(b["registers"] > 0 for b in builds), "ptxas reported no register count"
    worst = max(builds, key=lambda b: b["registers"])
    print(f"\n{len(builds)} builds for sm_90; most registers per thread: {worst['registers']} "
          f"({worst['kernel']}, {worst['dtype']}, M={worst['constants'].get('M')}, "
          f"BLOCK_C={worst['constants'].get('BLOCK_C')}, {worst['num_warps']} warps)")
    for name in sorted(kernels):
        regs = [b["registers"] for b in builds if b["kernel"] == name]
        print(f"  {name}: {len(regs)} builds, registers per thread {min(regs)}-{max(regs)}")
    spilled = [b for b in builds if b["stack_bytes"] or b["local_bytes"]]
    assert not spilled, f"{len(spilled)} builds spill registers, e.g. {spilled[0]}"
