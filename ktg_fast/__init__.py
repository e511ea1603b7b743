"""ktg_fast: fast training and search of knowledge transfer graphs.

Public API::

    import ktg_fast as kf
    res = kf.graph_loss(logits, labels, gates, temperature=1.0, progress=0.5)
    res.node_loss.sum().backward()

    loss = kf.GraphLoss(gates, temperature=2.0)      # bound once, called every step
    res = loss(logits, labels, progress=0.5)
"""
from .gates import Gate, GateContext, gate_names, get_gate, register_gate
from .graph import Graph, Node, preset
from .linear_loss import GraphLinearLoss
from .loss import GraphLoss, GraphLossResult, graph_loss, graph_loss_reference

__version__ = "0.1.0"

__all__ = [
    "Gate",
    "GateContext",
    "Graph",
    "GraphLinearLoss",
    "GraphLoss",
    "GraphLossResult",
    "Node",
    "gate_names",
    "get_gate",
    "graph_loss",
    "graph_loss_reference",
    "preset",
    "register_gate",
]
