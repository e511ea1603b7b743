"""The fused graph loss as a ``torch.library`` operator with autograd.

``graph_loss_triton`` is the entry point ``ktg_fast.loss.graph_loss`` calls.  It
launches one Triton kernel for all the per-row work (three when C is split
across programs), sums the per-program partial losses with ``torch.sum`` and
returns node and edge losses.  The gradient of every node's loss with respect
to its own logits is written during the forward pass; backward only scales it,
in place, by ``grad_output`` (a kernel that touches no memory for nodes whose
grad_output is 1).  No host synchronisation happens anywhere, so the op can be
captured in a CUDA graph, and ``torch.library.triton_op`` lets
``torch.compile`` trace into it.

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
import math
from typing import Optional

import torch
import triton
from torch.library import triton_op, wrap_triton

from . import _triton_graph_loss as K
from .launch import (DTYPES, LABEL_BLOCK, MAX_NODES, SCALE_BLOCK, SCALE_GRID, grad_dtype, interpreted,
                     is_available, plan)

__all__ = ["grad_dtype", "graph_loss_triton", "graph_loss_triton_with_grad", "is_available", "plan"]

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

    ``grad`` has dtype :func:`grad_dtype` of the logits' (float32 for float16 logits).
    """
    m, b, c = logits.shape
    mp = triton.next_power_of_2(m)
    mp1 = triton.next_power_of_2(m + 1)
    dev = logits.device
    t = float(temperature)
    consts = dict(T=t, K_T=K._LOG2E / t, SAME_T=t == 1.0)
    grad = torch.empty((m, b, c) if compute_grad else (0,), dtype=grad_dtype(logits.dtype), device=dev)
    count = labels  # a placeholder pointer when counting inside the kernel
    if not count_in_kernel:
        count = (labels != ignore_index).sum()
    count_consts = dict(COUNT_IN_KERNEL=count_in_kernel, LABEL_BLOCK=min(LABEL_BLOCK, triton.next_power_of_2(b)))
    s_m, s_b = logits.stride(0), logits.stride(1)
    s_y = labels.stride(0)
    if num_splits == 1:
        n_prog = triton.cdiv(b, rows_per_program)
        edge_p, node_p = _partials(n_prog, m, dev)
        _launch(
            K._fused_kernel, (n_prog,), logits,
            logits, labels, gate_codes, progress, count, grad, edge_p, node_p,
            b, c, s_m, s_b, s_y, ignore_index,
            M=m, MP=mp, MP1=mp1, ROWS=rows_per_program, BLOCK_C=block_c, SINGLE_BLOCK=c <= block_c,
            WRITE_GRAD=compute_grad, num_warps=num_warps, **count_consts, **consts,
        )
    else:
        nsp = triton.next_power_of_2(num_splits)
        stats = torch.empty((b, num_splits, 3, mp), dtype=torch.float32, device=dev)
        amax = torch.empty((b, num_splits, mp), dtype=torch.int32, device=dev)
        xbuf = torch.empty((b, num_splits, mp, mp), dtype=torch.float32, device=dev)
        _launch(
            K._split_stats_kernel, (b, num_splits), logits,
            logits, gate_codes, progress, stats, amax, c, s_m, s_b, chunk,
            M=m, MP=mp, NSPLIT=num_splits, BLOCK_C=block_c, K_T=consts["K_T"], SAME_T=consts["SAME_T"],
            num_warps=num_warps,
        )
        _launch(
            K._split_grad_kernel, (b, num_splits), logits,
            logits, labels, gate_codes, progress, count, stats, amax, grad, xbuf,
            b, c, s_m, s_b, s_y, ignore_index, chunk,
            M=m, MP=mp, NSPLIT=num_splits, NSP=nsp, BLOCK_C=block_c, WRITE_GRAD=compute_grad,
            num_warps=num_warps, **count_consts, **consts,
        )
        n_prog = triton.cdiv(b, rows_per_program)
        edge_p, node_p = _partials(n_prog, m, dev)
        _launch(
            K._split_loss_kernel, (n_prog,), logits,
            logits, labels, gate_codes, progress, count, stats, amax, xbuf, edge_p, node_p,
            b, c, s_m, s_b, s_y, ignore_index,
            M=m, MP=mp, MP1=mp1, ROWS=rows_per_program, NSPLIT=num_splits, NSP=nsp,
            num_warps=1, **count_consts, **consts,
        )
    if n_prog == 1:  # the kernel wrote the final sums
        return node_p, edge_p, grad
    return node_p.sum(0), edge_p.sum(0), grad


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
    ctx.compute_grad = inputs[6]
    ctx.logits_dtype = inputs[0].dtype
    ctx.save_for_backward(grad if ctx.compute_grad else None)


def _backward(ctx, grad_node, grad_edge, grad_grad):
    # edge_loss is returned detached by graph_loss_triton; grad_edge/grad_grad are ignored.
    (grad,) = ctx.saved_tensors
    if grad is None or grad_node is None:
        return (None,) * 13
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
    return (out,) + (None,) * 12


_graph_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_inputs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gate_codes: torch.Tensor,
    temperature: float,
    progress: torch.Tensor,
    ignore_index: int,
) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise ValueError(f"logits must be an (M, B, C) tensor, got {getattr(logits, 'shape', type(logits))}")
    m, b, c = logits.shape
    if logits.dtype not in DTYPES:
        raise TypeError(f"logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if not 1 <= m <= MAX_NODES:
        raise ValueError(f"the kernel handles 1 to {MAX_NODES} nodes, got M = {m}")
    if b < 1 or c < 1:
        raise ValueError(f"logits must have at least one row and one class, got shape {tuple(logits.shape)}")
    if not is_available(logits.device):
        raise RuntimeError(
            f"graph_loss_triton cannot run on {logits.device}: it needs a CUDA device, or CPU tensors "
            "with TRITON_INTERPRET=1 set before ktg_fast.kernels is first imported"
        )
    if labels.shape != (b,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be ({b},) int64 or int32 class indices, got shape {tuple(labels.shape)} "
                         f"{labels.dtype}")
    if gate_codes.shape != (m + 1, m + 1) or gate_codes.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"gate_codes must be ({m + 1}, {m + 1}) int32/int64, got shape "
                         f"{tuple(gate_codes.shape)} {gate_codes.dtype}")
    if not isinstance(progress, torch.Tensor) or progress.numel() != 1 or not progress.dtype.is_floating_point:
        raise ValueError("progress must be a 0-dim floating-point tensor (k / k_end of the linear gate)")
    for name, x in (("labels", labels), ("gate_codes", gate_codes), ("progress", progress)):
        if x.device != logits.device:
            raise ValueError(f"{name} is on {x.device} but logits are on {logits.device}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite Python float, got {temperature!r}")
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        # Data checks cost no synchronisation on the CPU; on CUDA (and when traced) they are the caller's job.
        if bool(((gate_codes < 0) | (gate_codes > 3)).any()):
            raise ValueError("gate_codes must hold built-in gate codes 0..3 (cutoff, through, linear, correct)")
        from ..graph import check_gate_structure  # ktg_fast.graph: the one home of the rule

        check_gate_structure(gate_codes)
        if bool(((labels != ignore_index) & ((labels < 0) | (labels >= c))).any()):
            raise ValueError(f"labels must lie in [0, {c}) or equal ignore_index={ignore_index}")


def graph_loss_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gate_codes: torch.Tensor,
    temperature: float,
    progress: torch.Tensor,
    ignore_index: int = -100,
    *,
    num_splits: int | None = None,
    block_c: int | None = None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused graph loss of SEMANTICS.md: node and edge losses in one kernel launch.

    Args:
        logits: (M, B, C) float32/bfloat16/float16, any strides (a copy is made
            only when the class dimension is not contiguous); M <= 16.
        labels: (B,) int64 (or int32) labels; ``ignore_index`` rows count nowhere.
            Other labels must lie in [0, C) (not checked on CUDA: no sync).
        gate_codes: (M+1, M+1) integer gate codes [source][destination] on the
            logits' device (0 cutoff, 1 through, 2 linear, 3 correct).
        temperature: T of the KL edges (a Python float, compiled into the kernel).
        progress: 0-dim float tensor on the device, the linear gate's k / k_end
            (read inside the kernel, so CUDA-graph replays see new values).
        ignore_index: label of ignored rows.
        num_splits, block_c, rows_per_program: override the launch heuristics
            (see :func:`plan`); for tests and tuning.

    Returns:
        ``(node_loss, edge_loss)``: (M,) and (M+1, M+1) float32.  ``node_loss``
        is differentiable w.r.t. ``logits``: node t's loss reaches node t's
        logits only (sources detached); its gradient is computed in the forward
        pass and only scaled in backward, in place, so backward may run once per
        forward (a second backward through the same graph raises).  ``edge_loss``
        is detached (not differentiable).  When no gradient is needed (logits
        not requiring grad, or grad mode off), no gradient is written.
    """
    node, edge, _ = _forward(logits, labels, gate_codes, temperature, progress, ignore_index, None,
                             num_splits=num_splits, block_c=block_c, rows_per_program=rows_per_program)
    return node, edge.detach()


def graph_loss_triton_with_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gate_codes: torch.Tensor,
    temperature: float,
    progress: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same launch as :func:`graph_loss_triton`, no autograd: node and edge losses and the gradient.

    Returns ``(node_loss (M,), edge_loss (M+1, M+1), grad (M, B, C))`` where ``grad`` is
    d(sum of node losses)/d(logits) in :func:`grad_dtype` of the logits' dtype.  For callers that
    turn the gradient into others themselves (``ktg_fast.GraphLinearLoss``'s chunks).
    """
    with torch.no_grad():
        return _forward(logits.detach(), labels, gate_codes, temperature, progress, ignore_index, True)


def _forward(logits: torch.Tensor, labels: torch.Tensor, gate_codes: torch.Tensor, temperature: float,
             progress: torch.Tensor, ignore_index: int, compute_grad: Optional[bool], **launch) -> tuple:
    """Check the inputs, plan the launch and run the forward op (one prologue for both entry points).

    ``compute_grad`` None: write the gradient when autograd will want it (grad mode on, logits require it).
    """
    _check_inputs(logits, labels, gate_codes, temperature, progress, ignore_index)
    if compute_grad is None:
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
    m, b, c = logits.shape
    if logits.stride(2) != 1:
        logits = logits.contiguous()  # loads along C must be contiguous; other strides are free
    progress = progress.reshape(())
    if progress.dtype != torch.float32:
        progress = progress.float()
    cfg = plan(m, b, c, logits.device, **launch)
    return torch.ops.ktg_fast.graph_loss_fwd(
        logits, labels, gate_codes, progress, float(temperature), int(ignore_index), compute_grad,
        cfg.block_c, cfg.rows_per_program, cfg.num_splits, cfg.chunk, cfg.num_warps, cfg.count_in_kernel,
    )
