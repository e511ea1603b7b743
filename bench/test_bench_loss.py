"""Graph loss, forward + backward: the fused Triton kernel against three baselines, in the same run.

    pytest bench/test_bench_loss.py --benchmark-only     # CPU: tiny shapes, the kernel interpreted
    pytest bench/test_bench_loss.py --benchmark-only     # on a GPU: paper and LLM shapes, JSON to bench/results/

Implementations:
    loop      a per-edge loop in the style of the authors' code: a KL (or CE) module per
              edge, per-sample losses, gates applied after, one backward per node;
    ref       the vectorised PyTorch reference (ktg_fast.loss.graph_loss_reference);
    compiled  torch.compile of the reference;
    triton    ktg_fast.kernels.graph_loss_triton.
Shapes: the paper's (M in {2, 4, 7}, B = 64, C in {10, 100, 200}, float32, dense graphs with
every gate kind) and distillation at LLM scale (M in {2, 4}, B = 8192, C in {32000, 128256},
bfloat16).  On CUDA each case is timed with CUDA events (median of the rounds, after warm-up)
and its peak extra memory recorded; LLM cases also get the memory-traffic floor: one read of
every logit and one write of every gradient at the bandwidth of a large device-to-device copy
measured in the same run.  A torch.profiler listing of the kernel launches of the triton path
is added for one paper shape.  Without CUDA the Triton kernel runs in the interpreter on tiny
shapes: the numbers then say nothing about the GPU targets, which stay unmeasured.
"""
from __future__ import annotations

import os
import statistics

import pytest
import torch


import authors  # noqa: E402
from benchutil import CUDA, DEVICE, QUICK, sync, time_calls, write_result  # noqa: E402

if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first built


from ktg_fast import kernels  # noqa: E402
from ktg_fast.loss import graph_loss_reference  # noqa: E402

IMPLS = ["loop", "ref", "compiled", "triton"]
from ktg_fast.gates import CORRECT, LINEAR, THROUGH  # noqa: E402
TEMPERATURE = 2.0
PROGRESS = 0.5

if CUDA and QUICK:  # bench/gpu.sh: the paper's and the LLM sizes, fewer of them and fewer repetitions
    PAPER = [(2, 64, 100), (4, 64, 10), (4, 64, 100), (4, 64, 200), (7, 64, 100)]
    LLM = [(2, 8192, 32000), (4, 8192, 128256)]  # the second holds rows past 2^31 elements (int64 offsets)
    ROUNDS, WARMUP = 7, 2
elif CUDA:
    PAPER = [(m, 64, c) for m in (2, 4, 7) for c in (10, 100, 200)]
    LLM = [(m, 8192, c) for m in (2, 4) for c in (32000, 128256)]  # (4, 8192, 128256): past 2^31 elements
    ROUNDS, WARMUP = 20, 3
else:
    PAPER = [(2, 16, 10), (4, 16, 100)]
    LLM = [(2, 4, 4096)]
    ROUNDS, WARMUP = 2, 1
    torch.set_num_threads(1)
# Without CUDA the PyTorch implementations take well under a millisecond at the paper's tiny shapes:
# they get enough rounds for the ref/loop ratio to mean something (the interpreted kernel keeps ROUNDS).
CPU_ROUNDS, CPU_WARMUP = 200, 20
SHAPES = [("paper", m, b, c, torch.float32) for m, b, c in PAPER] + \
         [("llm", m, b, c, torch.bfloat16) for m, b, c in LLM]
if not CUDA:
    # The reference against the per-edge loop where it once lost (1.5-3.1x slower): float32, CPU.
    SHAPES.append(("cpu", 2, 256, 32000, torch.float32))


def dense_gates(m: int) -> torch.Tensor:
    """A dense graph using every gate kind: label edges through, KL edges cycling through/linear/correct."""
    codes = torch.zeros(m + 1, m + 1, dtype=torch.int64)
    codes[0, 1:] = THROUGH
    kinds = [THROUGH, LINEAR, CORRECT]
    for s in range(1, m + 1):
        for t in range(1, m + 1):
            if s != t:
                codes[s, t] = kinds[(s + t) % 3]
    return codes


# --------------------------------------------------------------------------- implementations
def loop_step(z: torch.Tensor, labels: torch.Tensor, codes: list[list[int]], progress: torch.Tensor) -> None:
    """The authors' style (bench/authors.py): a loss module per edge, gates after, one backward per node."""
    authors.loss_step(z, labels, codes, TEMPERATURE, progress)


def ref_step(z, labels, codes, progress) -> None:
    res = graph_loss_reference(z, labels, codes, temperature=TEMPERATURE, progress=progress)
    res.node_loss.sum().backward()


_compiled_ref = None


def compiled_step(z, labels, codes, progress) -> None:
    global _compiled_ref
    if _compiled_ref is None:
        _compiled_ref = torch.compile(ref_step)
    _compiled_ref(z, labels, codes, progress)


def triton_step(z, labels, codes_dev, progress) -> None:
    node, _ = kernels.graph_loss_triton(z, labels, codes_dev, TEMPERATURE, progress)
    node.sum().backward()


# --------------------------------------------------------------------------- timing
_sync = sync


def _time(fn, rounds: int, warmup: int) -> list[float]:
    return time_calls(fn, rounds, warmup)


def _copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    n = 1 << 30  # 1 GiB each way
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), 10, 3)
    return 2 * n / statistics.median(times)


def _save(rows: dict, extra: dict, complete: bool = False):
    """Write the record so far (after every row on CUDA: a run cut short by its time cap keeps its rows)."""
    record = {"temperature": TEMPERATURE, "complete": complete,
              "rows": [{"kind": k[0], "M": k[1], "B": k[2], "C": k[3], "dtype": str(k[4]), "impl": k[5], **v}
                       for k, v in rows.items()],
              "extra": {k: v for k, v in extra.items() if isinstance(v, (int, float, str, list))},
              "table": _format(rows, extra)}
    return write_result("graph_loss", record)


@pytest.fixture(scope="module")
def table(bench_report):
    """Results per (shape, impl); the table and ratios go to the end-of-run summary."""
    rows: dict[tuple, dict] = {}
    extra: dict[str, object] = {}
    yield rows, extra
    bench_report.extend(_format(rows, extra))
    if CUDA and rows:
        bench_report.append(f"written: {_save(rows, extra, complete=True)}")


def _format(rows: dict, extra: dict) -> list[str]:
    clock = "CUDA events, median" if CUDA else "wall clock, median; Triton INTERPRETED on CPU: GPU targets unmeasured"
    lines = [f"graph loss forward+backward, ms on {DEVICE} ({clock}), T = {TEMPERATURE}",
             f"{'kind':>5} {'M':>2} {'B':>5} {'C':>6} " + " ".join(f"{k:>10}" for k in IMPLS) + "   ratios"]
    bw = extra.get("copy_bandwidth")
    for kind, m, b, c, dtype in SHAPES:
        cells, ms = [], {}
        for impl in IMPLS:
            r = rows.get((kind, m, b, c, str(dtype), impl))
            if r and "median_ms" in r:
                ms[impl] = r["median_ms"]
                cells.append(f"{r['median_ms']:>10.3f}")
            else:
                cells.append(f"{(r or {}).get('status', '-')[:10]:>10}")
        ratios = []
        if "ref" in ms and "loop" in ms:  # the reference must not lose to a hand-written per-edge loop
            ratios.append(f"ref/loop {ms['ref'] / ms['loop']:.2f}x")
        if "triton" in ms:
            for base in ("loop", "ref", "compiled"):
                if base in ms:
                    ratios.append(f"{base}/triton {ms[base] / ms['triton']:.3g}x")
            tr = rows[(kind, m, b, c, str(dtype), "triton")]
            if kind == "llm" and bw:
                floor_ms = tr["traffic_bytes"] / bw * 1e3
                ratios.append(f"triton/floor {ms['triton'] / floor_ms:.2f}x (floor {floor_ms:.3f} ms)")
            if tr.get("peak_extra_bytes") is not None:
                ratios.append(f"extra mem {tr['peak_extra_bytes'] / tr['grad_bytes']:.2f}x grad")
        lines.append(f"{kind:>5} {m:>2} {b:>5} {c:>6} " + " ".join(cells) + "   " + ", ".join(ratios))
    if bw:
        lines.append(f"device-to-device copy: {bw / 1e9:.0f} GB/s")
    if extra.get("launches"):
        lines.append("triton path, kernel launches of one forward+backward (torch.profiler):")
        lines.extend(f"    {name}: {count}" for name, count in extra["launches"])
    lines.append("targets (H100/H200): paper loop/triton >= 20x and compiled/triton >= 3x; "
                 "LLM triton/floor <= 1.3x and extra memory <= 1.1x the gradient buffer")
    return lines


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind, m, b, c, dtype", SHAPES, ids=lambda v: str(v).replace("torch.", ""))
def test_graph_loss(benchmark, table, impl, kind, m, b, c, dtype):
    rows, extra = table
    key = (kind, m, b, c, str(dtype), impl)
    if impl == "compiled" and kind in ("llm", "cpu") and (QUICK or not CUDA):
        rows[key] = {"status": "skipped"}
        pytest.skip("compiling the reference for this shape costs minutes (run without KTG_BENCH_QUICK on a GPU)")
    if impl == "triton" and kind == "cpu":
        rows[key] = {"status": "skipped"}
        pytest.skip("the Triton interpreter takes minutes at this shape, and its CPU times mean nothing")
    # Drawn where they are used: the LLM shapes hold up to 4.2 G values, a minute of CPU randn each.
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    z0 = (torch.randn(m, b, c, generator=gen, device=DEVICE) * 2).to(dtype)
    labels = torch.randint(0, c, (b,), generator=gen, device=DEVICE)
    labels[::7] = -100
    codes = dense_gates(m)
    codes_dev = codes.to(DEVICE, torch.int32)
    progress = torch.tensor(PROGRESS, device=DEVICE)
    z = z0.clone().requires_grad_()
    step = {
        "loop": lambda: loop_step(z, labels, codes.tolist(), progress),
        "ref": lambda: ref_step(z, labels, codes, progress),
        "compiled": lambda: compiled_step(z, labels, codes, progress),
        "triton": lambda: triton_step(z, labels, codes_dev, progress),
    }[impl]

    def run():
        z.grad = None
        step()

    grad_bytes = z.numel() * z.element_size()
    try:
        if CUDA:
            run()  # compile / autotune outside the measurement
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            z.grad = None
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            run()
            torch.cuda.synchronize()
            peak_extra = torch.cuda.max_memory_allocated() - base  # the .grad kept included
        else:
            peak_extra = None
        cheap = not CUDA and impl != "triton" and kind != "cpu"
        times = _time(run, *((CPU_ROUNDS, CPU_WARMUP) if cheap else (ROUNDS, WARMUP)))
        benchmark.pedantic(lambda: (run(), _sync()), rounds=max(1, ROUNDS // 2), iterations=1)
    except torch.OutOfMemoryError:
        rows[key] = {"status": "OOM"}
        torch.cuda.empty_cache()
        pytest.skip("out of memory")
    # peak_extra_bytes: the peak above what was allocated before the call (logits, labels), the
    # gradient buffer included (for the triton path it becomes .grad; the target is <= 1.1x of it).
    rec = {"median_ms": statistics.median(times) * 1e3, "times_ms": [t * 1e3 for t in times],
           "grad_bytes": grad_bytes, "peak_extra_bytes": peak_extra, "traffic_bytes": 2 * grad_bytes}
    rows[key] = rec
    benchmark.extra_info.update({k: v for k, v in rec.items() if k != "times_ms"})
    if CUDA and kind == "llm" and "copy_bandwidth" not in extra:
        extra["copy_bandwidth"] = _copy_bandwidth()
    if CUDA and impl == "triton" and kind == "paper" and "launches" not in extra:
        extra["launches"] = _launches(run)
    z.grad = None
    if CUDA:
        _save(rows, extra)


def _launches(run) -> list[tuple[str, int]]:
    """Names and counts of the device kernels one call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    counts: dict[str, int] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            counts[ev.name[:60]] = counts.get(ev.name[:60], 0) + 1
    return sorted(counts.items(), key=lambda kv: -kv[1])
