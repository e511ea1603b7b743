"""The interface every training-step path keeps (Algorithm 1 of the paper), and what they share.

A step runs one forward of the batch through every node, the graph loss of all
edges, one backward and one optimizer step for every trainable node.  The
trainer and its checkpoints work with any step path: checkpoints are per node,
each node's ``state_dict`` and the SGD momentum buffer of each of its
parameters, keyed by parameter name.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Optional, Sequence, Union

import torch
from torch import nn

from ..graph import Graph
from ..loss import GraphLoss
from ..recipe import TrainConfig

if TYPE_CHECKING:
    from ..distributed import DistContext

__all__ = ["TrainStep", "eval_mode_logits", "node_lrs", "say_once", "bind_loss"]

log = logging.getLogger("ktg_fast")
_said: set[str] = set()


def say_once(level: int, msg: str, *args: object) -> None:
    """Log a message once per process (fallbacks are announced, not repeated per step)."""
    key = msg % args if args else msg
    if key not in _said:
        _said.add(key)
        log.log(level, msg, *args)


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
    # Data-parallel runs (torchrun): weighs each node loss by this rank's share of the global batch and
    # sums gradients over the ranks before the update (:mod:`ktg_fast.distributed`); None: one process.
    dist: Optional["DistContext"] = None

    def _global_weight(self, node_loss: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Node losses weighted by this rank's share of the global batch's labelled rows (as is, alone)."""
        if self.dist is None:
            return node_loss
        return node_loss * self.dist.batch_weight(y).to(node_loss.dtype)

    def _global_loss(self, weighted: torch.Tensor) -> torch.Tensor:
        """The global batch's node losses from every rank's weighted ones (detached; as is, alone)."""
        if self.dist is None:
            return weighted.detach()
        return self.dist.all_reduce_(weighted.detach().clone())

    @abstractmethod
    def __call__(self, x: torch.Tensor, y: torch.Tensor, progress: Union[float, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Train on one batch; return detached node losses (M,) and logits (M, B, C)."""

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (M, B, C) of every node in eval mode."""
        return eval_mode_logits(self.nets, x)

    @abstractmethod
    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Set the learning rate of each trainable node (in ``graph.trainable`` order)."""

    def node_state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Per-node state dicts (parameters and buffers), copied to the CPU."""
        self.adopt_nets()
        return [{k: v.detach().cpu().clone() for k, v in net.state_dict().items()} for net in self.nets]

    def load_node_state_dicts(self, states: Sequence[dict[str, torch.Tensor]]) -> None:
        for net, sd in zip(self.nets, states):
            net.load_state_dict(sd)
        self.adopt_nets()

    @abstractmethod
    def momentum_buffers(self) -> list[Optional[dict[str, torch.Tensor]]]:
        """Per network node: SGD momentum buffer of each parameter by name (None for frozen nodes)."""

    @abstractmethod
    def load_momentum_buffers(self, bufs: Sequence[Optional[dict[str, torch.Tensor]]]) -> None:
        """Restore what :meth:`momentum_buffers` returned (from either step path)."""

    def loss_scale_state(self) -> Optional[dict[str, torch.Tensor]]:
        """fp16: every network node's loss scale and growth tracker, ``{"scale": (M,) float32,
        "growth_tracker": (M,) int32}`` on the CPU (the same on every path); None without loss scaling."""
        return None

    def load_loss_scale_state(self, state: Optional[dict[str, torch.Tensor]]) -> None:
        """Restore what :meth:`loss_scale_state` returned (from either step path); None, or a path without
        loss scaling, keeps the scales as they are."""

    def adopt_nets(self) -> None:
        """Take over any parameter or buffer a caller replaced in ``nets`` (paths that keep them stacked)."""

    @torch.no_grad()
    def reset_nodes(self, states: dict[int, dict[str, torch.Tensor]]) -> None:
        """Start network nodes afresh, in place: a trial pack's slot taken by a new trial.

        Each node ``t`` (1-based) gets ``states[t]`` (a full state dict: parameters and buffers),
        its SGD momentum is forgotten and its fp16 loss scale starts over.  Every tensor is written
        in place, so a compiled step is not recompiled and a captured CUDA graph replays on.

        Raises:
            KeyError / RuntimeError: a node index out of range, a state dict that does not fit the net.
        """
        for t, sd in states.items():
            if not 1 <= t <= len(self.nets):
                raise KeyError(f"node {t} is not a network node of this step (1..{len(self.nets)})")
            self.nets[t - 1].load_state_dict(sd)  # copy_ into the existing tensors
        self.adopt_nets()
        self._forget_optimizer_state(sorted(states))
        scale = self.loss_scale_state()
        if scale is not None:
            fresh = type(self)._initial_loss_scale(len(self.nets))
            for t in states:
                for name in scale:
                    scale[name][t - 1] = fresh[name][t - 1]
            self.load_loss_scale_state(scale)

    @staticmethod
    def _initial_loss_scale(num_nodes: int) -> dict[str, torch.Tensor]:
        from .precision import NodeLossScale

        return NodeLossScale(num_nodes, torch.device("cpu")).state_dict()

    @abstractmethod
    def _forget_optimizer_state(self, nodes: Sequence[int]) -> None:
        """Drop the momentum of these 1-based nodes (SGD's "no buffer yet"), leaving the others' untouched."""


def bind_loss(graph: Graph, loss: Optional[GraphLoss], loss_impl: str) -> GraphLoss:
    """The step's graph loss: ``loss`` if given (e.g. one whose gates are set in place), after checking
    it fits ``graph``; else one bound to ``graph``'s gates.

    Raises:
        ValueError: a given loss of another node count or temperature than ``graph``.
    """
    if loss is None:
        return GraphLoss(graph.gate_codes(), temperature=graph.temperature, impl=loss_impl)
    if loss.num_nodes != graph.num_nodes or loss.temperature != graph.temperature:
        raise ValueError(f"the given GraphLoss has {loss.num_nodes} nodes at T = {loss.temperature}, the graph "
                         f"{graph.num_nodes} at T = {graph.temperature}")
    return loss


def node_lrs(graph: Graph, cfg: TrainConfig) -> list[float]:
    """Learning rate of each trainable node: ``cfg.node_lr`` is per network node (frozen ones ignored)."""
    rates = cfg.node_rates(graph.num_nodes)
    return [rates[t - 1] for t in graph.trainable]


