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
from typing import Callable, Optional, Sequence

import torch

from . import gates as _gates

__all__ = ["node_blocks", "block_key", "run_in_blocks"]


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


@functools.lru_cache(maxsize=1024)
def block_key(key: tuple[tuple[int, ...], ...], a: int, b: int) -> tuple[tuple[int, ...], ...]:
    """The gate codes of nodes a..b-1 (0-based) with the label node, as nested tuples (a block's own key)."""
    ix = (0, *range(a + 1, b + 1))
    return tuple(tuple(key[s][t] for t in ix) for s in ix)


def run_in_blocks(z: torch.Tensor, block_codes: Sequence[torch.Tensor], progress: torch.Tensor,
                  blocks: tuple[tuple[int, int], ...],
                  run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
                  ) -> tuple[torch.Tensor, ...]:
    """Run ``run(z_block, codes_block, progress_block)`` per block and assemble the whole graph's results.

    Args:
        z: (M, B, C) logits.
        block_codes: each block's int32 gate codes (with the label row and column) on z's device, made
            once, not per step (:func:`block_key` and ``cached_codes``, or ``LiveGates.launch_codes``).
        progress: 0-dim or (M,) float tensor (per destination node).
        blocks: from :func:`node_blocks`.
        run: returns ``(node (m,), edge (m+1, m+1)[, grad (m, B, C)])`` for a block of m nodes.

    Returns:
        ``(node (M,), edge (M+1, M+1)[, grad (M, B, C)])``: the block results concatenated, edges placed at
        their (source, destination) in the whole graph.
    """
    m = z.shape[0]
    outs = [run(z[a:b], codes, progress if progress.numel() == 1 else progress[a:b])
            for (a, b), codes in zip(blocks, block_codes)]
    # Edges: block i's row 0 (the label's) and its square of nodes a+1..b; nothing crosses blocks.
    label = torch.cat([o[1][0, 1:] for o in outs])
    rows = [torch.nn.functional.pad(o[1][1:, 1:], (a + 1, m - b)) for o, (a, b) in zip(outs, blocks)]
    edges = torch.cat([torch.cat([label.new_zeros(1), label]).unsqueeze(0), *rows])
    res = (torch.cat([o[0] for o in outs]), edges)
    return res + (torch.cat([o[2] for o in outs]),) if len(outs[0]) > 2 else res
