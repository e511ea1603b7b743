"""One training step of a whole graph (Algorithm 1), and the interface every step path keeps.

A step runs one forward of the batch through every node, the graph loss of all
edges, one backward and one optimizer step for every trainable node.  The
eager step here is the plain reference; ``fusion.py`` adds faster paths with
the same interface, so the trainer and its checkpoints work with any of them.
Checkpoints are per node: each node's ``state_dict`` and the SGD momentum
buffer of each of its parameters, keyed by parameter name.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Sequence

import torch
from torch import nn

from .graph import Graph
from .loss import graph_loss
from .recipe import TrainConfig, make_optimizer

__all__ = ["TrainStep", "EagerStep", "eval_mode_logits", "make_step", "STEP_KINDS"]

STEP_KINDS = ("auto", "eager", "fused", "graph")


@torch.no_grad()
def eval_mode_logits(nets: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """Stacked eval-mode outputs of ``nets`` on ``x``; each net's train/eval mode is restored."""
    outs = []
    for net in nets:
        was = net.training
        net.eval()
        outs.append(net(x))
        net.train(was)
    return torch.stack(outs)


class TrainStep(ABC):
    """Interface of a training step over the networks of a graph (node order)."""

    kind = "base"
    graph: Graph
    nets: list[nn.Module]
    # Calls after which every call runs the steady-state path (a CUDA-graph step captures on a later
    # call than its warm-up): timings must start after this many calls.
    steady_after: int = 1

    @abstractmethod
    def __call__(self, x: torch.Tensor, y: torch.Tensor, progress: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch; return detached node losses (M,) and logits (M, B, C)."""

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (M, B, C) of every node in eval mode."""
        return eval_mode_logits(self.nets, x)

    @abstractmethod
    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Set the learning rate of each trainable node (in ``graph.trainable`` order)."""

    def node_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Per-node state dicts (parameters and buffers), copied to the CPU."""
        self.sync_to_nets()
        return [{k: v.detach().cpu().clone() for k, v in net.state_dict().items()} for net in self.nets]

    def load_node_state_dicts(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for net, sd in zip(self.nets, states):
            net.load_state_dict(sd)
        self.sync_from_nets()

    @abstractmethod
    def momentum_buffers(self) -> list[Optional[dict[str, torch.Tensor]]]:
        """Per network node: SGD momentum buffer of each parameter by name (None for frozen nodes)."""

    @abstractmethod
    def load_momentum_buffers(self, bufs: Sequence[Optional[dict[str, torch.Tensor]]]) -> None:
        """Restore what :meth:`momentum_buffers` returned (from either step path)."""

    # Paths that keep parameters elsewhere (stacked) copy them to and from the nets.
    def sync_to_nets(self) -> None:
        pass

    def sync_from_nets(self) -> None:
        pass


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
        self.codes = graph.gate_codes()
        self.loss_impl = loss_impl
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
        res = graph_loss(logits, y, self.codes, temperature=self.graph.temperature, progress=progress,
                         impl=self.loss_impl)
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


def node_lrs(graph: Graph, cfg: TrainConfig) -> list[float]:
    """Learning rate of each trainable node: ``cfg.node_lr`` is per network node (frozen ones ignored)."""
    if cfg.node_lr is None:
        return [cfg.lr] * len(graph.trainable)
    if len(cfg.node_lr) != graph.num_nodes:
        raise ValueError(f"node_lr has {len(cfg.node_lr)} entries but the graph has {graph.num_nodes} network nodes")
    return [cfg.node_lr[t - 1] for t in graph.trainable]


def make_step(kind: str, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *,
              loss_impl: str = "auto") -> TrainStep:
    """Build the step path named ``kind`` (``auto`` picks the fastest that works here)."""
    if kind not in STEP_KINDS:
        raise ValueError(f"unknown step {kind!r}; choose from {', '.join(STEP_KINDS)}")
    if kind in ("auto", "fused", "graph"):
        try:
            from . import fusion
        except ImportError:
            fusion = None
        if fusion is not None and hasattr(fusion, "make_fused_step"):
            return fusion.make_fused_step(kind, graph, nets, cfg, loss_impl=loss_impl)
        if kind != "auto":
            raise ValueError(f"step {kind!r} is not available in this build; use --step eager")
    return EagerStep(graph, nets, cfg, loss_impl=loss_impl)
