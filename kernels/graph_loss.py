"""The fused graph loss's entry points: ``graph_loss_triton`` and ``graph_loss_triton_with_grad``; for a
graph of NB blocks of m nodes with no edge between blocks (a trial pack), ``graph_loss_triton_blocks`` and
``graph_loss_triton_blocks_with_grad``: one launch whose programs each hold one block's nodes.

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
from .launch import DTYPES, MAX_NODES, grad_dtype, interpreter_problem, is_available, plan

__all__ = ["grad_dtype", "graph_loss_triton", "graph_loss_triton_with_grad", "graph_loss_triton_blocks",
           "graph_loss_triton_blocks_with_grad", "is_available", "plan"]


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
        problem = interpreter_problem() if logits.device.type == "cpu" else None
        raise RuntimeError(
            f"graph_loss_triton cannot run on {logits.device}: " + (problem or (
                "it needs a CUDA device, or CPU tensors with TRITON_INTERPRET=1 set before ktg_fast.kernels "
                "is first imported")))
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
        _check_codes(gate_codes)
        if bool(((labels != ignore_index) & ((labels < 0) | (labels >= c))).any()):
            raise ValueError(f"labels must lie in [0, {c}) or equal ignore_index={ignore_index}")


def _check_codes(gate_codes: torch.Tensor) -> None:
    """Built-in codes only, and the gate-structure rule (no edge into the label or onto the diagonal)."""
    if bool(((gate_codes < 0) | (gate_codes > 3)).any()):
        raise ValueError("gate_codes must hold built-in gate codes 0..3 (cutoff, through, linear, correct)")
    from ..graph import check_gate_structure  # ktg_fast.graph: the one home of the rule

    check_gate_structure(gate_codes)


def _launch_inputs(logits: torch.Tensor, progress: torch.Tensor, compute_grad: Optional[bool]
                   ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """What every launch needs of checked inputs: C contiguous, progress float32 (0-dim for one value), and
    whether to write the gradient (None: when autograd will want it, grad mode on and logits requiring it)."""
    if compute_grad is None:
        compute_grad = torch.is_grad_enabled() and logits.requires_grad
    if logits.stride(2) != 1:
        logits = logits.contiguous()  # loads along C must be contiguous; other strides are free
    if progress.numel() == 1:
        progress = progress.reshape(())  # one value for every edge (M = 1: either form)
    if progress.dtype != torch.float32:
        progress = progress.float()
    return logits, progress, compute_grad


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
    logits, progress, compute_grad = _launch_inputs(logits, progress, compute_grad)
    m, b, c = logits.shape
    cfg = plan(m, b, c, logits.device, **launch)
    return torch.ops.ktg_fast.graph_loss_fwd(
        logits, labels, gate_codes, progress, float(temperature), int(ignore_index), compute_grad,
        cfg.block_c, cfg.rows_per_program, cfg.num_splits, cfg.chunk, cfg.num_warps, cfg.count_in_kernel,
    )


# ----------------------------------------------------------------------------- blocks
def _check_blocks(logits: torch.Tensor, labels: torch.Tensor, block_codes: torch.Tensor, block_nodes: torch.Tensor,
                  temperature: float, progress: torch.Tensor, ignore_index: int) -> None:
    for name, x in (("logits", logits), ("block_codes", block_codes), ("block_nodes", block_nodes),
                    ("progress", progress)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if block_nodes.dim() != 2 or block_nodes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_nodes must be an (NB, m) int32/int64 tensor of node indices, got shape "
                         f"{tuple(block_nodes.shape)} {block_nodes.dtype}")
    nb, m = block_nodes.shape
    if logits.dim() != 3 or logits.shape[0] != nb * m:
        raise ValueError(f"block_nodes {tuple(block_nodes.shape)} holds {nb} blocks of {m} nodes, so logits must be "
                         f"({nb * m}, B, C); got logits of shape {tuple(logits.shape)}")
    if tuple(block_codes.shape) != (nb, m + 1, m + 1) or block_codes.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_codes must be an (NB, m+1, m+1) = ({nb}, {m + 1}, {m + 1}) int32/int64 tensor, got "
                         f"shape {tuple(block_codes.shape)} {block_codes.dtype}")
    if block_nodes.device != logits.device:
        raise ValueError(f"block_nodes is on {block_nodes.device} but logits are on {logits.device}")
    if progress.numel() != 1 and tuple(progress.shape) != (nb * m,):
        raise ValueError(f"progress must be 0-dim or ({nb * m},) (one per node), got shape {tuple(progress.shape)}")
    if logits.device.type == "cpu" and not torch.compiler.is_compiling():
        seen = block_nodes.reshape(-1).cpu().long()
        counts = torch.bincount(seen.clamp(0, nb * m), minlength=nb * m + 1)[:nb * m]
        if bool((seen < 0).any() or (seen >= nb * m).any() or (counts != 1).any()):
            missing = (counts == 0).nonzero().flatten().tolist()
            twice = (counts > 1).nonzero().flatten().tolist()
            raise ValueError(f"block_nodes must hold every node 0..{nb * m - 1} exactly once: missing {missing}, "
                             f"repeated {twice}, out of range {seen[(seen < 0) | (seen >= nb * m)].tolist()}")
        for k in range(nb):
            try:
                _check_codes(block_codes[k])
            except ValueError as e:
                raise ValueError(f"block_codes[{k}] (block-local indices; its nodes "
                                 f"{block_nodes[k].tolist()}): {e}") from None
    # One block's checks on a block-sized view: labels, logits dtype, devices, progress form, temperature.
    _check_inputs(logits[:m], labels, block_codes[0], temperature,
                  progress if progress.numel() == 1 else progress[:m], ignore_index)


def _forward_blocks(logits, labels, block_codes, block_nodes, temperature, progress, ignore_index, compute_grad,
                    **launch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_blocks(logits, labels, block_codes, block_nodes, temperature, progress, ignore_index)
    logits, progress, compute_grad = _launch_inputs(logits, progress, compute_grad)
    total, b, c = logits.shape
    m = block_nodes.shape[1]
    # No split of C: the blocks already multiply the programs (a pack's C is a CIFAR head's, not a vocabulary).
    cfg = plan(m, b, c, logits.device, blocks=True, **launch)
    node, edge_b, grad = torch.ops.ktg_fast.graph_loss_fwd_blocks(
        logits, labels, block_codes, block_nodes, progress, float(temperature), int(ignore_index), compute_grad,
        cfg.block_c, cfg.rows_per_program, cfg.num_warps, cfg.count_in_kernel)
    return node, assemble_block_edges(edge_b.detach(), block_nodes, total), grad


def assemble_block_edges(edge_b: torch.Tensor, block_nodes: torch.Tensor, total: int) -> torch.Tensor:
    """The (M+1, M+1) edge matrix of the whole graph from the blocks' (NB, m+1, m+1) ones (zero between blocks)."""
    nb = block_nodes.shape[0]
    ix = torch.cat([block_nodes.new_zeros(nb, 1), block_nodes + 1], dim=1).long()  # (NB, m+1): label, then nodes
    full = edge_b.new_zeros(total + 1, total + 1)
    # Entry [0, 0] is written by every block, always 0; every other entry by one block.
    return full.index_put_((ix[:, :, None], ix[:, None, :]), edge_b)


def graph_loss_triton_blocks(
    logits: torch.Tensor,
    labels: torch.Tensor,
    block_codes: torch.Tensor,
    block_nodes: torch.Tensor,
    temperature: float,
    progress: torch.Tensor,
    ignore_index: int = -100,
    *,
    block_c: int | None = None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The graph loss of NB blocks of m nodes each, no edge between blocks, in one kernel launch.

    A trial pack (``ktg_fast.pack``) is such a graph: each block is one trial's nodes.  Each program
    holds the m nodes of one block, so a row costs NB * m^2 pairs, not (NB * m)^2, and the whole graph
    may hold more than :data:`MAX_NODES` nodes (m <= 16).  Blocks need not be contiguous.

    Args:
        logits: (M, B, C) float32/bfloat16/float16 with M = NB * m.
        labels: (B,) int64/int32 labels.
        block_codes: (NB, m+1, m+1) integer gate codes of each block, [source][destination] with the
            label first and then the block's nodes in the order of ``block_nodes``.
        block_nodes: (NB, m) int32 (or int64) 0-based node indices; every node in exactly one block.
        temperature, progress, ignore_index: as for :func:`graph_loss_triton`; an (M,) progress is
            indexed by node (not by block position).
        block_c, rows_per_program: override the launch heuristics (tests).

    Returns:
        ``(node_loss (M,), edge_loss (M+1, M+1))`` float32, exactly as :func:`graph_loss_triton` on the
        whole gate matrix would give them (zero between blocks); ``node_loss`` differentiable.

    Raises:
        ValueError / TypeError: shapes, dtypes, devices; on the CPU also a table that is not a
            permutation of the nodes, or invalid gate codes.
    """
    node, edge, _ = _forward_blocks(logits, labels, block_codes, block_nodes, temperature, progress, ignore_index,
                                    None, block_c=block_c, rows_per_program=rows_per_program)
    return node, edge


def graph_loss_triton_blocks_with_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    block_codes: torch.Tensor,
    block_nodes: torch.Tensor,
    temperature: float,
    progress: torch.Tensor,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`graph_loss_triton_blocks` without autograd: ``(node_loss, edge_loss, grad (M, B, C))``."""
    with torch.no_grad():
        return _forward_blocks(logits.detach(), labels, block_codes, block_nodes, temperature, progress,
                               ignore_index, True)
