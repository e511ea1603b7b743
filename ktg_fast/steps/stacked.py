"""Stacked storage of K same-architecture nets: flat parameter buffers, the nets as views, gradients in place.

The K parameters of each name are stored stacked (K, ...) in one flat buffer per
dtype (param-major, then node), and each net keeps *views* into those buffers:
``nets[i].state_dict()`` is always current, and loading a state dict into a net
writes into the stacks.  Trainable stacks also hold flat gradient, momentum and
learning-rate buffers, which the flat SGD (:mod:`.flat_sgd`) updates in one op per
dtype; after the first backward every gradient is a view into the flat gradient
buffer, so later backwards accumulate there in place.  Buffers (BatchNorm running
statistics) are stacked too.  :class:`~.node_group.NodeGroup` adds the forward.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .base import say_once

__all__ = ["Region", "FlatBuffer", "StackedNets"]


# ----------------------------------------------------------------------- flat storage
@dataclass
class Region:
    """Where one parameter name of a group lives: ``flat[offset : offset + K * numel]`` as (K, *shape)."""

    flat: "FlatBuffer"
    offset: int
    numel: int
    shape: tuple[int, ...]

    def stacked(self, t: torch.Tensor) -> torch.Tensor:
        """This name's (K, *shape) stack in ``t`` (a flat buffer: param, grad, momentum or lr)."""
        return t[self.offset: self.offset + self.flat.k * self.numel].view(self.flat.k, *self.shape)

    def node(self, t: torch.Tensor, k: int) -> torch.Tensor:
        """Node slot ``k``'s (*shape) view of this name in ``t``."""
        start = self.offset + k * self.numel
        return t[start: start + self.numel].view(self.shape)


@dataclass
class FlatBuffer:
    """The parameters of one dtype of a group, param-major then node: each (K, *shape) stack is contiguous.

    ``grad``, ``momentum`` and ``lr`` (the per-element learning rate) exist
    for trainable groups only; ``node_of`` maps each element to its node slot,
    ``active`` (None when every parameter gets a gradient) masks parameters
    that get none.
    """

    k: int
    param: torch.Tensor
    grad: Optional[torch.Tensor] = None
    momentum: Optional[torch.Tensor] = None
    lr: Optional[torch.Tensor] = None
    node_of: Optional[torch.Tensor] = None
    active: Optional[torch.Tensor] = None
    regions: list[Region] = field(default_factory=list)


def _replace_tensors(net: nn.Module, params: dict[int, nn.Parameter], buffers: dict[int, torch.Tensor]) -> None:
    """Swap a module tree's parameters and buffers (matched by identity, so tied ones stay tied)."""
    for mod in net.modules():
        for key, val in list(mod._parameters.items()):
            if val is not None and id(val) in params:
                mod._parameters[key] = params[id(val)]
        for key, val in list(mod._buffers.items()):
            if val is not None and id(val) in buffers:
                mod._buffers[key] = buffers[id(val)]


class StackedNets:
    """The parameters and buffers of K nets of one architecture, stacked; the nets keep views into them.

    Args:
        nodes: 1-based graph node indices, ascending (named in messages).
        nets: the K nets (their parameters and buffers become views into the stacks).
        trainable: allocate gradient, momentum and learning-rate buffers.

    ``mode`` says which tensors autograd differentiates: "loop" the nets' own parameters, "vmap"
    the stacked ``leaves`` (a subclass that runs the nets batched sets it).
    """

    def __init__(self, nodes: Sequence[int], nets: Sequence[nn.Module], *, trainable: bool):
        if len(nodes) != len(nets) or not nets:
            raise ValueError("a node group needs one net per node and at least one node")
        self.nodes = list(nodes)
        self.nets = list(nets)
        self.k = len(nets)
        self.trainable = trainable
        self.mode = "loop"
        self.names = [n for n, _ in nets[0].named_parameters()]
        self.requires_grad = {n: p.requires_grad for n, p in nets[0].named_parameters()}
        self.buffer_names = [n for n, _ in nets[0].named_buffers()]
        self._stack(nets)
        self._grads_bound = False
        self.missing: set[str] = set()  # parameters that get no gradient (known after the first backward)

    # ------------------------------------------------------------ storage
    def _stack(self, nets: Sequence[nn.Module]) -> None:
        k = self.k
        first = nets[0]
        device = next(iter(first.parameters())).device if self.names else torch.device("cpu")
        per_node = [dict(net.named_parameters()) for net in nets]
        by_dtype: dict[torch.dtype, list[str]] = {}
        for n in self.names:
            by_dtype.setdefault(per_node[0][n].dtype, []).append(n)
        self.flats: list[FlatBuffer] = []
        self.regions: dict[str, Region] = {}
        for dtype, names in by_dtype.items():
            sizes = [per_node[0][n].numel() for n in names]
            flat = FlatBuffer(k=k, param=torch.empty(k * sum(sizes), dtype=dtype, device=device))
            off = 0
            for n, size in zip(names, sizes):
                reg = Region(flat, off, size, tuple(per_node[0][n].shape))
                with torch.no_grad():
                    reg.stacked(flat.param).copy_(torch.stack([p[n].detach() for p in per_node]))
                flat.regions.append(reg)
                self.regions[n] = reg
                off += k * size
            if self.trainable:
                flat.grad = torch.zeros_like(flat.param)
                flat.momentum = torch.zeros_like(flat.param)
                flat.lr = torch.zeros_like(flat.param)
                flat.node_of = torch.cat([torch.arange(k).repeat_interleave(s) for s in sizes]).to(device)
            self.flats.append(flat)
        # The leaves autograd differentiates in vmap mode: (K, ...) aliases of the flat buffers.
        self.leaves = {n: self.regions[n].stacked(self.regions[n].flat.param).detach().requires_grad_(
            self.trainable and self.requires_grad[n]) for n in self.names}
        self.buffers = {n: torch.stack([dict(net.named_buffers())[n].detach() for net in nets]).contiguous()
                        for n in self.buffer_names}
        for i, net in enumerate(nets):
            self._bind_net(i, net)

    def _bind_net(self, i: int, net: nn.Module) -> None:
        """Make net ``i``'s parameters and buffers views into the stacks."""
        pmap = {}
        for n, p in net.named_parameters():
            reg = self.regions[n]
            pmap[id(p)] = nn.Parameter(reg.node(reg.flat.param, i), requires_grad=p.requires_grad)
        bmap = {id(b): self.buffers[n][i] for n, b in net.named_buffers()}
        _replace_tensors(net, pmap, bmap)

    def _is_bound(self, i: int, net: nn.Module) -> bool:
        for n, p in net.named_parameters():
            reg = self.regions.get(n)
            if reg is None or p.data_ptr() != reg.node(reg.flat.param, i).data_ptr():
                return False
        return all(n in self.buffers and b.data_ptr() == self.buffers[n][i].data_ptr()
                   for n, b in net.named_buffers())

    @torch.no_grad()
    def adopt_nets(self) -> None:
        """Re-bind nets whose tensors were replaced (e.g. ``load_state_dict(assign=True)``), copying their values in."""
        for i, net in enumerate(self.nets):
            if self._is_bound(i, net):
                continue
            for n, p in net.named_parameters():
                reg = self.regions[n]
                reg.node(reg.flat.param, i).copy_(p.detach())
            for n, b in net.named_buffers():
                self.buffers[n][i].copy_(b.detach())
            self._bind_net(i, net)
            if self._grads_bound:
                self._bind_net_grads(i, net)

    def _bind_net_grads(self, i: int, net: nn.Module) -> None:
        for n, p in net.named_parameters():
            reg = self.regions[n]
            if reg.flat.grad is not None and p.requires_grad:
                p.grad = reg.node(reg.flat.grad, i)

    def bind_grads(self) -> None:
        """Point every gradient at the flat grad buffers; backward then accumulates there in place."""
        for n, leaf in self.leaves.items():
            if leaf.requires_grad:
                reg = self.regions[n]
                leaf.grad = reg.stacked(reg.flat.grad)
        for i, net in enumerate(self.nets):
            self._bind_net_grads(i, net)
        self._grads_bound = True

    def grads_intact(self) -> bool:
        """Whether every gradient is still the flat buffers' alias (nothing set it to None or replaced it).

        Only loop mode differentiates the nets' own parameters, which callers can reach
        (``net.zero_grad()``); vmap mode's stacked leaves are private to the group.
        """
        if self.mode == "vmap":
            return True
        for i, net in enumerate(self.nets):
            for n, p in net.named_parameters():
                if p.requires_grad and (p.grad is None or p.grad.data_ptr() != self.regions[n].node(
                        self.regions[n].flat.grad, i).data_ptr()):
                    return False
        return True

    def clear_grads(self) -> None:
        """Drop any gradient left from before this step path took the nets over."""
        for leaf in self.leaves.values():
            leaf.grad = None
        for net in self.nets:
            for p in net.parameters():
                p.grad = None

    @torch.no_grad()
    def adopt_first_grads(self) -> None:
        """After the first backward (grads unbound): copy grads into the flat buffer, mark ungraded params, bind."""
        for flat in self.flats:
            flat.grad.zero_()
        mask_parts: dict[int, list[torch.Tensor]] = {}
        missing: list[str] = []
        for n in self.names:
            reg = self.regions[n]
            if self.mode == "vmap":
                g = self.leaves[n].grad
                got = [g is not None] * self.k
                if g is not None:
                    reg.stacked(reg.flat.grad).copy_(g)
                    self.leaves[n].grad = None
            else:
                got = []
                for i, net in enumerate(self.nets):
                    g = dict(net.named_parameters())[n].grad
                    got.append(g is not None)
                    if g is not None:
                        reg.node(reg.flat.grad, i).copy_(g)
            if not all(got):
                missing.append(n)
            mask_parts.setdefault(id(reg.flat), []).append(
                torch.tensor(got, dtype=reg.flat.param.dtype).repeat_interleave(reg.numel))
        for flat in self.flats:
            if any(not bool(part.all()) for part in mask_parts[id(flat)]):
                flat.active = torch.cat(mask_parts[id(flat)]).to(flat.param.device)
        if missing:
            say_once(logging.WARNING, "nodes %s: parameters %s get no gradient; like SGD, they are not updated",
                      self.nodes, ", ".join(missing))
        self.missing = set(missing)
        self.bind_grads()

    # ------------------------------------------------------------ per-node access
    def node_grads(self, i: int) -> dict[str, Optional[torch.Tensor]]:
        """Gradient of each parameter of node slot ``i`` (views into the flat buffer; None before any step)."""
        if not self._grads_bound:
            if self.mode == "vmap":
                return {n: (None if self.leaves[n].grad is None else self.leaves[n].grad[i]) for n in self.names}
            return {n: p.grad for n, p in self.nets[i].named_parameters()}
        return {n: self.regions[n].node(self.regions[n].flat.grad, i) for n in self.names}

    def node_momentum(self, i: int) -> dict[str, torch.Tensor]:
        """Momentum buffer of each parameter of node slot ``i`` that gets a gradient (views)."""
        return {n: self.regions[n].node(self.regions[n].flat.momentum, i)
                for n in self.names if n not in self.missing}
