"""GraphLinearLoss (the graph loss from hidden states, in chunks) against graph_loss on materialized logits."""
import os
import random

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import ktg_fast as kf  # noqa: E402
from ktg_fast.gates import gate_names  # noqa: E402
from ktg_fast.linear_loss import auto_chunk_size  # noqa: E402

GATES = ["cutoff", "through", "linear", "correct"]


def case(seed: int, dtype=torch.float64):
    """Random M (1-4), hidden sizes per node, bias on some nodes, frozen teachers, ignored rows."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    m = rng.randint(1, 4)
    n = rng.choice([7, 13, 20])
    v = rng.choice([5, 11, 24])
    dims = [rng.choice([3, 6, 9]) for _ in range(m)]
    gates = [["cutoff"] * (m + 1) for _ in range(m + 1)]
    frozen = {t for t in range(2, m + 1) if rng.random() < 0.3}
    for t in range(1, m + 1):
        if t in frozen:
            continue
        for s in range(m + 1):
            if s != t:
                gates[s][t] = rng.choice(GATES)
        gates[0][t] = rng.choice(GATES[1:])  # every trainable node has an input
    hs = [(torch.randn(n, d, generator=gen, dtype=torch.float64) * 0.7).to(dtype) for d in dims]
    ws = [(torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.7).to(dtype) for d in dims]
    bs = [(torch.randn(v, generator=gen, dtype=torch.float64)).to(dtype) if rng.random() < 0.5 else None
          for _ in range(m)]
    for t in range(1, m + 1):
        want = t not in frozen
        hs[t - 1].requires_grad_(want)
        ws[t - 1].requires_grad_(want)
        if bs[t - 1] is not None:
            bs[t - 1].requires_grad_(want)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[0] = int((hs[0][0].double() @ ws[0].double().T).argmax())  # the correct gate bites
    labels[torch.rand(n, generator=gen) < 0.2] = -100
    labels[3:6] = -100  # with chunk 3: a chunk made only of ignored rows
    temperature = rng.choice([1.0, 2.0, 4.0])
    progress = rng.choice([0.0, 0.3, 1.0])
    return gates, hs, ws, bs, labels, temperature, progress


def leaves(hs, ws, bs):
    return [x for x in (*hs, *ws, *bs) if x is not None and x.requires_grad]


def materialized(gates, hs, ws, bs, labels, temperature, progress, weights):
    z = torch.stack([torch.nn.functional.linear(h.double(), w.double(), None if b is None else b.double())
                     for h, w, b in zip(hs, ws, bs)])
    res = kf.graph_loss(z, labels, gates, temperature=temperature, progress=progress, impl="reference")
    params = leaves(hs, ws, bs)
    grads = torch.autograd.grad((res.node_loss * weights).sum(), params) if params else []
    return res, grads


@pytest.mark.parametrize("seed", range(16))
@pytest.mark.parametrize("chunk", [1, 3, None])
def test_matches_materialized_logits_float64(seed, chunk):
    gates, hs, ws, bs, labels, T, prog = case(seed)
    m = len(hs)
    weights = torch.linspace(0.5, 2.0, m, dtype=torch.float64)
    progress = torch.tensor(prog, dtype=torch.float64) if seed % 2 else prog  # a float and a 0-dim tensor
    loss = kf.GraphLinearLoss(gates, temperature=T, chunk_size=chunk)
    res = loss(hs, ws, labels, bias=bs, progress=progress)
    assert res.node_loss.dtype == torch.float64 and not res.edge_loss.requires_grad
    ref, ref_grads = materialized(gates, hs, ws, bs, labels, T, prog, weights)
    torch.testing.assert_close(res.edge_loss, ref.edge_loss.detach(), rtol=0, atol=1e-10)
    torch.testing.assert_close(res.node_loss, ref.node_loss.detach(), rtol=0, atol=1e-10)
    params = leaves(hs, ws, bs)
    if params and res.node_loss.requires_grad:
        grads = torch.autograd.grad((res.node_loss * weights).sum(), params)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("seed", [2, 5, 11])
def test_per_node_progress(seed, impl):
    """progress of shape (M,) (one per destination node) reaches every chunk, on both paths."""
    gates, hs, ws, bs, labels, T, _ = case(seed)
    m = len(hs)
    for t in range(1, m + 1):
        if any(gates[s][t] != "cutoff" for s in range(m + 1)):
            gates[0][t] = "linear"
    prog = torch.linspace(0.2, 0.9, m, dtype=torch.float64)
    weights = torch.linspace(0.5, 2.0, m, dtype=torch.float64)
    if impl == "triton":
        hs, ws = [h.detach().float().requires_grad_(h.requires_grad) for h in hs], \
            [w.detach().float().requires_grad_(w.requires_grad) for w in ws]
        bs = [None if b is None else b.detach().float().requires_grad_(b.requires_grad) for b in bs]
    res = kf.GraphLinearLoss(gates, temperature=T, chunk_size=3, impl=impl)(hs, ws, labels, bias=bs, progress=prog)
    ref, ref_grads = materialized(gates, hs, ws, bs, labels, T, prog, weights)
    tol = dict(rtol=0, atol=1e-10) if impl == "reference" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.edge_loss.double(), ref.edge_loss.detach(), **tol)
    params = leaves(hs, ws, bs)
    if params and res.node_loss.requires_grad:
        grads = torch.autograd.grad((res.node_loss * weights.to(res.node_loss.dtype)).sum(), params)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double(), r.double(), **tol)


def test_frozen_teachers_get_no_gradient_work():
    """A teacher's hidden state and weight without grad: no gradient buffer, the students' grads right."""
    gates = kf.preset("kd", model="resnet8", teacher="resnet8", checkpoint="t.pt").gates
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(9, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w_s = torch.randn(13, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    h_t = torch.randn(9, 6, generator=gen, dtype=torch.float64)
    w_t = torch.randn(13, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 13, (9,), generator=gen)
    res = kf.GraphLinearLoss(gates, temperature=2.0, chunk_size=4)([h_s, h_t], [w_s, w_t], y)
    res.node_loss.sum().backward()
    assert h_t.grad is None and w_t.grad is None and res.node_loss[1] == 0
    z = torch.stack([h_s @ w_s.T, h_t @ w_t.T])
    ref = kf.graph_loss(z, y, gates, temperature=2.0, progress=0.0)
    gh, gw = torch.autograd.grad(ref.node_loss.sum(), [h_s, w_s])
    torch.testing.assert_close(h_s.grad, gh, rtol=0, atol=1e-12)
    torch.testing.assert_close(w_s.grad, gw, rtol=0, atol=1e-12)


def test_stacked_inputs_and_leading_dimensions():
    """One (M, B, T, D) hidden tensor, one (M, V, D) weight, (B, T) labels: the flat list call's result."""
    gen = torch.Generator().manual_seed(1)
    gates = kf.preset("dml", nodes=2).gates
    h = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (3, 4), generator=gen)
    loss = kf.GraphLinearLoss(gates, chunk_size=5)
    a = loss(h, w, y, progress=1.0)
    (ga_h, ga_w) = torch.autograd.grad(a.node_loss.sum(), [h, w])
    b = loss([h[0].reshape(12, 5), h[1].reshape(12, 5)], [w[0], w[1]], y.reshape(12), progress=1.0)
    (gb_h, gb_w) = torch.autograd.grad(b.node_loss.sum(), [h, w])
    torch.testing.assert_close(a.edge_loss, b.edge_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(ga_h, gb_h, rtol=0, atol=1e-12)
    torch.testing.assert_close(ga_w, gb_w, rtol=0, atol=1e-12)


@pytest.mark.kernel
@pytest.mark.parametrize("seed", range(3))
def test_triton_path_under_the_interpreter(seed):
    """impl='triton' (the kernel writes each chunk's gradient) in float32 against the float64 reference."""
    import ktg_fast.kernels as kernels

    if not kernels.is_available("cpu" if not torch.cuda.is_available() else "cuda"):
        pytest.skip("Triton kernels unavailable here")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gates, hs, ws, bs, labels, T, prog = case(seed + 40)
    f32 = [[None if x is None else x.detach().float().to(dev).requires_grad_(x.requires_grad) for x in group]
           for group in (hs, ws, bs)]
    res = kf.GraphLinearLoss(gates, temperature=T, chunk_size=4, impl="triton")(
        f32[0], f32[1], labels.to(dev), bias=f32[2], progress=prog)
    weights = torch.linspace(0.5, 2.0, len(hs), dtype=torch.float64)
    ref, ref_grads = materialized(gates, hs, ws, bs, labels, T, prog, weights)
    torch.testing.assert_close(res.edge_loss.double().cpu(), ref.edge_loss.detach(), rtol=1e-5, atol=1e-5)
    params = leaves(*f32)
    if params and res.node_loss.requires_grad:
        grads = torch.autograd.grad((res.node_loss * weights.float().to(dev)).sum(), params)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g.double().cpu(), r, rtol=1e-4, atol=1e-5 * max(1.0, r.abs().max().item()))


def test_bfloat16_inputs_accumulate_in_float32():
    gates, hs, ws, bs, labels, T, prog = case(5)
    bf = [[None if x is None else x.detach().bfloat16().requires_grad_(x.requires_grad) for x in g]
          for g in (hs, ws, bs)]
    res = kf.GraphLinearLoss(gates, temperature=T, chunk_size=3)(bf[0], bf[1], labels, bias=bf[2], progress=prog)
    assert res.node_loss.dtype == torch.float32
    up = [[None if x is None else x.detach().double() for x in g] for g in bf]
    z = torch.stack([torch.nn.functional.linear(h, w, b) for h, w, b in zip(*up)])
    ref = kf.graph_loss(z, labels, gates, temperature=T, progress=prog)
    # bf16 logits (one rounding of each matmul's output): loss to about 1e-2 relative.
    torch.testing.assert_close(res.edge_loss.double(), ref.edge_loss, rtol=2e-2, atol=2e-2)
    params = leaves(*bf)
    if params and res.node_loss.requires_grad:
        grads = torch.autograd.grad(res.node_loss.sum(), params)
        assert all(g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() for g in grads)


def test_compiles_without_graph_breaks():
    import torch._dynamo

    gates = kf.preset("dml", nodes=2).gates
    gen = torch.Generator().manual_seed(2)
    hs = [torch.randn(6, 4, generator=gen, requires_grad=True) for _ in range(2)]
    ws = [torch.randn(9, 4, generator=gen, requires_grad=True) for _ in range(2)]
    y = torch.randint(0, 9, (6,), generator=gen)
    loss = kf.GraphLinearLoss(gates, chunk_size=4, impl="reference")

    def f(h0, h1, w0, w1):
        return loss([h0, h1], [w0, w1], y, progress=0.5).node_loss.sum()

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(f)(*hs, *ws)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(f, backend="eager", fullgraph=True)
    a = compiled(*hs, *ws)
    ga = torch.autograd.grad(a, hs + ws)
    b = f(*hs, *ws)
    gb = torch.autograd.grad(b, hs + ws)
    torch.testing.assert_close(a, b)
    for x, z in zip(ga, gb):
        torch.testing.assert_close(x, z)


def test_auto_chunk_size_and_bad_arguments():
    assert auto_chunk_size(3, 32000, 8192, torch.device("cpu"), torch.float32) == \
        (512 * 2 ** 20) // (3 * 32000 * 28)
    assert auto_chunk_size(1, 10, 5, torch.device("cpu"), torch.float32) == 5
    gates = kf.preset("dml", nodes=2).gates
    h = [torch.randn(4, 3), torch.randn(4, 3)]
    w = [torch.randn(6, 3), torch.randn(6, 3)]
    y = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        kf.GraphLinearLoss(gates, chunk_size=0)
    loss = kf.GraphLinearLoss(gates)
    with pytest.raises(ValueError, match=r"hidden holds 1 node's hidden states but the gate matrix is 3x3 \(2 network "
                                         r"nodes\): pass 2, or build the loss with a 2x2 gate matrix"):
        loss(h[:1], w, y)
    with pytest.raises(ValueError, match=r"hidden holds 3 nodes' hidden states but the gate matrix is 3x3 \(2 network "
                                         r"nodes\): pass 2, or build the loss with a 4x4 gate matrix"):
        loss(h + h[:1], w + w[:1], y)  # the gate matrix is at fault, not hidden: it is named with its size
    with pytest.raises(ValueError, match=r"weights must hold one entry per network node: 2, as hidden and the 3x3 "
                                         r"gate matrix have, got 3"):
        loss(h, w + w[:1], y)
    with pytest.raises(ValueError, match=r"weights\[1\] has V = 5 rows, weights\[0\] has 6: every node must share"):
        loss(h, [w[0], torch.randn(5, 3)], y)
    with pytest.raises(ValueError, match=r"weights\[0\] must be \(V, D\) with D = 3, the size of hidden\[0\], got "
                                         r"\(3, 6\) \(it looks transposed: pass nn.Linear.weight, \(V, D\), or w.T\)$"):
        loss(h, [x.T for x in w], y)
    with pytest.raises(ValueError, match=r"weights\[1\] must be \(V, D\) with D = 3, .* got \(6, 4\)$"):
        loss(h, [w[0], torch.randn(6, 4)], y)
    with pytest.raises(ValueError, match=r"labels must be \(4,\)"):
        loss(h, w, y[:3])
    with pytest.raises(TypeError, match=r"hidden\[0\] must be a floating-point tensor"):
        loss([torch.ones(4, 3, dtype=torch.long), h[1]], w, y)
    assert "cutoff" in gate_names()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_kernel_chunks_match_the_reference(dtype):
    """On CUDA the kernel writes each chunk's gradient: losses and gradients against float64 on the CPU
    (bf16: one rounding of the logits and of each gradient matmul, so about 1e-2 relative)."""
    gates, hs, ws, bs, labels, T, prog = case(7)
    dev = torch.device("cuda")
    on = [[None if x is None else x.detach().to(dev, dtype).requires_grad_(x.requires_grad) for x in g]
          for g in (hs, ws, bs)]
    res = kf.GraphLinearLoss(gates, temperature=T, chunk_size=5)(on[0], on[1], labels.to(dev), bias=on[2],
                                                                  progress=prog)
    up = [[None if x is None else x.detach().double().cpu().requires_grad_(x.requires_grad) for x in g] for g in on]
    weights = torch.linspace(0.5, 2.0, len(hs), dtype=torch.float64)
    ref, ref_grads = materialized(gates, up[0], up[1], up[2], labels, T, prog, weights)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(res.edge_loss.double().cpu(), ref.edge_loss.detach(), rtol=tol, atol=tol)
    params = leaves(*on)
    if params and res.node_loss.requires_grad:
        grads = torch.autograd.grad((res.node_loss * weights.to(dev, torch.float32)).sum(), params)
        for g, r in zip(grads, ref_grads):
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(g.double().cpu(), r, rtol=tol * 5, atol=tol * 5 * scale)


def test_default_progress_is_graph_loss_s():
    """Left out, ``progress`` means the same in both front doors (1.0): a linear edge passes its whole loss."""
    gen = torch.Generator().manual_seed(3)
    gates = [["cutoff", "through", "through"], ["cutoff", "cutoff", "linear"], ["cutoff", "linear", "cutoff"]]
    hs = [torch.randn(6, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    ws = [torch.randn(9, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    labels = torch.randint(0, 9, (6,), generator=gen)
    got = kf.GraphLinearLoss(gates, temperature=2.0, impl="reference")(hs, ws, labels)
    want = kf.graph_loss(torch.stack([h @ w.T for h, w in zip(hs, ws)]), labels, gates, temperature=2.0,
                         impl="reference")
    torch.testing.assert_close(got.node_loss, want.node_loss)
    none = kf.graph_loss(torch.stack([h @ w.T for h, w in zip(hs, ws)]), labels, gates, temperature=2.0,
                         progress=0.0, impl="reference")
    assert (got.node_loss - none.node_loss).abs().min() > 1e-3  # the linear edges count


def test_hidden_states_need_a_row_dimension_and_one_leading_shape():
    """A (D,) hidden state is refused with the fix (as graph_loss refuses a (C,) row), never compared with
    itself; nodes with different rows are named with both shapes."""
    gates = kf.preset("dml", nodes=3).gates
    loss = kf.GraphLinearLoss(gates, 2.0)
    h = [torch.randn(8, dtype=torch.float64) for _ in range(3)]
    w = [torch.randn(50, 8, dtype=torch.float64) for _ in range(3)]
    y = torch.tensor(3)
    msg = (r"hidden\[0\] is \(8,\): each node's hidden states need a row dimension, \(N, D\) or \(\*, D\); for one "
           r"row pass h\.unsqueeze\(0\), \(1, D\) \(a stacked \(M, D\) tensor: \.unsqueeze\(1\)\), with labels of "
           r"shape \(1,\)$")
    with pytest.raises(ValueError, match=msg):
        loss(h, w, y)
    with pytest.raises(ValueError, match=msg):
        loss(torch.stack(h), torch.stack(w), y)
    with pytest.raises(ValueError, match=r"hidden\[1\] is \(5, 8\) but hidden\[0\] is \(4, 8\): every node's hidden "
                                         r"states must have the same rows, \(\*, D_m\) with \* = \(4,\)$"):
        loss([torch.randn(4, 8), torch.randn(5, 8), torch.randn(4, 8)], w, torch.zeros(4, dtype=torch.long))
    # The fix the message names works, and equals graph_loss on the one row's logits.
    got = loss([x.unsqueeze(0) for x in h], w, y.unsqueeze(0))
    want = kf.graph_loss([(x @ v.T).unsqueeze(0) for x, v in zip(h, w)], y.unsqueeze(0), gates, temperature=2.0)
    torch.testing.assert_close(got.node_loss, want.node_loss)


def test_an_empty_batch_checks_its_arguments_all_the_same():
    """N = 0 gives zeros (tests/test_loss.py checks the values and gradients), but labels and progress are
    still checked: nothing a call with rows would refuse passes because the batch is empty."""
    loss = kf.GraphLinearLoss(kf.preset("dml", nodes=2).gates)
    h = [torch.randn(0, 3)] * 2
    w = [torch.randn(6, 3)] * 2
    with pytest.raises(ValueError, match=r"progress .* must lie in \[0, 1\], got 2\.0"):
        loss(h, w, torch.zeros(0, dtype=torch.long), progress=2.0)
    with pytest.raises(ValueError, match="int64 or int32 class indices, got torch.float32"):
        loss(h, w, torch.zeros(0))
    with pytest.raises(ValueError, match=r"labels must be \(0,\)"):
        loss(h, w, torch.zeros(1, dtype=torch.long))
    assert torch.equal(loss(h, w, torch.zeros(0, dtype=torch.long)).node_loss, torch.zeros(2))  # chunk size: auto
