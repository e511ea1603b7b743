"""The reference step: each node's forward in turn, one graph loss, one backward, one SGD step."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from ..graph import Graph
from ..loss import GraphLoss
from ..recipe import TrainConfig, make_optimizer
from .base import TrainStep, bind_loss, eval_mode_logits, node_lrs
from .precision import NodeLossScale, check_loss_scale_state, check_precision, forward_autocast

__all__ = ["EagerStep"]


class EagerStep(TrainStep):
    """The reference step: each node's forward in turn, ``graph_loss``, one backward, one SGD step.

    Frozen nodes run in eval mode under ``no_grad``.  One SGD with a
    parameter group per trainable node equals one SGD per node, because each
    node's loss reaches only its own parameters.

    ``precision`` (:mod:`.precision`): the nets' forward under autocast in
    bf16/fp16, the graph loss in float32, weights in float32.  fp16 gives each
    node its own SGD and its own ``torch.amp.GradScaler``: a node whose
    gradients overflow skips its own step (and halves its own scale) only.
    ``channels_last`` puts the nets and the input in channels-last format.

    Raises:
        ValueError: an unknown precision.
    """

    kind = "eager"

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, loss_impl: str = "auto",
                 precision: str = "fp32", channels_last: bool = False, loss: Optional[GraphLoss] = None):
        self.graph = graph
        self.nets = list(nets)
        self.precision = check_precision(precision)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            for net in self.nets:
                net.to(memory_format=torch.channels_last)
        self.loss = bind_loss(graph, loss, loss_impl)
        self.trainable = graph.trainable
        lrs = node_lrs(graph, cfg)
        self.device = next((p.device for net in self.nets for p in net.parameters()), torch.device("cpu"))
        self.scalers: Optional[list[torch.amp.GradScaler]] = None
        self.node_optimizers: Optional[list[torch.optim.SGD]] = None
        self.optimizer: Optional[torch.optim.SGD] = None
        if self.precision == "fp16":
            # One optimizer and one scaler per node: GradScaler skips a whole optimizer's step on overflow.
            self.node_optimizers = [make_optimizer([list(self.nets[t - 1].parameters())], [lr], cfg)
                                    for t, lr in zip(self.trainable, lrs)]
            self.scalers = [torch.amp.GradScaler(self.device.type) for _ in self.trainable]
        else:
            self.optimizer = make_optimizer([list(self.nets[t - 1].parameters()) for t in self.trainable], lrs, cfg)
        for t in self.trainable:
            self.nets[t - 1].train()

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (M, B, C) of every node, in the autocast dtype (float32 for fp32)."""
        x = self._prepare_input(x)
        outs = []
        with forward_autocast(x.device, self.precision):
            for t, net in enumerate(self.nets, start=1):
                if t in self.trainable:
                    outs.append(net(x))
                else:
                    with torch.no_grad():
                        outs.append(net(x))
        return torch.stack(outs)

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        with forward_autocast(x.device, self.precision):
            return eval_mode_logits(self.nets, self._prepare_input(x))

    def __call__(self, x, y, progress):
        logits = self.forward(x)
        res = self.loss(logits, y, progress=progress)  # outside autocast: float32 whatever the logits
        node_loss = self._global_weight(res.node_loss, y)
        if self.scalers is None:
            self.optimizer.zero_grad(set_to_none=True)
            node_loss.sum().backward()
            self._sync_grads()
            self.optimizer.step()
        else:
            for opt in self.node_optimizers:
                opt.zero_grad(set_to_none=True)
            # Node t's loss reaches only node t's parameters: scaling it by node t's factor scales them alone.
            total = sum(sc.scale(node_loss[t - 1]) for sc, t in zip(self.scalers, self.trainable))
            total.backward()
            self._sync_grads()  # (an overflow on any rank is an inf in the sum: every rank skips alike)
            for sc, opt in zip(self.scalers, self.node_optimizers):
                sc.step(opt)  # unscales; skips this node's step if its gradients are not finite
                sc.update()
        return self._global_loss(node_loss), logits.detach()

    def _sync_grads(self) -> None:
        if self.dist is not None:
            self.dist.sync_grads(p.grad for t in self.trainable for p in self.nets[t - 1].parameters())

    def _optimizer_of(self, i: int) -> torch.optim.SGD:
        """The optimizer holding the ``i``-th trainable node's parameters."""
        return self.optimizer if self.optimizer is not None else self.node_optimizers[i]

    def _param_group(self, i: int) -> dict:
        opt = self._optimizer_of(i)
        return opt.param_groups[i] if opt is self.optimizer else opt.param_groups[0]

    def set_lrs(self, lrs):
        for i, lr in enumerate(lrs):
            self._param_group(i)["lr"] = lr

    def momentum_buffers(self):
        out: list[Optional[dict[str, torch.Tensor]]] = [None] * len(self.nets)
        for i, t in enumerate(self.trainable):
            opt = self._optimizer_of(i)
            bufs = {}
            for name, p in self.nets[t - 1].named_parameters():
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    bufs[name] = buf.detach().cpu().clone()
            out[t - 1] = bufs
        return out

    def load_momentum_buffers(self, bufs):
        for i, t in enumerate(self.trainable):
            opt = self._optimizer_of(i)
            named = bufs[t - 1] or {}
            for name, p in self.nets[t - 1].named_parameters():
                if name in named:
                    opt.state[p]["momentum_buffer"] = named[name].to(p.device, p.dtype).clone()

    def _forget_optimizer_state(self, nodes: Sequence[int]) -> None:
        for i, t in enumerate(self.trainable):
            if t in nodes:
                opt = self._optimizer_of(i)
                for p in self.nets[t - 1].parameters():
                    opt.state.pop(p, None)

    def loss_scale_state(self) -> Optional[dict[str, torch.Tensor]]:
        if self.scalers is None:
            return None
        # The fused step's layout: one entry per network node (frozen ones keep the initial values).
        state = NodeLossScale(len(self.nets), torch.device("cpu")).state_dict()
        for sc, t in zip(self.scalers, self.trainable):
            sd = sc.state_dict()  # empty for a disabled scaler
            if sd:
                state["scale"][t - 1] = sd["scale"]
                state["growth_tracker"][t - 1] = sd["_growth_tracker"]
        return state

    def load_loss_scale_state(self, state: Optional[dict[str, torch.Tensor]]) -> None:
        if self.scalers is None or state is None:
            return
        check_loss_scale_state(state, len(self.nets))
        for sc, t in zip(self.scalers, self.trainable):
            sd = sc.state_dict()
            if sd:
                sc.load_state_dict({**sd, "scale": float(state["scale"][t - 1]),
                                    "_growth_tracker": int(state["growth_tracker"][t - 1])})
