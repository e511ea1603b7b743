"""Gates that change in place inside fixed node blocks: a trial pack refilled without a new step.

A pack of trials (:mod:`ktg_fast.pack`) is a block-diagonal super-graph: each
trial's nodes form a block, and no edge crosses blocks.  When a pruned trial
leaves and a newcomer of the same node models takes its block, only the gates
inside that block change.  :class:`LiveGates` holds the gate matrix as device
tensors that :meth:`LiveGates.set` rewrites in place, and the graph loss bound
to it (``GraphLoss(..., blocks=...)``) computes every edge a block may hold,
reading each edge's gate at run time: a new gate matrix then allocates nothing,
so a compiled step is not recompiled and a captured CUDA graph not re-captured.

The built-in gates only (cutoff, through, linear, correct): their weights are
a few masks (docs/SEMANTICS.md, the paper's Sec. 3.2); a custom gate's weight
function is Python and would be traced as a constant.
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional, Sequence

import torch

from . import gates as _gates
from .device import resolve_device

__all__ = ["LiveGates", "merge_blocks", "kernel_node_limit"]


def kernel_node_limit() -> int:
    """The most network nodes one launch of the fused kernel takes (``ktg_fast.kernels.MAX_NODES``;
    16 where Triton is missing and the kernel never runs)."""
    try:
        from .kernels import MAX_NODES
    except ImportError:
        return 16
    return MAX_NODES


def merge_blocks(blocks: Sequence[tuple[int, int]], limit: int) -> Optional[tuple[tuple[int, int], ...]]:
    """Consecutive blocks joined into ranges of at most ``limit`` nodes (one kernel launch each), never
    splitting a block; None when a block alone exceeds ``limit``."""
    out: list[tuple[int, int]] = []
    for a, b in blocks:
        if b - a > limit:
            return None
        if out and b - out[-1][0] <= limit:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


def _int_ranges(blocks: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """``blocks`` as (start, stop) pairs of Python ints; anything else (floats, 3-tuples, text) is a ValueError
    rather than silently rounded."""
    out = []
    for r in blocks:
        try:
            a, b = r
        except (TypeError, ValueError):
            raise ValueError(f"blocks: {r!r} is not a (start, stop) pair of node indices") from None
        ok = [isinstance(v, numbers.Integral) and not isinstance(v, bool) or
              (isinstance(v, torch.Tensor) and v.ndim == 0 and not v.is_floating_point()) for v in (a, b)]
        if not all(ok):
            raise ValueError(f"blocks: {r!r} must hold integer node indices (start, stop), got "
                             f"{type(a).__name__}, {type(b).__name__}")
        out.append((int(a), int(b)))
    return tuple(out)


class LiveGates:
    """An (M+1, M+1) gate matrix on a device, rewritable in place within fixed node blocks.

    Args:
        gates: the first gate matrix [source][destination] (names or codes; node 0 the label).
        blocks: 0-based node ranges ``(start, stop)``, in order, covering nodes 0..M-1 (one per packed
            trial); edges may join nodes of one block only.
        device: where the loss runs (the logits' device).
        kernel_limit: the most nodes one kernel launch takes (``ktg_fast.kernels.MAX_NODES``).

    Attributes (device tensors, rewritten in place by :meth:`set`):
        codes: (M+1, M+1) int32, the whole matrix (the kernel reads it).
        launches: None (one kernel launch takes every node) or the node ranges launched one by one, each
            of whole blocks; ``kernel_fits`` is False when a block alone exceeds ``kernel_limit``.
        launch_codes: int32 codes of each launch range (with the label row and column).
        uniform: two or more blocks of one size m (at most ``kernel_limit``): the kernel runs one block
            launch (``graph_loss_triton_blocks``) and :meth:`set` may regroup the nodes.
        groups: each block's 0-based nodes (host tuples; contiguous ranges until regrouped).
        block_nodes, block_codes: uniform blocks only, else None: (NB, m) int32 ``groups`` and
            (NB, m+1, m+1) int32 each block's codes (its label row and column first).
        kl_nodes: 0-based nodes of blocks of two or more nodes: every KL edge lies among them.
        kl_through, kl_linear, kl_correct: (S, S, 1) bool over ``kl_nodes`` x ``kl_nodes`` [source, destination].
        ce_through, ce_linear: (M, 1) bool, the label edge into each node (correct acts as through there).

    Raises:
        ValueError: blocks that do not tile the nodes, and everything :meth:`set` raises.
    """

    def __init__(self, gates, blocks: Sequence[tuple[int, int]], device: torch.device | str, *,
                 kernel_limit: int = 16):
        from .loss_inputs import prepare_gates  # (loss_inputs imports graph, which must not import this)

        codes = _gates.gate_codes(gates)
        m = codes.shape[0] - 1
        self.blocks = _int_ranges(blocks)
        at = 0
        for a, b in self.blocks:
            if a != at or b <= a:
                raise ValueError(f"blocks {list(self.blocks)} must be non-empty ranges (start, stop) that follow one "
                                 f"another from node 0 to node {m}")
            at = b
        if at != m:
            raise ValueError(f"blocks {list(self.blocks)} cover {at} nodes; the gate matrix has {m}")
        self.num_nodes = m
        self.device = resolve_device(device)  # a clear error for an absent GPU; cuda means cuda:N, as the logits say
        # The nodes of each block: the ranges at first; with blocks of one size, set(..., groups=...) regroups them.
        self.groups: tuple[tuple[int, ...], ...] = tuple(tuple(range(a, b)) for a, b in self.blocks)
        self._block_of = [k for k, (a, b) in enumerate(self.blocks) for _ in range(a, b)]
        self.kl_nodes = tuple(n for a, b in self.blocks if b - a >= 2 for n in range(a, b))
        sizes = {b - a for a, b in self.blocks}
        # Blocks of one size (a trial pack's): one block launch, each program one block's nodes (NB * m^2 pairs).
        self.uniform = len(self.blocks) > 1 and len(sizes) == 1 and max(sizes) <= kernel_limit
        # Otherwise the kernel's launches: None for one launch over every node, else ranges of whole blocks.
        self.launches = None if self.uniform or m <= kernel_limit else merge_blocks(self.blocks, kernel_limit)
        self.kernel_fits = self.uniform or m <= kernel_limit or self.launches is not None
        s, dev = len(self.kl_nodes), self.device
        self.codes = torch.zeros(m + 1, m + 1, dtype=torch.int32, device=dev)
        self.launch_codes = [torch.zeros(b - a + 1, b - a + 1, dtype=torch.int32, device=dev)
                             for a, b in (self.launches or ())]
        nb, mb = len(self.blocks), (self.blocks[0][1] - self.blocks[0][0])
        self.block_nodes = torch.zeros(nb, mb, dtype=torch.int32, device=dev) if self.uniform else None
        self.block_codes = torch.zeros(nb, mb + 1, mb + 1, dtype=torch.int32, device=dev) if self.uniform else None
        self.kl_through = torch.zeros(s, s, 1, dtype=torch.bool, device=dev)
        self.kl_linear = torch.zeros_like(self.kl_through)
        self.kl_correct = torch.zeros_like(self.kl_through)
        self.ce_through = torch.zeros(m, 1, dtype=torch.bool, device=dev)
        self.ce_linear = torch.zeros_like(self.ce_through)
        self._prepare = prepare_gates
        self.set(codes)

    def _regroup(self, groups: Sequence[Sequence[int]]) -> None:
        """Take new node groups (each block's nodes, in its order): blocks of one size only."""
        nb, mb = len(self.groups), len(self.groups[0])
        if not self.uniform:
            raise ValueError(f"regrouping nodes needs two or more blocks of one size (at most the kernel's limit); "
                             f"these are {list(self.blocks)}")
        try:
            new = tuple(tuple(operator.index(n) for n in g) for g in groups)
        except TypeError:
            raise ValueError(f"groups must be lists of integer node indices, got {groups!r}") from None
        if len(new) != nb or any(len(g) != mb for g in new) or sorted(n for g in new for n in g) != list(
                range(self.num_nodes)):
            raise ValueError(f"groups must be {nb} lists of {mb} nodes holding every node 0..{self.num_nodes - 1} "
                             f"exactly once (0-based), got {[list(g) for g in new]}")
        self.groups = new
        self._block_of = [0] * self.num_nodes
        for k, g in enumerate(new):
            for n in g:
                self._block_of[n] = k

    @torch.no_grad()
    def set(self, gates, groups: Optional[Sequence[Sequence[int]]] = None) -> None:
        """Take a new gate matrix: device copies into the existing tensors (no allocation on the device).

        Args:
            gates: (M+1, M+1) gate names or codes, the built-in gates only, no edge between blocks.
            groups: with blocks of one size, new blocks: NB lists of m 0-based nodes, every node once (a
                pack's newcomer takes free places anywhere); None keeps the current ones.

        Raises:
            ValueError: a wrong size, an edge into the label or onto the diagonal, a gate other than
                the built-in ones, an edge joining two blocks (each named), or groups that do not tile the
                nodes (or blocks of several sizes).
        """
        old = (self.groups, self._block_of)
        if groups is not None:
            self._regroup(groups)
        try:
            self._set(gates)
        except Exception:  # refused (or an unknown gate name): the old groups stand, as the device tensors do
            self.groups, self._block_of = old
            raise

    def _set(self, gates) -> None:
        m = self.num_nodes
        shape = tuple(_gates.gate_codes(gates).shape)
        if shape != (m + 1, m + 1):
            raise ValueError(f"the gate matrix is {shape[0]}x{shape[-1]} but this loss's blocks hold {m} nodes: it "
                             f"must be {m + 1}x{m + 1} (label node 0 plus one row per network)")
        codes = self._prepare(gates, m)
        custom = sorted({int(c) for c in codes.flatten().tolist()} - _gates.KERNEL_GATES)
        if custom:
            names = ", ".join(repr(_gates.get_gate(c).name) for c in custom)
            raise ValueError(f"gates set in place (GraphLoss(blocks=...)) take the built-in gates only (cutoff, "
                             f"through, linear, correct), got {names}; for custom gates build a GraphLoss without "
                             "blocks= (its gates are then fixed)")
        cut = _gates.CUTOFF
        for s, t in (codes[1:, 1:] != cut).nonzero().tolist():
            if self._block_of[s] != self._block_of[t]:
                raise ValueError(f"gate[{s + 1}][{t + 1}] is {_gates.get_gate(int(codes[s + 1, t + 1])).name!r}: an "
                                 f"edge from network {s} to network {t}, which lie in different blocks "
                                 f"{list(self.groups[self._block_of[s]])} and {list(self.groups[self._block_of[t]])} "
                                 "(networks counted from 0 as in blocks= and groups=; the gate matrix's rows and "
                                 "columns from 1, after the label's 0); edges between blocks must be cutoff")
        self.key = tuple(map(tuple, codes.tolist()))
        dev = self.device
        self.codes.copy_(codes.to(torch.int32).to(dev))
        for (a, b), out in zip(self.launches or (), self.launch_codes):
            ix = torch.tensor([0, *range(a + 1, b + 1)])
            out.copy_(codes[ix][:, ix].to(torch.int32).to(dev))
        if self.uniform:
            nodes = torch.tensor(self.groups, dtype=torch.long)  # (NB, m)
            ix = torch.cat([torch.zeros(len(self.groups), 1, dtype=torch.long), nodes + 1], dim=1)  # label first
            self.block_nodes.copy_(nodes.to(torch.int32).to(dev))
            self.block_codes.copy_(codes[ix[:, :, None], ix[:, None, :]].to(torch.int32).to(dev))
        kl = torch.tensor(self.kl_nodes, dtype=torch.long) + 1
        sub = codes[kl][:, kl].unsqueeze(-1) if len(kl) else torch.zeros(0, 0, 1, dtype=codes.dtype)
        self.kl_through.copy_((sub == _gates.THROUGH).to(dev))
        self.kl_linear.copy_((sub == _gates.LINEAR).to(dev))
        self.kl_correct.copy_((sub == _gates.CORRECT).to(dev))
        lab = codes[0, 1:].unsqueeze(-1)
        self.ce_through.copy_(((lab == _gates.THROUGH) | (lab == _gates.CORRECT)).to(dev))
        self.ce_linear.copy_((lab == _gates.LINEAR).to(dev))

    def weights(self, z: torch.Tensor, labels: torch.Tensor, dtype: torch.dtype, prog: torch.Tensor
                ) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """The gate weights of every edge a block may hold, before the batch mean.

        Args:
            z: (M, B, C) logits; labels: (B,) safe labels; prog: 0-dim or (M,) progress in ``dtype``.

        Returns:
            ``w_kl`` (S, S, B) over ``kl_nodes`` x ``kl_nodes`` (None without such nodes) and ``w_ce`` (M, B).
        """
        w_kl = None
        if self.kl_nodes:
            from .reference import take

            p = prog if prog.dim() == 0 else take(prog, self.kl_nodes).view(1, -1, 1)
            right = (take(z, self.kl_nodes).detach().argmax(dim=-1) == labels).to(dtype).unsqueeze(1)  # (S, 1, B)
            w_kl = torch.where(self.kl_linear, p, self.kl_through.to(dtype))
            w_kl = torch.where(self.kl_correct, right, w_kl)
        p = prog if prog.dim() == 0 else prog.view(-1, 1)
        w_ce = torch.where(self.ce_linear, p, self.ce_through.to(dtype))
        b = labels.shape[0]
        return w_kl, w_ce.expand(self.num_nodes, b)
