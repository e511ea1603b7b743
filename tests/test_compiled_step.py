"""The compiled step (torch.compile, Inductor) and mixed precision against the eager reference, on the CPU.

Compiling is the expensive part (tens of seconds per graph on 2 cores): the compile-heavy tests are
few and small (resnet8-sized nets, batch 16), marked slow, and share one Inductor cache per session
(``compile_cache`` in conftest.py; set KTG_COMPILE_CACHE to a folder to keep it between sessions).

Tolerances.  In float64 the compiled step equals the eager one to ~1e-14 after 6 steps at lr 0.1
(checked while building it); in float32, BatchNorm at batch 16 amplifies rounding differences
(Inductor's reductions vs ATen's) step by step, at lr 0.1 to ~1e-2 after 5 steps even between the
uncompiled fused and eager steps.  So the float32 comparison runs at lr 0.01, where 5 steps stay
below ~1e-5 and 1e-4 is a real bound (a wrong gradient or update moves weights by ~lr * |g| > 1e-3).
bf16 against fp32: measured <= 3e-3 after 5 steps at lr 0.01; the bound is 1e-2.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from ktg_fast.graph import Graph, preset
from ktg_fast.recipe import TrainConfig
from ktg_fast.steps import (CPU_AUTO_KIND, CPU_COMPILE_MIN_STEPS, CompiledStep, EagerStep, FusedStep,
                            NodeLossScale, compile_cache_dir, make_step)
from ktg_fast.steps import base as steps_base
from torch._dynamo.utils import counters

from helpers import build_nets, mixed_graph as mixed_graph_of

FASHION = Path("/usr/share/datasets/fashion-mnist")
BATCH, STEPS = 16, 5


pytestmark = pytest.mark.usefixtures("one_thread")




def mixed_graph() -> Graph:
    """Two resnet8, one wrn10_1, a frozen resnet8 teacher (node 4); every gate kind, groups out of node order."""
    return mixed_graph_of("resnet8", "wrn10_1", "resnet8")


def build(graph: Graph, seed: int = 0, num_classes: int = 10) -> list[nn.Module]:
    return build_nets(graph, seed=seed, num_classes=num_classes)


def batches(n: int = STEPS, b: int = BATCH, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(b, 3, size, size, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(n)]


def max_diff(a: list[nn.Module], b: list[nn.Module]) -> float:
    return max((p.float() - q.float()).abs().max().item() for na, nb in zip(a, b)
               for p, q in zip(na.state_dict().values(), nb.state_dict().values()) if p.is_floating_point())


def assert_states_close(a: list[nn.Module], b: list[nn.Module], tol: float) -> None:
    for i, (na, nb) in enumerate(zip(a, b), start=1):
        sa, sb = na.state_dict(), nb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=lambda m: f"node {i} {k}: {m}")


def assert_momentum_close(a, b, tol: float, lr: float = 1.0) -> None:
    """Momentum buffers to ``tol`` in weight units: a buffer is gradient-sized, its step lr * buffer."""
    for i, (da, db) in enumerate(zip(a.momentum_buffers(), b.momentum_buffers()), start=1):
        assert (da is None) == (db is None), f"node {i}"
        if da is not None:
            assert da.keys() == db.keys(), f"node {i}"
            for k in da:
                torch.testing.assert_close(da[k] * lr, db[k] * lr, rtol=tol, atol=tol,
                                           msg=lambda m: f"node {i} {k}: {m}")


CFG = TrainConfig(lr=0.01)


# ------------------------------------------------------------------------- fp32 equivalence
@pytest.mark.slow
def test_compiled_equals_eager_for_5_steps_and_resumes_across_kinds(compile_cache) -> None:
    """fp32: weights, BatchNorm statistics, momentum (times lr) and losses of every node to 1e-4 after 5 steps;
    then new learning rates without recompiling, and checkpoints moved between the two kinds."""
    graph = mixed_graph()
    nets = build(graph)
    ref = copy.deepcopy(nets)
    teacher = copy.deepcopy(nets[3].state_dict())
    step, eager = CompiledStep(graph, nets, CFG), EagerStep(graph, ref, CFG)
    assert not step.groups[0].mode == "vmap"  # on the CPU the compiled step traces nets one by one (faster)
    for k, (x, y) in enumerate(batches()):
        progress = torch.tensor(k / STEPS)
        la, za = step(x, y, progress)
        lb, zb = eager(x, y, progress)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {k}: {m}")
        torch.testing.assert_close(za, zb, rtol=1e-3, atol=1e-3, msg=lambda m: f"step {k}: {m}")
    assert step.kind == "compiled" and step.compiled and step.compile_seconds is not None
    assert_states_close(step.nets, eager.nets, 1e-4)
    assert_momentum_close(step, eager, 1e-4, lr=CFG.lr)
    assert all(torch.equal(v, teacher[k]) for k, v in step.nets[3].state_dict().items())  # frozen: untouched
    assert any(compile_cache.rglob("*")), "nothing was written to the Inductor cache folder"

    # New learning rates are device writes: the next step runs the same compiled graphs.
    graphs_before = counters["stats"]["unique_graphs"]
    step.set_lrs([0.02, 0.005, 0.0])  # trainable nodes 1, 2, 3
    eager.set_lrs([0.02, 0.005, 0.0])
    before3 = {k: v.clone() for k, v in step.nets[2].state_dict().items()}
    x, y = batches(1, seed=7)[0]
    step(x, y, 1.0)
    eager(x, y, 1.0)
    assert counters["stats"]["unique_graphs"] == graphs_before, "set_lrs or a float progress recompiled"
    assert_states_close(step.nets, eager.nets, 1e-4)
    p3 = {k: v for k, v in step.nets[2].named_parameters()}
    assert all(torch.equal(p3[k], before3[k]) for k in p3)  # lr 0: parameters stay

    # A checkpoint of the compiled step resumes in a fresh eager step, and the other way round.
    for src, dst_kind in ((step, EagerStep), (eager, CompiledStep)):
        states, moms = src.node_state_dicts(), src.momentum_buffers()
        dst = dst_kind(graph, build(graph, seed=5), CFG)
        dst.load_node_state_dicts(states)
        dst.load_momentum_buffers(moms)
        dst.set_lrs([0.02, 0.005, 0.0])
        for x, y in batches(2, seed=9):  # the source continues from the state it handed over
            src(x, y, 0.5)
            dst(x, y, 0.5)
        assert_states_close(dst.nets, src.nets, 1e-4)
        assert_momentum_close(dst, src, 1e-4, lr=CFG.lr)


@pytest.mark.slow
def test_a_refilled_pack_slot_runs_on_without_recompiling(compile_cache) -> None:
    """A trial pack's slot refilled in place (new gates in the loss's device tensors, new weights, momentum
    forgotten) and another slot masked: the compiled step runs the same graphs and equals an eager step
    bound to the new gates as a fixed matrix (issue 15's fixed slots)."""
    from ktg_fast.loss import GraphLoss

    first = Graph.from_dict({"nodes": ["resnet8"] * 3, "gates": [["cutoff", "through", "linear", "through"],
                                                                 ["cutoff", "cutoff", "through", "cutoff"],
                                                                 ["cutoff", "correct", "cutoff", "cutoff"],
                                                                 ["cutoff", "cutoff", "cutoff", "cutoff"]]})
    # Slot 0 (nodes 1-2) gets a new trial; slot 1 (node 3) is emptied: every edge into it cutoff.
    refill = [["cutoff", "linear", "through", "cutoff"], ["cutoff", "cutoff", "correct", "cutoff"],
              ["cutoff", "linear", "cutoff", "cutoff"], ["cutoff", "cutoff", "cutoff", "cutoff"]]
    live = GraphLoss(first.gate_codes(), blocks=[(0, 2), (2, 3)])
    step = CompiledStep(first, build(first), CFG, loss=live)
    eager = EagerStep(first, build(first), CFG)
    for k, (x, y) in enumerate(batches(2)):
        step(x, y, torch.full((3,), k / 4))
        eager(x, y, torch.full((3,), k / 4))
    graphs_before = counters["stats"]["unique_graphs"]
    fresh = build(first, seed=11)
    states = {1: fresh[0].state_dict(), 2: fresh[1].state_dict(), 3: {n: torch.zeros_like(v) for n, v in
                                                                        fresh[2].state_dict().items()}}
    live.set_gates(refill)
    eager.loss = GraphLoss(refill)
    for s in (step, eager):
        s.reset_nodes(states)
        s.set_lrs([0.01, 0.01, 0.0])
    assert all(float(b.abs().sum()) == 0 for b in step.momentum_buffers()[0].values())
    for k, (x, y) in enumerate(batches(3, seed=4)):
        la, _ = step(x, y, torch.tensor([k / 6, k / 6, 0.0]))
        lb, _ = eager(x, y, torch.tensor([k / 6, k / 6, 0.0]))
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4)
        assert la[2] == 0.0  # the masked slot's loss is exactly zero
    assert counters["stats"]["unique_graphs"] == graphs_before, "a refill recompiled the step"
    assert_states_close(step.nets, eager.nets, 1e-4)
    assert_momentum_close(step, eager, 1e-4, lr=CFG.lr)


def test_compiled_regions_have_no_graph_break() -> None:
    """Dynamo traces the forward + graph loss and the flat SGD update as one graph each, in every precision."""
    graph = mixed_graph()
    (x, y), = batches(1, b=4, size=16)
    for precision in ("fp32", "bf16", "fp16"):
        step = CompiledStep(graph, build(graph), CFG, precision=precision)
        step(x, y, 0.0)  # the eager first step
        got = step.explain(x, y, torch.tensor(0.5))
        for region in ("forward_loss", "update"):
            assert got[region] == {"graphs": 1, "breaks": 0, "reasons": []}, (precision, region, got)
    with pytest.raises(RuntimeError, match="call the step once"):
        CompiledStep(graph, build(graph), CFG).explain(x, y, 0.0)


# ---------------------------------------------------------------------------- precision
def test_node_loss_scale_rules() -> None:
    """GradScaler's rules per node: unscale, a node with inf/NaN gradients backs off alone, growth after N."""
    s = NodeLossScale(3, torch.device("cpu"), init_scale=8.0, growth_interval=2)
    node_index = torch.tensor([0, 2])  # a group holding graph nodes 1 and 3
    flat = type("Flat", (), {})()
    flat.node_of = torch.tensor([0, 0, 1, 1])
    flat.grad = torch.tensor([8.0, 16.0, 4.0, float("inf")])
    ok = s.unscale_and_check(node_index, [flat])
    assert ok.tolist() == [True, False]
    assert flat.grad[:2].tolist() == [1.0, 2.0]
    s.update(node_index, ok)
    assert s.scale.tolist() == [8.0, 8.0, 4.0]  # node 2 (not in the group) untouched
    for _ in range(2):
        s.update(node_index, torch.tensor([True, True]))
    # Node 1 grew at its 2nd clean step in a row (and counts again from 0), node 3 (backed off to 4 first)
    # grew at its own 2nd; node 2, in no group here, kept its scale.
    assert s.scale.tolist() == [16.0, 8.0, 8.0]
    assert s.growth_tracker.tolist() == [1, 0, 0]


@pytest.mark.parametrize("kind", ["fused", "eager"])
def test_fp16_overflow_skips_only_that_nodes_update(kind: str) -> None:
    """fp16: node 2's gradients overflow (its scale is huge); it skips its update and halves its scale,
    nodes 1 and 3 step; weights stay fp32."""
    graph = preset("dml", models=["resnet8"] * 3)
    nets = build(graph)
    before = [copy.deepcopy(n.state_dict()) for n in nets]
    x, y = batches(1, b=4, size=16)[0]
    # Node 2's fp16 gradients become inf; 2^8 keeps the others finite (GradScaler's 2^16 overflows
    # resnet8's first backward too, which is what it is for, but not what this test looks at).
    if kind == "fused":
        step = FusedStep(graph, nets, TrainConfig(), precision="fp16")
        step.scaler.scale.copy_(torch.tensor([2.0 ** 8, 2.0 ** 120, 2.0 ** 8]))
    else:
        step = EagerStep(graph, nets, TrainConfig(), precision="fp16")
        step.scalers = [torch.amp.GradScaler("cpu", init_scale=s) for s in (2.0 ** 8, 2.0 ** 120, 2.0 ** 8)]
    loss, logits = step(x, y, 0.0)
    # (vmap's linear adds the fp32 bias after autocast's fp16 matmul: logits may come out fp32, rounded to fp16)
    assert logits.dtype in (torch.float16, torch.float32) and torch.isfinite(loss).all()
    params = [dict(n.named_parameters()) for n in step.nets]
    for t in (0, 2):
        assert any(not torch.equal(p, before[t][k]) for k, p in params[t].items()), f"node {t + 1} did not step"
    assert all(torch.equal(p, before[1][k]) for k, p in params[1].items()), "node 2 stepped despite overflow"
    assert all(p.dtype == torch.float32 for n in step.nets for p in n.parameters())
    moms = step.momentum_buffers()
    assert all(bool((b == 0).all()) for b in (moms[1] or {}).values())  # no momentum from the skipped step
    assert moms[0] and all(bool(b.abs().sum() > 0) for b in moms[0].values())
    scales = step.scaler.scale.tolist() if kind == "fused" else [s.get_scale() for s in step.scalers]
    assert scales == [2.0 ** 8, 2.0 ** 119, 2.0 ** 8]


def test_fp16_fused_and_eager_agree_with_fp32() -> None:
    """The flat-buffer loss scaling makes what a GradScaler per node makes: the same overflow decisions
    (the same scales) and, after unscaling, weights within fp16's noise of fp32 (measured <= 2e-3 after
    3 steps at lr 0.01; a missed unscale would be off by the scale, 65536x).  The fused (vmapped) and
    eager fp16 paths round differently (vmap's linear adds its fp32 bias outside autocast), so each is
    compared with fp32 rather than with each other."""
    graph = preset("dml", models=["resnet8"] * 2 + ["wrn10_1"])
    nets = build(graph)
    ref, ref32 = copy.deepcopy(nets), copy.deepcopy(nets)
    a = FusedStep(graph, nets, CFG, precision="fp16")
    b = EagerStep(graph, ref, CFG, precision="fp16")
    c = EagerStep(graph, ref32, CFG)
    for k, (x, y) in enumerate(batches(3, b=8, size=16)):
        for s in (a, b, c):
            s(x, y, 0.5)
        assert a.scaler.scale.tolist() == [s.get_scale() for s in b.scalers], k
    assert_states_close(a.nets, c.nets, 1e-2)
    assert_states_close(b.nets, c.nets, 1e-2)
    assert max_diff(a.nets, c.nets) > 1e-5 and max_diff(b.nets, c.nets) > 1e-5  # fp16 really ran


def test_unknown_precision_is_refused() -> None:
    graph = preset("dml", models=["resnet8"] * 2)
    for kind in ("eager", "fused", "compiled"):
        with pytest.raises(ValueError, match="unknown precision 'fp8'; choose from fp32, bf16, fp16"):
            make_step(kind, graph, build(graph), CFG, precision="fp8")


def test_channels_last_gives_the_same_step() -> None:
    graph = preset("dml", models=["resnet8"] * 2)
    nets = build(graph)
    ref = copy.deepcopy(nets)
    a, b = EagerStep(graph, nets, CFG, channels_last=True), EagerStep(graph, ref, CFG)
    assert a.nets[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
    c = FusedStep(graph, build(graph), CFG, channels_last=True)
    d = FusedStep(graph, build(graph), CFG)
    for x, y in batches(2, b=4, size=16):
        a(x, y, 0.0)
        b(x, y, 0.0)
        c(x, y, 0.0)
        d(x, y, 0.0)
    assert_states_close(a.nets, b.nets, 1e-4)
    assert_states_close(c.nets, d.nets, 1e-4)
    cl = c._prepare_input(torch.rand(2, 3, 8, 8))
    assert cl.is_contiguous(memory_format=torch.channels_last) and not cl.is_contiguous()


# ------------------------------------------------------------------------- factory, cache
def test_make_step_compiled_and_auto(caplog, monkeypatch) -> None:
    monkeypatch.setattr(steps_base, "_said", set())
    graph = preset("dml", models=["resnet8"] * 2)
    assert make_step("compiled", graph, build(graph), CFG).kind == "compiled"
    with caplog.at_level(logging.INFO, logger="ktg_fast"):
        short = make_step("auto", graph, build(graph), CFG, total_steps=100)
        long = make_step("auto", graph, build(graph), CFG, total_steps=CPU_COMPILE_MIN_STEPS)
    assert short.kind == CPU_AUTO_KIND and isinstance(long, CompiledStep)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("step auto -> compiled" in m and "compiling costs about" in m for m in msgs), msgs
    assert any(f"step auto -> {CPU_AUTO_KIND}" in m and "only 100 steps" in m for m in msgs), msgs


def test_compile_cache_dir_sets_inductor_folder(tmp_path, monkeypatch) -> None:
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "old"))
    # torch's own patch(), not monkeypatch: pytest 9's undo deletes a torch config entry it did not find in
    # the module's __dict__, and torch 2.11 then hides it ("does not exist") from every later compile.
    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        got = compile_cache_dir(tmp_path / "a" / ".." / "cache")
        assert got == (tmp_path / "cache").resolve() and got.is_dir()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(got) and cache_dir() == str(got)
        assert inductor_config.fx_graph_cache and functorch_config.enable_autograd_cache
    with pytest.raises(OSError):
        compile_cache_dir(Path(__file__))  # a file, not a folder


# ------------------------------------------------------------------------------ on a GPU
@pytest.fixture
def cuda_fp32():
    """Plain fp32 matmuls and convolutions (no TF32), so 1e-4 means what it does on the CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
def test_gpu_cudagraph_step_captures_the_compiled_body(cuda_fp32, compile_cache) -> None:
    """make_step("cudagraph") on CUDA compiles, captures the compiled body, and equals the eager step."""
    from ktg_fast.steps import CUDA_COMPILE_MIN_STEPS, CompiledCudaGraphStep, CudaGraphStep

    graph = mixed_graph()
    nets = [n.to(cuda_fp32) for n in build(graph)]
    ref = copy.deepcopy(nets)
    step = make_step("cudagraph", graph, nets, CFG, total_steps=CUDA_COMPILE_MIN_STEPS)
    eager = EagerStep(graph, ref, CFG)
    assert isinstance(step, CompiledCudaGraphStep) and step.groups[0].mode == "vmap"
    for k, (x, y) in enumerate(batches(8)):
        progress = torch.tensor(k / 8, device=cuda_fp32)
        la, _ = step(x.to(cuda_fp32), y.to(cuda_fp32), progress)
        lb, _ = eager(x.to(cuda_fp32), y.to(cuda_fp32), progress)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-4, msg=lambda m: f"step {k}: {m}")
    assert step.kind == "cudagraph" and step.compiled and step._cuda_graph is not None
    assert_states_close(step.nets, eager.nets, 1e-4)
    assert_momentum_close(step, eager, 1e-4, lr=CFG.lr)
    short = make_step("cudagraph", graph, [n.to(cuda_fp32) for n in build(graph)], CFG, total_steps=10)
    assert type(short) is CudaGraphStep  # too short a run to repay compiling


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_compiled_kernel_loss_has_no_graph_break(precision: str) -> None:
    """On CUDA the graph loss is the Triton kernel (a triton_op): Dynamo traces into it, 16-bit logits in."""
    graph = mixed_graph()
    nets = [n.cuda() for n in build(graph)]
    step = CompiledStep(graph, nets, CFG, loss_impl="triton", precision=precision)
    x, y = batches(1)[0]
    x, y = x.cuda(), y.cuda()
    step(x, y, 0.0)
    got = step.explain(x, y, torch.tensor(0.5, device="cuda"))
    assert got["forward_loss"] == {"graphs": 1, "breaks": 0, "reasons": []}, got
    assert got["update"] == {"graphs": 1, "breaks": 0, "reasons": []}, got
    loss, logits = step(x, y, 0.5)
    assert torch.isfinite(loss).all() and loss.dtype == torch.float32
