"""SGD over node groups' flat buffers: a handful of kernels per group, a learning rate per node.

The math is ``torch.optim.SGD``'s (dampening 0): ``d = g + wd * p``;
``buf = momentum * buf + d`` (a zero buffer makes the first step ``buf = d``
exactly, as SGD's clone); ``d = d + momentum * buf`` with Nesterov, else
``d = buf``; ``p -= lr * d``.  The learning rate is a per-element tensor built
from each node's rate, held on the device so a CUDA-graph replay sees new
values.  A parameter that gets no gradient is not updated at all, as SGD skips it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..recipe import TrainConfig
from .node_group import NodeGroup

__all__ = ["FlatSGD"]


class FlatSGD:
    """The optimizer of every trainable node group of a step.

    Args:
        groups: node groups (frozen ones are ignored).
        cfg: momentum, Nesterov, weight decay (learning rates come through :meth:`set_lr`).
    """

    def __init__(self, groups: Sequence[NodeGroup], cfg: TrainConfig):
        self.groups = [g for g in groups if g.trainable]
        self.momentum = float(cfg.momentum)
        self.nesterov = bool(cfg.nesterov)
        self.weight_decay = float(cfg.weight_decay)
        device = self.groups[0].flats[0].param.device if self.groups and self.groups[0].flats else None
        # float64, so each parameter dtype gets the rate rounded once, as SGD's Python-float lr is.
        self.lrs = {g: torch.zeros(g.k, dtype=torch.float64, device=device) for g in self.groups}
        self.has_momentum = False

    def set_lr(self, group: NodeGroup, slot: int, lr: float) -> None:
        """Learning rate of node ``slot`` of ``group`` (a device write; call :meth:`refresh` after a batch of them)."""
        self.lrs[group][slot].fill_(float(lr))

    @torch.no_grad()
    def refresh(self) -> None:
        """Spread the per-node rates over each flat buffer's elements (masking parameters without gradient)."""
        for g in self.groups:
            for f in g.flats:
                if f.lr is None or f.node_of is None:
                    continue
                torch.index_select(self.lrs[g].to(f.lr.dtype), 0, f.node_of, out=f.lr)
                if f.active is not None:
                    f.lr.mul_(f.active)

    @torch.no_grad()
    def step(self, keep: Optional[dict[NodeGroup, torch.Tensor]] = None) -> None:
        """One update of every trainable group from the gradients in its flat buffers (no host sync).

        Args:
            keep: optional (K,) bool per group: node slots to update.  A slot that is False is left
                exactly as it was (parameters and momentum), as ``GradScaler`` skips an optimizer
                step on overflow; its gradients may hold inf/NaN.  Groups not in ``keep`` all update.
        """
        mu, wd = self.momentum, self.weight_decay
        for g in self.groups:
            mask = None if keep is None else keep.get(g)
            for f in g.flats:
                if mask is None:
                    d = torch.add(f.grad, f.param, alpha=wd) if wd else f.grad.clone()
                    if mu:
                        f.momentum.mul_(mu).add_(d)
                        if self.nesterov:
                            d.add_(f.momentum, alpha=mu)
                        else:
                            d = f.momentum
                    f.param.addcmul_(d, f.lr, value=-1.0)
                    continue
                el = mask.index_select(0, f.node_of)  # (N,) bool per element
                # where(), not a product: a skipped node's gradient may be inf or NaN.
                d = torch.where(el, torch.add(f.grad, f.param, alpha=wd) if wd else f.grad, 0.0)
                if mu:
                    f.momentum.copy_(torch.where(el, f.momentum * mu + d, f.momentum))
                    d = d + f.momentum * mu if self.nesterov else f.momentum
                f.param.addcmul_(d, torch.where(el, f.lr, 0.0), value=-1.0)
        if mu:
            self.has_momentum = True

    # ------------------------------------------------------------ state
    def node_momentum(self, group: NodeGroup, slot: int) -> dict[str, torch.Tensor]:
        """Momentum buffer of each parameter of one node, on the CPU ({} before any momentum exists)."""
        if not self.has_momentum:
            return {}
        return {n: b.detach().cpu().clone() for n, b in group.node_momentum(slot).items()}

    @torch.no_grad()
    def zero_node_momentum(self, group: NodeGroup, slot: int) -> None:
        """Forget one node's momentum in place (a zero buffer is SGD's "none yet" for dampening 0)."""
        for reg in group.regions.values():
            if reg.flat.momentum is not None:
                reg.node(reg.flat.momentum, slot).zero_()

    @torch.no_grad()
    def load_momentum(self, named: Sequence[tuple[NodeGroup, int, Optional[dict[str, torch.Tensor]]]]) -> None:
        """Load (group, slot, buffers by parameter name) for every trainable node; missing ones start at zero.

        Raises ValueError naming the node slot and the unknown parameters.
        """
        for g in self.groups:
            for f in g.flats:
                f.momentum.zero_()  # a missing buffer is SGD's "none yet", which a zero buffer reproduces
        loaded = False
        for g, slot, bufs in named:
            bufs = bufs or {}
            unknown = set(bufs) - set(g.names)
            if unknown:
                raise ValueError(f"momentum buffers of node {g.nodes[slot]} name unknown parameters: "
                                 f"{sorted(unknown)}")
            for n, b in bufs.items():
                reg = g.regions[n]
                reg.node(reg.flat.momentum, slot).copy_(b)
                loaded = True
        self.has_momentum = loaded
