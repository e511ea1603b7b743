"""A trial pack's graph loss, forward + backward: one block launch against one launch per range, in one run.

    pytest bench/test_bench_pack_loss.py --benchmark-only

A pack of K trials of n = 3 nodes is a block-diagonal graph of K * n nodes (ktg_fast.pack).  Ways to compute
its loss with the fused kernel:
    blocks    graph_loss_triton_blocks: one launch, a program per (rows, trial), K * n^2 pairs per row;
    ranges    whole trials merged into ranges of at most 16 nodes, one graph_loss_triton launch per range
              (the path for members of several node counts), (range size)^2 pairs per row;
    single    graph_loss_triton over the whole matrix, one launch (only up to 16 nodes), (K * n)^2 pairs;
    ref       the vectorised PyTorch reference on the whole matrix.
Paper shapes on a GPU (B = 64, C = 100, K in {2, 4, 5, 8, 16}), timed with CUDA events after warm-up, medians;
JSON to bench/results/.  Without CUDA the kernel runs in the Triton interpreter at tiny shapes: the
ratios then say nothing about the GPU, where they stay unmeasured.
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch

from benchutil import CUDA, DEVICE, QUICK, time_calls, write_result

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first built

from ktg_fast import kernels  # noqa: E402
from ktg_fast.gates import CUTOFF, LINEAR, THROUGH  # noqa: E402
from ktg_fast.live_gates import merge_blocks  # noqa: E402
from ktg_fast.loss import graph_loss_reference  # noqa: E402
from ktg_fast.loss_blocks import run_in_blocks  # noqa: E402

N = 3  # nodes per trial (the paper's 3-node graphs)
TEMPERATURE = 2.0
IMPLS = ["blocks", "ranges", "single", "ref"]
if CUDA:
    PACKS, B, C = ((2, 4, 5, 8) if QUICK else (2, 4, 5, 8, 16)), 64, 100
    ROUNDS, WARMUP = (7, 2) if QUICK else (20, 3)
else:
    PACKS, B, C = (2, 6), 8, 10
    ROUNDS, WARMUP = 2, 1


def trial_codes(seed: int) -> torch.Tensor:
    """One trial's (n+1, n+1) gates: label edges through, KL edges through / linear / cutoff."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.zeros(N + 1, N + 1, dtype=torch.int64)
    codes[0, 1:] = THROUGH
    for s in range(1, N + 1):
        for t in range(1, N + 1):
            if s != t:
                codes[s, t] = (THROUGH, LINEAR, CUTOFF)[int(torch.randint(3, (1,), generator=g))]
    return codes


def pack_case(k: int):
    per = torch.stack([trial_codes(i) for i in range(k)])  # (K, n+1, n+1)
    total = k * N
    full = torch.zeros(total + 1, total + 1, dtype=torch.int64)
    for i in range(k):
        ix = torch.tensor([0, *range(i * N + 1, i * N + N + 1)])
        full[ix[:, None], ix[None, :]] = torch.maximum(full[ix[:, None], ix[None, :]], per[i])
    nodes = torch.arange(total, dtype=torch.int32).view(k, N)
    ranges = merge_blocks([(i * N, i * N + N) for i in range(k)], kernels.MAX_NODES)
    return per, full, nodes, ranges


@pytest.fixture(scope="module")
def table(bench_report):
    rows: dict[tuple, dict] = {}
    yield rows
    clock = "CUDA events, median" if CUDA else "wall clock, median; Triton INTERPRETED on CPU: GPU ratios unmeasured"
    lines = [f"pack graph loss forward+backward, ms on {DEVICE} ({clock}); trials of {N} nodes, B = {B}, C = {C}",
             f"{'K':>3} {'nodes':>5} " + " ".join(f"{i:>9}" for i in IMPLS) + "   ratios"]
    for k in PACKS:
        ms = {i: rows[(k, i)]["median_ms"] for i in IMPLS if "median_ms" in rows.get((k, i), {})}
        cells = [f"{ms[i]:>9.3f}" if i in ms else f"{rows.get((k, i), {}).get('status', '-')[:9]:>9}" for i in IMPLS]
        ratios = [f"{i}/blocks {ms[i] / ms['blocks']:.2f}x" for i in IMPLS[1:] if i in ms and "blocks" in ms]
        lines.append(f"{k:>3} {k * N:>5} " + " ".join(cells) + "   " + ", ".join(ratios))
    lines.append("blocks: one launch, a program per (rows, trial); ranges: a launch per <= 16-node range")
    bench_report.extend(lines)
    if CUDA and rows:
        path = write_result("pack_loss", {"nodes_per_trial": N, "B": B, "C": C, "temperature": TEMPERATURE,
                                          "rows": [{"K": k, "impl": i, **v} for (k, i), v in rows.items()],
                                          "table": lines})
        bench_report.append(f"written: {path}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k", PACKS)
def test_pack_loss(benchmark, table, impl, k):
    per, full, nodes, ranges = pack_case(k)
    total = k * N
    if impl == "single" and total > kernels.MAX_NODES:
        table[(k, impl)] = {"status": "> 16"}
        pytest.skip(f"one launch takes at most {kernels.MAX_NODES} nodes")
    gen = torch.Generator().manual_seed(k)
    z = (torch.randn(total, B, C, generator=gen) * 2).to(DEVICE).requires_grad_()
    labels = torch.randint(0, C, (B,), generator=gen).to(DEVICE)
    prog = torch.linspace(0.1, 0.9, total, device=DEVICE)
    per_dev, nodes_dev, full_dev = per.to(DEVICE, torch.int32), nodes.to(DEVICE), full.to(DEVICE, torch.int32)
    range_codes = [full_dev[[0, *range(a + 1, b + 1)]][:, [0, *range(a + 1, b + 1)]].contiguous() for a, b in ranges]

    def step():
        if impl == "blocks":
            node, _ = kernels.graph_loss_triton_blocks(z, labels, per_dev, nodes_dev, TEMPERATURE, prog)
        elif impl == "ranges":
            node, _ = run_in_blocks(z, range_codes, prog, ranges,
                                    lambda zb, cb, pb: kernels.graph_loss_triton(zb, labels, cb, TEMPERATURE, pb))
        elif impl == "single":
            node, _ = kernels.graph_loss_triton(z, labels, full_dev, TEMPERATURE, prog)
        else:
            node = graph_loss_reference(z, labels, full, temperature=TEMPERATURE, progress=prog).node_loss
        z.grad = None
        node.sum().backward()
        return node

    # The paths agree before they are timed (a fast wrong answer is not a result).
    step()
    got = z.grad.clone()
    z.grad = None
    graph_loss_reference(z, labels, full, temperature=TEMPERATURE, progress=prog).node_loss.sum().backward()
    torch.testing.assert_close(got, z.grad, rtol=1e-4, atol=1e-6)
    times = time_calls(step, ROUNDS, WARMUP)
    benchmark.pedantic(step, rounds=max(1, ROUNDS // 2), iterations=1)
    table[(k, impl)] = {"median_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times],
                        "launches": {"blocks": 1, "ranges": len(ranges), "single": 1}.get(impl)}
