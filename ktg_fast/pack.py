"""Several graphs as one: the block-diagonal super-graph of a pack of trials.

K graphs trained in one process share the label node 0 and nothing else: the
super-graph holds every member's network nodes one after the other, each
member's edges inside its own block, and cutoff between members.  Nodes of the
same architecture, across members, then form one vmapped node group, so a pack
costs about the launches of one graph.  A cutoff edge is exactly zero, loss and
gradient (docs/SEMANTICS.md), so no member can reach another: a packed member
trains exactly as it would alone on the same batches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch

from .graph import Graph
from .graph_io import GraphError

__all__ = ["PackedGraph", "pack_graphs"]

T = TypeVar("T")


@dataclass(frozen=True)
class PackedGraph:
    """A super-graph and where each member's nodes sit in it.

    Attributes:
        graph: the super-graph (``sum(M_k)`` network nodes; its target is member 0's target).
        members: the member graphs, in order.
        offsets: 0-based index of each member's first network node among the super-graph's nodes.
    """

    graph: Graph
    members: tuple[Graph, ...]
    offsets: tuple[int, ...]

    def nodes_of(self, k: int) -> range:
        """1-based super-graph nodes of member ``k`` (member node ``t`` is ``offsets[k] + t``)."""
        return range(self.offsets[k] + 1, self.offsets[k] + self.members[k].num_nodes + 1)

    def split(self, per_node: Sequence[T]) -> list[list[T]]:
        """Cut a per-network-node sequence of the super-graph (length ``sum(M_k)``) into one list per member."""
        if len(per_node) != self.graph.num_nodes:
            raise ValueError(f"expected {self.graph.num_nodes} values (one per node of the pack), got {len(per_node)}")
        return [list(per_node[o:o + g.num_nodes]) for o, g in zip(self.offsets, self.members)]

    def blocks(self) -> list[tuple[int, int]]:
        """Each member's 0-based node range ``(start, stop)``: the blocks no edge crosses."""
        return [(o, o + g.num_nodes) for o, g in zip(self.offsets, self.members)]

    def per_node(self, per_member: Sequence[float], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Spread one value per member over its nodes: a (sum(M_k),) tensor, e.g. each member's
        linear-gate progress k / k_end as the graph loss's per-destination progress."""
        if len(per_member) != len(self.members):
            raise ValueError(f"expected {len(self.members)} values (one per member), got {len(per_member)}")
        reps = torch.tensor([g.num_nodes for g in self.members])
        return torch.repeat_interleave(torch.tensor([float(v) for v in per_member], dtype=dtype), reps).to(device)


def pack_graphs(graphs: Sequence[Graph]) -> PackedGraph:
    """The block-diagonal super-graph of ``graphs`` (label shared, no edge between members).

    Args:
        graphs: one or more graphs with the same temperature.

    Returns:
        :class:`PackedGraph`; frozen nodes stay frozen and trainable ones trainable.

    Raises:
        GraphError: no graph, or members with different temperatures (the graph loss takes one T).
    """
    graphs = tuple(graphs)
    if not graphs:
        raise GraphError("a pack needs at least one graph")
    temps = sorted({g.temperature for g in graphs})
    if len(temps) > 1:
        raise GraphError(f"packed graphs must share one temperature, got {temps}; pack graphs of one T together")
    offsets, total = [], 0
    for g in graphs:
        offsets.append(total)
        total += g.num_nodes
    gates = [["cutoff"] * (total + 1) for _ in range(total + 1)]
    nodes = []
    for g, off in zip(graphs, offsets):
        nodes.extend(g.nodes)
        m = g.num_nodes
        for t in range(1, m + 1):
            gates[0][off + t] = g.gates[0][t]  # the shared label's edge into the member's node
            for s in range(1, m + 1):
                gates[off + s][off + t] = g.gates[s][t]
    sup = Graph(nodes=list(nodes), gates=gates, temperature=temps[0], target=offsets[0] + graphs[0].target,
                check_models=all(g.check_models for g in graphs))
    return PackedGraph(graph=sup, members=graphs, offsets=tuple(offsets))
