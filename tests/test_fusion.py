"""Fused node groups, the flat SGD, streams and the CUDA-graph step against the eager reference.

The multi-step comparisons run in float64: BatchNorm at a small batch turns
float32 rounding differences (grouped vs separate convolutions) into visible
weight differences within a few SGD steps, which would hide real mistakes
behind a loose tolerance.  In float64 the fused path must agree to 1e-5
(it agrees to ~1e-13).  A float32 single step is checked too.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ktg_fast.steps import CPU_AUTO_KIND, CudaGraphStep, FusedStep, NodeGroup, group_nodes
from ktg_fast.steps import base as steps_base
from ktg_fast.graph import Graph, Node, preset
from ktg_fast.models import WideResNet, get_model, register_model, unregister_model
from ktg_fast.recipe import TrainConfig, make_optimizer
from ktg_fast.steps import EagerStep, make_step
from ktg_fast.loss import graph_loss_reference

from helpers import build_nets, mixed_graph as mixed_graph_of

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def dml_graph(models: list[str]) -> Graph:
    return preset("dml", models=models)


def mixed_graph() -> Graph:
    """Two ResNet32, one WRN-16-2 and a frozen teacher (node 4); every gate kind, groups out of node order."""
    return mixed_graph_of("resnet32", "wrn16_2", "resnet20")


def build(graph: Graph, dtype: torch.dtype = F64, seed: int = 0, num_classes: int = 10) -> list[nn.Module]:
    return build_nets(graph, dtype, seed=seed, num_classes=num_classes)


def batch(n: int = 4, size: int = 8, dtype: torch.dtype = F64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g, dtype=dtype), torch.randint(0, 10, (n,), generator=g)


def assert_nets_equal(a: list[nn.Module], b: list[nn.Module], tol: float = 1e-5) -> None:
    for i, (na, nb) in enumerate(zip(a, b), start=1):
        sa, sb = na.state_dict(), nb.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=lambda m: f"node {i} {k}: {m}")


# --------------------------------------------------------------------------- groups
@pytest.mark.parametrize("model,k", [("resnet20", 1), ("resnet20", 2), ("resnet20", 3), ("wrn10_1", 2), ("wrn16_2", 3)])
def test_group_of_k_equals_k_separate_modules(model: str, k: int) -> None:
    """A fused group of K nodes == K modules with their own SGD: outputs, grads, weights, BN buffers, eval."""
    graph = dml_graph([model] * k) if k > 1 else Graph([Node(model)], [["cutoff", "through"], ["cutoff", "cutoff"]])
    nets = build(graph)
    ref = copy.deepcopy(nets)
    cfg = TrainConfig(lr=0.1)
    step = FusedStep(graph, nets, cfg)
    assert [g.mode for g in step.groups] == ["vmap" if k > 1 else "loop"]
    opts = [make_optimizer([list(n.parameters())], [cfg.lr], cfg) for n in ref]
    x, y = batch()
    for i in range(5):
        progress = torch.tensor((i + 1) / 5, dtype=F64)
        node_loss, logits = step(x, y, progress)
        for n in ref:
            n.train()
        ref_logits = torch.stack([n(x) for n in ref])
        res = graph_loss_reference(ref_logits, y, graph.gates, progress=progress)
        for t, opt in enumerate(opts):
            opt.zero_grad()
            res.node_loss[t].backward(retain_graph=True)
        torch.testing.assert_close(logits, ref_logits.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(node_loss, res.node_loss.detach(), rtol=1e-5, atol=1e-5)
        for t, n in enumerate(ref, start=1):
            grads = step.node_grads(t)
            for name, p in n.named_parameters():
                torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-5, msg=f"step {i} grad {name}")
        for opt in opts:
            opt.step()
        assert_nets_equal(nets, ref)  # parameters and BatchNorm buffers (num_batches_tracked too)
    torch.testing.assert_close(step.eval_logits(x), torch.stack([n.eval()(x) for n in ref]).detach(),
                               rtol=1e-5, atol=1e-5)
    # Nothing else moved: every net still trains, each node's weights differ from the others'.
    assert all(n.training for n in nets)
    if k > 1:
        assert not torch.allclose(nets[0].state_dict()["fc.weight"], nets[1].state_dict()["fc.weight"])


def test_float32_single_step_matches_eager() -> None:
    graph = dml_graph(["resnet20"] * 3)
    nets = build(graph, torch.float32)
    ref = copy.deepcopy(nets)
    cfg = TrainConfig()
    x, y = batch(dtype=torch.float32)
    a = FusedStep(graph, nets, cfg)(x, y, torch.tensor(0.5))
    b = EagerStep(graph, ref, cfg)(x, y, torch.tensor(0.5))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert_nets_equal(nets, ref, tol=1e-5)


def test_grouping_and_node_order() -> None:
    graph = mixed_graph()
    nets = build(graph)
    groups = group_nodes(graph, nets)
    assert groups == [(True, [1, 3]), (True, [2]), (False, [4])]
    step = FusedStep(graph, nets, TrainConfig())
    x, _ = batch()
    out = step.eval_logits(x)
    with torch.no_grad():
        ref = torch.stack([copy.deepcopy(n).eval()(x) for n in nets])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # node order restored from group order
    assert not nets[3].training and nets[0].training


def test_mixed_graph_fused_equals_eager_trainer() -> None:
    """Two ResNet32, a WRN-16-2, a frozen teacher: fused and eager steps give the same weights after 3 steps."""
    graph = mixed_graph()
    nets = build(graph)
    ref = copy.deepcopy(nets)
    cfg = TrainConfig(node_lr=[0.1, 0.05, 0.02, 0.1])  # per-node rates must survive the stacking
    fused, eager = FusedStep(graph, nets, cfg), EagerStep(graph, ref, cfg)
    teacher = copy.deepcopy(nets[3].state_dict())
    x, y = batch()
    for i in range(3):
        progress = torch.tensor((i + 1) / 3, dtype=F64)
        a, b = fused(x, y, progress), eager(x, y, progress)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert_nets_equal(nets, ref)
    for k, v in nets[3].state_dict().items():  # the frozen teacher never changes, running stats included
        assert torch.equal(v, teacher[k]), k
    mf, me = fused.momentum_buffers(), eager.momentum_buffers()
    assert mf[3] is None and me[3] is None
    for t in range(3):
        assert mf[t].keys() == me[t].keys()
        for k in me[t]:
            torch.testing.assert_close(mf[t][k], me[t][k], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.eval_logits(x), eager.eval_logits(x), rtol=1e-5, atol=1e-5)


def test_set_lrs_per_node_and_schedule() -> None:
    graph = dml_graph(["resnet20"] * 3)
    nets = build(graph)
    ref = copy.deepcopy(nets)
    fused, eager = FusedStep(graph, nets, TrainConfig()), EagerStep(graph, ref, TrainConfig())
    x, y = batch()
    for lrs in ([0.1, 0.1, 0.1], [0.2, 0.0, 0.01], [0.01, 0.03, 0.0]):
        fused.set_lrs(lrs)
        eager.set_lrs(lrs)
        fused(x, y, 1.0)
        eager(x, y, 1.0)
    assert_nets_equal(nets, ref)
    with pytest.raises(ValueError, match="3 trainable nodes"):
        fused.set_lrs([0.1])


@pytest.mark.parametrize("nesterov,momentum,wd", [(True, 0.9, 5e-4), (False, 0.9, 0.0), (False, 0.0, 1e-3)])
def test_flat_sgd_matches_torch_sgd(nesterov: bool, momentum: float, wd: float) -> None:
    graph = dml_graph(["resnet8"] * 2)
    nets = build(graph)
    ref = copy.deepcopy(nets)
    cfg = TrainConfig(momentum=momentum, nesterov=nesterov, weight_decay=wd)
    fused, eager = FusedStep(graph, nets, cfg), EagerStep(graph, ref, cfg)
    x, y = batch()
    for _ in range(3):
        fused(x, y, 1.0)
        eager(x, y, 1.0)
    assert_nets_equal(nets, ref)
    mf, me = fused.momentum_buffers(), eager.momentum_buffers()
    assert [m.keys() for m in mf] == [m.keys() for m in me]


# ------------------------------------------------------------------ any registry model
class ItemNet(nn.Module):
    """A model vmap cannot batch: it reads a value on the host (``.item()``) after a train-mode BatchNorm."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x)))
        scale = 1.0 if h.mean().item() >= 0 else -1.0
        return self.fc(h.mean((2, 3))) * scale


class UnusedNet(nn.Module):
    """A model with a parameter its forward never uses: SGD leaves it alone, and so must the fused step."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.spare = nn.Linear(3, 3)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def custom_models():
    register_model("test_itemnet")(lambda *, num_classes, in_channels=3: ItemNet(num_classes, in_channels))
    register_model("test_unusednet")(lambda *, num_classes, in_channels=3: UnusedNet(num_classes, in_channels))
    register_model("test_wrn_dropout")(
        lambda *, num_classes, in_channels=3: WideResNet(10, 1, num_classes, in_channels, dropout=0.5))
    yield
    for name in ("test_itemnet", "test_unusednet", "test_wrn_dropout"):
        unregister_model(name)


def test_dropout_draws_a_mask_per_node(custom_models) -> None:
    """vmap must not share random masks across a group: identical nodes get different train-mode outputs."""
    graph = dml_graph(["test_wrn_dropout"] * 2)
    nets = build(graph)
    nets[1].load_state_dict(nets[0].state_dict())
    step = FusedStep(graph, nets, TrainConfig())
    x, y = batch()
    _, logits = step(x, y, 1.0)
    assert step.groups[0].mode == "vmap"
    assert not torch.allclose(logits[0], logits[1])
    ev = step.eval_logits(x)  # no dropout in eval mode: the same weights would give the same output
    assert torch.isfinite(ev).all()


def test_unbatchable_model_falls_back_to_a_loop_with_one_warning(custom_models, caplog, monkeypatch) -> None:
    monkeypatch.setattr(steps_base, "_said", set())  # "once per process": start this test afresh
    graph = dml_graph(["test_itemnet"] * 2 + ["resnet8"])
    nets = build(graph)
    ref = copy.deepcopy(nets)
    fused, eager = FusedStep(graph, nets, TrainConfig()), EagerStep(graph, ref, TrainConfig())
    assert fused.groups[0].mode == "vmap"
    x, y = batch()
    with caplog.at_level(logging.WARNING, logger="ktg_fast"):
        for _ in range(3):
            torch.testing.assert_close(fused(x, y, 1.0), eager(x, y, 1.0), rtol=1e-5, atol=1e-5)
    assert fused.groups[0].mode == "loop"
    warnings = [r for r in caplog.records if "not batched with vmap" in r.getMessage()]
    assert len(warnings) == 1 and "[1, 2]" in warnings[0].getMessage()
    # The failed vmap attempt's running-statistics update was undone: BN buffers match eager exactly.
    assert_nets_equal(nets, ref)


def test_unused_parameters_are_not_updated(custom_models) -> None:
    graph = dml_graph(["test_unusednet"] * 2)
    nets = build(graph)
    ref = copy.deepcopy(nets)
    spare = nets[0].spare.weight.detach().clone()
    fused, eager = FusedStep(graph, nets, TrainConfig()), EagerStep(graph, ref, TrainConfig())
    x, y = batch()
    for _ in range(3):
        fused(x, y, 1.0)
        eager(x, y, 1.0)
    assert torch.equal(nets[0].spare.weight, spare)  # no weight decay either
    assert_nets_equal(nets, ref)
    assert [m.keys() for m in fused.momentum_buffers()] == [m.keys() for m in eager.momentum_buffers()]
    assert "spare.weight" not in fused.momentum_buffers()[0]


# ----------------------------------------------------------------------- checkpoints
def _ckpt(step) -> tuple[list, list]:
    return step.node_state_dicts(), step.momentum_buffers()


@pytest.mark.parametrize("first,second", [(FusedStep, EagerStep), (EagerStep, FusedStep)])
def test_checkpoint_from_one_path_resumes_in_the_other(first, second) -> None:
    graph = mixed_graph()
    cfg = TrainConfig()
    x, y = batch()
    # Uninterrupted: 3 steps of the first path.
    nets = build(graph)
    whole = first(graph, nets, cfg)
    for _ in range(3):
        whole(x, y, 0.5)
    # Interrupted: 1 step, checkpoint, a fresh other path from different weights loads it, 2 more steps.
    part = first(graph, build(graph), cfg)
    part(x, y, 0.5)
    states, moms = _ckpt(part)
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for sd in states for v in sd.values())
    resumed_nets = build(graph, seed=123)
    resumed = second(graph, resumed_nets, cfg)
    resumed.load_node_state_dicts(states)
    resumed.load_momentum_buffers(moms)
    for a, b in zip(_ckpt(resumed), (states, moms)):  # what was loaded reads back the same
        for da, db in zip(a, b):
            if db is not None:
                assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in db)
    for _ in range(2):
        resumed(x, y, 0.5)
    assert_nets_equal(resumed_nets, nets)


def test_state_dict_views_stay_live() -> None:
    """The per-node nets are views into the stacks: loading into a net, even by assignment, reaches the step."""
    graph = dml_graph(["resnet8"] * 2)
    nets = build(graph)
    step = FusedStep(graph, nets, TrainConfig())
    x, y = batch()
    other = get_model("resnet8", num_classes=10).to(F64)
    nets[1].load_state_dict(other.state_dict())
    torch.testing.assert_close(step.eval_logits(x)[1], other.eval()(x).detach())
    nets[0].load_state_dict(other.state_dict(), assign=True)  # replaces the tensors: sync re-binds them
    step.adopt_nets()
    torch.testing.assert_close(step.eval_logits(x)[0], other.eval()(x).detach())
    step(x, y, 1.0)
    assert not torch.equal(nets[0].state_dict()["fc.weight"], other.state_dict()["fc.weight"])


def test_trainer_checkpoint_resumes_across_paths(tmp_path) -> None:
    """A Trainer run checkpointed by the fused path resumes in the eager one, with identical state."""
    from ktg_fast.data import DataSpec
    from ktg_fast.trainer import Trainer

    class Stop(Exception):
        pass

    def stop(record):
        raise Stop

    graph = dml_graph(["resnet8"] * 2)
    data = DataSpec(dataset="synthetic", loader="torch", train_subset=64, test=False)
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05)
    t1 = Trainer(graph, data, cfg, tmp_path / "r", device="cpu", step="fused", on_epoch_end=stop, progress=False)
    with pytest.raises(Stop):
        t1.run()
    assert t1.train_step.kind == "fused"
    saved, moms = _ckpt(t1.train_step)
    t2 = Trainer(graph, data, cfg, tmp_path / "r", device="cpu", step="eager", progress=False)
    t2._load_data()
    t2._build()
    assert t2._restore(t2._read_checkpoint()) == (1, 2)
    for a, b in zip(_ckpt(t2.train_step), (saved, moms)):
        for da, db in zip(a, b):
            assert da.keys() == db.keys() and all(torch.equal(da[k], db[k]) for k in db)
    final = Trainer(graph, data, cfg, tmp_path / "r", device="cpu", step="eager", progress=False).run(resume=True)
    assert final["epoch"] == 2 and final["step_path"] == "eager"


# ---------------------------------------------------------------------------- factory
def test_make_step_kinds(caplog, monkeypatch) -> None:
    monkeypatch.setattr(steps_base, "_said", set())
    graph = dml_graph(["resnet8"] * 2)
    with caplog.at_level(logging.INFO, logger="ktg_fast"):
        assert make_step("fused", graph, build(graph), TrainConfig()).kind == "fused"
        assert make_step("eager", graph, build(graph), TrainConfig()).kind == "eager"
        step = make_step("cudagraph", graph, build(graph), TrainConfig())
        make_step("cudagraph", graph, build(graph), TrainConfig())
        auto = make_step("auto", graph, build(graph), TrainConfig())
    assert step.kind == "fused"  # CPU nets: the CUDA-graph step falls back, saying so once
    assert sum("needs CUDA" in r.getMessage() for r in caplog.records) == 1
    assert any("step auto ->" in r.getMessage() for r in caplog.records)
    assert auto.kind == CPU_AUTO_KIND  # these nets are on the CPU, whether or not CUDA exists
    with pytest.raises(ValueError, match="unknown step 'fast'; choose from auto, eager, fused, cudagraph"):
        make_step("fast", graph, build(graph), TrainConfig())
    with pytest.raises(ValueError, match="CUDA device"):
        CudaGraphStep(graph, build(graph), TrainConfig())


def test_rejects_mismatched_inputs() -> None:
    graph = dml_graph(["resnet8"] * 2)
    with pytest.raises(ValueError, match="3 nets for a graph of 2"):
        FusedStep(graph, build(graph) + [get_model("resnet8", num_classes=10)], TrainConfig())
    with pytest.raises(ValueError, match="one net per node"):
        NodeGroup([1, 2], [get_model("resnet8", num_classes=10)], trainable=True)


def test_grads_set_to_none_by_a_caller_are_rebound() -> None:
    graph = dml_graph(["resnet8"] * 2 + ["wrn10_1"])  # the wrn10_1 group of one runs its net itself
    nets = build(graph)
    ref = copy.deepcopy(nets)
    fused, eager = FusedStep(graph, nets, TrainConfig()), EagerStep(graph, ref, TrainConfig())
    x, y = batch()
    for _ in range(3):
        for n in nets:
            n.zero_grad(set_to_none=True)
        fused(x, y, 1.0)
        eager(x, y, 1.0)
    assert_nets_equal(nets, ref)


# ------------------------------------------------------------------------------- GPU
# In float32 a step's rounding differences grow by orders of magnitude within 20 steps (BatchNorm
# nets at initialisation are that sensitive), so "the same weights" is only checkable where the
# same kernels run: the graph step in loop mode against eager (the very same ops), and the vmapped
# graph step against the vmapped fused step.  Fused vs eager with vmap is exact in float64 (above).
@pytest.fixture
def cuda_exact():
    flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
             torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = flags


def _gpu_nets(graph: Graph, seed: int = 0) -> list[nn.Module]:
    return [n.cuda() for n in build(graph, torch.float32, seed=seed, num_classes=100)]


def _gpu_batches(n: int, steps: int = 20):
    g = torch.Generator().manual_seed(3)
    return [(torch.rand(n, 3, 32, 32, generator=g).cuda(), torch.randint(0, 100, (n,), generator=g).cuda())
            for _ in range(steps)]


def _run_pair(graph: Graph, cfg: TrainConfig, a, b, steps: int = 20) -> None:
    progress = torch.zeros((), device="cuda")
    for k, (x, y) in enumerate(_gpu_batches(64, steps), start=1):
        progress.fill_(k / steps)
        if k == steps // 2:
            for s in (a, b):
                s.set_lrs([cfg.node_lr[t - 1] / 2 for t in graph.trainable])  # a schedule step between replays
        torch.testing.assert_close(a(x, y, progress), b(x, y, progress), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_graph_step_equals_eager_after_20_steps(cuda_exact) -> None:
    graph = Graph([Node("resnet20"), Node("wrn16_2"), Node("resnet20"), Node("resnet20", checkpoint="t.pt")],
                  [["cutoff", "through", "linear", "through", "cutoff"],
                   ["cutoff", "cutoff", "through", "correct", "cutoff"],
                   ["cutoff", "through", "cutoff", "through", "cutoff"],
                   ["cutoff", "through", "linear", "cutoff", "cutoff"],
                   ["cutoff", "through", "through", "through", "cutoff"]])
    cfg = TrainConfig(lr=0.02, node_lr=[0.02, 0.01, 0.02, 0.0])
    # Loop-mode graph step == eager: the same kernels, captured and replayed.
    g_nets, e_nets = _gpu_nets(graph), _gpu_nets(graph)
    graph_step, eager = CudaGraphStep(graph, g_nets, cfg, use_vmap=False), EagerStep(graph, e_nets, cfg)
    _run_pair(graph, cfg, graph_step, eager)
    assert graph_step.kind == "cudagraph" and graph_step._cuda_graph is not None  # really captured, no fallback
    assert_nets_equal(g_nets, e_nets)
    # vmapped graph step == vmapped fused step.
    v_nets, f_nets = _gpu_nets(graph), _gpu_nets(graph)
    graph_v, fused = CudaGraphStep(graph, v_nets, cfg), FusedStep(graph, f_nets, cfg)
    assert graph_v.groups[0].mode == "vmap"
    _run_pair(graph, cfg, graph_v, fused)
    assert graph_v.kind == "cudagraph" and graph_v.groups[0].mode == "vmap"
    assert_nets_equal(v_nets, f_nets)
    x, _ = _gpu_batches(64, 1)[0]
    torch.testing.assert_close(graph_v.eval_logits(x), fused.eval_logits(x), rtol=1e-5, atol=1e-5)
    # The graph path's checkpoint resumes in the eager path, and an eager checkpoint in a captured step.
    fresh = EagerStep(graph, _gpu_nets(graph, seed=9), cfg)
    fresh.load_node_state_dicts(graph_v.node_state_dicts())
    fresh.load_momentum_buffers(graph_v.momentum_buffers())
    assert_nets_equal(fresh.nets, v_nets, tol=0)
    graph_v.load_node_state_dicts(eager.node_state_dicts())
    graph_v.load_momentum_buffers(eager.momentum_buffers())
    graph_step.load_node_state_dicts(eager.node_state_dicts())
    graph_step.load_momentum_buffers(eager.momentum_buffers())
    _run_pair(graph, cfg, graph_step, eager, steps=4)  # loaded in place: the captured graph sees it
    assert_nets_equal(g_nets, e_nets)


@pytest.mark.gpu
def test_gpu_graph_step_has_no_host_sync(cuda_exact) -> None:
    graph = dml_graph(["resnet20", "resnet20", "wrn16_2"])
    step = CudaGraphStep(graph, _gpu_nets(graph), TrainConfig())
    progress = torch.zeros((), device="cuda")
    batches = _gpu_batches(64, steps=8)
    for x, y in batches[:4]:  # warm-up and capture (capture itself synchronises)
        step(x, y, progress)
    assert step._cuda_graph is not None
    loss_sum = torch.zeros(3, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k, (x, y) in enumerate(batches[4:]):
            progress.fill_(k / 8)
            node_loss, logits = step(x, y, progress)
            loss_sum += node_loss  # device-side accumulation, as the trainer does
        step.set_lrs([0.01, 0.01, 0.01])
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss_sum).all()


@pytest.mark.gpu
def test_gpu_streams_give_the_same_result(cuda_exact) -> None:
    graph = mixed_graph()
    a_nets, b_nets = _gpu_nets(graph), _gpu_nets(graph)
    a = FusedStep(graph, a_nets, TrainConfig(), streams=True)
    b = FusedStep(graph, b_nets, TrainConfig(), streams=False)
    assert a._streams is not None and b._streams is None
    for x, y in _gpu_batches(32, steps=3):
        torch.testing.assert_close(a(x, y, 0.5), b(x, y, 0.5), rtol=1e-5, atol=1e-5)
    assert_nets_equal(a_nets, b_nets)


# ---------------------------------------------------------------------------- devices
def test_runs_make_their_cuda_device_current(monkeypatch) -> None:
    """A run on cuda:1 makes cuda:1 current (Triton launches and graph captures use the current device);
    a device the machine lacks is refused by name. CUDA is mocked: this runs on the CPU."""
    from ktg_fast import device as tr

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert tr.use_device(tr.resolve_device("cuda:1")) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]
    assert tr.use_device(tr.resolve_device("cuda")) == torch.device("cuda", 0)
    assert tr.use_device(tr.resolve_device("cpu")) == torch.device("cpu") and len(current) == 2
    with pytest.raises(ValueError, match=r"'cuda:3' asked for but this machine has 2 CUDA devices"):
        tr.resolve_device("cuda:3")


def test_fused_step_enters_its_device(monkeypatch) -> None:
    """Every call of a fused step runs inside its nets' device context (a no-op on the CPU)."""
    graph = dml_graph(["resnet8"] * 2)
    step = FusedStep(graph, build(graph), TrainConfig())
    entered = []
    real = step._on_device

    def spy():
        entered.append(step.device)
        return real()

    monkeypatch.setattr(step, "_on_device", spy)
    x, y = torch.rand(4, 3, 32, 32, dtype=F64), torch.randint(0, 10, (4,))
    step(x, y, torch.zeros((), dtype=F64))
    assert entered == [torch.device("cpu")]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_graph_step_on_the_second_device(cuda_exact) -> None:
    """Nets on cuda:1 while cuda:0 is current: the captured step (its capture stream, its Triton launches)
    runs on cuda:1 and equals the fused step there."""
    graph = dml_graph(["resnet20", "resnet20", "wrn16_2"])
    dev1 = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    a_nets = [n.to(dev1) for n in build(graph, torch.float32, num_classes=100)]
    b_nets = [n.to(dev1) for n in build(graph, torch.float32, num_classes=100)]
    a, b = CudaGraphStep(graph, a_nets, TrainConfig()), FusedStep(graph, b_nets, TrainConfig())
    progress = torch.zeros((), device=dev1)
    for x, y in _gpu_batches(32, steps=6):
        x, y = x.to(dev1), y.to(dev1)
        torch.testing.assert_close(a(x, y, progress), b(x, y, progress), rtol=1e-5, atol=1e-5)
    assert a.kind == "cudagraph" and a._cuda_graph is not None and torch.cuda.current_device() == 0
    assert_nets_equal(a_nets, b_nets)


def test_old_step_name_graph_still_works_with_a_deprecation_message(caplog) -> None:
    graph = dml_graph(["resnet8"] * 2)
    with pytest.warns(FutureWarning, match="--step graph is now --step cudagraph"):
        step = make_step("graph", graph, build(graph), TrainConfig())
    assert step.kind == "fused"  # CPU nets: the CUDA-graph step falls back to the fused one


def test_old_step_name_on_the_command_line_is_one_warning_line(tmp_path) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "ktg_fast.train", "--graph", "vanilla", "--model", "resnet8",
                        "--dataset", "synthetic", "--train-subset", "32", "--eval-subset", "32", "--batch-size", "16",
                        "--epochs", "1", "--step", "graph", "--no-progress", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("deprecated") == 1 and "FutureWarning" not in r.stderr, r.stderr
    assert "warning: --step graph is deprecated (the old name goes in the next release): use --step cudagraph" \
        in r.stderr
