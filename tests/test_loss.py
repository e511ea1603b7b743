"""The vectorised reference graph loss against a brute-force loop over edges (float64)."""
import random

import pytest
import torch

import ktg_fast as kf
from ktg_fast import gates as G


from brute_force import analytic_grad, brute_force_graph_loss

GATE_NAMES = ["cutoff", "through", "linear", "correct"]


def random_gates(m, rng, p_cut=0.3):
    g = [["cutoff"] * (m + 1) for _ in range(m + 1)]
    for s in range(m + 1):
        for t in range(1, m + 1):
            if s != t:
                g[s][t] = "cutoff" if rng.random() < p_cut else rng.choice(GATE_NAMES)
    return g


def random_case(seed):
    rng = random.Random(seed)
    m = rng.randint(1, 7)
    b = rng.choice([1, 3, 8, 13])
    c = rng.choice([2, 3, 7, 10, 33])
    gen = torch.Generator().manual_seed(seed)
    logits = [(torch.randn(b, c, generator=gen, dtype=torch.float64) * rng.choice([0.5, 3.0])).requires_grad_() for _ in range(m)]
    labels = torch.randint(0, c, (b,), generator=gen)
    # Make the correct gate bite both ways: some rows where a source is right.
    if m >= 1 and b > 1:
        labels[0] = int(logits[0][0].argmax())
    labels[torch.rand(b, generator=gen) < 0.2] = -100
    gates = random_gates(m, rng)
    return logits, labels, gates, rng.choice([1.0, 2.0, 4.0]), rng.choice([0.0, 0.25, 1.0, 0.731])


@pytest.mark.parametrize("seed", range(40))
def test_reference_matches_brute_force(seed):
    logits, labels, gates, T, prog = random_case(seed)
    node_bf, edge_bf = brute_force_graph_loss(logits, labels, gates, T, prog)
    if node_bf.requires_grad:
        grads_bf = torch.autograd.grad(node_bf.sum(), logits, allow_unused=True)
    else:  # every edge cut: nothing to differentiate
        grads_bf = [None] * len(logits)
    grads_bf = [g if g is not None else torch.zeros_like(z) for g, z in zip(grads_bf, logits)]

    res = kf.graph_loss(logits, labels, gates, temperature=T, progress=prog)
    assert res.node_loss.dtype == torch.float64
    torch.testing.assert_close(res.edge_loss, edge_bf, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.node_loss, node_bf, rtol=0, atol=1e-10)
    grads = torch.autograd.grad(res.node_loss.sum(), logits, allow_unused=True) if res.node_loss.requires_grad else grads_bf
    for t, (g, gb) in enumerate(zip(grads, grads_bf)):
        g = torch.zeros_like(gb) if g is None else g
        torch.testing.assert_close(g, gb, rtol=0, atol=1e-10, msg=f"node {t + 1}")
    # And the closed-form gradient of SEMANTICS.md.
    for g, ga in zip(grads, analytic_grad(logits, labels, gates, T, prog)):
        g = torch.zeros_like(ga) if g is None else g
        torch.testing.assert_close(g, ga, rtol=0, atol=1e-10)


def test_stacked_and_list_inputs_agree_and_gates_as_codes():
    logits, labels, gates, T, prog = random_case(123)
    stacked = torch.stack([z.detach() for z in logits])
    codes = torch.tensor([[G.get_gate(g).code for g in row] for row in gates])
    a = kf.graph_loss(logits, labels, gates, temperature=T, progress=prog)
    b = kf.graph_loss(stacked, labels, codes, temperature=T, progress=torch.tensor(prog))
    torch.testing.assert_close(a.edge_loss, b.edge_loss, rtol=0, atol=1e-12)


def test_gradcheck():
    gen = torch.Generator().manual_seed(0)
    m, b, c = 3, 4, 5
    z = torch.randn(m, b, c, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.tensor([0, 3, -100, 4])
    gates = random_gates(m, random.Random(5), p_cut=0.0)
    for s in range(m + 1):
        gates[s][0] = "cutoff"
    for t in range(1, m + 1):
        gates[t][t] = "cutoff"
    # Sources are detached by design, so the check is per target: node t's loss
    # as a function of node t's logits, the other nodes held fixed.
    for t in range(m):
        def f(zt, t=t):
            full = torch.cat([z[:t].detach(), zt.unsqueeze(0), z[t + 1:].detach()])
            return kf.graph_loss(full, labels, gates, temperature=2.0, progress=0.4).node_loss[t]

        assert torch.autograd.gradcheck(f, (z[t].detach().clone().requires_grad_(),))


def test_gradient_isolation():
    """d node_loss[t] / d logits reaches node t's logits only."""
    gen = torch.Generator().manual_seed(1)
    m, b, c = 4, 6, 9
    z = torch.randn(m, b, c, dtype=torch.float64, generator=gen, requires_grad=True)
    labels = torch.randint(0, c, (b,), generator=gen)
    gates = kf.preset("dml", nodes=m).gates
    res = kf.graph_loss(z, labels, gates)
    for t in range(m):
        (g,) = torch.autograd.grad(res.node_loss[t], z, retain_graph=True)
        others = torch.cat([g[:t], g[t + 1:]])
        assert others.abs().max() == 0
        assert g[t].abs().max() > 0


def test_all_ignored_batch_gives_zero_not_nan():
    z = torch.randn(2, 3, 4, requires_grad=True)
    labels = torch.full((3,), -100)
    res = kf.graph_loss(z, labels, [["cutoff", "through", "through"], ["cutoff", "cutoff", "through"], ["cutoff", "through", "cutoff"]])
    assert torch.equal(res.node_loss, torch.zeros(2))
    res.node_loss.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


def test_frozen_node_gets_no_gradient_and_low_precision_is_float32():
    z = torch.randn(2, 5, 7, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 7, (5,))
    gates = [["cutoff", "through", "cutoff"], ["cutoff", "cutoff", "cutoff"], ["cutoff", "through", "cutoff"]]
    res = kf.graph_loss(z, labels, gates, temperature=2.0)
    assert res.node_loss.dtype == torch.float32
    assert res.node_loss[1] == 0
    res.node_loss.sum().backward()
    assert z.grad.dtype == torch.bfloat16
    assert z.grad[1].abs().max() == 0 and z.grad[0].abs().max() > 0
    ref = kf.graph_loss(z.detach().double(), labels, gates, temperature=2.0)
    torch.testing.assert_close(res.node_loss.double(), ref.node_loss, rtol=2e-2, atol=2e-2)


def test_custom_gate_registry():
    kf.register_gate("half", lambda ctx: 0.5)
    try:
        logits, labels, gates, T, prog = random_case(7)
        half = [[("half" if g == "through" else g) for g in row] for row in gates]
        a = kf.graph_loss(logits, labels, gates, temperature=T, progress=prog)
        b = kf.graph_loss(logits, labels, half, temperature=T, progress=prog)
        through = torch.tensor([[g == "through" for g in row] for row in gates])
        torch.testing.assert_close(b.edge_loss[through], 0.5 * a.edge_loss[through])
        torch.testing.assert_close(b.edge_loss[~through], a.edge_loss[~through])
        with pytest.raises(ValueError, match="built-in gates only"):
            kf.graph_loss(logits, labels, half, impl="triton")
        # Per-sample weights from the context: weigh each row by its index.
        G.register_gate("rowidx", lambda ctx: torch.arange(ctx.labels.shape[0], dtype=ctx.progress.dtype))
        z = torch.randn(1, 3, 4, dtype=torch.float64)
        y = torch.tensor([1, 2, 3])
        r = kf.graph_loss(z, y, [["cutoff", "rowidx"], ["cutoff", "cutoff"]])
        ce = torch.nn.functional.cross_entropy(z[0], y, reduction="none")
        torch.testing.assert_close(r.node_loss[0], (ce * torch.arange(3)).mean())
    finally:
        G.unregister_gate("half")
        G.unregister_gate("rowidx")
    with pytest.raises(ValueError, match="built-in"):
        G.unregister_gate("through")
    with pytest.raises(ValueError, match="already registered"):
        kf.register_gate("linear", lambda ctx: 1.0)


@pytest.mark.parametrize(
    "gates, match",
    [
        ([["cutoff", "through"], ["through", "cutoff"]], r"gate\[1\]\[0\].*label"),
        ([["cutoff", "through"], ["cutoff", "through"]], r"gate\[1\]\[1\].*itself"),
        ([["cutoff", "through", "cutoff"]] * 3, "3x3 but logits hold 1"),
        ([["cutoff", "bogus"], ["cutoff", "cutoff"]], r"^gate\[0\]\[1\]: unknown gate 'bogus'"),
        ([[0, 7], [0, 0]], r"^gate\[0\]\[1\]: unknown gate 7; known gates \(name and integer code\): cutoff \(0\)"),
        (torch.tensor([[0, 1], [-1, 0]]), r"^gate\[1\]\[0\]: unknown gate -1"),
        ([["cutoff", "through", "cutoff"]] * 2, r"must be square \(M\+1, M\+1\), got 2 rows of lengths \[3, 3\]"),
    ],
)
def test_bad_gate_matrices(gates, match):
    with pytest.raises(ValueError, match=match) as e:  # an unknown gate too (UnknownGateError is a ValueError)
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), gates)
    assert not str(e.value).startswith(('"', "'"))  # no KeyError quotes around the message


def test_a_tensor_temperature_and_an_absent_device_are_named():
    g = [["cutoff", "through"], ["cutoff", "cutoff"]]
    with pytest.raises(TypeError, match=r"not a tensor; got tensor\(2\.\): pass float\(temperature\)"):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), g, temperature=torch.tensor(2.0))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            kf.GraphLoss(g, 2.0, device="cuda")  # refused, not ignored, also without blocks
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        kf.GraphLoss(g, 2.0, device="gpu0")


def test_bad_shapes_and_args():
    g = [["cutoff", "through"], ["cutoff", "cutoff"]]
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1, 2]), g)
    with pytest.raises(ValueError, match="of one shape"):
        kf.graph_loss([torch.randn(2, 3), torch.randn(2, 4)], torch.tensor([0, 1]), [["cutoff"] * 3] * 3)
    with pytest.raises(ValueError, match="impl must be"):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), g, impl="fast")
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), g, temperature=0)


# --------------------------------------------------------------- masked classes, non-finite sources
def _masked_case(seed: int, m: int = 3, b: int = 6, c: int = 12, masked=(2, 7, 11)):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(m, b, c, generator=gen, dtype=torch.float64) * 2
    z[:, :, list(masked)] = float("-inf")  # e.g. padded vocabulary entries, masked in every node
    keep = [k for k in range(c) if k not in masked]
    labels = torch.tensor(keep)[torch.randint(0, len(keep), (b,), generator=gen)]
    labels[1] = -100
    return z, labels, keep


@pytest.mark.parametrize("seed", range(4))
def test_masked_classes_follow_0_log_0(seed):
    """-inf logits shared by all nodes: finite losses equal to the loss over the unmasked classes,
    zero gradient on masked classes, against the brute force too."""
    z, labels, keep = _masked_case(seed)
    rng = random.Random(seed)
    gates = random_gates(3, rng, p_cut=0.0)
    leaf = z.clone().requires_grad_()
    res = kf.graph_loss(leaf, labels, gates, temperature=2.0, progress=0.5)
    assert torch.isfinite(res.edge_loss).all()
    (grad,) = torch.autograd.grad(res.node_loss.sum(), leaf)
    assert torch.isfinite(grad).all() and grad[:, :, [2, 7, 11]].abs().max() == 0
    # The same loss on the sub-vocabulary: remap labels onto the kept classes.
    remap = {k: i for i, k in enumerate(keep)}
    sub_labels = torch.tensor([remap.get(int(y), -100) for y in labels])
    sub = z[:, :, keep].clone().requires_grad_()
    ref = kf.graph_loss(sub, sub_labels, gates, temperature=2.0, progress=0.5)
    torch.testing.assert_close(res.edge_loss, ref.edge_loss, rtol=0, atol=1e-12)
    (sub_grad,) = torch.autograd.grad(ref.node_loss.sum(), sub)
    torch.testing.assert_close(grad[:, :, keep], sub_grad, rtol=0, atol=1e-12)
    node_bf, edge_bf = brute_force_graph_loss(list(z.unbind(0)), labels, gates, 2.0, 0.5)
    torch.testing.assert_close(res.edge_loss, edge_bf, rtol=0, atol=1e-10)


def test_masked_source_class_against_an_open_target_is_finite():
    """Node 1 masks classes node 2 keeps: KL(p_1 || p_2) is finite (0 log 0 = 0 on the source side)."""
    z, labels, _ = _masked_case(5, m=2)
    z[1] = torch.randn(z.shape[1:], dtype=torch.float64)  # node 2 masks nothing
    gates = [["cutoff", "through", "through"], ["cutoff", "cutoff", "through"], ["cutoff", "cutoff", "cutoff"]]
    res = kf.graph_loss(z, labels, gates, temperature=2.0)
    _, edge_bf = brute_force_graph_loss(list(z.unbind(0)), labels, gates, 2.0, 1.0)
    assert torch.isfinite(res.edge_loss).all()
    torch.testing.assert_close(res.edge_loss, edge_bf, rtol=0, atol=1e-10)


def test_masked_label_class_gives_infinite_ce_and_a_clear_error_when_asked():
    z, labels, _ = _masked_case(1, m=2)
    labels[0] = 7  # a masked class
    gates = [["cutoff", "through", "cutoff"], ["cutoff", "cutoff", "through"], ["cutoff", "through", "cutoff"]]
    res = kf.graph_loss(z, labels, gates)
    assert res.edge_loss[0, 1] == float("inf") and not torch.isnan(res.edge_loss).any()
    with pytest.raises(FloatingPointError, match=r"node 1.*row 0's label 7 is a masked class"):
        kf.graph_loss(z, labels, gates, check_finite=True)
    labels[0] = 0
    kf.graph_loss(z, labels, gates, check_finite=True)  # finite: no error


def test_a_nan_loss_names_the_node_whose_logits_diverged():
    """Node 1 learns from node 2, whose logits hold NaN: the error names node 2, not only node 1's loss."""
    z = torch.randn(3, 4, 5, dtype=torch.float64)
    z[1, 2, 3] = float("nan")
    labels = torch.randint(0, 5, (4,))
    gates = [["cutoff", "through", "through", "through"], ["cutoff", "cutoff", "cutoff", "cutoff"],
             ["cutoff", "through", "cutoff", "cutoff"], ["cutoff", "cutoff", "cutoff", "cutoff"]]
    with pytest.raises(FloatingPointError, match=r"the loss of node 1 is nan: the logits of node 2 hold NaN or \+inf "
                                                 r"\(node 1 learns from it\)$"):
        kf.graph_loss(z, labels, gates, check_finite=True)
    z[1, 2, 3] = 0.0
    z[0, 1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"the loss of node 1 is nan: the logits of node 1 hold NaN or \+inf$"):
        kf.graph_loss(z, labels, gates, check_finite=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_cutoff_edges_are_zero_whatever_the_source_holds(bad):
    """Node 1 diverged (NaN / inf logits); node 3 takes nothing from it: its loss and gradient stay
    exactly those of the brute force (which never reads node 1 for node 3), only node 2 (a through
    edge from node 1) sees the NaN."""
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    z[0, 2, 3] = bad
    labels = torch.randint(0, 7, (5,), generator=gen)
    gates = [["cutoff", "through", "through", "through"],
             ["cutoff", "cutoff", "through", "cutoff"],   # 1 -> 2 through, 1 -> 3 cutoff
             ["cutoff", "through", "cutoff", "through"],
             ["cutoff", "linear", "correct", "cutoff"]]
    leaf = z.clone().requires_grad_()
    res = kf.graph_loss(leaf, labels, gates, temperature=2.0, progress=0.5)
    (grad,) = torch.autograd.grad(res.node_loss[2], leaf)
    clean = [x.clone().requires_grad_() for x in z.unbind(0)]
    node_bf, edge_bf = brute_force_graph_loss(clean, labels, gates, 2.0, 0.5)
    (g3,) = torch.autograd.grad(node_bf[2], clean[2])
    assert torch.isfinite(res.node_loss[2]) and res.edge_loss[1, 3] == 0
    torch.testing.assert_close(res.node_loss[2], node_bf[2], rtol=0, atol=1e-10)
    torch.testing.assert_close(grad[2], g3, rtol=0, atol=1e-10)
    assert grad[1].abs().max() == 0  # node 3's loss reaches node 3's logits only
    assert not torch.isfinite(res.node_loss[1])  # the through edge 1 -> 2 carries the divergence


# --------------------------------------------------------------- input validation
@pytest.mark.parametrize("kwargs, exc, match", [
    ({"temperature": float("inf")}, ValueError, r"temperature must be a positive finite number, got inf"),
    ({"temperature": float("nan")}, ValueError, r"got nan"),
    ({"temperature": "2"}, TypeError, r"temperature"),
    ({"progress": 1.5}, ValueError, r"progress .* must lie in \[0, 1\], got 1.5"),
    ({"progress": -0.1}, ValueError, r"got -0.1"),
    ({"progress": float("nan")}, ValueError, r"got nan"),
    ({"progress": torch.tensor(2.0)}, ValueError, r"got 2.0"),
])
def test_bad_temperature_and_progress_are_refused(kwargs, exc, match):
    g = [["cutoff", "linear"], ["cutoff", "cutoff"]]
    for impl in ("reference", "auto"):
        with pytest.raises(exc, match=match):
            kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), g, impl=impl, **kwargs)


@pytest.mark.parametrize("gates, match", [
    ([[0, 1.7], [0, 0]], r"gate\[0\]\[1\] is 1.7"),
    ([[0, True], [0, 0]], r"gate\[0\]\[1\] is True"),
    (torch.tensor([[0.0, 1.7], [0.0, 0.0]]), "integer dtype, got torch.float32"),
])
def test_float_and_bool_gate_codes_are_refused(gates, match):
    with pytest.raises(ValueError, match=match):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), gates)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex64, torch.bool])
def test_non_float_logits_are_refused(dtype):
    z = torch.ones(1, 2, 3, dtype=dtype)
    with pytest.raises(TypeError, match=f"logits must be floating point.*got {dtype}"):
        kf.graph_loss(z, torch.tensor([0, 1]), [["cutoff", "through"], ["cutoff", "cutoff"]])


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0.0, 1.0]), "labels must be int64 or int32 class indices, got torch.float32"),
    (torch.tensor([0, 1], dtype=torch.uint8), "int64 or int32.*torch.uint8"),
    (torch.tensor([0, 3]), r"lie in \[0, 3\).*labels\[1\] is 3"),
    (torch.tensor([-5, 1]), r"labels\[0\] is -5"),
])
def test_bad_labels_get_one_message_on_every_path(labels, match):
    g = [["cutoff", "through"], ["cutoff", "cutoff"]]
    for impl in ("reference", "auto"):
        with pytest.raises(ValueError, match=match):
            kf.graph_loss(torch.randn(1, 2, 3), labels, g, impl=impl)
    kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1], dtype=torch.int32), g)  # int32 is fine


# --------------------------------------------------------------- impl="auto" falls back
def test_auto_falls_back_to_reference_with_one_warning_when_the_kernel_fails(monkeypatch):
    """A kernel that cannot build or launch (ptxas, driver, old GPU) costs speed, not the run:
    impl='auto' warns once naming the cause and uses the reference; impl='triton' still raises."""
    import ktg_fast.kernels as kernels
    from ktg_fast import loss as L

    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise RuntimeError("PTXAS error: Internal Triton PTX codegen error\nmore lines")

    monkeypatch.setattr(L, "_KERNEL_BROKEN", {})
    monkeypatch.setattr(L, "_kernel_device_ok", lambda z: True)  # pretend these CPU tensors are on a GPU
    monkeypatch.setattr(kernels, "is_available", lambda device: True)
    monkeypatch.setattr(kernels, "graph_loss_triton", broken)
    z = torch.randn(2, 4, 5)
    y = torch.tensor([0, 1, 2, 3])
    g = [["cutoff", "through", "through"], ["cutoff", "cutoff", "through"], ["cutoff", "through", "cutoff"]]
    with pytest.warns(RuntimeWarning, match=r"kernel is unavailable on cpu \(RuntimeError: PTXAS error: "
                                            r"Internal Triton PTX codegen error\)") as rec:
        a = kf.graph_loss(z, y, g, temperature=2.0)
        b = kf.graph_loss(z, y, g, temperature=2.0)
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 1
    assert len(calls) == 1  # the broken device is remembered, not retried every step
    ref = kf.graph_loss(z, y, g, temperature=2.0, impl="reference")
    torch.testing.assert_close(a.edge_loss, ref.edge_loss)
    torch.testing.assert_close(b.edge_loss, ref.edge_loss)
    with pytest.raises(RuntimeError, match="PTXAS"):
        kf.graph_loss(z, y, g, temperature=2.0, impl="triton")


def test_an_interpreter_that_cannot_run_the_kernels_is_named(monkeypatch):
    """Triton 3.6's interpreter fails under NumPy >= 2.4 (an int() of a one-element array): the kernels
    then count as unavailable on the CPU and impl='triton' says why and what to install."""
    import ktg_fast.kernels as kernels
    from ktg_fast.kernels import launch

    if not launch.interpreted():
        pytest.skip("the kernels are compiled here, not interpreted")
    found = launch._probe_interpreter()  # the real probe: None, or a reason naming the fix
    assert found is None or "install numpy<2.4" in found
    assert kernels.is_available("cpu") == (found is None)
    monkeypatch.setattr(launch, "_INTERPRETER_PROBLEM", "Triton 3.6.0's interpreter fails with NumPy 2.5.5 (...); "
                                                        "install numpy<2.4, or Triton 3.7 or later")
    assert not kernels.is_available("cpu")
    z, y = torch.randn(2, 4, 5), torch.tensor([0, 1, 2, 3])
    g = [["cutoff", "through", "through"], ["cutoff", "cutoff", "through"], ["cutoff", "through", "cutoff"]]
    with pytest.raises(RuntimeError, match=r"cannot run on cpu: Triton 3\.6\.0's interpreter .* install numpy<2\.4"):
        kernels.graph_loss_triton(z, y, G.gate_codes(g), 2.0, torch.tensor(0.0))
    ref = kf.graph_loss(z, y, g, temperature=2.0, impl="reference")
    torch.testing.assert_close(kf.graph_loss(z, y, g, temperature=2.0).edge_loss, ref.edge_loss)  # auto still runs


# --------------------------------------------------------------- GraphLoss: bound once
def test_graph_loss_module_binds_the_gates_once(monkeypatch):
    """GraphLoss validates and plans the gate matrix at construction; calls only check the batch and
    give graph_loss's result."""
    from ktg_fast import loss as L

    logits, labels, gates, T, prog = random_case(7)
    z = torch.stack(logits).detach()
    bound = kf.GraphLoss(gates, temperature=T)
    assert bound.num_nodes == z.shape[0] and "temperature" in repr(bound)

    def refuse(*a, **k):
        raise AssertionError("the gate matrix was re-validated on a call")

    monkeypatch.setattr(L._gates, "gate_codes", refuse)
    monkeypatch.setattr(L, "edge_plan", refuse)
    a = bound(z, labels, prog)
    monkeypatch.undo()
    b = kf.graph_loss(z, labels, gates, temperature=T, progress=prog)
    torch.testing.assert_close(a.edge_loss, b.edge_loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"logits hold 1 nodes but the gate matrix is"):
        bound(z[:1], labels)
    with pytest.raises(ValueError, match="temperature must be a positive finite number, got 0"):
        kf.GraphLoss(gates, temperature=0)
    with pytest.raises(ValueError, match="impl must be"):
        kf.GraphLoss(gates, impl="fast")


def test_a_graph_gives_its_gates_and_temperature_and_a_given_temperature_wins():
    """``graph_loss(z, y, kf.preset("kd"))`` uses KD's T = 2, as the graph would train with; GraphLoss and
    GraphLinearLoss take a Graph alike."""
    graph = kf.preset("kd")
    assert graph.temperature == 2.0
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 7, (5,), generator=gen)
    want = kf.graph_loss(z, y, graph.gates, temperature=2.0)
    for got in (kf.graph_loss(z, y, graph), kf.GraphLoss(graph)(z, y)):
        torch.testing.assert_close(got.edge_loss, want.edge_loss, rtol=0, atol=0)
    t1 = kf.graph_loss(z, y, graph.gates)  # a bare gate matrix: T = 1
    assert not torch.allclose(t1.edge_loss, want.edge_loss)
    torch.testing.assert_close(kf.graph_loss(z, y, graph, temperature=1.0).edge_loss, t1.edge_loss, rtol=0, atol=0)
    assert kf.GraphLinearLoss(graph).loss.temperature == 2.0


@pytest.mark.parametrize("seed", range(12))
def test_closed_form_reference_gradient_equals_autograd(seed):
    """reference_with_grad (the gradient written with the forward, as the kernel does) against autograd."""
    from ktg_fast.reference import edge_plan, reference_with_grad
    from ktg_fast.loss_inputs import prepare_gates

    logits, labels, gates, T, prog = random_case(seed)
    z = torch.stack(logits).detach().requires_grad_()
    res = kf.graph_loss(z, labels, gates, temperature=T, progress=prog)
    expected = torch.autograd.grad(res.node_loss.sum(), z)[0] if res.node_loss.requires_grad else torch.zeros_like(z)
    plan = edge_plan(prepare_gates(gates, z.shape[0]))
    res2, grad = reference_with_grad(z.detach(), labels, plan, T, prog, -100)
    torch.testing.assert_close(res2.edge_loss, res.edge_loss.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-12)


def test_leading_batch_dimensions_are_flattened():
    """(M, B, T, C) logits with (B, T) labels, as sequence models hand them over, equal the flat call."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (2, 5), generator=gen)
    y[1, 3] = -100
    gates = random_gates(3, random.Random(2), p_cut=0.0)
    a = kf.graph_loss(z, y, gates, temperature=2.0, progress=0.3)
    b = kf.graph_loss(z.reshape(3, 10, 7), y.reshape(10), gates, temperature=2.0, progress=0.3)
    torch.testing.assert_close(a.edge_loss, b.edge_loss, rtol=0, atol=0)
    (ga,) = torch.autograd.grad(a.node_loss.sum(), z)
    (gb,) = torch.autograd.grad(b.node_loss.sum(), z)
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)
    lst = kf.GraphLoss(gates, temperature=2.0)(list(z.unbind(0)), y, 0.3)  # a list of (B, T, C)
    torch.testing.assert_close(lst.edge_loss, a.edge_loss, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"labels must be \(2, 5\) to match logits \(3, 2, 5, 7\)"):
        kf.graph_loss(z, y.reshape(10), gates)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_graph_loss_compiles_without_graph_breaks_and_floats_do_not_recompile(impl):
    """torch._dynamo.explain: one graph for the reference and for the kernel path (interpreted here);
    a Python-float progress compiles at most twice (specialised once, then dynamic), not once per value."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    import ktg_fast.kernels as kernels

    if impl == "triton" and not kernels.is_available("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("Triton kernels unavailable here")
    dev = torch.device("cuda" if torch.cuda.is_available() and impl == "triton" else "cpu")
    gates = kf.preset("dml", nodes=3).gates
    gates[1][2], gates[2][3] = "linear", "correct"
    z = torch.randn(3, 8, 10, device=dev)
    y = torch.randint(0, 10, (8,), device=dev)
    loss = kf.GraphLoss(gates, temperature=2.0, impl=impl)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(z, y, 0.3)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(loss, backend=counter)
    for p in (0.1, 0.2, 0.3, 0.4, 0.5):
        res = compiled(z, y, p)
    assert counter.frame_count <= 2
    torch.testing.assert_close(res.edge_loss, loss(z, y, 0.5).edge_loss)


# --------------------------------------------------------------- progress per destination node
def per_node_case(seed, m, c=None):
    """A random case with M nodes, an odd C, ignored rows, every gate kind and one progress per node."""
    rng = random.Random(seed)
    b = rng.choice([3, 8, 13])
    c = c or rng.choice([3, 7, 11, 33])
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(m, b, c, generator=gen, dtype=torch.float64) * rng.choice([0.5, 3.0])
    labels = torch.randint(0, c, (b,), generator=gen)
    labels[0] = int(z[0, 0].argmax())  # a row where a correct gate passes
    labels[1] = -100
    gates = random_gates(m, rng, p_cut=0.2)
    gates[0][1] = "linear"  # a linear label edge and a linear KL edge whatever the draw
    if m > 1:
        gates[1][2] = "linear"
    prog = torch.rand(m, generator=gen, dtype=torch.float64)
    prog[0] = 0.0 if seed % 2 else 1.0  # the ends of the range
    return z, labels, gates, rng.choice([1.0, 2.0]), prog


@pytest.mark.parametrize("m", [1, 2, 3, 7])
@pytest.mark.parametrize("seed", range(3))
def test_per_node_progress_matches_brute_force(m, seed):
    """progress of shape (M,): edges s -> t weigh progress[t-1] (SEMANTICS.md), losses and gradients,
    the autograd reference and the closed-form one, against the float64 brute force."""
    from ktg_fast.loss_inputs import prepare_gates
    from ktg_fast.reference import edge_plan, reference_with_grad

    z, labels, gates, T, prog = per_node_case(seed * 10 + m, m)
    leaves = [x.clone().requires_grad_() for x in z.unbind(0)]
    node_bf, edge_bf = brute_force_graph_loss(leaves, labels, gates, T, prog.tolist())
    grads_bf = torch.autograd.grad(node_bf.sum(), leaves, allow_unused=True)
    grad_bf = torch.stack([torch.zeros_like(x) if g is None else g for g, x in zip(grads_bf, leaves)])
    torch.testing.assert_close(grad_bf, torch.stack(analytic_grad(list(z.unbind(0)), labels, gates, T, prog)),
                               rtol=0, atol=1e-10)

    leaf = z.clone().requires_grad_()
    res = kf.graph_loss(leaf, labels, gates, temperature=T, progress=prog)
    torch.testing.assert_close(res.edge_loss, edge_bf, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.node_loss, node_bf, rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(res.node_loss.sum(), leaf)
    torch.testing.assert_close(grad, grad_bf, rtol=0, atol=1e-10)
    res2, grad2 = reference_with_grad(z, labels, edge_plan(prepare_gates(gates, m)), T, prog, -100)
    torch.testing.assert_close(res2.edge_loss, edge_bf, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad2, grad_bf, rtol=0, atol=1e-10)
    # float32 logits and a float32 progress: the same within float32 rounding.
    res32 = kf.graph_loss(z.float(), labels, gates, temperature=T, progress=prog.float())
    torch.testing.assert_close(res32.edge_loss.double(), edge_bf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3])
def test_scalar_progress_equals_a_constant_vector(m):
    """A float, a 0-dim tensor and torch.full((M,), p) give bit-identical losses and gradients."""
    z, labels, gates, T, _ = per_node_case(4, m, c=7)
    out = []
    for prog in (0.3, torch.tensor(0.3, dtype=torch.float64), torch.full((m,), 0.3, dtype=torch.float64)):
        leaf = z.clone().requires_grad_()
        res = kf.graph_loss(leaf, labels, gates, temperature=T, progress=prog)
        out.append((res.edge_loss.detach(), torch.autograd.grad(res.node_loss.sum(), leaf)[0]))
    for edge, grad in out[1:]:
        assert torch.equal(edge, out[0][0]) and torch.equal(grad, out[0][1])


def test_per_node_progress_reaches_only_its_destination():
    """Raising node 2's progress changes the linear edges into node 2 only."""
    z, labels, gates, T, _ = per_node_case(5, 3, c=9)
    gates = [["cutoff", "linear", "linear", "through"], ["cutoff", "cutoff", "linear", "linear"],
             ["cutoff", "linear", "cutoff", "correct"], ["cutoff", "through", "linear", "cutoff"]]
    a = kf.graph_loss(z, labels, gates, temperature=T, progress=torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64))
    b = kf.graph_loss(z, labels, gates, temperature=T, progress=torch.tensor([0.2, 0.8, 0.6], dtype=torch.float64))
    torch.testing.assert_close(b.edge_loss[:, 2], 2 * a.edge_loss[:, 2], rtol=1e-12, atol=0)  # all linear
    keep = [0, 1, 3]
    assert torch.equal(a.edge_loss[:, keep], b.edge_loss[:, keep])


def test_custom_gates_see_one_progress_per_destination():
    """A custom gate always sees a 0-dim ctx.progress; with an (M,) progress it is called once per
    destination t (ctx.destination = t) and its (M+1, B) per-source weights apply to edges into t."""
    seen = []

    def weight(ctx):
        seen.append((ctx.destination, tuple(ctx.progress.shape)))
        return ctx.progress * ctx.correct.to(ctx.source_logits.dtype)  # per source, times this t's progress

    kf.register_gate("progcorrect", weight)
    try:
        z, labels, _, T, prog = per_node_case(6, 3, c=7)
        gates = [["cutoff", "progcorrect", "through", "progcorrect"], ["cutoff", "cutoff", "progcorrect", "correct"],
                 ["cutoff", "progcorrect", "cutoff", "progcorrect"], ["cutoff", "linear", "progcorrect", "cutoff"]]
        res = kf.graph_loss(z, labels, gates, temperature=T, progress=prog)
        assert sorted(seen) == [(1, ()), (2, ()), (3, ())]
        as_correct = [[("correct" if g == "progcorrect" else g) for g in row] for row in gates]
        ref = kf.graph_loss(z, labels, as_correct, temperature=T, progress=prog)
        custom = torch.tensor([[g == "progcorrect" for g in row] for row in gates])
        expected = torch.where(custom, ref.edge_loss * torch.cat([torch.ones(1, dtype=prog.dtype), prog]), ref.edge_loss)
        torch.testing.assert_close(res.edge_loss, expected, rtol=1e-12, atol=1e-14)
        seen.clear()
        kf.graph_loss(z, labels, gates, temperature=T, progress=0.5)  # one progress: one call, for all
        assert seen == [(None, ())]
    finally:
        G.unregister_gate("progcorrect")


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("prog, match", [
    (torch.full((4,), 0.5), r"progress must be a float, a 0-dim floating-point tensor or a \(3,\) one"),
    (torch.full((3, 1), 0.5), r"a \(3,\) one .*got torch.float32 of shape \(3, 1\)"),
    (torch.full((2,), 0.5), r"\(3,\)"),
    (torch.tensor([1, 0, 1]), r"\(3,\).*torch.int64"),
    (torch.tensor([0.5, 1.5, 0.2]), r"progress\[1\] \(k / k_end of the linear gates into node 2\) must lie in "
                                    r"\[0, 1\], got 1.5"),
    (torch.tensor([0.5, 0.2, float("nan")]), r"progress\[2\].*got nan"),
])
def test_bad_per_node_progress_is_refused(impl, prog, match):
    z, labels, gates, _, _ = per_node_case(1, 3, c=5)
    with pytest.raises(ValueError, match=match):
        kf.graph_loss(z.float(), labels, gates, progress=prog, impl=impl)
    with pytest.raises(ValueError, match=match):
        kf.GraphLoss(gates).loss_and_grad(z.float(), labels, prog)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_per_node_progress_compiles_once_without_graph_breaks(impl):
    """An (M,) progress tensor is a graph input: no graph break, and new values do not recompile."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    import ktg_fast.kernels as kernels

    if impl == "triton" and not kernels.is_available("cuda" if torch.cuda.is_available() else "cpu"):
        pytest.skip("Triton kernels unavailable here")
    dev = torch.device("cuda" if torch.cuda.is_available() and impl == "triton" else "cpu")
    gates = kf.preset("dml", nodes=3).gates
    gates[1][2], gates[2][3], gates[0][3] = "linear", "correct", "linear"
    z = torch.randn(3, 8, 11, device=dev)
    y = torch.randint(0, 11, (8,), device=dev)
    loss = kf.GraphLoss(gates, temperature=2.0, impl=impl)
    prog = torch.tensor([0.1, 0.2, 0.3], device=dev)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(loss)(z, y, prog)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(loss, backend=counter)
    for k in range(1, 6):
        prog = torch.tensor([0.1 * k, 0.15 * k, 0.2 * k], device=dev)
        res = compiled(z, y, prog)
        torch.testing.assert_close(res.edge_loss, loss(z, y, prog).edge_loss)
    assert counter.frame_count == 1


def _block_gates(sizes, rng, p_cut=0.3):
    """Random gates of graphs of ``sizes`` nodes side by side (a trial pack): no edge between blocks."""
    m = sum(sizes)
    g = [["cutoff"] * (m + 1) for _ in range(m + 1)]
    a = 0
    for n in sizes:
        sub = random_gates(n, rng, p_cut)
        for s in range(n + 1):
            for t in range(1, n + 1):
                g[0 if s == 0 else a + s][a + t] = sub[s][t]
        a += n
    return g


@pytest.mark.parametrize("seed", range(6))
def test_gates_set_in_place_equal_the_brute_force(seed):
    """A GraphLoss with gates set in place (ktg_fast.live_gates) against the float64 brute force of each new
    matrix: node and edge losses and gradients, scalar and per-node progress, ignored rows, empty slots."""
    rng = random.Random(seed)
    sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 4))]
    m = sum(sizes)
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    blocks = [(o, o + n) for o, n in zip(offs, sizes)]
    loss = kf.GraphLoss(_block_gates(sizes, rng), 2.0, impl="reference", blocks=blocks)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        gates = _block_gates(sizes, rng)
        if len(sizes) > 1:  # an empty slot: every edge into it cutoff
            k = rng.randrange(len(sizes))
            for s in range(m + 1):
                for t in range(blocks[k][0] + 1, blocks[k][1] + 1):
                    gates[s][t] = "cutoff"
        loss.set_gates(gates)
        b, c = rng.choice([1, 5, 9]), rng.choice([2, 7])
        z = torch.randn(m, b, c, generator=gen, dtype=torch.float64) * 2
        labels = torch.randint(0, c, (b,), generator=gen)
        labels[torch.rand(b, generator=gen) < 0.2] = -100
        prog = rng.choice([0.3, torch.rand(m, generator=gen, dtype=torch.float64)])
        leaf = z.clone().requires_grad_()
        res = loss(leaf, labels, prog)
        grad, = torch.autograd.grad(res.node_loss.sum(), leaf)
        logits = [z[i].clone().requires_grad_() for i in range(m)]
        node_bf, edge_bf = brute_force_graph_loss(logits, labels, gates, 2.0, prog)
        torch.testing.assert_close(res.node_loss, node_bf, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(res.edge_loss, edge_bf, rtol=1e-10, atol=1e-12)
        g_bf = (torch.autograd.grad(node_bf.sum(), logits, allow_unused=True) if node_bf.requires_grad
                else [None] * m)  # (every edge cutoff)
        g_bf = torch.stack([torch.zeros_like(z[0]) if g is None else g for g in g_bf])
        torch.testing.assert_close(grad, g_bf, rtol=1e-10, atol=1e-12)
        _, grad2 = loss.loss_and_grad(z, labels, prog)
        torch.testing.assert_close(grad2, grad, rtol=1e-10, atol=1e-12)


def test_gates_set_in_place_refuse_what_they_cannot_take():
    blocks = [(0, 2), (2, 3)]
    gates = [["cutoff", "through", "through", "through"], ["cutoff", "cutoff", "linear", "cutoff"],
             ["cutoff", "through", "cutoff", "cutoff"], ["cutoff"] * 4]
    loss = kf.GraphLoss(gates, 2.0, blocks=blocks)
    bad = [row[:] for row in gates]
    bad[1][3] = "through"  # node 1 (first block) -> node 3 (second block)
    with pytest.raises(ValueError, match=r"gate\[1\]\[3\] is 'through'.*different blocks"):
        loss.set_gates(bad)
    kf.register_gate("half_live", lambda ctx: 0.5)
    try:
        odd = [row[:] for row in gates]
        odd[0][1] = "half_live"
        with pytest.raises(ValueError, match="built-in gates only.*'half_live'; for custom gates build a GraphLoss "
                                             "without blocks="):
            loss.set_gates(odd)
    finally:
        G.unregister_gate("half_live")
    with pytest.raises(ValueError, match="3x3 but this loss's blocks hold 3 nodes: it must be 4x4"):
        loss.set_gates([["cutoff"] * 3] * 3)
    with pytest.raises(ValueError, match="cover 2 nodes"):
        kf.GraphLoss(gates, blocks=[(0, 2)])
    with pytest.raises(ValueError, match="follow one another"):
        kf.GraphLoss(gates, blocks=[(0, 2), (1, 3)])
    with pytest.raises(RuntimeError, match="blocks=..."):
        kf.GraphLoss(gates).set_gates(gates)
    with pytest.raises(ValueError, match=r"\(0, 1.5\) must hold integer node indices"):
        kf.GraphLoss(gates, blocks=[(0, 1.5), (1.5, 3)])  # not rounded into other blocks
    with pytest.raises(ValueError, match="not a \\(start, stop\\) pair"):
        kf.GraphLoss(gates, blocks=[(0, 2, 3)])
    assert kf.GraphLoss(gates, blocks=[(torch.tensor(0), 2), (2, 3)]).plan.live.blocks == ((0, 2), (2, 3))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available"):
            kf.GraphLoss(gates, blocks=blocks, device="cuda")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="keeps its gates on cpu"):
            loss(torch.randn(3, 2, 4, device="cuda"), torch.zeros(2, dtype=torch.long, device="cuda"))
    assert loss.gate_key[1][2] == G.LINEAR and "blocks=[(0, 2), (2, 3)]" in repr(loss)


# --------------------------------------------------------------- edge cases of the front door
def test_a_row_without_a_row_dimension_is_refused_with_the_fix():
    """A (C,) row per node is refused (not guessed: a stacked (M, C) could be one node's (B, C)), and the
    message says what to pass; nodes of different shapes are named with both shapes."""
    g = kf.preset("dml", nodes=3).gates
    y = torch.tensor(3)
    with pytest.raises(ValueError, match=r"logits\[0\] is \(50,\): each node's logits need a row dimension.*"
                                         r"z\.unsqueeze\(0\).*labels of shape \(1,\)"):
        kf.graph_loss([torch.randn(50) for _ in range(3)], y, g)
    with pytest.raises(ValueError, match=r"got shape \(3, 50\): it has no row dimension.*logits\.unsqueeze\(1\), "
                                         r"\(M, 1, C\), with labels of shape \(1,\)"):
        kf.GraphLoss(g)(torch.randn(3, 50), y)
    with pytest.raises(ValueError, match=r"of one shape \(\*, C\), e\.g\. \(B, C\): logits\[0\] is \(2, 5\) but "
                                         r"logits\[2\] is \(3, 5\)$"):
        kf.graph_loss([torch.randn(2, 5), torch.randn(2, 5), torch.randn(3, 5)], torch.tensor([0, 1]), g)
    # The fix the message names works.
    rows = [torch.randn(50, dtype=torch.float64) for _ in range(3)]
    one = kf.graph_loss([z.unsqueeze(0) for z in rows], y.unsqueeze(0), g)
    stacked = kf.graph_loss(torch.stack(rows).unsqueeze(1), y.unsqueeze(0), g)
    torch.testing.assert_close(one.node_loss, stacked.node_loss)


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_every_gate_cutoff_gives_zeros_that_backpropagate(impl):
    """All cutoff: node_loss is exactly 0 and still backpropagates (zero gradients), as GraphLinearLoss's
    does, so a training loop's node_loss.sum().backward() runs; a diverged logit leaks no NaN into it."""
    cut = [["cutoff"] * 3 for _ in range(3)]
    z = torch.randn(2, 4, 5, dtype=torch.float64)
    z[1, 0, 2] = float("nan")
    z.requires_grad_()
    y = torch.tensor([0, 1, -100, 4])
    res = kf.graph_loss(z, y, cut, impl=impl)
    assert res.node_loss.requires_grad and res.node_loss.dtype == torch.float64
    assert torch.equal(res.node_loss, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(res.edge_loss, torch.zeros(3, 3, dtype=torch.float64))
    res.node_loss.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    h = [torch.randn(4, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    w = [torch.randn(5, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    lin = kf.GraphLinearLoss(cut, impl=impl)(h, w, y)
    assert lin.node_loss.requires_grad and torch.equal(lin.node_loss, res.node_loss.detach())
    # Without grad nothing is connected: no autograd graph is built for nothing.
    assert not kf.graph_loss(z.detach(), y, cut, impl=impl).node_loss.requires_grad


@pytest.mark.parametrize("labels", [torch.zeros(0, dtype=torch.long), torch.full((4,), -100)],
                         ids=["empty batch", "every row ignored"])
def test_no_counted_row_gives_zero_losses_and_zero_gradients(labels):
    """B = 0 (docs/SEMANTICS.md): zeros, not NaN as F.cross_entropy's mean, with zero gradients; GraphLinearLoss
    agrees (an empty batch is not an error there either)."""
    n, v, d = labels.shape[0], 5, 3
    g = kf.preset("dml", nodes=3).gates
    g[1][2], g[0][3] = "correct", "linear"
    z = torch.randn(3, n, v, dtype=torch.float64, requires_grad=True)
    res = kf.graph_loss(z, labels, g, temperature=2.0, progress=0.5)
    assert torch.equal(res.node_loss, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(res.edge_loss, torch.zeros(4, 4, dtype=torch.float64))
    res.node_loss.sum().backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    h = [torch.randn(n, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    w = [torch.randn(v, d, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    b = [torch.randn(v, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lin = kf.GraphLinearLoss(g, temperature=2.0, chunk_size=2)(h, w, labels, bias=b, progress=0.5)
    assert torch.equal(lin.node_loss.detach(), res.node_loss.detach())
    assert torch.equal(lin.edge_loss, res.edge_loss.detach())
    lin.node_loss.sum().backward()
    for x in (*h, *w, *b):
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x))


def test_labels_on_another_device_or_of_another_dtype_are_named_at_the_front_door():
    """Checked before any label value is read (the meta device stands in for a GPU here): both devices and
    the fix are named, on every path and in GraphLinearLoss."""
    g = kf.preset("dml", nodes=2).gates
    z = torch.randn(2, 4, 5)
    y = torch.zeros(4, dtype=torch.long, device="meta")
    msg = r"labels are on meta but logits are on cpu: move the labels there, labels\.to\(logits\.device\)"
    for impl in ("reference", "auto"):
        with pytest.raises(ValueError, match=msg):
            kf.graph_loss(z, y, g, impl=impl)
    with pytest.raises(ValueError, match=msg):
        kf.GraphLoss(g).loss_and_grad(z, y)
    with pytest.raises(ValueError, match=msg):
        kf.graph_loss_reference(z, y, g)
    with pytest.raises(ValueError, match=r"labels are on meta but hidden\[0\] is on cpu: .*labels\.to\(hidden\[0\]"
                                         r"\.device\)"):
        kf.GraphLinearLoss(g)([torch.randn(4, 3)] * 2, [torch.randn(5, 3)] * 2, y)
    with pytest.raises(ValueError, match="labels must be int64 or int32 class indices, got torch.float32"):
        kf.GraphLinearLoss(g)([torch.randn(4, 3)] * 2, [torch.randn(5, 3)] * 2, torch.zeros(4))
    with pytest.raises(TypeError, match="labels must be an int64 or int32 tensor"):
        kf.GraphLinearLoss(g)([torch.randn(4, 3)] * 2, [torch.randn(5, 3)] * 2, [0, 1, 2, 3])
