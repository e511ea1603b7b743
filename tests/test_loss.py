"""The vectorised reference graph loss against a brute-force loop over edges (float64)."""
import random

import pytest
import torch

import ktg_fast as kf
from ktg_fast import gates as G
from ktg_fast.loss import graph_loss_reference

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
    gate = kf.register_gate("half", lambda ctx: 0.5)
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
        ([["cutoff", "bogus"], ["cutoff", "cutoff"]], "unknown gate 'bogus'"),
    ],
)
def test_bad_gate_matrices(gates, match):
    with pytest.raises((ValueError, KeyError), match=match):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), gates)


def test_bad_shapes_and_args():
    g = [["cutoff", "through"], ["cutoff", "cutoff"]]
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1, 2]), g)
    with pytest.raises(ValueError, match="same B and C"):
        kf.graph_loss([torch.randn(2, 3), torch.randn(2, 4)], torch.tensor([0, 1]), [["cutoff"] * 3] * 3)
    with pytest.raises(ValueError, match="impl must be"):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), g, impl="fast")
    with pytest.raises(ValueError, match="temperature must be positive"):
        kf.graph_loss(torch.randn(1, 2, 3), torch.tensor([0, 1]), g, temperature=0)
