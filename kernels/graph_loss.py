"""The fused graph loss's entry points: ``graph_loss_triton`` and ``graph_loss_triton_with_grad``.

``graph_loss_triton`` is what ``ktg_fast.loss.GraphLoss`` calls on CUDA tensors:
it checks the inputs, plans the launch (:mod:`.launch`) and runs the
``torch.library`` operator of :mod:`.ops`, which launches the Triton kernels
(:mod:`._triton_graph_loss`).  The forward writes every node's gradient; the
backward only scales it by ``grad_output``.  No host synchronisation happens on
CUDA, so a call can be captured in a CUDA graph and traced by ``torch.compile``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import ops  # noqa: F401  (registers the torch.ops.ktg_fast operators)
from .launch import DTYPES, MAX_NODES, grad_dtype, is_available, plan

__all__ = ["grad_dtype", "graph_loss_triton", "graph_loss_triton_with_grad", "is_available", "plan"]


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
    if not isinstance(progress, torch.Tensor) or not progress.dtype.is_floating_point or not (
            progress.numel() == 1 or tuple(progress.shape) == (m,)):
        got = f"shape {tuple(progress.shape)} {progress.dtype}" if isinstance(progress, torch.Tensor) else repr(progress)
        raise ValueError(f"progress must be a floating-point tensor of k / k_end of the linear gate: 0-dim (every "
                         f"edge) or ({m},) (one per destination node 1..{m}), got {got}")
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
        progress: float tensor on the device, the linear gate's k / k_end: 0-dim
            (every edge) or (M,) (per destination: edges s -> t read progress[t-1]).
            Read inside the kernel, so CUDA-graph replays see new values.
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
    if progress.numel() == 1:
        progress = progress.reshape(())  # one value for every edge (M = 1: either form)
    if progress.dtype != torch.float32:
        progress = progress.float()
    cfg = plan(m, b, c, logits.device, **launch)
    return torch.ops.ktg_fast.graph_loss_fwd(
        logits, labels, gate_codes, progress, float(temperature), int(ignore_index), compute_grad,
        cfg.block_c, cfg.rows_per_program, cfg.num_splits, cfg.chunk, cfg.num_warps, cfg.count_in_kernel,
    )
