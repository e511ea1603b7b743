"""Node groups: nodes of one architecture and role, their parameters stacked in flat buffers.

Nodes of one architecture (same model name, module type, parameter and buffer
shapes) and the same role (trainable or frozen) form a :class:`NodeGroup`.  Its
K parameters of each name are stored stacked (K, ...) in one flat buffer per
dtype (:mod:`.stacked`), and each node's ``nn.Module`` keeps *views* into those buffers:
``nets[i].state_dict()`` is always current, and loading a state dict into a
net writes into the stacks, so checkpoints stay per node and load into any step
path.  One forward is ``vmap(functional_call)`` over the stacks on the shared
input; BatchNorm buffers are stacked too, so every node keeps its own running
statistics.  A group of one node, or an architecture vmap cannot batch (with a
warning), runs its nets one after another instead ("loop" mode): the
parameters, gradients and optimizer state stay in the same flat buffers.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from ..graph import Graph
from ..models import canonical_model_name
from .base import eval_mode_logits, say_once
from .stacked import StackedNets

__all__ = ["NodeGroup", "architecture_key", "group_nodes"]


# --------------------------------------------------------------------------- grouping
def architecture_key(net: nn.Module, model_name: Optional[str] = None) -> tuple:
    """What must agree for two nets to share a group: model, module type, every tensor's name/shape/dtype/device."""
    try:
        name = canonical_model_name(model_name) if model_name else None
    except (KeyError, ValueError, TypeError):
        name = model_name
    params = tuple((n, tuple(p.shape), p.dtype, str(p.device), p.requires_grad) for n, p in net.named_parameters())
    buffers = tuple((n, tuple(b.shape), b.dtype, str(b.device)) for n, b in net.named_buffers())
    return (name, type(net).__module__, type(net).__qualname__, params, buffers)


def group_nodes(graph: Graph, nets: Sequence[nn.Module]) -> list[tuple[bool, list[int]]]:
    """Partition network nodes (1-based) into groups: ``[(trainable, [t, ...]), ...]`` ordered by first node."""
    groups: dict[tuple, list[int]] = {}
    for t, net in enumerate(nets, start=1):
        key = (not graph.is_frozen(t), architecture_key(net, graph.nodes[t - 1].model))
        groups.setdefault(key, []).append(t)
    return sorted(((key[0], ts) for key, ts in groups.items()), key=lambda kv: kv[1][0])


class NodeGroup(StackedNets):
    """K network nodes of one architecture and role, their parameters and buffers stacked
    (:class:`~.stacked.StackedNets`), run as one vmapped forward or one net after another.

    Args:
        nodes: 1-based graph node indices, ascending.
        nets: the K nets (their parameters and buffers become views into the stacks).
        trainable: train mode with autograd, or eval mode under ``no_grad``.
        vmap_ok: try ``vmap`` (K > 1); False forces loop mode.
    """

    def __init__(self, nodes: Sequence[int], nets: Sequence[nn.Module], *, trainable: bool, vmap_ok: bool = True):
        super().__init__(nodes, nets, trainable=trainable)
        self.mode = "vmap" if (vmap_ok and self.k > 1) else "loop"
        self._probed: set[bool] = set()  # train/eval modes in which vmap has run once
        self.base: Optional[nn.Module] = None
        if self.mode == "vmap":
            try:  # the structure only; the tensors come from the stacks
                self.base = copy.deepcopy(nets[0]).to("meta")
            except Exception as e:  # noqa: BLE001 - any model-specific failure means "cannot batch"
                self._to_loop(f"cannot copy its module structure ({type(e).__name__}: {e})")
        self.set_mode()

    # ------------------------------------------------------------ modes
    def set_mode(self) -> None:
        """Trainable nets in train mode, frozen ones in eval mode (as EagerStep and build_nodes leave them)."""
        for net in self.nets:
            net.train(self.trainable)
        if self.base is not None:
            self.base.train(self.trainable)

    def _to_loop(self, why: str) -> None:
        say_once(logging.WARNING, "nodes %s (%s) run one after another, not batched with vmap: %s",
                  self.nodes, type(self.nets[0]).__name__, why)
        self.mode = "loop"
        self.base = None

    # ------------------------------------------------------------ forward
    def _run_vmapped(self, x: torch.Tensor) -> torch.Tensor:
        def one(params: dict, buffers: dict, inp: torch.Tensor) -> torch.Tensor:
            return functional_call(self.base, (params, buffers), (inp,))

        # randomness="different": each node draws its own dropout masks, as separate nets would.
        return vmap(one, in_dims=(0, 0, None), randomness="different")(self.leaves, self.buffers, x)

    def forward(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Logits (K, B, C) of the group's nodes; ``train`` only for trainable groups (autograd, BN batch stats)."""
        if self.mode == "vmap" and train not in self._probed:
            # The first vmapped call in each mode may fail for a model vmap cannot batch: undo any
            # running-statistics update it made and fall back to the loop.
            saved = {n: b.clone() for n, b in self.buffers.items()}
            try:
                out = self._forward_mode(x, train)
                self._probed.add(train)
                return out
            except Exception as e:  # noqa: BLE001 - vmap raises many kinds for unsupported ops
                with torch.no_grad():
                    for n, b in saved.items():
                        self.buffers[n].copy_(b)
                self._to_loop(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return self._forward_mode(x, train)

    def _forward_mode(self, x: torch.Tensor, train: bool) -> torch.Tensor:
        if self.mode == "vmap":
            if train:
                return self._run_vmapped(x)
            self.base.eval()
            try:
                with torch.no_grad():
                    return self._run_vmapped(x)
            finally:
                self.base.train(self.trainable)
        if train:
            return torch.stack([net(x) for net in self.nets])
        return eval_mode_logits(self.nets, x)
