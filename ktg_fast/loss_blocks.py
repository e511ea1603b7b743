"""Graphs larger than the kernel's node limit, run as independent blocks (packed search trials).

The fused kernel holds every node of a row in one program, so it takes at most
``ktg_fast.kernels.MAX_NODES`` (16) network nodes.  A super-graph of packed trials
(:mod:`ktg_fast.pack`) is larger, but it has no edge between trials: its nodes fall
into components that share only the label node 0.  The loss of a node depends on
its component alone, so the graph loss is the concatenation of the blocks' losses:
consecutive components are grouped into blocks of at most the limit, and each block
is one kernel launch on a view of the logits (``len(blocks)`` launches instead of
one).  Chosen from the gate matrix alone (a constant to ``torch.compile``).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from . import gates as _gates

__all__ = ["node_blocks", "run_in_blocks"]


@functools.lru_cache(maxsize=256)
def node_blocks(key: tuple[tuple[int, ...], ...], limit: int) -> Optional[tuple[tuple[int, int], ...]]:
    """Contiguous 0-based node ranges ``(start, stop)`` of at most ``limit`` nodes with no edge between ranges.

    Args:
        key: the (M+1, M+1) gate codes [source][destination] as nested tuples (node 0 the label).
        limit: the most nodes per block.

    Returns:
        The ranges in node order, covering 0..M-1; None when some set of nodes joined by edges
        (a component, ignoring the label node) cannot fit a block of ``limit`` contiguous nodes.
    """
    m = len(key) - 1
    cut = _gates.CUTOFF
    # reach[i]: the last node index that node i's component touches among nodes >= i (edges either way).
    far = list(range(m))
    for s in range(m):
        for t in range(m):
            if s != t and key[s + 1][t + 1] != cut:
                lo, hi = min(s, t), max(s, t)
                far[lo] = max(far[lo], hi)
    # Cut points: i is a boundary when no edge crosses from [..i) to [i..).
    bounds, reach = [0], -1
    for i in range(m):
        reach = max(reach, far[i])
        if reach == i:
            bounds.append(i + 1)
    comps = list(zip(bounds[:-1], bounds[1:]))
    if any(b - a > limit for a, b in comps):
        return None
    blocks: list[tuple[int, int]] = []
    for a, b in comps:
        if blocks and b - blocks[-1][0] <= limit:
            blocks[-1] = (blocks[-1][0], b)
        else:
            blocks.append((a, b))
    return tuple(blocks)


def sub_codes(codes: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """The (b-a+1)-square gate codes of nodes a..b-1 (0-based) with the label node."""
    ix = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(a + 1, b + 1)]).to(codes.device)
    return codes.index_select(0, ix).index_select(1, ix).contiguous()


def run_in_blocks(z: torch.Tensor, codes: torch.Tensor, progress: torch.Tensor,
                  blocks: tuple[tuple[int, int], ...],
                  run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
                  ) -> tuple[torch.Tensor, ...]:
    """Run ``run(z_block, codes_block, progress_block)`` per block and assemble the whole graph's results.

    Args:
        z: (M, B, C) logits.
        codes: (M+1, M+1) int32 gate codes on z's device.
        progress: 0-dim or (M,) float tensor (per destination node).
        blocks: from :func:`node_blocks`.
        run: returns ``(node (m,), edge (m+1, m+1)[, grad (m, B, C)])`` for a block of m nodes.

    Returns:
        ``(node (M,), edge (M+1, M+1)[, grad (M, B, C)])``: the block results concatenated, edges placed at
        their (source, destination) in the whole graph.
    """
    m = z.shape[0]
    nodes, edges, grads = [], None, []
    for a, b in blocks:
        p = progress if progress.numel() == 1 else progress[a:b]
        out = run(z[a:b], sub_codes(codes, a, b), p)
        nodes.append(out[0])
        # Place the block's (n+1)^2 edges: row/column 0 is the label, 1..n are nodes a+1..b.
        ix = torch.cat([torch.zeros(1, dtype=torch.long, device=z.device),
                        torch.arange(a + 1, b + 1, device=z.device)])
        e = out[1]
        full = e.new_zeros(m + 1, m + 1).index_put((ix[:, None], ix[None, :]), e, accumulate=True)
        edges = full if edges is None else edges + full
        if len(out) > 2:
            grads.append(out[2])
    res = (torch.cat(nodes), edges)
    return res + (torch.cat(grads),) if grads else res
