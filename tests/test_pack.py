"""Trial packing: the block-diagonal super-graph, and packed members equal to lone runs (issue 15)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ktg_fast as kf
from ktg_fast.data.plan import EpochLoader
from ktg_fast.graph import Graph, GraphError, Node
from ktg_fast.nodes import save_model_checkpoint
from ktg_fast.models import get_model
from ktg_fast.pack import pack_graphs
from ktg_fast.pack_trainer import PackTrainer
from ktg_fast.trainer import Trainer

from helpers import exploding_model, small_config, synthetic_data

PACK_SEED = 7


def _graphs(teacher: Path) -> list[Graph]:
    """Three members of different shapes: a DML pair with a linear gate, a mixed pair with a correct gate,
    and a student taught by a frozen teacher."""
    a = Graph([Node("resnet8"), Node("resnet8")],
              [["cutoff", "through", "linear"], ["cutoff", "cutoff", "through"], ["cutoff", "linear", "cutoff"]])
    b = Graph([Node("resnet8"), Node("wrn10_1")],
              [["cutoff", "through", "through"], ["cutoff", "cutoff", "correct"], ["cutoff", "through", "cutoff"]])
    c = Graph([Node("resnet8"), Node("resnet8", checkpoint=str(teacher))],
              [["cutoff", "through", "cutoff"], ["cutoff", "cutoff", "cutoff"], ["cutoff", "linear", "cutoff"]])
    return [a, b, c]


@pytest.fixture
def teacher(tmp_path: Path) -> Path:
    torch.manual_seed(123)
    path = tmp_path / "teacher.pt"
    save_model_checkpoint(path, get_model("resnet8", num_classes=10), name="resnet8", num_classes=10, in_channels=3)
    return path


def _data():
    return synthetic_data(val_size=32, train_subset=64, eval_subset=32, test=False)


def _weights(run: Path) -> list[dict[str, torch.Tensor]]:
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    return ckpt["nets"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(packed: Path, alone: Path, epochs: int) -> None:
    pw, aw = _weights(packed), _weights(alone)
    assert len(pw) == len(aw)
    for p, a in zip(pw, aw):
        assert p.keys() == a.keys()
        for k in p:
            torch.testing.assert_close(p[k], a[k], rtol=1e-5, atol=1e-5, msg=f"{k}")
    pm, am = _metrics(packed), _metrics(alone)
    assert [r["epoch"] for r in pm] == [r["epoch"] for r in am] == list(range(1, epochs + 1))
    for r, s in zip(pm, am):
        assert r["lr"] == s["lr"]  # None for frozen nodes
        for key in ("val_acc", "train_acc", "train_loss"):
            assert r[key] == pytest.approx(s[key], rel=1e-5, abs=1e-5), key


def test_pack_graphs_is_block_diagonal(teacher):
    a, b, c = _graphs(teacher)
    p = pack_graphs([a, b, c])
    g = p.graph
    assert g.num_nodes == 6 and p.offsets == (0, 2, 4)
    assert [n.model for n in g.nodes] == ["resnet8", "resnet8", "resnet8", "wrn10_1", "resnet8", "resnet8"]
    assert g.frozen == [6]  # c's teacher stays frozen; nothing else is
    for k, m in enumerate(p.members):
        for s in range(m.num_nodes + 1):
            for t in range(1, m.num_nodes + 1):
                src = 0 if s == 0 else p.offsets[k] + s
                assert g.gates[src][p.offsets[k] + t] == m.gates[s][t]
    # no edge between members
    for s in range(1, 7):
        for t in range(1, 7):
            if (s - 1) // 2 != (t - 1) // 2:
                assert g.gates[s][t] == "cutoff"
    assert p.split(list(range(6))) == [[0, 1], [2, 3], [4, 5]]
    assert p.per_node([0.5, 0.25, 1.0]).tolist() == [0.5, 0.5, 0.25, 0.25, 1.0, 1.0]
    c.temperature = 2.0
    with pytest.raises(GraphError, match="temperature"):
        pack_graphs([a, c])
    with pytest.raises(GraphError, match="at least one"):
        pack_graphs([])
    with pytest.raises(ValueError, match="one per node"):
        p.split([1, 2])


@pytest.fixture
def float64(monkeypatch):
    """Nets, batches and progress in float64: a fused pack stacks more nodes per group than a lone run, and
    oneDNN's grouped convolutions round differently with the group count (1e-6 in float32, grown by training)."""
    torch.set_default_dtype(torch.float64)
    plain = EpochLoader.__iter__

    def double(self):
        for x, y in plain(self):
            yield x.double(), y

    monkeypatch.setattr(EpochLoader, "__iter__", double)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("step", ["eager", "fused"])
def test_packed_trials_equal_lone_runs(tmp_path, teacher, step, float64):
    """Three trials packed for 2 epochs end exactly as each trial alone with the pack's data seed."""
    graphs, data, seeds = _graphs(teacher), _data(), [3, 4, 5]
    pack = PackTrainer(data, batch_size=16, data_seed=PACK_SEED, device="cpu", step=step)
    members = [pack.add(k, g, small_config(seed=s, epochs=2, batch_size=16), tmp_path / f"packed{k}")
               for k, (g, s) in enumerate(zip(graphs, seeds))]
    for _ in range(2):
        outcomes = pack.run_epoch()
        assert [o.member for o in outcomes] == members and all(o.failure is None for o in outcomes)
    assert [r["pack_size"] for r in _metrics(tmp_path / "packed0")] == [3, 3]  # images_per_s is the pack's
    for mem, o in zip(members, outcomes):
        final = pack.finish(mem, o.record)
        assert final["epoch"] == 2 and (mem.out / "final.json").is_file()
    for k, (g, s) in enumerate(zip(graphs, seeds)):
        alone = tmp_path / f"alone{k}"
        Trainer(g, data, small_config(seed=s, epochs=2, batch_size=16, data_seed=PACK_SEED), alone,
                device="cpu", step=step, progress=False).run()
        _assert_same_run(tmp_path / f"packed{k}", alone, 2)
        # the final node files hold the same weights too
        for node_file in (alone / "nodes").glob("*.pt"):
            a = torch.load(node_file, weights_only=True)["state_dict"]
            p = torch.load(tmp_path / f"packed{k}" / "nodes" / node_file.name, weights_only=True)["state_dict"]
            for key in a:
                torch.testing.assert_close(p[key], a[key], rtol=1e-5, atol=1e-5)


def test_refill_newcomer_equals_its_lone_run(tmp_path, teacher, float64):
    """A member leaving after epoch 1 is replaced; the newcomer (joining at pack epoch 1) trains as it
    would alone with the pack's data seed from epoch 1 on, and the member that stays is unaffected."""
    a, b, c = _graphs(teacher)
    data = _data()
    pack = PackTrainer(data, batch_size=16, data_seed=PACK_SEED, device="cpu", step="fused")
    stay = pack.add("stay", a, small_config(seed=1, epochs=3, batch_size=16), tmp_path / "stay")
    gone = pack.add("gone", b, small_config(seed=2, epochs=3, batch_size=16), tmp_path / "gone")
    pack.run_epoch()
    pack.remove(gone)  # pruned after its first epoch
    new = pack.add("new", c, small_config(seed=9, epochs=2, batch_size=16), tmp_path / "new")
    assert new.cfg.data_offset == 1 and new.cfg.data_seed == PACK_SEED
    for _ in range(2):
        pack.run_epoch()
    assert stay.epoch == 3 and new.epoch == 2
    Trainer(c, data, small_config(seed=9, epochs=2, batch_size=16, data_seed=PACK_SEED, data_offset=1),
            tmp_path / "new-alone", device="cpu", step="fused", progress=False).run()
    _assert_same_run(tmp_path / "new", tmp_path / "new-alone", 2)
    Trainer(a, data, small_config(seed=1, epochs=3, batch_size=16, data_seed=PACK_SEED), tmp_path / "stay-alone",
            device="cpu", step="eager", progress=False).run()
    _assert_same_run(tmp_path / "stay", tmp_path / "stay-alone", 3)


def test_a_diverging_member_fails_alone(tmp_path, teacher):
    """A member whose loss turns NaN is reported failed, naming its node; the others train on unharmed."""
    a, _, _ = _graphs(teacher)
    data = _data()
    with exploding_model(from_call=2):
        bad = Graph([Node("exploding"), Node("resnet8")], [["cutoff", "through", "through"],
                                                          ["cutoff", "cutoff", "through"],
                                                          ["cutoff", "through", "cutoff"]])
        pack = PackTrainer(data, batch_size=16, data_seed=PACK_SEED, device="cpu", step="eager")
        good = pack.add(0, a, small_config(seed=1, epochs=1, batch_size=16), tmp_path / "good")
        pack.add(1, bad, small_config(seed=2, epochs=1, batch_size=16), tmp_path / "bad")
        out = pack.run_epoch()
    assert out[0].failure is None and out[0].record is not None
    assert out[1].record is None and "non-finite" in out[1].failure and "node 1 (exploding)" in out[1].failure
    Trainer(a, data, small_config(seed=1, epochs=1, batch_size=16, data_seed=PACK_SEED), tmp_path / "alone",
            device="cpu", step="eager", progress=False).run()
    _assert_same_run(good.out, tmp_path / "alone", 1)


def test_member_recipe_must_match_the_pack(tmp_path, teacher):
    a, _, c = _graphs(teacher)
    pack = PackTrainer(_data(), batch_size=16, data_seed=0, device="cpu", step="eager")
    with pytest.raises(ValueError, match="batch size"):
        pack.add(0, a, small_config(batch_size=32), tmp_path / "x")
    pack.add(0, a, small_config(batch_size=16), tmp_path / "a")
    c.temperature = 3.0
    with pytest.raises(ValueError, match="temperature 3 differs from the pack's 1"):
        pack.add(1, c, small_config(batch_size=16), tmp_path / "c")
    with pytest.raises(RuntimeError, match="no member"):
        PackTrainer(_data(), batch_size=16, device="cpu").run_epoch()
    # One optimizer serves the pack: a member of another momentum, nesterov, weight decay or memory layout
    # would silently train with the first member's.
    for change, name in [(dict(momentum=0.5), "momentum"), (dict(nesterov=False), "nesterov"),
                         (dict(weight_decay=0.0), "weight_decay"), (dict(channels_last=True), "channels_last")]:
        with pytest.raises(ValueError, match=f"{name}=.*the pack's"):
            pack.add(2, a, small_config(batch_size=16, **change), tmp_path / "d")
    with pytest.raises(ValueError, match="already in the pack"):
        pack.add(0, a, small_config(batch_size=16), tmp_path / "e")
    with pytest.raises(ValueError, match="output folder"):
        pack.add(3, a, small_config(batch_size=16), tmp_path / "a")
    assert [m.key for m in pack.members] == [0]


def test_members_misused_after_their_epochs_get_clear_errors(tmp_path, teacher):
    """A finished member left in, a member removed twice, and finish/save_node of a member whose places went to
    a newcomer (they would write the newcomer's weights as its own) each raise a ValueError naming the fix."""
    a, b, _ = _graphs(teacher)
    pack = PackTrainer(_data(), batch_size=16, data_seed=PACK_SEED, device="cpu", step="eager")
    one = pack.add("one", a, small_config(seed=1, epochs=1, batch_size=16), tmp_path / "one")
    two = pack.add("two", b, small_config(seed=2, epochs=2, batch_size=16), tmp_path / "two")
    with pytest.raises(ValueError, match="'one' did not train"):
        pack.finish(one, {})  # not trained yet
    records = {o.member.key: o.record for o in pack.run_epoch()}
    with pytest.raises(ValueError, match="'one' has done its 1 epochs: finish"):
        pack.run_epoch()
    assert two.epoch == 1  # nothing ran
    pack.remove(one)
    with pytest.raises(ValueError, match="'one' is not in the pack"):
        pack.remove(one)
    final = pack.finish(one, records["one"])  # still valid: the next epoch has not run
    assert final["epoch"] == 1 and (tmp_path / "one" / "nodes" / "node1_resnet8.pt").exists()
    with pytest.raises(ValueError, match="'two' has done 1 of its 2 epochs: finish"):
        pack.finish(two, records["two"])  # not done: a pruned member saves nodes, not final.json
    for t in (0, 3, 1.0):
        with pytest.raises(ValueError, match="t is 1-based, 1..2"):
            pack.save_node(two, t)
    with pytest.raises(ValueError, match="is member 'one''s \\(in this pack now or earlier\\)"):
        pack.add("one-again", a, small_config(seed=1, epochs=1, batch_size=16), tmp_path / "one")
    assert (tmp_path / "one" / "final.json").exists() and (tmp_path / "one" / "metrics.jsonl").read_text()
    pack.add("new", Graph([Node("resnet8"), Node("resnet8")], a.gates), small_config(seed=3, epochs=1,
                                                                                    batch_size=16), tmp_path / "new")
    pack.run_epoch()
    assert pack.refills == 1  # the newcomer took one's places
    with pytest.raises(ValueError, match="'one' did not train in the pack's last epoch"):
        pack.finish(one, records["one"])
    with pytest.raises(ValueError, match="'one' did not train"):
        pack.save_node(one, 1)


def test_a_pack_never_compiles_unasked(teacher, tmp_path, monkeypatch):
    """Newcomers of other node kinds and a search's tail rebuild the step: a long pack on `auto` must not pick
    the compiled step (a compile per rebuild)."""
    import ktg_fast.steps as steps

    monkeypatch.setattr(steps, "CPU_COMPILE_MIN_STEPS", 1)
    pack = PackTrainer(_data(), batch_size=16, augment=False, data_seed=PACK_SEED, device="cpu", step="auto")
    a, _, _ = _graphs(teacher)
    pack.add(0, a, small_config(epochs=1, batch_size=16, augment=False), tmp_path / "m0")
    pack.run_epoch()
    assert pack.train_step.kind != "compiled" and pack.rebuilds == 1


def _like_b() -> Graph:
    """Same node models and frozen nodes as member b of :func:`_graphs`, other gates: it fits b's slot."""
    return Graph([Node("resnet8"), Node("wrn10_1")],
                 [["cutoff", "linear", "correct"], ["cutoff", "cutoff", "through"], ["cutoff", "linear", "cutoff"]])


@pytest.mark.parametrize("step", ["eager", "fused"])
def test_a_newcomer_that_fits_takes_the_slot_in_place(tmp_path, teacher, step, float64):
    """Pruned after epoch 1, member b's slot goes to a newcomer of the same node models: the step is not
    rebuilt (its tensors are rewritten in place), the newcomer equals its lone run from its epoch 0 (the
    slot's old weights, momentum and gates are gone) and the members that stay are unaffected."""
    a, b, c = _graphs(teacher)
    data = _data()
    pack = PackTrainer(data, batch_size=16, data_seed=PACK_SEED, device="cpu", step=step)
    stay = pack.add("stay", a, small_config(seed=1, epochs=3, batch_size=16), tmp_path / "stay")
    gone = pack.add("gone", b, small_config(seed=2, epochs=3, batch_size=16), tmp_path / "gone")
    third = pack.add("third", c, small_config(seed=3, epochs=3, batch_size=16), tmp_path / "third")
    pack.run_epoch()
    step_before, nets_before = pack.train_step, list(pack.train_step.nets)
    pack.remove(gone)
    new = pack.add("new", _like_b(), small_config(seed=9, epochs=2, batch_size=16), tmp_path / "new")
    for _ in range(2):
        out = pack.run_epoch()
    assert [o.member for o in out] == [stay, third, new]  # in the order they joined
    assert pack.rebuilds == 1 and pack.refills == 1 and pack.train_step is step_before
    assert pack.train_step.nets == nets_before and new.places == [3, 4] and new.nets == nets_before[2:4]
    Trainer(_like_b(), data, small_config(seed=9, epochs=2, batch_size=16, data_seed=PACK_SEED, data_offset=1),
            tmp_path / "new-alone", device="cpu", step=step, progress=False).run()
    _assert_same_run(tmp_path / "new", tmp_path / "new-alone", 2)
    Trainer(a, data, small_config(seed=1, epochs=3, batch_size=16, data_seed=PACK_SEED), tmp_path / "stay-alone",
            device="cpu", step=step, progress=False).run()
    _assert_same_run(tmp_path / "stay", tmp_path / "stay-alone", 3)


def test_an_empty_slot_is_masked_and_a_tail_compacts(tmp_path, teacher, float64):
    """A slot left empty costs the others nothing: its loss is exactly zero, its weights stay zero (lr 0),
    and the members go on as alone; when at most half the slots are in use the step is rebuilt smaller."""
    a, b, c = _graphs(teacher)
    data = _data()
    pack = PackTrainer(data, batch_size=16, data_seed=PACK_SEED, device="cpu", step="fused")
    stay = pack.add("stay", a, small_config(seed=1, epochs=3, batch_size=16), tmp_path / "stay")
    gone = pack.add("gone", b, small_config(seed=2, epochs=3, batch_size=16), tmp_path / "gone")
    third = pack.add("third", c, small_config(seed=3, epochs=2, batch_size=16), tmp_path / "third")
    pack.run_epoch()
    pack.remove(gone)  # no newcomer: its slot (nodes 3, 4) is masked
    out = pack.run_epoch()
    assert [o.member for o in out] == [stay, third] and pack.rebuilds == 1 and pack.layout == [stay, third]
    empty = pack.train_step.nets[2:4]
    assert all(float(p.detach().abs().sum()) == 0.0 for net in empty for p in net.parameters())
    losses = pack.loss(pack.train_step.eval_logits(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    assert losses.node_loss[2:4].tolist() == [0.0, 0.0] and bool((losses.node_loss[:2] > 0).all())
    pack.remove(third)  # done: one of three slots in use -> a step of member a alone
    pack.run_epoch()
    assert pack.rebuilds == 2 and pack.packed.graph.num_nodes == 2 and pack.layout == [stay]
    Trainer(a, data, small_config(seed=1, epochs=3, batch_size=16, data_seed=PACK_SEED), tmp_path / "stay-alone",
            device="cpu", step="fused", progress=False).run()
    _assert_same_run(tmp_path / "stay", tmp_path / "stay-alone", 3)
    Trainer(c, data, small_config(seed=3, epochs=2, batch_size=16, data_seed=PACK_SEED), tmp_path / "third-alone",
            device="cpu", step="fused", progress=False).run()
    _assert_same_run(tmp_path / "third", tmp_path / "third-alone", 2)


@pytest.mark.gpu
def test_gpu_cudagraph_pack_refills_without_recapture(tmp_path, teacher, float64):
    """On CUDA (float64, so that grouping cannot round differently): a newcomer taking free places replays
    the CUDA graph captured before it joined, and equals its lone CUDA-graph run from its epoch 0."""
    a, b, c = _graphs(teacher)
    data = _data()
    pack = PackTrainer(data, batch_size=16, data_seed=PACK_SEED, device="cuda", step="cudagraph", loss_impl="auto")
    pack.add("stay", a, small_config(seed=1, epochs=3, batch_size=16), tmp_path / "stay")
    gone = pack.add("gone", b, small_config(seed=2, epochs=3, batch_size=16), tmp_path / "gone")
    pack.run_epoch()
    graph = pack.train_step._cuda_graph
    assert graph is not None, "the pack's step was not captured"
    pack.remove(gone)
    new = pack.add("new", _like_b(), small_config(seed=9, epochs=2, batch_size=16), tmp_path / "new")
    for _ in range(2):
        pack.run_epoch()
    assert pack.refills == 1 and pack.rebuilds == 1 and pack.train_step._cuda_graph is graph
    assert new.places == [3, 4]
    Trainer(_like_b(), data, small_config(seed=9, epochs=2, batch_size=16, data_seed=PACK_SEED, data_offset=1),
            tmp_path / "new-alone", device="cuda", step="cudagraph", progress=False).run()
    _assert_same_run(tmp_path / "new", tmp_path / "new-alone", 2)


@pytest.mark.parametrize("kind", ["eager", "fused"])
def test_reset_nodes_restarts_only_those_nodes(kind):
    """TrainStep.reset_nodes (a pack's refill): the node gets the given weights and buffers, no momentum and a
    fresh fp16 loss scale, in the step's own tensors; every other node keeps its state."""
    from helpers import build_nets, mixed_graph
    from ktg_fast.recipe import TrainConfig
    from ktg_fast.steps import make_step

    graph = mixed_graph("resnet8", "wrn10_1", "resnet8")
    step = make_step(kind, graph, build_nets(graph), TrainConfig(lr=0.05), precision="fp16")
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        step(torch.rand(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g), 0.5)
    scale = step.loss_scale_state()
    scale["scale"][:] = 8.0  # as if every node had overflowed
    step.load_loss_scale_state(scale)
    before = step.node_state_dicts()
    moms = step.momentum_buffers()
    tensors = [p.data_ptr() for p in step.nets[0].parameters()]
    fresh = build_nets(graph, seed=5)[0].state_dict()
    step.reset_nodes({1: fresh})
    after, moms_after = step.node_state_dicts(), step.momentum_buffers()
    assert [p.data_ptr() for p in step.nets[0].parameters()] == tensors  # written in place
    for k, v in fresh.items():
        assert torch.equal(after[0][k], v), k
    assert all(float(b.abs().sum()) == 0 for b in moms_after[0].values())
    for t in (2, 3):  # trainable nodes left alone: weights and momentum
        for k in before[t - 1]:
            assert torch.equal(after[t - 1][k], before[t - 1][k]), (t, k)
        assert moms_after[t - 1].keys() == moms[t - 1].keys() and moms[t - 1]
        for k in moms[t - 1]:
            assert torch.equal(moms_after[t - 1][k], moms[t - 1][k]), (t, k)
    assert step.loss_scale_state()["scale"].tolist()[:3] == [2.0 ** 16, 8.0, 8.0]
    with pytest.raises(KeyError, match="node 9"):
        step.reset_nodes({9: fresh})


def test_custom_gates_fall_back_to_a_new_step_per_change(tmp_path, teacher):
    """Gates set in place take the built-in gates only: a pack holding a custom gate binds its loss to fixed
    gates and rebuilds the step whenever its members change (and still trains)."""
    a, b, _ = _graphs(teacher)
    kf.register_gate("half_pack", lambda ctx: 0.5)
    try:
        odd = Graph([Node("resnet8"), Node("resnet8")], [["cutoff", "half_pack", "through"],
                                                         ["cutoff", "cutoff", "through"],
                                                         ["cutoff", "through", "cutoff"]])
        pack = PackTrainer(_data(), batch_size=16, data_seed=PACK_SEED, device="cpu", step="fused")
        pack.add(0, a, small_config(epochs=3, batch_size=16), tmp_path / "a")
        gone = pack.add(1, odd, small_config(epochs=3, batch_size=16), tmp_path / "odd")
        pack.add(2, b, small_config(epochs=3, batch_size=16), tmp_path / "b")
        pack.run_epoch()
        assert pack.loss is None
        pack.remove(gone)
        out = pack.run_epoch()
        assert pack.rebuilds == 2 and pack.loss is not None and all(o.failure is None for o in out)
        pack.add(3, odd, small_config(epochs=3, batch_size=16), tmp_path / "odd2")  # no in-place loss for it
        pack.run_epoch()
        assert pack.rebuilds == 3 and pack.refills == 0 and pack.loss is None
    finally:
        kf.gates.unregister_gate("half_pack")


def test_a_newcomer_takes_free_places_anywhere_when_blocks_are_uniform(tmp_path, teacher, float64):
    """Members of one node count: the loss's blocks are regrouped, so a newcomer may take free places left by
    two different members (not one contiguous range); it equals its lone run and the member that stays is
    unaffected."""
    a, b, c = _graphs(teacher)
    data = _data()
    pack = PackTrainer(data, batch_size=16, data_seed=PACK_SEED, device="cpu", step="fused")
    first = pack.add("a", a, small_config(seed=1, epochs=2, batch_size=16), tmp_path / "a")
    second = pack.add("b", b, small_config(seed=2, epochs=2, batch_size=16), tmp_path / "b")
    stay = pack.add("c", c, small_config(seed=3, epochs=2, batch_size=16), tmp_path / "c")
    pack.run_epoch()
    assert pack.loss.plan.live.uniform
    pack.remove(first)
    pack.remove(second)
    new = pack.add("d", _like_b(), small_config(seed=9, epochs=1, batch_size=16), tmp_path / "d")
    pack.run_epoch()
    assert pack.rebuilds == 1 and pack.refills == 1
    assert new.places == [1, 4]  # resnet8 from a's places, wrn10_1 from b's
    assert [list(g) for g in pack.loss.plan.live.groups] == [[4, 5], [0, 3], [1, 2]]  # c, d, the free places
    Trainer(_like_b(), data, small_config(seed=9, epochs=1, batch_size=16, data_seed=PACK_SEED, data_offset=1),
            tmp_path / "d-alone", device="cpu", step="fused", progress=False).run()
    _assert_same_run(tmp_path / "d", tmp_path / "d-alone", 1)
    Trainer(c, data, small_config(seed=3, epochs=2, batch_size=16, data_seed=PACK_SEED), tmp_path / "c-alone",
            device="cpu", step="fused", progress=False).run()
    _assert_same_run(tmp_path / "c", tmp_path / "c-alone", 2)
    assert stay.epoch == 2


def test_beyond_the_kernel_limit_a_newcomer_still_takes_places_anywhere(tmp_path):
    """Nine (resnet8, wrn10_1) members: 18 nodes, past the kernel's 16.  Fixed launch ranges ((0, 16), (16, 18))
    would keep a newcomer within one range; uniform blocks let a (resnet8, resnet8) newcomer take the resnet8
    places of the first and the last member, in place."""
    mixed = Graph([Node("resnet8"), Node("wrn10_1")],
                  [["cutoff", "through", "through"], ["cutoff", "cutoff", "through"], ["cutoff", "through", "cutoff"]])
    data = synthetic_data(val_size=16, train_subset=16, eval_subset=16, test=False)
    pack = PackTrainer(data, batch_size=16, augment=False, data_seed=PACK_SEED, device="cpu", step="eager")
    members = [pack.add(k, mixed, small_config(seed=k, epochs=2, batch_size=16, augment=False), tmp_path / str(k))
               for k in range(9)]
    pack.run_epoch()
    assert pack.packed.graph.num_nodes == 18 and pack.loss.plan.live.uniform
    pack.remove(members[0])
    pack.remove(members[8])
    pair = Graph([Node("resnet8"), Node("resnet8")],
                 [["cutoff", "through", "cutoff"], ["cutoff", "cutoff", "linear"], ["cutoff", "cutoff", "cutoff"]])
    new = pack.add("new", pair, small_config(seed=20, epochs=1, batch_size=16, augment=False), tmp_path / "new")
    out = pack.run_epoch()
    assert pack.rebuilds == 1 and pack.refills == 1 and new.places == [1, 17]
    assert [o.member.key for o in out] == [*range(1, 8), "new"] and all(o.failure is None for o in out)
    assert list(pack.loss.plan.live.groups[-2]) == [0, 16] and list(pack.loss.plan.live.groups[-1]) == [1, 17]
