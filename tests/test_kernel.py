"""The fused Triton graph loss (ktg_fast.kernels) against the float64 PyTorch reference.

On a machine without CUDA the kernels run on CPU tensors in the Triton
interpreter: ``TRITON_INTERPRET=1`` must be set before Triton builds them, which
tests/conftest.py does (and this file again, for runs of this file alone).
Shapes are kept small because the interpreter is slow; every code path (one
block per row, online multi-block rows, several rows per program, C split across
programs, in-kernel and on-device batch counts) is still reached, through the
launch overrides of ``graph_loss_triton``.  GPU-only tests (marked ``gpu``) run
compiled kernels, ``torch.compile`` and CUDA-graph capture.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import pytest  # noqa: E402

import ktg_fast  # noqa: E402

import ktg_fast.kernels as kernels  # noqa: E402  (installed by pip install -e .: kernels/ is ktg_fast.kernels)

from ktg_fast.kernels import graph_loss as kgl  # noqa: E402
from ktg_fast.kernels import launch as klaunch  # noqa: E402
from ktg_fast.kernels import ops as kops  # noqa: E402
from ktg_fast.loss import graph_loss_reference  # noqa: E402

from ktg_fast.gates import CORRECT, CUTOFF, LINEAR, THROUGH  # noqa: E402
from brute_force import analytic_grad, brute_force_graph_loss  # noqa: E402  (tests/, on pytest's path)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(not kernels.is_available(DEV), reason="Triton kernels unavailable on this device"
                                + (f": {kernels.interpreter_problem()}" if kernels.interpreter_problem() else ""))

# Gradient tolerance relative to the largest reference gradient, per logits dtype
# (half types are compared after rounding to their own precision, as in Liger-Kernel's tests).
GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def mixed_gates(m: int, seed: int, p_cut: float = 0.25, frozen: tuple = ()) -> torch.Tensor:
    """A random (M+1, M+1) code matrix with every gate kind; nodes in ``frozen`` (1-based) get no input."""
    rng = random.Random(seed)
    codes = torch.zeros(m + 1, m + 1, dtype=torch.int64)
    edges = [(s, t) for t in range(1, m + 1) for s in range(m + 1) if s != t]
    for i, (s, t) in enumerate(edges):
        codes[s, t] = i % 4 if i < 4 else (CUTOFF if rng.random() < p_cut else rng.randrange(4))
    for t in frozen:
        codes[:, t] = CUTOFF
    return codes


def reference(z, labels, codes, temperature, progress, ignore_index=-100):
    """float64 node loss, edge loss and d(sum node_loss)/dz from graph_loss_reference."""
    z64 = z.detach().to(torch.float64).requires_grad_()
    ref = graph_loss_reference(z64, labels, codes, temperature=temperature, progress=progress,
                               ignore_index=ignore_index)
    if ref.node_loss.requires_grad:
        (grad,) = torch.autograd.grad(ref.node_loss.sum(), z64)
    else:
        grad = torch.zeros_like(z64)
    return ref.node_loss.detach(), ref.edge_loss.detach(), grad


def check(z, labels, codes, temperature=1.0, progress=0.6, ignore_index=-100, **launch):
    """Run the kernel (forward + backward) and compare losses and every gradient with the reference.

    ``progress``: a float (a 0-dim tensor for the kernel) or one value per destination node (a list).
    """
    z = z.to(DEV)
    labels = labels.to(DEV)
    leaf = z.detach().clone().requires_grad_()
    if isinstance(progress, float):
        prog_ref, prog = progress, torch.tensor(progress, device=DEV)
    else:  # the reference sees the float32 values the kernel reads
        prog = torch.as_tensor(progress, dtype=torch.float32).to(DEV)
        prog_ref = prog.double().cpu()
    node_ref, edge_ref, grad_ref = reference(leaf, labels, codes, temperature, prog_ref, ignore_index)
    node, edge = kernels.graph_loss_triton(
        leaf, labels, codes.to(DEV, torch.int32), float(temperature), prog, ignore_index, **launch)
    assert node.shape == (z.shape[0],) and edge.shape == (z.shape[0] + 1,) * 2
    assert node.dtype == edge.dtype == torch.float32
    assert torch.isfinite(node).all() and torch.isfinite(edge).all()
    node.sum().backward()
    assert leaf.grad.dtype == z.dtype and leaf.grad.shape == z.shape
    scale = max(1.0, edge_ref.abs().max().item())
    torch.testing.assert_close(edge.double().cpu(), edge_ref.cpu(), rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(node.double().cpu(), node_ref.cpu(), rtol=1e-5, atol=1e-5 * scale)
    gmax = max(grad_ref.abs().max().item(), 1e-30)
    tol = GRAD_TOL[z.dtype]
    torch.testing.assert_close(leaf.grad.double().cpu(), grad_ref.cpu(), rtol=tol, atol=tol * gmax)
    return node, edge, leaf.grad


def make_case(m, b, c, seed, scale=3.0, ignore_frac=0.2, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(m, b, c, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, c, (b,), generator=gen)
    # Let correct gates pass on some rows: node 1 is right on every third row.
    labels[::3] = z[0, ::3].float().argmax(-1)
    labels[torch.rand(b, generator=gen) < ignore_frac] = -100
    return z, labels


# (M, B, C, T, launch overrides): every M, C and T of the issue; small B for the interpreter.
CASES = [
    (1, 5, 2, 1.0, {}),
    (2, 9, 10, 2.0, {}),
    (3, 7, 10, 4.0, {"rows_per_program": 3}),  # several rows per program, partial last program
    (7, 6, 10, 1.0, {}),
    (2, 4, 100, 1.0, {}),
    (3, 5, 100, 2.0, {}),
    (7, 4, 100, 4.0, {}),
    (1, 3, 1000, 4.0, {}),
    (2, 3, 1000, 2.0, {"block_c": 128}),  # online softmax over 8 blocks
    (3, 3, 1000, 1.0, {}),
    (7, 2, 1000, 2.0, {}),
    (2, 2, 5000, 1.0, {}),
    (3, 2, 5000, 4.0, {}),
    (7, 2, 5000, 2.0, {}),  # 40 blocks of 128 per row
]


@pytest.mark.parametrize("m, b, c, temperature, launch", CASES)
def test_matches_reference(m, b, c, temperature, launch):
    z, labels = make_case(m, b, c, seed=m * 1000 + c)
    check(z, labels, mixed_gates(m, seed=c + m), temperature, progress=0.37, **launch)


@pytest.mark.parametrize("b, num_splits, rows", [(3, 3, 1), (5, 4, 2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_split_c(b, num_splits, rows, temperature):
    """C split across programs: per-chunk stats, merged; argmax of a row found in a later chunk."""
    z, labels = make_case(3, b, 1000, seed=num_splits)
    z[0, 0, 900] = 50.0  # node 1's argmax in the last chunk, and a row where it is correct
    labels[0] = 900
    check(z, labels, mixed_gates(3, seed=11), temperature, progress=0.5,
          num_splits=num_splits, block_c=64, rows_per_program=rows)


def test_every_gate_kind_alone():
    """Each gate on every edge at once, labels edges included, against the reference."""
    z, labels = make_case(3, 6, 10, seed=2)
    for code in (THROUGH, LINEAR, CORRECT):
        codes = torch.full((4, 4), code)
        codes[:, 0] = CUTOFF
        codes.fill_diagonal_(CUTOFF)
        check(z, labels, codes, 2.0, progress=0.25)


def test_frozen_nodes_get_zero_loss_and_gradient():
    z, labels = make_case(3, 6, 100, seed=4)
    codes = mixed_gates(3, seed=1, p_cut=0.0, frozen=(2,))
    node, edge, grad = check(z, labels, codes, 2.0)
    assert node[1] == 0 and edge[:, 2].abs().max() == 0
    assert grad[1].abs().max() == 0 and grad[0].abs().max() > 0


def test_all_cutoff_graph():
    z, labels = make_case(2, 4, 10, seed=0)
    node, edge, grad = check(z, labels, torch.zeros(3, 3, dtype=torch.int64), 1.0)
    assert node.abs().max() == 0 and edge.abs().max() == 0 and grad.abs().max() == 0


@pytest.mark.parametrize("c, launch", [(10, {}), (300, {"block_c": 64})])
def test_all_rows_ignored_gives_zeros_not_nan(c, launch):
    z, labels = make_case(3, 5, c, seed=9)
    labels[:] = -100
    node, edge, grad = check(z, labels, mixed_gates(3, seed=2), 2.0, **launch)
    assert node.abs().max() == 0 and edge.abs().max() == 0 and grad.abs().max() == 0


def test_custom_ignore_index_and_int32_labels():
    z, labels = make_case(2, 7, 10, seed=3, ignore_frac=0.0)
    labels[2] = labels[5] = -1
    check(z, labels.int(), mixed_gates(2, seed=4), 1.0, ignore_index=-1)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_large_magnitude_logits(temperature):
    """+-1e4 logits: no overflow, no NaN, KL values of order 1e4 * T^2 still accurate."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-1, 2, (3, 6, 100), generator=gen).float() * 1e4 + torch.randn(3, 6, 100, generator=gen)
    z[1, 0] = 1e4  # a row of equal maxima (argmax ties: the first index wins)
    labels = torch.randint(0, 100, (6,), generator=gen)
    labels[0] = 0
    check(z, labels, mixed_gates(3, seed=5, p_cut=0.0), temperature, block_c=32)


def test_argmax_ties_take_the_first_index():
    """The correct gate compares the first maximal index with the label, across blocks too."""
    z = torch.zeros(2, 4, 64)
    z[0, :, 5] = 3.0
    z[0, :, 40] = 3.0  # a tie in another block (block_c=16)
    z[1] = torch.randn(4, 64)
    labels = torch.tensor([5, 40, 5, 40])
    codes = torch.tensor([[0, 0, 0], [0, 0, CORRECT], [0, 0, 0]])
    node, edge, _ = check(z, labels, codes, 1.0, block_c=16)
    assert edge[1, 2] > 0  # rows 0 and 2 count, rows 1 and 3 do not (checked against the reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c, launch", [(10, {}), (1000, {"block_c": 256})])
def test_half_precision_inputs(dtype, c, launch):
    z, labels = make_case(3, 4, c, seed=c, dtype=dtype)
    check(z, labels, mixed_gates(3, seed=7), 2.0, progress=0.9, **launch)


def test_non_contiguous_inputs_without_copy():
    """(B, M, C) storage permuted to (M, B, C), and a slice of a wider C: strides are used as they are."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 3, 40, generator=gen)
    z = base.permute(1, 0, 2)[:, :, 5:35]
    assert not z.is_contiguous() and z.stride(2) == 1
    labels = torch.randint(0, 30, (6,), generator=gen)
    check(z, labels, mixed_gates(3, seed=8), 2.0)


def test_non_contiguous_class_dimension_is_copied():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(2, 20, 5, generator=gen).transpose(1, 2)  # (2, 5, 20), stride(2) = 5
    labels = torch.randint(0, 20, (5,), generator=gen)
    check(z, labels, mixed_gates(2, seed=9), 1.0)


def test_batch_count_on_device(monkeypatch):
    """Large batches count the non-ignored rows with one torch op before the launch."""
    monkeypatch.setattr(klaunch, "COUNT_IN_KERNEL_MAX_B", 2)
    assert not kgl.plan(2, 8, 10, DEV).count_in_kernel
    z, labels = make_case(2, 8, 10, seed=6)
    check(z, labels, mixed_gates(2, seed=6), 2.0, rows_per_program=3)
    check(z, labels, mixed_gates(2, seed=6), 2.0, num_splits=2, block_c=16)


def test_grad_output_scales_each_node():
    """Backward multiplies node t's gradient by grad_output[t] (ones are skipped in the kernel)."""
    z, labels = make_case(3, 4, 10, seed=1)
    codes = mixed_gates(3, seed=3, p_cut=0.0)
    prog = torch.tensor(0.5, device=DEV)
    weights = torch.tensor([2.0, 1.0, -0.5], device=DEV)
    leaf = z.to(DEV).requires_grad_()
    node, _ = kernels.graph_loss_triton(leaf, labels.to(DEV), codes.to(DEV), 2.0, prog)
    (node * weights).sum().backward()
    _, _, grad_ref = reference(z, labels, codes, 2.0, 0.5)
    expected = grad_ref * weights.double().cpu().view(3, 1, 1)
    torch.testing.assert_close(leaf.grad.double().cpu(), expected, rtol=1e-5, atol=1e-7)


def dev_case(*args, **kw):
    """make_case on the test device (CUDA when present: the interpreter is off there)."""
    z, labels = make_case(*args, **kw)
    return z.to(DEV), labels.to(DEV)


def test_single_node_loss_backward():
    """Backward of one node's loss: the other nodes' gradients are zero."""
    z, labels = dev_case(2, 4, 10, seed=12)
    leaf = z.requires_grad_()
    node, _ = kernels.graph_loss_triton(leaf, labels, mixed_gates(2, seed=1, p_cut=0.0).to(DEV), 1.0,
                                        torch.tensor(1.0, device=DEV))
    node[1].backward()
    assert leaf.grad[0].abs().max() == 0 and leaf.grad[1].abs().max() > 0


def test_second_backward_through_the_same_graph_raises():
    z, labels = dev_case(2, 4, 10, seed=0)
    leaf = z.requires_grad_()
    node, _ = kernels.graph_loss_triton(leaf, labels, mixed_gates(2, seed=0, p_cut=0.0).to(DEV), 1.0,
                                        torch.tensor(1.0, device=DEV))
    node.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        node.sum().backward()


def test_no_gradient_written_without_grad():
    z, labels = dev_case(2, 5, 10, seed=4)
    codes = mixed_gates(2, seed=4).to(DEV)
    prog = torch.tensor(0.3, device=DEV)
    node_ref, edge_ref, _ = reference(z, labels, codes, 2.0, 0.3)
    node, edge = kernels.graph_loss_triton(z, labels, codes, 2.0, prog)  # z does not require grad
    assert not node.requires_grad
    torch.testing.assert_close(node.double(), node_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        node2, _ = kernels.graph_loss_triton(z.clone().requires_grad_(), labels, codes, 2.0, prog)
    assert not node2.requires_grad and torch.equal(node, node2)
    cfg = kgl.plan(2, 5, 10, z.device)
    _, _, grad = torch.ops.ktg_fast.graph_loss_fwd(
        z, labels, codes, prog, 2.0, -100, False, cfg.block_c, cfg.rows_per_program, cfg.num_splits,
        cfg.chunk, cfg.num_warps, cfg.count_in_kernel)
    assert grad.numel() == 0


def test_edge_loss_is_detached():
    z, labels = dev_case(2, 3, 10, seed=1)
    node, edge = kernels.graph_loss_triton(z.requires_grad_(), labels, mixed_gates(2, seed=1).to(DEV), 1.0,
                                           torch.tensor(1.0, device=DEV))
    assert node.requires_grad and not edge.requires_grad


def test_progress_is_read_on_device():
    """The linear gate's weight comes from the progress tensor at run time."""
    z, labels = dev_case(2, 4, 10, seed=3, ignore_frac=0.0)
    codes = torch.tensor([[0, LINEAR, 0], [0, 0, LINEAR], [0, LINEAR, 0]], device=DEV)
    a, _ = kernels.graph_loss_triton(z, labels, codes, 1.0, torch.tensor(0.25, device=DEV))
    b, _ = kernels.graph_loss_triton(z, labels, codes, 1.0, torch.tensor(1.0, device=DEV))
    torch.testing.assert_close(a * 4, b)


# ---------------------------------------------------------------------------
# Progress per destination node: an (M,) tensor, edges s -> t read progress[t-1].
# ---------------------------------------------------------------------------
def node_progress(m: int, seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(m, generator=gen)
    p[0] = 0.0 if seed % 2 else 1.0
    return p.tolist()


def linear_heavy_gates(m: int, seed: int) -> torch.Tensor:
    """mixed_gates with linear label and KL edges into every node (so each progress entry bites)."""
    codes = mixed_gates(m, seed)
    codes[0, 1:] = LINEAR
    for t in range(2, m + 1):
        codes[t - 1, t] = LINEAR
    return codes


PER_NODE_CASES = [
    (1, 5, 3, 1.0, {}),
    (2, 9, 11, 2.0, {}),
    (3, 7, 11, 4.0, {"rows_per_program": 3}),
    (7, 6, 13, 1.0, {}),
    (3, 3, 1001, 2.0, {"block_c": 128}),  # online softmax over blocks
    (2, 3, 999, 1.0, {"num_splits": 3, "block_c": 64}),  # C split across programs
    (3, 5, 777, 2.0, {"num_splits": 4, "block_c": 32, "rows_per_program": 2}),
]


@pytest.mark.parametrize("m, b, c, temperature, launch", PER_NODE_CASES)
def test_per_node_progress_matches_reference(m, b, c, temperature, launch):
    z, labels = make_case(m, b, c, seed=m * 100 + c)
    check(z, labels, linear_heavy_gates(m, seed=c), temperature, progress=node_progress(m, c), **launch)


@pytest.mark.parametrize("m, c, launch", [(3, 7, {}), (2, 9, {"block_c": 16}), (3, 33, {"num_splits": 2, "block_c": 16})])
def test_per_node_progress_matches_brute_force(m, c, launch):
    """The kernel against the float64 brute force of SEMANTICS.md, losses and gradients."""
    z, labels = make_case(m, 6, c, seed=c)
    codes = linear_heavy_gates(m, seed=c)
    names = ["cutoff", "through", "linear", "correct"]
    gates = [[names[int(k)] for k in row] for row in codes]
    prog = torch.tensor(node_progress(m, c))
    leaf = z.to(DEV).requires_grad_()
    node, edge = kernels.graph_loss_triton(leaf, labels.to(DEV), codes.to(DEV), 2.0, prog.to(DEV), **launch)
    node.sum().backward()
    zs = [x.double() for x in z.unbind(0)]
    node_bf, edge_bf = brute_force_graph_loss(zs, labels, gates, 2.0, prog.double().tolist())
    torch.testing.assert_close(edge.double().cpu(), edge_bf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(node.double().cpu(), node_bf, rtol=1e-5, atol=1e-5)
    grad_bf = torch.stack(analytic_grad(zs, labels, gates, 2.0, prog.double().tolist()))
    torch.testing.assert_close(leaf.grad.double().cpu(), grad_bf, rtol=1e-5, atol=1e-5 * grad_bf.abs().max().item())


@pytest.mark.parametrize("launch", [{}, {"num_splits": 3, "block_c": 16}])
def test_scalar_progress_equals_a_constant_vector(launch):
    """A 0-dim progress (read with stride 0) and torch.full((M,), p) give bit-identical results."""
    z, labels = dev_case(3, 5, 41, seed=8)
    codes = linear_heavy_gates(3, seed=8).to(DEV)
    out = []
    for prog in (torch.tensor(0.35, device=DEV), torch.full((3,), 0.35, device=DEV)):
        leaf = z.clone().requires_grad_()
        node, edge = kernels.graph_loss_triton(leaf, labels, codes, 2.0, prog, **launch)
        node.sum().backward()
        out.append((node, edge, leaf.grad))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_per_node_progress_any_stride_and_dtype_read_on_device():
    """A strided (M,) view and a float64 one; new values in the same tensor are read on the next call."""
    z, labels = dev_case(3, 4, 10, seed=3, ignore_frac=0.0)
    codes = torch.tensor([[0, LINEAR, LINEAR, LINEAR], [0, 0, LINEAR, 0], [0, LINEAR, 0, LINEAR],
                          [0, 0, LINEAR, 0]], device=DEV)
    base = torch.zeros(3, 2, device=DEV)
    prog = base[:, 1]  # stride 2
    prog.copy_(torch.tensor([0.25, 0.5, 1.0]))
    a, edge_a = kernels.graph_loss_triton(z, labels, codes, 1.0, prog)
    b, _ = kernels.graph_loss_triton(z, labels, codes, 1.0, prog.double().contiguous())
    assert torch.equal(a, b)
    prog.copy_(torch.tensor([0.5, 0.5, 0.5]))
    c, edge_c = kernels.graph_loss_triton(z, labels, codes, 1.0, prog)
    torch.testing.assert_close(c, a * torch.tensor([2.0, 1.0, 0.5], device=DEV))
    torch.testing.assert_close(edge_c, edge_a * torch.tensor([1.0, 2.0, 1.0, 0.5], device=DEV))


def test_bad_progress_shapes_name_the_expected_one():
    z, labels = dev_case(3, 4, 10, seed=0)
    codes = mixed_gates(3, seed=0).to(DEV)
    for bad in (torch.full((4,), 0.5), torch.full((3, 1), 0.5), torch.full((2,), 0.5), torch.ones(3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"0-dim \(every edge\) or \(3,\) \(one per destination node 1..3\)"):
            kernels.graph_loss_triton(z, labels, codes, 1.0, bad.to(DEV))


def test_plan_heuristics():
    p = kgl.plan(7, 64, 100, torch.device("cpu"))
    assert p.block_c == 128 and p.num_splits == 1 and p.count_in_kernel
    p = kgl.plan(2, 8192, 128256, torch.device("cpu"))
    assert p.block_c == 2048 and p.rows_per_program == 1 and not p.count_in_kernel
    p = kgl.plan(16, 4, 262144, torch.device("cpu"), num_splits=8)
    assert p.block_c == 32 and p.num_splits == 8 and p.chunk * p.num_splits >= 262144
    with pytest.raises(ValueError, match="power of two"):
        kgl.plan(2, 4, 100, torch.device("cpu"), block_c=100)


def test_bad_inputs_raise_clear_errors():
    z, labels = dev_case(2, 4, 10, seed=0)
    codes = mixed_gates(2, seed=0).to(DEV)
    prog = torch.tensor(1.0, device=DEV)
    f = kernels.graph_loss_triton
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        f(z.double(), labels, codes, 1.0, prog)
    with pytest.raises(ValueError, match="1 to 16 nodes"):
        f(torch.randn(17, 2, 3, device=DEV), labels[:2], torch.zeros(18, 18, dtype=torch.int64, device=DEV), 1.0,
          prog)
    with pytest.raises(ValueError, match="int64 or int32 class indices"):
        f(z, labels.float(), codes, 1.0, prog)
    with pytest.raises(ValueError, match=r"labels must be \(4,\)"):
        f(z, labels[:3], codes, 1.0, prog)
    with pytest.raises(ValueError, match=r"gate_codes must be \(3, 3\)"):
        f(z, labels, codes[:2], 1.0, prog)
    with pytest.raises(ValueError, match="temperature"):
        f(z, labels, codes, 0.0, prog)
    with pytest.raises(ValueError, match="progress"):
        f(z, labels, codes, 1.0, 0.5)
    with pytest.raises(ValueError, match=r"\(M, B, C\)"):
        f(z[0], labels, codes, 1.0, prog)
    if DEV.type == "cpu":  # data checks run only where they cost no synchronisation
        bad = codes.clone()
        bad[1, 1] = THROUGH
        with pytest.raises(ValueError, match="diagonal"):
            f(z, labels, bad, 1.0, prog)
        with pytest.raises(ValueError, match=r"lie in \[0, 10\)"):
            f(z, torch.tensor([0, 1, 10, 2], device=DEV), codes, 1.0, prog)


def test_registered_op_passes_opcheck():
    """Schema, autograd registration and fake-tensor shapes of the torch.library op (and, compiled on
    a GPU, AOT dispatch: what torch.compile relies on)."""
    z, labels = make_case(2, 4, 10, seed=0)
    z = z.to(DEV).requires_grad_()
    cfg = kgl.plan(2, 4, 10, DEV)
    args = (z, labels.to(DEV), mixed_gates(2, seed=0).to(DEV), torch.tensor(0.5, device=DEV), 2.0, -100, True,
            *cfg)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if DEV.type == "cuda":  # interpreted kernels cannot be traced
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.ktg_fast.graph_loss_fwd.default, args, test_utils=utils)
    per_node = args[:3] + (torch.tensor([0.5, 0.25], device=DEV),) + args[4:]
    torch.library.opcheck(torch.ops.ktg_fast.graph_loss_fwd.default, per_node, test_utils=utils)


def test_dynamo_traces_the_wrapper_without_graph_breaks():
    """torch.compile(fullgraph=True) traces graph_loss_triton's host code (checks, launch plan) into
    one graph around the custom op; the eager backend runs it (interpreted kernels cannot be compiled)."""
    z, labels = make_case(2, 4, 10, seed=5)
    codes = mixed_gates(2, seed=5).to(DEV)
    prog = torch.tensor(0.5, device=DEV)
    z = z.to(DEV)
    labels = labels.to(DEV)

    def f(x):
        return kernels.graph_loss_triton(x, labels, codes, 2.0, prog)[0]

    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    torch.compile(f, backend="eager", fullgraph=True)(a).sum().backward()
    f(b).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_is_available():
    assert kernels.is_available(DEV)
    assert not kernels.is_available("meta")


def test_graph_loss_front_door_uses_kernel():
    """ktg_fast.graph_loss(impl='triton') reaches the kernel and matches impl='reference'."""
    z, labels = make_case(3, 4, 10, seed=2)
    names = ["cutoff", "through", "linear", "correct"]
    gates = [[names[int(c)] for c in row] for row in mixed_gates(3, seed=2)]
    a = ktg_fast.graph_loss(z.to(DEV), labels.to(DEV), gates, temperature=2.0, progress=0.4, impl="triton")
    b = ktg_fast.graph_loss(z.double(), labels, gates, temperature=2.0, progress=0.4, impl="reference")
    torch.testing.assert_close(a.edge_loss.double().cpu(), b.edge_loss, rtol=1e-5, atol=1e-6)


def test_fp16_gradient_survives_a_grad_scaler():
    """fp16 logits under torch.amp.GradScaler (loss x 65536): the gradient is kept in fp32 until the
    backward has scaled it, so entries of order p / B (subnormal or zero in fp16) come out right."""
    m, b, c = 2, 256, 2000
    z, labels = make_case(m, b, c, seed=21, scale=1.0, ignore_frac=0.0)
    z = z.half().float()  # the reference sees the same (fp16-rounded) logits
    codes = mixed_gates(m, seed=3, p_cut=0.0)
    _, _, grad_ref = reference(z, labels, codes, 2.0, 0.5)
    scale = 65536.0
    expected = grad_ref * scale
    # Below fp16's smallest normal number unscaled, normal once scaled.
    tiny = (grad_ref.abs() < 6.1e-5) & (expected.abs() > 6.1e-5)
    assert tiny.float().mean() > 0.5  # most of this gradient would be subnormal or zero in fp16
    leaf = z.to(DEV, torch.float16).requires_grad_()
    node, _ = kernels.graph_loss_triton(leaf, labels.to(DEV), codes.to(DEV), 2.0, torch.tensor(0.5, device=DEV),
                                        rows_per_program=16)
    (node.sum() * scale).backward()
    got = leaf.grad.double().cpu()
    assert leaf.grad.dtype == torch.float16
    assert (got[tiny] != 0).all(), "entries flushed to zero before the loss scale was applied"
    gmax = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=2 ** -10, atol=2 ** -10 * gmax)
    # Relative to each entry too (the fp32 reference rounded once to fp16).
    rel = ((got - expected).abs() / expected.abs().clamp(min=1e-30))[expected.abs() > 1e-3]
    assert rel.max() < 2 ** -9


@pytest.mark.parametrize("c, launch", [(12, {}), (300, {"block_c": 64}), (300, {"num_splits": 3, "block_c": 32})])
def test_masked_classes_give_finite_losses(c, launch):
    """-inf logits (a masked vocabulary shared by every node): 0 log 0 = 0 in the kernel as in the
    reference; masked classes get zero gradient."""
    z, labels = make_case(3, 5, c, seed=c, ignore_frac=0.0)
    masked = [1, 5, c - 1]
    z[:, :, masked] = float("-inf")
    labels = torch.where(torch.isin(labels, torch.tensor(masked)), torch.zeros_like(labels), labels)
    node, edge, grad = check(z, labels, mixed_gates(3, seed=4, p_cut=0.0), 2.0, progress=0.5, **launch)
    assert torch.isfinite(edge).all() and grad[:, :, masked].abs().max() == 0


def test_masked_label_class_gives_infinite_ce_not_nan():
    z, labels = dev_case(2, 4, 10, seed=3, ignore_frac=0.0)
    z[:, :, 4] = float("-inf")
    labels[0] = 4
    codes = torch.tensor([[0, THROUGH, 0], [0, 0, THROUGH], [0, THROUGH, 0]], device=DEV)
    node, edge = kernels.graph_loss_triton(z, labels, codes, 1.0, torch.tensor(1.0, device=DEV))
    ref = graph_loss_reference(z.double().cpu(), labels.cpu(), codes.cpu())
    assert edge[0, 1] == float("inf") and ref.edge_loss[0, 1] == float("inf")
    assert not torch.isnan(edge).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("c, launch", [(10, {}), (300, {"num_splits": 3, "block_c": 32})])
def test_cutoff_edges_ignore_a_diverged_source(bad, c, launch):
    """Node 1 holds NaN/inf; node 3 takes nothing from it: node 3's loss and gradient equal the
    reference's (finite), as if node 1 were clean."""
    z, labels = make_case(3, 4, c, seed=5, ignore_frac=0.0)
    clean = z.clone()
    z[0, 1, 3] = bad
    codes = torch.tensor([[0, THROUGH, THROUGH, THROUGH],
                          [0, 0, THROUGH, CUTOFF],
                          [0, THROUGH, 0, CORRECT],
                          [0, LINEAR, THROUGH, 0]])
    leaf = z.to(DEV).requires_grad_()
    node, edge = kernels.graph_loss_triton(leaf, labels.to(DEV), codes.to(DEV), 2.0,
                                           torch.tensor(0.5, device=DEV), **launch)
    node[2].backward()
    node_ref, edge_ref, grad_ref = reference(clean, labels, codes, 2.0, 0.5)
    assert edge[1, 3] == 0 and torch.isfinite(node[2])
    torch.testing.assert_close(node[2].double().cpu(), node_ref[2], rtol=1e-5, atol=1e-6)
    # grad_ref holds d(sum of node losses)/dz; node 3's own slice is d(node 3's loss)/dz_3.
    gmax = grad_ref[2].abs().max().item()
    torch.testing.assert_close(leaf.grad[2].double().cpu(), grad_ref[2], rtol=1e-5, atol=1e-5 * gmax)
    assert not torch.isfinite(node[1])  # the through edge 1 -> 2 carries the divergence
    ref_bad = graph_loss_reference(z.double(), labels, codes, temperature=2.0, progress=0.5)
    assert ref_bad.edge_loss[1, 3] == 0 and torch.isfinite(ref_bad.node_loss[2])


def test_backward_scale_uses_a_small_fixed_grid(monkeypatch):
    """The scale kernel's grid is (P, M) with P <= SCALE_GRID / M whatever B * C is; each program
    loops over blocks, so every element is still scaled."""
    monkeypatch.setattr(kops, "SCALE_BLOCK", 16)
    monkeypatch.setattr(kops, "SCALE_GRID", 6)
    grids = []
    real = kops._launch

    def spy(kernel, grid, probe, *a, **k):
        if kernel is kops.K._scale_kernel:
            grids.append(grid)
        return real(kernel, grid, probe, *a, **k)

    monkeypatch.setattr(kops, "_launch", spy)
    z, labels = dev_case(3, 8, 50, seed=1)
    codes = mixed_gates(3, seed=3, p_cut=0.0)
    weights = torch.tensor([2.0, 1.0, -0.5], device=DEV)
    leaf = z.requires_grad_()
    node, _ = kernels.graph_loss_triton(leaf, labels, codes.to(DEV), 2.0, torch.tensor(0.5, device=DEV))
    (node * weights).sum().backward()
    assert grids == [(2, 3)]  # 25 blocks of 16 per node, 2 programs each
    _, _, grad_ref = reference(z, labels, codes, 2.0, 0.5)
    expected = grad_ref.cpu() * weights.double().cpu().view(3, 1, 1)
    torch.testing.assert_close(leaf.grad.double().cpu(), expected, rtol=1e-5, atol=1e-7)


def test_every_launch_enters_the_logits_device(monkeypatch):
    """Triton launches on the current CUDA device: each launch (forward and backward) goes through
    _device_guard with a tensor on the logits' device."""
    seen = []
    real = kops._device_guard

    def spy(probe):
        seen.append(probe.device)
        return real(probe)

    monkeypatch.setattr(kops, "_device_guard", spy)
    z, labels = dev_case(2, 4, 10, seed=2)
    leaf = z.requires_grad_()
    node, _ = kernels.graph_loss_triton(leaf, labels, mixed_gates(2, seed=2, p_cut=0.0).to(DEV), 1.0,
                                        torch.tensor(1.0, device=DEV))
    (node * torch.tensor([2.0, 3.0], device=DEV)).sum().backward()
    assert len(seen) == 2 and all(d == leaf.device for d in seen)  # the forward and the backward scale


def test_device_guard_selects_the_tensor_device(monkeypatch):
    """A real CUDA tensor gets torch.cuda.device(its device); CPU and fake tensors get none."""
    entered = []

    class FakeDeviceCtx:
        def __init__(self, device):
            entered.append(torch.device(device))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDeviceCtx)
    cuda1 = torch.empty(0, device="meta")
    monkeypatch.setattr(kops, "_is_real_cuda", lambda t: True)
    with kops._device_guard(cuda1):
        pass
    assert entered == [torch.device("meta")]
    monkeypatch.undo()
    import contextlib
    assert isinstance(kops._device_guard(torch.empty(0)), contextlib.nullcontext)


requires_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")


@pytest.mark.gpu
@requires_two_gpus
def test_gpu_second_device_while_the_first_is_current():
    """Logits on cuda:1 while cuda:0 is current: forward, backward and a captured graph are right."""
    dev1 = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    z, labels = make_case(3, 64, 1000, seed=7)
    codes = mixed_gates(3, seed=7)
    leaf = z.to(dev1).requires_grad_()
    node, edge = kernels.graph_loss_triton(leaf, labels.to(dev1), codes.to(dev1), 2.0,
                                           torch.tensor(0.5, device=dev1))
    (node * torch.tensor([1.0, 2.0, 0.5], device=dev1)).sum().backward()
    node_ref, edge_ref, grad_ref = reference(z, labels, codes, 2.0, 0.5)
    torch.testing.assert_close(edge.double().cpu(), edge_ref, rtol=1e-5, atol=1e-5)
    expected = grad_ref * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(leaf.grad.double().cpu(), expected, rtol=1e-5, atol=1e-7)
    assert torch.cuda.current_device() == 0


# ---------------------------------------------------------------------------
# GPU only: compiled kernels, torch.compile and CUDA-graph capture.
# ---------------------------------------------------------------------------
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_CASES = CASES + [
    (4, 512, 32000, 1.0, {}),
    (2, 3, 131072, 2.0, {}),  # few rows, large C: split across programs by the heuristic
    (16, 64, 1000, 2.0, {}),
    (7, 2048, 100, 4.0, {}),  # many rows per program, batch counted on the device
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m, b, c, temperature, launch", GPU_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_reference(m, b, c, temperature, launch, dtype):
    z, labels = make_case(m, b, c, seed=m + c, dtype=dtype)
    check(z, labels, mixed_gates(m, seed=c), temperature, progress=0.37, **launch)


@pytest.mark.gpu
@requires_cuda
def test_gpu_torch_compile():
    z, labels = make_case(3, 64, 1000, seed=1)
    z, labels = z.cuda(), labels.cuda()
    codes = mixed_gates(3, seed=1).cuda()
    prog = torch.tensor(0.5, device="cuda")

    def forward(x):
        node, edge = kernels.graph_loss_triton(x, labels, codes, 2.0, prog)
        return (node * torch.tensor([1.0, 2.0, 0.5], device="cuda")).sum(), edge

    # Dynamo refuses .backward() inside fullgraph: compile the forward, run the backward outside.
    compiled = torch.compile(forward, fullgraph=True)
    leaf = z.clone().requires_grad_()
    loss, edge = compiled(leaf)
    loss.backward()
    node_ref, edge_ref, grad_ref = reference(z, labels, codes, 2.0, 0.5)
    torch.testing.assert_close(edge.double(), edge_ref, rtol=1e-5, atol=1e-5)
    expected = grad_ref * torch.tensor([1.0, 2.0, 0.5], device="cuda", dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(leaf.grad.double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("launch", [{}, {"num_splits": 4}])
def test_gpu_cuda_graph_capture_and_replay(launch):
    """Capture forward + backward once, replay with new logits, labels and progress."""
    m, b, c = 3, 64, 4096
    codes = mixed_gates(m, seed=3).cuda()
    static_z = torch.zeros(m, b, c, device="cuda", requires_grad=True)
    static_y = torch.zeros(b, dtype=torch.int64, device="cuda")
    static_p = torch.zeros((), device="cuda")

    def step():
        static_z.grad = None
        node, edge = kernels.graph_loss_triton(static_z, static_y, codes, 2.0, static_p, **launch)
        node.sum().backward()
        return node, edge

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up: compile kernels outside the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    static_z.grad = None
    with torch.cuda.graph(graph):
        node, edge = kernels.graph_loss_triton(static_z, static_y, codes, 2.0, static_p, **launch)
        node.sum().backward()
    for seed, prog in ((1, 0.25), (2, 0.9)):
        z, labels = make_case(m, b, c, seed=seed)
        with torch.no_grad():
            static_z.copy_(z.cuda())
        static_y.copy_(labels.cuda())
        static_p.fill_(prog)
        graph.replay()
        node_ref, edge_ref, grad_ref = reference(z, labels, codes, 2.0, prog)  # on the CPU
        torch.testing.assert_close(edge.double().cpu(), edge_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(static_z.grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.slow
@requires_cuda
def test_gpu_offsets_past_2_31_elements():
    """(2, 8200, 131072) bfloat16 logits: node 2's counted rows start past 2^31 elements, so they are
    addressed with int64 offsets (2 x 8192 x 131072 would be exactly 2^31, the last element 2^31 - 1)."""
    m, b, c = 2, 8200, 131072
    assert (m * b - 4) * c > 2 ** 31  # node 2's last rows lie past 2^31 elements
    gen = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(m, b, c, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    labels = torch.full((b,), -100, device="cuda")
    rows = torch.tensor([0, b // 2, b - 2, b - 1], device="cuda")  # only these rows count
    labels[rows] = torch.tensor([1, 2, 3, c - 1], device="cuda")
    codes = mixed_gates(m, seed=1, p_cut=0.0).cuda()
    node, edge = kernels.graph_loss_triton(z, labels, codes, 2.0, torch.tensor(0.5, device="cuda"))
    node.sum().backward()
    node_ref, edge_ref, grad_ref = reference(z[:, rows].cpu(), labels[rows].cpu(), codes.cpu(), 2.0, 0.5)
    torch.testing.assert_close(edge.double().cpu(), edge_ref, rtol=1e-5, atol=1e-5)
    gmax = grad_ref.abs().max().item()
    # bf16 gradients: one bf16 rounding of values of order p / B_eff (2^-7 relative to the largest).
    torch.testing.assert_close(z.grad[:, rows].double().cpu(), grad_ref, rtol=2 ** -7, atol=2 ** -7 * gmax)
    assert z.grad[:, b - 3].abs().max() == 0  # an ignored row


# ----------------------------------------------------------------- beyond the kernel's node limit
def block_diagonal(sizes, seed):
    """Gate codes of graphs of ``sizes`` nodes side by side (packed trials): no edge between blocks."""
    m = sum(sizes)
    codes = torch.zeros(m + 1, m + 1, dtype=torch.int64)
    a = 0
    for i, n in enumerate(sizes):
        sub = mixed_gates(n, seed=seed + i)
        codes[0, a + 1:a + n + 1] = sub[0, 1:]
        codes[a + 1:a + n + 1, a + 1:a + n + 1] = sub[1:, 1:]
        a += n
    return codes


def test_node_blocks_group_components_within_the_limit():
    from ktg_fast.loss_blocks import node_blocks
    key = tuple(map(tuple, block_diagonal([3, 4, 5, 3, 6], seed=1).tolist()))
    assert node_blocks(key, 16) == ((0, 15), (15, 21))
    assert node_blocks(key, 8) == ((0, 7), (7, 15), (15, 21))
    assert node_blocks(key, 5) is None  # a 6-node component
    codes = block_diagonal([3, 3], seed=2)
    codes[1, 6] = THROUGH  # an edge from the first block's node 1 to the second's last node joins them
    assert node_blocks(tuple(map(tuple, codes.tolist())), 5) is None
    assert node_blocks(tuple(map(tuple, codes.tolist())), 6) == ((0, 6),)


@pytest.mark.parametrize("progress", ["scalar", "per-node"])
def test_graphs_beyond_the_node_limit_run_in_blocks(progress):
    """A 21-node packed graph (limit 16): the kernel in blocks equals the float64 reference, losses,
    edges and gradients, through GraphLoss's forward and its loss_and_grad."""
    sizes = [3, 4, 5, 3, 6]
    m = sum(sizes)
    assert m > kernels.MAX_NODES
    codes = block_diagonal(sizes, seed=5)
    z, labels = make_case(m, 6, 11, seed=9)
    prog = 0.4 if progress == "scalar" else torch.linspace(0.05, 0.95, m)
    prog_ref = prog if progress == "scalar" else prog.double()
    node_ref, edge_ref, grad_ref = reference(z, labels, codes, 2.0, prog_ref)
    loss = ktg_fast.GraphLoss(codes, 2.0, impl="triton")
    leaf = z.to(DEV).requires_grad_()
    res = loss(leaf, labels.to(DEV), prog if progress == "scalar" else prog.to(DEV))
    res.node_loss.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, edge_ref.abs().max().item()))
    torch.testing.assert_close(res.edge_loss.double().cpu(), edge_ref, **tol)
    torch.testing.assert_close(res.node_loss.double().cpu(), node_ref, **tol)
    gmax = grad_ref.abs().max().item()
    torch.testing.assert_close(leaf.grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-5 * gmax)
    res2, grad = loss.loss_and_grad(z.to(DEV), labels.to(DEV), prog if progress == "scalar" else prog.to(DEV))
    torch.testing.assert_close(res2.node_loss.double().cpu(), node_ref, **tol)
    torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-5 * gmax)


def test_a_connected_graph_beyond_the_limit_names_the_reference():
    m = kernels.MAX_NODES + 1
    codes = mixed_gates(m, seed=3, p_cut=0.0)
    z, labels = make_case(m, 4, 5, seed=3)
    with pytest.raises(ValueError, match="at most 16 connected.*impl='reference'"):
        ktg_fast.GraphLoss(codes, 1.0, impl="triton")(z.to(DEV), labels.to(DEV))
    # The reference has no limit.
    ref = ktg_fast.GraphLoss(codes, 1.0, impl="reference")(z, labels)
    assert ref.node_loss.shape == (m,) and torch.isfinite(ref.node_loss).all()


@pytest.mark.parametrize("sizes", [[3, 2, 1], [3, 4, 5, 3, 6]])
def test_gates_set_in_place_equal_fixed_gates(sizes):
    """A GraphLoss with gates set in place (a trial pack's slots, within and beyond the node limit): after
    each new matrix, the kernel equals the float64 reference of that matrix bound as fixed gates, losses,
    edges and gradients, forward and loss_and_grad; the device tensors it reads are the same ones."""
    m = sum(sizes)
    offs = [sum(sizes[:i]) for i in range(len(sizes))]
    blocks = [(o, o + n) for o, n in zip(offs, sizes)]
    loss = ktg_fast.GraphLoss(block_diagonal(sizes, seed=1), 2.0, impl="triton", blocks=blocks, device=DEV)
    live = loss.plan.live
    tensors = [live.codes.data_ptr(), *(c.data_ptr() for c in live.launch_codes)]
    assert (live.launches is None) == (m <= kernels.MAX_NODES)
    for seed in (2, 3):
        codes = block_diagonal(sizes, seed=seed)
        codes[:, offs[-1] + 1:] = CUTOFF  # the last slot empty: masked
        loss.set_gates(codes)
        z, labels = make_case(m, 6, 11, seed=seed)
        prog = torch.linspace(0.05, 0.95, m)
        node_ref, edge_ref, grad_ref = reference(z, labels, codes, 2.0, prog.double())
        leaf = z.to(DEV).requires_grad_()
        res = loss(leaf, labels.to(DEV), prog.to(DEV))
        res.node_loss.sum().backward()
        tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, edge_ref.abs().max().item()))
        torch.testing.assert_close(res.edge_loss.double().cpu(), edge_ref, **tol)
        torch.testing.assert_close(res.node_loss.double().cpu(), node_ref, **tol)
        assert res.node_loss[offs[-1]:].abs().sum().item() == 0.0
        gmax = grad_ref.abs().max().item()
        torch.testing.assert_close(leaf.grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-5 * gmax)
        _, grad = loss.loss_and_grad(z.to(DEV), labels.to(DEV), prog.to(DEV))
        torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-5 * gmax)
    assert [live.codes.data_ptr(), *(c.data_ptr() for c in live.launch_codes)] == tensors


# ----------------------------------------------------------------------------- block launches (trial packs)
def grouped_gates(groups, seed, empty=()):
    """Full (M+1, M+1) codes and the blocks' (NB, m+1, m+1) codes for blocks of nodes ``groups`` (0-based,
    any order); blocks listed in ``empty`` are all cutoff (a pack's free places)."""
    m = sum(len(g) for g in groups)
    full = torch.zeros(m + 1, m + 1, dtype=torch.int64)
    per_block = []
    for k, g in enumerate(groups):
        sub = torch.zeros(len(g) + 1, len(g) + 1, dtype=torch.int64) if k in empty else mixed_gates(len(g), seed + k)
        ix = torch.tensor([0, *[n + 1 for n in g]])
        full[ix[:, None], ix[None, :]] = torch.maximum(full[ix[:, None], ix[None, :]], sub)
        per_block.append(sub)
    return full, torch.stack(per_block)


BLOCK_CASES = [  # (NB, m, B, C, T, launch overrides, progress per node)
    (3, 3, 7, 10, 2.0, {}, False),
    (4, 3, 5, 37, 1.0, {"rows_per_program": 3}, True),  # several rows per program, partial last program
    (6, 3, 4, 100, 4.0, {}, True),  # 18 nodes: beyond the single launch's limit
    (2, 5, 3, 300, 2.0, {"block_c": 64}, True),  # online softmax over 5 blocks of C per row
    (5, 1, 6, 10, 1.0, {}, False),  # label edges only
    (2, 16, 2, 20, 2.0, {}, True),  # the largest block
]


@pytest.mark.parametrize("nb, m, b, c, temperature, launch, per_node", BLOCK_CASES)
def test_block_launch_matches_reference(nb, m, b, c, temperature, launch, per_node):
    """graph_loss_triton_blocks with non-contiguous blocks (one all cutoff) equals the float64 reference of
    the whole gate matrix: node and edge losses (zero between blocks) and every gradient."""
    total = nb * m
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(total + c)).tolist()
    groups = [perm[k * m:(k + 1) * m] for k in range(nb)]
    full, per_block = grouped_gates(groups, seed=c, empty=(nb - 1,) if nb > 2 else ())
    z, labels = make_case(total, b, c, seed=total * 7 + c)
    prog = torch.linspace(0.1, 0.9, total) if per_node else torch.tensor(0.37)
    node_ref, edge_ref, grad_ref = reference(z, labels, full, temperature, prog.double() if per_node else 0.37)
    leaf = z.to(DEV).requires_grad_()
    nodes = torch.tensor(groups, dtype=torch.int32, device=DEV)
    node, edge = kernels.graph_loss_triton_blocks(leaf, labels.to(DEV), per_block.to(DEV, torch.int32), nodes,
                                                  temperature, prog.to(DEV), **launch)
    assert node.shape == (total,) and edge.shape == (total + 1, total + 1)
    node.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, edge_ref.abs().max().item()))
    torch.testing.assert_close(edge.double().cpu(), edge_ref, **tol)
    torch.testing.assert_close(node.double().cpu(), node_ref, **tol)
    gmax = max(grad_ref.abs().max().item(), 1e-30)
    torch.testing.assert_close(leaf.grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-5 * gmax)
    _, _, grad = kernels.graph_loss_triton_blocks_with_grad(z.to(DEV), labels.to(DEV), per_block.to(DEV, torch.int32),
                                                            nodes, temperature, prog.to(DEV))
    torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-5 * gmax)
    if nb > 2:  # the empty block: exactly zero loss and gradient
        empty = groups[-1]
        assert node[empty].abs().sum().item() == 0.0 and leaf.grad[empty].abs().sum().item() == 0.0


def test_block_launch_refuses_bad_tables():
    z, labels = make_case(6, 4, 10, seed=0)
    z, labels = z.to(DEV), labels.to(DEV)
    codes = torch.zeros(2, 4, 4, dtype=torch.int32, device=DEV)
    prog = torch.tensor(0.5, device=DEV)
    f = kernels.graph_loss_triton_blocks
    with pytest.raises(ValueError, match="every node 0..5 exactly once"):
        f(z, labels, codes, torch.tensor([[0, 1, 2], [2, 3, 4]], dtype=torch.int32, device=DEV), 1.0, prog)
    with pytest.raises(ValueError, match=r"block_nodes \(3, 3\) holds 3 blocks of 3 nodes, so logits must be "
                                         r"\(9, B, C\)"):
        f(z, labels, codes, torch.arange(9, dtype=torch.int32, device=DEV).view(3, 3), 1.0, prog)
    nodes = torch.arange(6, dtype=torch.int32, device=DEV).view(2, 3)
    with pytest.raises(ValueError, match="progress must be a tensor, got float"):
        f(z, labels, codes, nodes, 1.0, 0.5)
    with pytest.raises(ValueError, match="block_codes must be a tensor, got list"):
        f(z, labels, codes.tolist(), nodes, 1.0, prog)
    with pytest.raises(ValueError, match=r"block_codes must be .* int32/int64 tensor, got shape \(2, 4, 4\) "
                                         r"torch.float32"):
        f(z, labels, codes.float(), nodes, 1.0, prog)
    with pytest.raises(ValueError, match=r"block_nodes must be .* got shape \(2, 3\) torch.float32"):
        f(z, labels, codes, nodes.float(), 1.0, prog)
    with pytest.raises(ValueError, match=r"missing \[5\], repeated \[2\]"):
        f(z, labels, codes, torch.tensor([[0, 1, 2], [2, 3, 4]], dtype=torch.int32, device=DEV), 1.0, prog)
    with pytest.raises(ValueError, match=r"block_codes must be an \(NB, m\+1, m\+1\) = \(2, 4, 4\)"):
        f(z, labels, codes[:, :3, :3], torch.arange(6, dtype=torch.int32, device=DEV).view(2, 3), 1.0, prog)
    bad = codes.clone()
    bad[1, 2, 2] = THROUGH
    with pytest.raises(ValueError, match=r"block_codes\[1\] \(block-local indices; its nodes \[3, 4, 5\]\).*diagonal"):
        f(z, labels, bad, torch.arange(6, dtype=torch.int32, device=DEV).view(2, 3), 1.0, prog)
    with pytest.raises(ValueError, match=r"progress must be 0-dim or \(6,\)"):
        f(z, labels, codes, torch.arange(6, dtype=torch.int32, device=DEV).view(2, 3), 1.0, prog.repeat(3))


def test_block_op_passes_opcheck():
    z, labels = make_case(6, 4, 10, seed=0)
    z = z.to(DEV).requires_grad_()
    _, per_block = grouped_gates([[0, 4, 2], [1, 3, 5]], seed=1)
    cfg = kgl.plan(3, 4, 10, DEV, num_splits=1)
    args = (z, labels.to(DEV), per_block.to(DEV, torch.int32), torch.tensor([[0, 4, 2], [1, 3, 5]], dtype=torch.int32,
                                                                            device=DEV),
            torch.linspace(0, 1, 6, device=DEV), 2.0, -100, True, cfg.block_c, cfg.rows_per_program, cfg.num_warps,
            cfg.count_in_kernel)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor"]
    if DEV.type == "cuda":
        utils.append("test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.ktg_fast.graph_loss_fwd_blocks.default, args, test_utils=utils)


def test_uniform_blocks_regroup_in_place():
    """A GraphLoss over blocks of one size (a search's pack, 18 nodes) runs one block launch; set_gates with new
    groups (a newcomer's places anywhere) rewrites the same device tensors and equals the reference."""
    groups0 = [list(range(k * 3, k * 3 + 3)) for k in range(6)]
    full0, _ = grouped_gates(groups0, seed=4)
    loss = ktg_fast.GraphLoss(full0, 2.0, impl="triton", blocks=[(g[0], g[-1] + 1) for g in groups0], device=DEV)
    live = loss.plan.live
    assert live.uniform and live.launches is None and live.block_nodes.shape == (6, 3)
    ptrs = (live.codes.data_ptr(), live.block_nodes.data_ptr(), live.block_codes.data_ptr())
    groups = [[0, 7, 14], [3, 1, 2], [6, 4, 5], [9, 10, 11], [12, 13, 8], [15, 16, 17]]
    full, _ = grouped_gates(groups, seed=9, empty=(5,))
    loss.set_gates(full, groups)
    assert live.block_nodes.tolist() == groups and "groups=" in repr(loss)
    z, labels = make_case(18, 5, 12, seed=3)
    prog = torch.linspace(0.0, 1.0, 18)
    node_ref, edge_ref, grad_ref = reference(z, labels, full, 2.0, prog.double())
    res, grad = loss.loss_and_grad(z.to(DEV), labels.to(DEV), prog.to(DEV))
    tol = dict(rtol=1e-5, atol=1e-5 * max(1.0, edge_ref.abs().max().item()))
    torch.testing.assert_close(res.edge_loss.double().cpu(), edge_ref, **tol)
    torch.testing.assert_close(res.node_loss.double().cpu(), node_ref, **tol)
    torch.testing.assert_close(grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-5 * grad_ref.abs().max().item())
    ref_loss = ktg_fast.GraphLoss(full0, 2.0, impl="reference", blocks=[(g[0], g[-1] + 1) for g in groups0])
    ref_loss.set_gates(full, groups)
    torch.testing.assert_close(ref_loss(z, labels, prog).node_loss.double(), node_ref, **tol)
    assert (live.codes.data_ptr(), live.block_nodes.data_ptr(), live.block_codes.data_ptr()) == ptrs
    with pytest.raises(ValueError, match=r"gate\[1\]\[2\] is 'through': an edge from network 0 to network 1, "
                                         r"which lie in different blocks \[0, 7, 14\] and \[3, 1, 2\] \(networks "
                                         r"counted from 0"):
        bad = full.clone()
        bad[1, 2] = THROUGH
        loss.set_gates(bad, groups)
    assert live.groups == tuple(map(tuple, groups))  # a refused call changes nothing
    with pytest.raises(ValueError, match="6 lists of 3 nodes"):
        loss.set_gates(full, [[0, 1, 2]] * 6)
    with pytest.raises(ValueError, match="blocks of one size"):
        ktg_fast.GraphLoss(block_diagonal([3, 2], 1), blocks=[(0, 3), (3, 5)]).set_gates(block_diagonal([3, 2], 1),
                                                                                         [[0, 1, 2], [3, 4]])


def test_dynamo_traces_the_block_wrapper_without_graph_breaks():
    """torch.compile(fullgraph=True) traces graph_loss_triton_blocks' host code (checks, plan, the node-loss
    scatter and the edge assembly) around the custom op; the eager backend runs it."""
    z, labels = make_case(6, 4, 10, seed=5)
    groups = [[0, 4, 2], [1, 3, 5]]
    _, per_block = grouped_gates(groups, seed=5)
    codes, nodes = per_block.to(DEV, torch.int32), torch.tensor(groups, dtype=torch.int32, device=DEV)
    prog = torch.linspace(0, 1, 6, device=DEV)
    z, labels = z.to(DEV), labels.to(DEV)

    def f(x):
        node, edge = kernels.graph_loss_triton_blocks(x, labels, codes, nodes, 2.0, prog)
        return node, edge

    a = z.clone().requires_grad_()
    b = z.clone().requires_grad_()
    na, ea = torch.compile(f, backend="eager", fullgraph=True)(a)
    nb_, eb = f(b)
    na.sum().backward()
    nb_.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    torch.testing.assert_close(ea, eb, rtol=0, atol=0)


@pytest.mark.gpu
@requires_cuda
def test_gpu_block_launch_compiles_and_regroups_inside_a_cuda_graph():
    """The block launch under torch.compile, and captured in a CUDA graph whose replays see new groups and gates
    written in place (a pack's refill): each replay equals the float64 reference of its gate matrix."""
    nb, m, b, c = 6, 3, 64, 100
    total = nb * m
    groups0 = [list(range(k * m, k * m + m)) for k in range(nb)]
    full0, _ = grouped_gates(groups0, seed=1)
    loss = ktg_fast.GraphLoss(full0, 2.0, impl="triton", blocks=[(g[0], g[-1] + 1) for g in groups0], device="cuda")
    z0, labels0 = make_case(total, b, c, seed=1)
    prog = torch.linspace(0.1, 0.9, total, device="cuda")
    compiled = torch.compile(lambda x: loss(x, labels0.cuda(), prog).node_loss.sum(), fullgraph=True)
    leaf = z0.cuda().requires_grad_()
    compiled(leaf).backward()
    _, _, grad_ref = reference(z0, labels0, full0, 2.0, prog.double().cpu())
    torch.testing.assert_close(leaf.grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-7)
    static_z = torch.zeros(total, b, c, device="cuda", requires_grad=True)
    static_y = torch.zeros(b, dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            static_z.grad = None
            loss(static_z, static_y, prog).node_loss.sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    static_z.grad = None
    with torch.cuda.graph(graph):
        res = loss(static_z, static_y, prog)
        res.node_loss.sum().backward()
    for seed, groups in ((2, groups0), (3, [[0, 7, 14], [3, 1, 2], [6, 4, 5], [9, 10, 11], [12, 13, 8],
                                            [15, 16, 17]])):
        full, _ = grouped_gates(groups, seed=seed, empty=(nb - 1,))
        loss.set_gates(full, groups)
        z, labels = make_case(total, b, c, seed=seed)
        with torch.no_grad():
            static_z.copy_(z.cuda())
        static_y.copy_(labels.cuda())
        graph.replay()
        node_ref, edge_ref, grad_ref = reference(z, labels, full, 2.0, prog.double().cpu())
        torch.testing.assert_close(res.edge_loss.double().cpu(), edge_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(static_z.grad.double().cpu(), grad_ref, rtol=1e-5, atol=1e-7)
