"""The reference step: each node's forward in turn, one graph loss, one backward, one SGD step."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..graph import Graph
from ..loss import GraphLoss
from ..recipe import TrainConfig, make_optimizer
from .base import TrainStep, node_lrs

__all__ = ["EagerStep"]


class EagerStep(TrainStep):
    """The reference step: each node's forward in turn, ``graph_loss``, one backward, one SGD step.

    Frozen nodes run in eval mode under ``no_grad``.  One SGD with a
    parameter group per trainable node equals one SGD per node, because each
    node's loss reaches only its own parameters.
    """

    kind = "eager"

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, loss_impl: str = "auto"):
        self.graph = graph
        self.nets = list(nets)
        self.loss = GraphLoss(graph.gate_codes(), temperature=graph.temperature, impl=loss_impl)
        self.trainable = graph.trainable
        lrs = node_lrs(graph, cfg)
        self.optimizer = make_optimizer([list(self.nets[t - 1].parameters()) for t in self.trainable], lrs, cfg)
        for t in self.trainable:
            self.nets[t - 1].train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for t, net in enumerate(self.nets, start=1):
            if t in self.trainable:
                outs.append(net(x))
            else:
                with torch.no_grad():
                    outs.append(net(x))
        return torch.stack(outs)

    def __call__(self, x, y, progress):
        logits = self.forward(x)
        res = self.loss(logits, y, progress=progress)
        self.optimizer.zero_grad(set_to_none=True)
        res.node_loss.sum().backward()
        self.optimizer.step()
        return res.node_loss.detach(), logits.detach()

    def set_lrs(self, lrs):
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def momentum_buffers(self):
        out: list[Optional[dict[str, torch.Tensor]]] = [None] * len(self.nets)
        for t in self.trainable:
            bufs = {}
            for name, p in self.nets[t - 1].named_parameters():
                buf = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    bufs[name] = buf.detach().cpu().clone()
            out[t - 1] = bufs
        return out

    def load_momentum_buffers(self, bufs):
        for t in self.trainable:
            named = bufs[t - 1] or {}
            for name, p in self.nets[t - 1].named_parameters():
                if name in named:
                    self.optimizer.state[p]["momentum_buffer"] = named[name].to(p.device, p.dtype).clone()
