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
def sm90():
    """Skip unless Triton can build for sm_90 here (its compiler and ptxas, no GPU needed)."""
    probe = subprocess.run(
        [sys.executable, "-c", "from ktg_fast.kernels.aot import backend_status; ok, why = backend_status(90); "
                               "print(why); raise SystemExit(0 if ok else 3)"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    if probe.returncode == 3:
        pytest.skip(f"cannot build for sm_90 here: {probe.stdout.strip()}")
    assert probe.returncode == 0, probe.stderr


@pytest.fixture(scope="module")
def builds(sm90):
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
    from ktg_fast.kernels.aot import SPILL_TOLERANCE_BYTES

    small = [b for b in builds if 0 < b["stack_bytes"] + b["local_bytes"] <= SPILL_TOLERANCE_BYTES]
    if small:
        print(f"  {len(small)} builds keep a few bytes on the stack, e.g. {small[0]}")
    spilled = [b for b in builds if b["stack_bytes"] + b["local_bytes"] > SPILL_TOLERANCE_BYTES]
    assert not spilled, f"{len(spilled)} builds spill registers, e.g. {spilled[0]}"


_SCALE_LOOP_TTIR = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ktg_fast.kernels import _triton_graph_loss as K
sig = {"src_ptr": "*fp32", "dst_ptr": "*fp32", "gout_ptr": "*fp32", "s_g": "i32", "N": "i32", "BLOCK": "constexpr",
       "IN_PLACE": "constexpr"}
src = ASTSource(fn=K._scale_kernel, signature=sig, constexprs={"BLOCK": 4096, "IN_PLACE": True})
ttir = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8}).asm["ttir"]
print("\\n".join(line.strip() for line in ttir.splitlines() if "scf.for" in line))
"""


def test_the_scale_loop_counts_in_int64_when_n_fits_int32(sm90):
    """The backward's stride loop over a node's B * C values: with an int32 counter the last stride wraps
    negative when B * C is within one stride of 2^31, and the loop writes out of bounds."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCALE_LOOP_TTIR], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loops = r.stdout.strip().splitlines()
    assert loops and all(line.endswith(": i64 {") for line in loops), loops
