"""The graph loss from hidden states (GraphLinearLoss, chunked) against materializing every logit.

    pytest bench/test_bench_linear_loss.py --benchmark-only       # KTG_BENCH_LINEAR=ci|scaled|llm

Graph: two students and a frozen teacher (every student learns from the label, the teacher and the
other student; the teacher's hidden state and weight need no gradient).  Variants, each forward +
backward of the students' hidden states and output weights, in the same run:
    chunked       ktg_fast.GraphLinearLoss (chunks of rows; the kernel on CUDA, the reference on CPU)
    materialized  every node's logits, then ktg_fast.graph_loss
    loop          every node's logits, then one F.kl_div / F.cross_entropy per edge (the authors' style)
    liger         Liger-Kernel's chunked pairwise loss (LigerFusedLinearJSDLoss, beta 0: forward KL) edge by
                  edge, where liger-kernel is installed (pip install -e ".[bench]"); skipped otherwise
Each variant runs in its own process, so its peak memory is its own: on CUDA the allocator's peak
above the inputs, on the CPU the peak resident set above the inputs.  Sizes: ``ci`` small (CI), ``scaled``
M = 3, N = 2048, D = 512, V = 32,000 (this CPU), ``llm`` N = 8192, V = 128,256, D = 4096 (a GPU).
Targets (GPU, llm): chunked peak <= 1/4 of materialized, time <= 1.1x; on the CPU (scaled) peak <= 1/3.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchutil import CUDA, write_result

HERE = Path(__file__).resolve().parent
SIZE = os.environ.get("KTG_BENCH_LINEAR", "ci")
SIZES = {"ci": dict(m=3, n=512, d=128, v=4000), "scaled": dict(m=3, n=2048, d=512, v=32000),
         "llm": dict(m=3, n=8192, d=4096, v=128256)}
VARIANTS = ["chunked", "materialized", "loop", "liger"]
ROUNDS = 3
GATES = [["cutoff", "through", "through", "cutoff"],
         ["cutoff", "cutoff", "through", "cutoff"],
         ["cutoff", "through", "cutoff", "cutoff"],
         ["cutoff", "through", "through", "cutoff"]]  # node 3: the frozen teacher
TEMPERATURE = 2.0


def _inputs(m: int, n: int, d: int, v: int, device: torch.device, dtype: torch.dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    hs = [(torch.randn(n, d, generator=gen) * 0.5).to(device, dtype) for _ in range(m)]
    ws = [(torch.randn(v, d, generator=gen) / d ** 0.5).to(device, dtype) for _ in range(m)]
    for x in hs[:2] + ws[:2]:
        x.requires_grad_()
    y = torch.randint(0, v, (n,), generator=gen).to(device)
    return hs, ws, y


def _run(variant: str, hs, ws, y) -> None:
    import torch.nn.functional as F

    import ktg_fast as kf

    if variant == "chunked":
        res = kf.GraphLinearLoss(GATES, temperature=TEMPERATURE)(hs, ws, y, progress=1.0)
        res.node_loss.sum().backward()
    elif variant == "materialized":
        z = torch.stack([h @ w.t() for h, w in zip(hs, ws)])
        kf.graph_loss(z, y, GATES, temperature=TEMPERATURE).node_loss.sum().backward()
    elif variant == "loop":
        zs = [h @ w.t() for h, w in zip(hs, ws)]
        t = TEMPERATURE
        loss = 0.0
        for dst in (0, 1):
            loss = loss + F.cross_entropy(zs[dst].float(), y)
            for src in range(3):
                if src != dst and GATES[src + 1][dst + 1] != "cutoff":
                    loss = loss + t * t * F.kl_div(F.log_softmax(zs[dst].float() / t, -1),
                                                   F.softmax(zs[src].detach().float() / t, -1), reduction="batchmean")
        loss.backward()
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=TEMPERATURE,
                                      compiled=CUDA)  # compiling its chunks on the CPU costs minutes
        loss = 0.0
        for dst in (0, 1):
            for src in range(3):
                if src != dst and GATES[src + 1][dst + 1] != "cutoff":
                    loss = loss + jsd(hs[dst], ws[dst], hs[src].detach(), ws[src].detach(), y)
        loss.backward()


def _child(variant: str, size: str) -> dict:
    """One variant in this process: median seconds and peak bytes above the inputs."""
    dev = torch.device("cuda" if CUDA else "cpu")
    dtype = torch.bfloat16 if CUDA else torch.float32
    if not CUDA:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    hs, ws, y = _inputs(**SIZES[size], device=dev, dtype=dtype)
    if variant == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError as e:
            return {"status": f"skipped: liger-kernel is not installed ({e})"}
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(ROUNDS + 1):
        for x in hs[:2] + ws[:2]:
            x.grad = None
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _run(variant, hs, ws, y)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            _run(variant, hs, ws, y)
            dt = time.perf_counter() - t0
        if i:  # the first call warms up (compilation, allocator)
            times.append(dt)
    peak = (torch.cuda.max_memory_allocated() - base) if CUDA else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    return {"median_ms": statistics.median(times) * 1e3, "peak_bytes": int(peak),
            "peak_kind": "CUDA allocator peak above inputs" if CUDA else "peak RSS above inputs"}


@pytest.fixture(scope="module")
def table(bench_report):
    rows: dict[str, dict] = {}
    yield rows
    dims = SIZES[SIZE]
    lines = [f"graph loss from hidden states, M={dims['m']} N={dims['n']} D={dims['d']} V={dims['v']} "
             f"({'CUDA bf16' if CUDA else 'CPU fp32'}; forward + backward; median of {ROUNDS})",
             f"{'variant':<13}{'ms':>10}{'peak MiB':>10}{'time / materialized':>21}{'peak / materialized':>21}"]
    mat = rows.get("materialized", {})
    for v in VARIANTS:
        r = rows.get(v, {})
        if "median_ms" not in r:
            lines.append(f"{v:<13}{r.get('status', '-')}")
            continue
        tr = f"{r['median_ms'] / mat['median_ms']:.2f}x" if "median_ms" in mat else "-"
        pr = f"{r['peak_bytes'] / max(mat['peak_bytes'], 1):.2f}x" if "peak_bytes" in mat else "-"
        lines.append(f"{v:<13}{r['median_ms']:>10.1f}{r['peak_bytes'] / 2 ** 20:>10.0f}{tr:>21}{pr:>21}")
    lines.append("targets: GPU (llm) chunked peak <= 0.25x and time <= 1.1x materialized; CPU (scaled) peak <= 0.33x")
    bench_report.extend(lines)
    if rows and (CUDA or SIZE != "ci"):
        path = write_result(f"linear_loss_{SIZE}", {"size": dims, "rows": rows, "table": lines})
        bench_report.append(f"written: {path}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_loss(benchmark, table, variant):
    def measure():
        r = subprocess.run([sys.executable, __file__, variant, SIZE], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(HERE) + os.pathsep + os.environ.get("PYTHONPATH", "")},
                           timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    rec = benchmark.pedantic(measure, rounds=1, iterations=1)
    table[variant] = rec
    if "status" in rec:
        pytest.skip(rec["status"])
    assert rec["median_ms"] > 0


if __name__ == "__main__":
    print(json.dumps(_child(sys.argv[1], sys.argv[2])))
