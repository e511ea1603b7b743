"""The fused graph loss as ``torch.library`` operators with autograd (``ktg_fast::graph_loss_fwd``, and
``ktg_fast::graph_loss_fwd_blocks`` for a graph of blocks of one size, one launch with a grid axis over blocks).

The forward op launches one Triton kernel for all the per-row work (three when C
is split across programs), sums the per-program partial losses with ``torch.sum``
and returns node and edge losses.  The gradient of every node's loss with respect
to its own logits is written during the forward pass; backward only scales it,
in place, by ``grad_output`` (a kernel that touches no memory for nodes whose
grad_output is 1).  No host synchronisation happens anywhere, so the ops can be
captured in a CUDA graph, and ``torch.library.triton_op`` lets
``torch.compile`` trace into them.  The checked entry points are in
:mod:`.graph_loss`.

Precision: float16 logits get a float32 gradient buffer, scaled by
``grad_output`` and cast once in backward, so a loss scaled by
``torch.amp.GradScaler`` (grad_output 65536) keeps gradients that float16
would flush to zero at about p / B.  bfloat16 shares float32's exponent range,
so its gradient is stored in bfloat16 (half the memory at LLM vocabularies).

Devices: Triton launches on the *current* CUDA device, not on the tensors'
one, so every launch enters the logits' device (``cuda:1`` works when the
current device is 0).
"""
from __future__ import annotations

import contextlib

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import _triton_graph_loss as K
from .launch import LABEL_BLOCK, SCALE_BLOCK, SCALE_GRID, grad_dtype, interpreted, single_block

def _device_guard(probe: torch.Tensor):
    """Make ``probe``'s CUDA device current for a launch (Triton launches on the current device).

    Only real CUDA tensors get a guard: fake tensors (tracing) and CPU tensors (the interpreter)
    need none, and Inductor's generated launches carry their own.
    """
    if _is_real_cuda(probe):
        return torch.cuda.device(probe.device)
    return contextlib.nullcontext()


def _is_real_cuda(t: torch.Tensor) -> bool:
    return type(t) is torch.Tensor and t.device.type == "cuda"


def _launch(kernel, grid: tuple, probe: torch.Tensor, *args, **kwargs) -> None:
    """Launch ``kernel`` on ``probe``'s device, traceably (``wrap_triton``); under the interpreter directly.

    Interpreted kernels cannot be traced: on fake tensors (shape propagation) they are skipped.
    """
    with _device_guard(probe):
        if interpreted():
            if not isinstance(probe, torch._subclasses.FakeTensor):
                kernel[grid](*args, **kwargs)
        else:
            wrap_triton(kernel)[grid](*args, **kwargs)


def _partials(n_prog: int, m: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-program partial sums (edge, node); with one program, the outputs themselves."""
    if n_prog == 1:
        return (torch.empty((m + 1, m + 1), dtype=torch.float32, device=dev),
                torch.empty((m,), dtype=torch.float32, device=dev))
    return (torch.empty((n_prog, m + 1, m + 1), dtype=torch.float32, device=dev),
            torch.empty((n_prog, m), dtype=torch.float32, device=dev))


def _fwd_setup(logits: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int,
               compute_grad: bool, count_in_kernel: bool) -> tuple[dict, dict, torch.Tensor, torch.Tensor]:
    """Both forward ops' prologue: temperature and batch-count constexprs, the gradient buffer (M, B, C) (or an
    empty one), and the batch count (the labels as a placeholder pointer when counted inside the kernel)."""
    m, b, c = logits.shape
    t = float(temperature)
    consts = dict(T=t, K_T=K._LOG2E / t, SAME_T=t == 1.0)
    count_consts = dict(COUNT_IN_KERNEL=count_in_kernel, LABEL_BLOCK=min(LABEL_BLOCK, triton.next_power_of_2(b)))
    grad = torch.empty((m, b, c) if compute_grad else (0,), dtype=grad_dtype(logits.dtype), device=logits.device)
    count = labels if count_in_kernel else (labels != ignore_index).sum()
    return consts, count_consts, grad, count


@triton_op("ktg_fast::graph_loss_fwd", mutates_args=())
def _graph_loss_fwd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gate_codes: torch.Tensor,
    progress: torch.Tensor,
    temperature: float,
    ignore_index: int,
    compute_grad: bool,
    block_c: int,
    rows_per_program: int,
    num_splits: int,
    chunk: int,
    num_warps: int,
    count_in_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional forward: (node_loss (M,), edge_loss (M+1, M+1), grad (M, B, C) or (0,)).

    ``progress`` is float32, 0-dim (every linear edge) or (M,) (edges into node t read progress[t-1]).

    ``grad`` has dtype :func:`grad_dtype` of the logits' (float32 for float16 logits).
    """
    m, b, c = logits.shape
    mp = triton.next_power_of_2(m)
    mp1 = triton.next_power_of_2(m + 1)
    dev = logits.device
    consts, count_consts, grad, count = _fwd_setup(logits, labels, temperature, ignore_index, compute_grad,
                                                   count_in_kernel)
    s_m, s_b = logits.stride(0), logits.stride(1)
    s_y = labels.stride(0)
    s_p = 0 if progress.dim() == 0 else progress.stride(0)  # one progress for every edge, or one per destination
    if num_splits == 1:
        n_prog = triton.cdiv(b, rows_per_program)
        edge_p, node_p = _partials(n_prog, m, dev)
        _launch(
            K._fused_kernel, (n_prog,), logits,
            logits, labels, gate_codes, progress, count, grad, edge_p, node_p, gate_codes,
            b, c, s_m, s_b, s_y, s_p, ignore_index,
            M=m, MP=mp, MP1=mp1, ROWS=rows_per_program, BLOCK_C=block_c,
            SINGLE_BLOCK=single_block(c, block_c, num_warps),
            WRITE_GRAD=compute_grad, GATHER=False, num_warps=num_warps, **count_consts, **consts,
        )
    else:
        nsp = triton.next_power_of_2(num_splits)
        stats = torch.empty((b, num_splits, 3, mp), dtype=torch.float32, device=dev)
        amax = torch.empty((b, num_splits, mp), dtype=torch.int32, device=dev)
        xbuf = torch.empty((b, num_splits, mp, mp), dtype=torch.float32, device=dev)
        _launch(
            K._split_stats_kernel, (b, num_splits), logits,
            logits, gate_codes, stats, amax, c, s_m, s_b, chunk,
            M=m, MP=mp, NSPLIT=num_splits, BLOCK_C=block_c, K_T=consts["K_T"], SAME_T=consts["SAME_T"],
            num_warps=num_warps,
        )
        _launch(
            K._split_grad_kernel, (b, num_splits), logits,
            logits, labels, gate_codes, progress, count, stats, amax, grad, xbuf,
            b, c, s_m, s_b, s_y, s_p, ignore_index, chunk,
            M=m, MP=mp, NSPLIT=num_splits, NSP=nsp, BLOCK_C=block_c, WRITE_GRAD=compute_grad,
            num_warps=num_warps, **count_consts, **consts,
        )
        n_prog = triton.cdiv(b, rows_per_program)
        edge_p, node_p = _partials(n_prog, m, dev)
        _launch(
            K._split_loss_kernel, (n_prog,), logits,
            logits, labels, gate_codes, progress, count, stats, amax, xbuf, edge_p, node_p,
            b, c, s_m, s_b, s_y, s_p, ignore_index,
            M=m, MP=mp, MP1=mp1, ROWS=rows_per_program, NSPLIT=num_splits, NSP=nsp,
            num_warps=1, **count_consts, **consts,
        )
    if n_prog == 1:  # the kernel wrote the final sums
        return node_p, edge_p, grad
    return node_p.sum(0), edge_p.sum(0), grad


@triton_op("ktg_fast::graph_loss_fwd_blocks", mutates_args=())
def _graph_loss_fwd_blocks(
    logits: torch.Tensor,
    labels: torch.Tensor,
    block_codes: torch.Tensor,
    block_nodes: torch.Tensor,
    progress: torch.Tensor,
    temperature: float,
    ignore_index: int,
    compute_grad: bool,
    block_c: int,
    rows_per_program: int,
    num_warps: int,
    count_in_kernel: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Functional forward of a graph made of NB blocks of m nodes each, no edge between blocks, in one launch.

    ``block_codes`` (NB, m+1, m+1) int32 holds each block's gates (the label first, then its nodes in the
    order of ``block_nodes``), ``block_nodes`` (NB, m) int32 the block's nodes (0-based indices into
    the logits; every node in exactly one block).  Returns (node_loss (M,) in node order, the blocks'
    edge losses (NB, m+1, m+1) in block order, grad (M, B, C) or (0,)); M = NB * m.
    """
    total, b, c = logits.shape
    nb, m = block_nodes.shape
    mp = triton.next_power_of_2(m)
    mp1 = triton.next_power_of_2(m + 1)
    dev = logits.device
    consts, count_consts, grad, count = _fwd_setup(logits, labels, temperature, ignore_index, compute_grad,
                                                   count_in_kernel)
    s_p = 0 if progress.dim() == 0 else progress.stride(0)
    n_prog = triton.cdiv(b, rows_per_program)
    edge_p = torch.empty((nb, n_prog, m + 1, m + 1), dtype=torch.float32, device=dev)
    node_p = torch.empty((nb, n_prog, m), dtype=torch.float32, device=dev)
    _launch(
        K._fused_kernel, (n_prog, nb), logits,
        logits, labels, block_codes, progress, count, grad, edge_p, node_p, block_nodes,
        b, c, logits.stride(0), logits.stride(1), labels.stride(0), s_p, ignore_index,
        M=m, MP=mp, MP1=mp1, ROWS=rows_per_program, BLOCK_C=block_c,
        SINGLE_BLOCK=single_block(c, block_c, num_warps, blocks=True),
        WRITE_GRAD=compute_grad, GATHER=True, num_warps=num_warps, **count_consts, **consts,
    )
    node_b = node_p.sum(1) if n_prog > 1 else node_p[:, 0]
    edge_b = edge_p.sum(1) if n_prog > 1 else edge_p[:, 0]
    # The blocks' node losses back in node order (the table is a permutation: every entry written once).
    node = node_b.new_empty(total).scatter_(0, block_nodes.reshape(-1).long(), node_b.reshape(-1))
    return node, edge_b, grad


def _scale_launch(src: torch.Tensor, dst: torch.Tensor, grad_output: torch.Tensor) -> None:
    m = src.shape[0]
    n = src.numel() // max(m, 1)
    if n == 0:
        return
    nblk = triton.cdiv(n, SCALE_BLOCK)
    programs = max(1, min(nblk, SCALE_GRID // m))
    _launch(
        K._scale_kernel, (programs, m), src,
        src, dst, grad_output, grad_output.stride(0), n, BLOCK=SCALE_BLOCK,
        IN_PLACE=src is dst, num_warps=8,
    )


@triton_op("ktg_fast::scale_node_grad_", mutates_args={"grad"})
def _scale_node_grad_(grad: torch.Tensor, grad_output: torch.Tensor) -> None:
    """grad[m] *= grad_output[m] in place; nodes whose grad_output is 1 cost no memory traffic."""
    _scale_launch(grad, grad, grad_output)


@triton_op("ktg_fast::scale_node_grad_into", mutates_args={"out"})
def _scale_node_grad_into(grad: torch.Tensor, grad_output: torch.Tensor, out: torch.Tensor) -> None:
    """out[m] = grad[m] * grad_output[m] in out's dtype (an fp32 gradient cast once to fp16)."""
    _scale_launch(grad, out, grad_output)


def _setup_context(ctx, inputs, output) -> None:
    _, _, grad = output
    ctx.n_inputs = len(inputs)
    ctx.compute_grad = inputs[6] if ctx.n_inputs == 13 else inputs[7]  # graph_loss_fwd / graph_loss_fwd_blocks
    ctx.logits_dtype = inputs[0].dtype
    ctx.save_for_backward(grad if ctx.compute_grad else None)


def _backward(ctx, grad_node, grad_edge, grad_grad):
    # edge_loss is returned detached by graph_loss_triton; grad_edge/grad_grad are ignored.
    (grad,) = ctx.saved_tensors
    rest = (None,) * (ctx.n_inputs - 1)
    if grad is None or grad_node is None:
        return (None,) + rest
    g = grad_node.to(torch.float32)
    traced = torch.compiler.is_compiling() or type(grad) is not torch.Tensor
    if traced:
        # Under torch.compile: functional (Inductor fuses the multiply; no in-place on a saved tensor).
        out = (grad.to(torch.float32) * g.view(-1, 1, 1)).to(ctx.logits_dtype)
    elif grad.dtype != ctx.logits_dtype:
        # fp16 logits: scale the fp32 gradient, then round once (GradScaler's factor applied before it).
        out = torch.empty(grad.shape, dtype=ctx.logits_dtype, device=grad.device)
        torch.ops.ktg_fast.scale_node_grad_into(grad, g, out)
    else:
        # Eager: scale the saved buffer in place (no second gradient-sized buffer) and bump its
        # version, so a second backward through the same graph fails loudly instead of scaling twice.
        torch.ops.ktg_fast.scale_node_grad_(grad, g)
        torch.autograd.graph.increment_version(grad)
        out = grad
    return (out,) + rest


_graph_loss_fwd.register_autograd(_backward, setup_context=_setup_context)
_graph_loss_fwd_blocks.register_autograd(_backward, setup_context=_setup_context)
