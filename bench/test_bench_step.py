"""Training step throughput: the authors' style against this project's eager, fused and CUDA-graph steps.

    pytest bench/test_bench_step.py --benchmark-only    # CPU: small nets and batch; on a GPU: the paper's sizes

Graphs (every node trainable; every edge, label edges included, "through"):
    a   3 x ResNet32
    b   ResNet32, WRN-28-2, ResNet32, ResNet110
Step variants, timed in the same run on the same synthetic on-device batches (no loader):
    authors  the authors' style: a forward per node, a loss module per edge (per-sample KL or
             cross-entropy, gate weight, batch mean), one backward per node with retain_graph,
             one torch.optim.SGD per node;
    eager    simultaneous update, unfused: this project's EagerStep (graph_loss, one backward, one SGD);
    fused    FusedStep without streams: one vmapped forward per architecture, flat SGD per group;
    graph    CudaGraphStep: fused groups on CUDA streams, the whole step captured as one CUDA graph.
The eager, fused and graph variants use ``graph_loss(impl="auto")``: the fused Triton loss kernel on
CUDA when it is available, the PyTorch reference elsewhere.

Reported: training images per second per node (each node trains on B images per step, so this is
B / step time) and the ratio to the authors' style.  On CUDA: CUDA-event timing, the fraction of the
dense bf16 and tf32 FLOP ceilings reached (training FLOPs per image: ResNet32 0.41 G, ResNet110
1.52 G, WRN-28-2 1.29 G) and a JSON record in bench/results/.  Targets on an H100/H200: graph >= 10x
authors on graph b, graph >= 3x eager on graph a.  Without CUDA the graph variant is the fused step
(there is nothing to capture) and the sizes are small: the numbers say nothing about the GPU targets.
"""
from __future__ import annotations

import statistics
from typing import Callable

import pytest
import torch

from benchutil import CUDA, DEVICE, QUICK, sync, time_calls, write_result  # noqa: E402
from torch import nn


from ktg_fast.steps import CudaGraphStep, EagerStep, FusedStep  # noqa: E402
from authors import AuthorsStep  # noqa: E402
from ktg_fast.graph import Graph, preset  # noqa: E402
from ktg_fast.models import get_model  # noqa: E402
from ktg_fast.recipe import TrainConfig  # noqa: E402

VARIANTS = ["authors", "eager", "fused", "graph"]

if CUDA:
    GRAPHS = {"a": ["resnet32"] * 3, "b": ["resnet32", "wrn28_2", "resnet32", "resnet110"]}
    BATCH, IMAGE, CLASSES = 64, 32, 100
    WARMUP, ROUNDS, STEPS = 6, (3 if QUICK else 5), 20  # the graph variant captures at its 4th step
else:
    GRAPHS = {"a": ["resnet8"] * 3, "b": ["resnet8", "wrn10_1", "resnet8", "resnet14"]}
    BATCH, IMAGE, CLASSES = 16, 32, 10
    WARMUP, ROUNDS, STEPS = 2, 3, 2
N_BATCHES = 4  # distinct synthetic batches cycled through, all on the device

# Training FLOPs (forward + backward) per 32x32 image.
TRAIN_GFLOP = {"resnet32": 0.41, "resnet110": 1.52, "wrn28_2": 1.29}
# Dense peak TFLOP/s (bf16, tf32) by device name.
PEAKS = [("H200", 989.0, 494.5), ("H100 PCIe", 756.0, 378.0), ("H100 NVL", 835.0, 418.0), ("H100", 989.0, 494.5),
         ("A100", 312.0, 156.0)]


def dense_graph(models: list[str]) -> Graph:
    """Every node learns from the label and every other node: the DML preset."""
    return preset("dml", models=models)


def make_variant(variant: str, graph: Graph, nets: list[nn.Module], cfg: TrainConfig):
    if variant == "authors":
        return AuthorsStep(graph, nets, cfg)
    if variant == "eager":
        return EagerStep(graph, nets, cfg)
    if variant == "fused":
        return FusedStep(graph, nets, cfg, streams=False)
    if CUDA:
        return CudaGraphStep(graph, nets, cfg)
    return FusedStep(graph, nets, cfg)  # no CUDA: nothing to capture, no streams


# --------------------------------------------------------------------------- timing
@pytest.fixture(autouse=True, scope="module")
def cpu_threads():
    """On the CPU, one thread: OpenMP workers spin-wait when other processes share the cores, which
    turns timings into noise (a step 40x slower now and then)."""
    before = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_sync = sync


def _time(fn: Callable[[], None], rounds: int) -> list[float]:
    return time_calls(fn, rounds)


@pytest.fixture(scope="module")
def table(bench_report):
    """Seconds per step by (graph, variant); the table goes to the end-of-run summary (and JSON on CUDA)."""
    rows: dict[tuple[str, str], dict] = {}
    yield rows
    lines = _format(rows)
    bench_report.extend(lines)
    if CUDA and rows:
        record = {"batch": BATCH, "image": IMAGE, "classes": CLASSES,
                  "graphs": GRAPHS, "rows": [{"graph": g, "variant": v, **r} for (g, v), r in rows.items()],
                  "table": lines}
        path = write_result("train_step", record)
        bench_report.append(f"written: {path}")


def _peaks() -> tuple[float, float] | None:
    if not CUDA:
        return None
    name = torch.cuda.get_device_name(DEVICE)
    for key, bf16, tf32 in PEAKS:
        if key in name:
            return bf16 * 1e12, tf32 * 1e12
    return None


def _format(rows: dict) -> list[str]:
    clock = "CUDA events, median of rounds" if CUDA else \
        "wall clock on CPU, 1 thread, small nets; graph = fused (no CUDA): GPU targets unmeasured"
    lines = [f"training step, batch {BATCH}, {IMAGE}x{IMAGE}, {CLASSES} classes, on {DEVICE} ({clock})",
             f"{'graph':<6}{'variant':<9}{'ms/step':>9}{'img/s/node':>12}{'x authors':>10}{'x eager':>9}"
             + ("  bf16 peak  tf32 peak" if _peaks() else "")]
    for g, models in GRAPHS.items():
        base = rows.get((g, "authors"), {}).get("s_per_step")
        eager = rows.get((g, "eager"), {}).get("s_per_step")
        for v in VARIANTS:
            r = rows.get((g, v))
            if r is None:
                continue
            s = r["s_per_step"]
            line = f"{g:<6}{v:<9}{s * 1e3:>9.2f}{BATCH / s:>12.0f}"
            line += f"{base / s:>10.2f}" if base else f"{'':>10}"
            line += f"{eager / s:>9.2f}" if eager else f"{'':>9}"
            if "bf16_fraction" in r:
                line += f"{r['bf16_fraction'] * 100:>10.1f}%{r['tf32_fraction'] * 100:>10.1f}%"
            lines.append(line)
        lines.append(f"{'':<6}nodes: {', '.join(models)}")
    if CUDA:
        for g, v, k, target in (("b", "graph", "authors", 10.0), ("a", "graph", "eager", 3.0)):
            a, b = rows.get((g, v)), rows.get((g, k))
            if a and b:
                got = b["s_per_step"] / a["s_per_step"]
                lines.append(f"target: graph {g}, {v} >= {target:g}x {k}: {got:.2f}x "
                             f"({'met' if got >= target else 'NOT met'})")
    return lines


# ------------------------------------------------------------------------ the bench
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("graph_name", list(GRAPHS))
def test_train_step(benchmark, table, graph_name: str, variant: str) -> None:
    models = GRAPHS[graph_name]
    graph = dense_graph(models)
    torch.manual_seed(0)
    nets = [get_model(m, num_classes=CLASSES).to(DEVICE) for m in models]
    step = make_variant(variant, graph, nets, TrainConfig())
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.rand(BATCH, 3, IMAGE, IMAGE, generator=gen).to(DEVICE),
                torch.randint(0, CLASSES, (BATCH,), generator=gen).to(DEVICE)) for _ in range(N_BATCHES)]
    progress = torch.zeros((), device=DEVICE)
    state = {"k": 0}

    def run() -> None:
        for _ in range(STEPS):
            x, y = batches[state["k"] % N_BATCHES]
            state["k"] += 1
            step(x, y, progress)

    # Lazy initialisation, autotuning, and the graph variant's capture: never inside the timed rounds.
    for _ in range(max(WARMUP, getattr(step, "steady_after", 1) + 1)):
        x, y = batches[state["k"] % N_BATCHES]
        state["k"] += 1
        node_loss, _ = step(x, y, progress)
    assert torch.isfinite(node_loss).all()
    times = _time(run, ROUNDS)
    benchmark.pedantic(lambda: (run(), _sync()), rounds=1, iterations=1)
    s = statistics.median(times) / STEPS
    row = {"s_per_step": s, "images_per_s_per_node": BATCH / s, "step_kind": step.kind, "models": models}
    peaks = _peaks()
    if peaks and all(m in TRAIN_GFLOP for m in models):
        flops = sum(TRAIN_GFLOP[m] for m in models) * 1e9 * BATCH / s
        row.update(tflops=flops / 1e12, bf16_fraction=flops / peaks[0], tf32_fraction=flops / peaks[1])
    if variant == "graph" and CUDA:
        assert step.kind == "cudagraph", "the CUDA graph was not captured (see the log for why)"
    benchmark.extra_info.update(row)
    table[(graph_name, variant)] = row
