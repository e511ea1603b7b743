"""The fused step: one forward per node group, the graph loss, one backward, one flat SGD per group.

At batch 64 a small CIFAR network leaves a GPU nearly idle: a step is bound by
kernel launches and Python, not arithmetic.  This step pays that cost once per
group of same-architecture nodes (:mod:`.node_group`) instead of once per node.
On CUDA, groups run their forward on separate streams that join before the
loss; autograd runs each backward op on its forward's stream, so the backward
passes overlap too.  It computes what :class:`~ktg_fast.steps.eager.EagerStep`
computes.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..graph import Graph
from ..loss import GraphLoss
from ..recipe import TrainConfig
from .base import TrainStep, bind_loss, node_lrs
from .flat_sgd import FlatSGD
from .node_group import NodeGroup, group_nodes
from .precision import NodeLossScale, check_precision, forward_autocast

__all__ = ["FusedStep"]


class FusedStep(TrainStep):
    """Algorithm 1 with same-architecture nodes batched: one forward per node group, one flat SGD per group.

    Args:
        graph: the knowledge transfer graph.
        nets: one net per node, in node order, on one device; their tensors
            become views into the groups' stacks (keep using ``step.nets``).
        cfg: learning rates, momentum, Nesterov, weight decay.
        loss_impl: passed to :class:`~ktg_fast.loss.GraphLoss`.
        streams: on CUDA, run groups on separate streams.
        use_vmap: batch groups with vmap (False: every group loops over its nets).
        precision: "fp32", "bf16" or "fp16" (:mod:`.precision`): autocast for the forward, the
            graph loss in float32, weights and momentum in float32; fp16 with a loss scale per node.
        channels_last: give the nets channels-last (NHWC) input.
        loss: a bound :class:`~ktg_fast.loss.GraphLoss` to use (e.g. one with gates set in place);
            None binds one to ``graph``'s gates.

    Raises:
        ValueError: a net count that does not match the graph, nets on several devices, an unknown precision.
    """

    kind = "fused"

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, loss_impl: str = "auto",
                 streams: bool = True, use_vmap: bool = True, precision: str = "fp32",
                 channels_last: bool = False, loss: Optional[GraphLoss] = None):
        self.precision = check_precision(precision)
        self.channels_last = bool(channels_last)
        if len(nets) != graph.num_nodes:
            raise ValueError(f"{len(nets)} nets for a graph of {graph.num_nodes} network nodes")
        devices = {p.device for net in nets for p in net.parameters()} | {b.device for net in nets for b in net.buffers()}
        if len(devices) > 1:
            raise ValueError(f"all nets must be on one device for a fused step, found {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.graph = graph
        self.nets = list(nets)
        self.loss = bind_loss(graph, loss, loss_impl)
        self.trainable = graph.trainable
        self.groups: list[NodeGroup] = []
        self.slot: dict[int, tuple[NodeGroup, int]] = {}
        for trainable, ts in group_nodes(graph, self.nets):
            grp = NodeGroup(ts, [self.nets[t - 1] for t in ts], trainable=trainable, vmap_ok=use_vmap)
            self.groups.append(grp)
            for i, t in enumerate(ts):
                self.slot[t] = (grp, i)
        self.train_groups = [g for g in self.groups if g.trainable]
        # Group outputs are concatenated in group order; this index puts them back in node order.
        order = [t for g in self.groups for t in g.nodes]
        inv = [order.index(t) for t in range(1, graph.num_nodes + 1)]
        self._perm = None if inv == list(range(len(inv))) else torch.tensor(inv, device=self.device)
        self._streams = None
        if streams and self.device.type == "cuda" and len(self.groups) > 1:
            self._streams = [torch.cuda.Stream(self.device) for _ in self.groups]
        self.optimizer = FlatSGD(self.groups, cfg)
        # fp16: a loss scale per node; each group's slots map to graph nodes through _node_index.
        self.scaler = NodeLossScale(graph.num_nodes, self.device) if self.precision == "fp16" else None
        self._node_index = {g: torch.tensor([t - 1 for t in g.nodes], device=self.device) for g in self.train_groups}
        self._first_step_done = False
        self._overlap: Optional[list] = None  # data-parallel gradient sums in flight (see _start_sums_early)
        self.set_lrs(node_lrs(graph, cfg))

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, train: bool = True) -> torch.Tensor:
        """Logits (M, B, C) in node order; trainable groups in ``train`` mode, frozen ones always in eval mode."""
        if self._streams is None:
            outs = [g.forward(x, train and g.trainable) for g in self.groups]
        else:
            outs = self._forward_streams(x, train)
        logits = torch.cat(outs) if len(outs) > 1 else outs[0]
        return logits if self._perm is None else logits.index_select(0, self._perm)

    def _forward_streams(self, x: torch.Tensor, train: bool) -> list[torch.Tensor]:
        main = torch.cuda.current_stream(self.device)
        capturing = torch.cuda.is_current_stream_capturing()
        outs = []
        for g, s in zip(self.groups, self._streams):
            s.wait_stream(main)  # fork: the input is ready
            with torch.cuda.stream(s):
                if not capturing:  # the allocator must not reuse x's memory while s still reads it
                    x.record_stream(s)
                out = g.forward(x, train and g.trainable)
            if not capturing:
                out.record_stream(main)
            outs.append(out)
        for s in self._streams:
            main.wait_stream(s)  # join before the loss
        return outs

    def _join_streams(self) -> None:
        # Backward ops ran on the groups' streams; the update (and a capture's end) needs them joined.
        if self._streams is not None:
            main = torch.cuda.current_stream(self.device)
            for s in self._streams:
                main.wait_stream(s)

    @torch.no_grad()
    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (M, B, C) of every node in eval mode (running statistics, no dropout)."""
        with self._on_device(), forward_autocast(self.device, self.precision):
            x = self._prepare_input(x)
            outs = [g.forward(x, False) for g in self.groups]
        logits = torch.cat(outs) if len(outs) > 1 else outs[0]
        return logits if self._perm is None else logits.index_select(0, self._perm)

    # ------------------------------------------------------------ the step
    def __call__(self, x: torch.Tensor, y: torch.Tensor, progress: Union[float, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._on_device():
            node_loss, logits = self._train_body(x, y, progress)
        return node_loss.detach(), logits.detach()

    def _on_device(self):
        """Make the nets' CUDA device current: streams, Triton launches and captures use the current one."""
        if self.device.type == "cuda":
            return torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _train_body(self, x: torch.Tensor, y: torch.Tensor, progress: Union[float, torch.Tensor]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward, loss, backward, update; every tensor op, no host synchronisation (capturable)."""
        first = not self._first_step_done
        if first:
            for g in self.train_groups:
                g.clear_grads()
        else:
            for g in self.train_groups:
                if not g.grads_intact():  # someone set grads to None: point them back at the flat buffers
                    g.bind_grads()
                for f in g.flats:
                    f.grad.zero_()
        total, node_loss, logits = self._forward_loss(self._prepare_input(x), y, progress)
        total.backward()
        self._join_streams()
        if first:
            for g in self.train_groups:
                g.adopt_first_grads()
            self._first_step_done = True
            self.optimizer.refresh()
        if self.dist is not None:  # one collective per flat buffer (per group and dtype)
            if self._overlap is None:  # first step: the buffers were only now filled
                self.dist.sync_grads(f.grad for g in self.train_groups for f in g.flats)
                self._overlap = self._start_sums_early()
            else:  # started by each group's last gradient during the backward
                self.dist.wait(self._overlap)
                self._overlap.clear()
        self._update()
        return self._global_loss(node_loss), logits.detach()

    def _start_sums_early(self) -> list:
        """From the second step of a data-parallel run: a group's gradient sum starts as soon as the backward
        has accumulated its last gradient (a post-accumulate hook on each of its leaves), overlapping the
        backward of the other groups; returns the list the handles are collected in."""
        handles: list = []
        for g in self.train_groups:
            if g.mode == "vmap":
                leaves = [leaf for n, leaf in g.leaves.items() if leaf.requires_grad and n not in g.missing]
            else:
                leaves = [p for net in g.nets for n, p in net.named_parameters()
                          if p.requires_grad and n not in g.missing]
            left = [len(leaves)]

            def last_grad(_t: torch.Tensor, g: NodeGroup = g, left: list = left, n: int = len(leaves)) -> None:
                left[0] -= 1
                if left[0] == 0:
                    left[0] = n
                    handles.extend(self.dist.start_sum(f.grad) for f in g.flats)

            for leaf in leaves:
                leaf.register_post_accumulate_grad_hook(last_grad)
        return handles

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor, progress: Union[float, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scalar to differentiate, node losses (M,) float32, logits (M, B, C) in the forward's dtype).

        Only the nets run under autocast: the graph loss accumulates in float32 whatever the logits' dtype.
        """
        with forward_autocast(self.device, self.precision):
            logits = self.forward(x, True)
        res = self.loss(logits, y, progress=progress)
        node_loss = self._global_weight(res.node_loss, y)
        total = node_loss.sum() if self.scaler is None else self.scaler.scaled_total(node_loss)
        return total, node_loss, logits

    @torch.no_grad()
    def _update(self) -> None:
        """The optimizer step; in fp16 each node is unscaled and checked, and a node that overflowed skips."""
        if self.scaler is None:
            self.optimizer.step()
            return
        keep = {}
        for g in self.train_groups:
            ok = self.scaler.unscale_and_check(self._node_index[g], g.flats)
            self.scaler.update(self._node_index[g], ok)
            keep[g] = ok
        self.optimizer.step(keep)

    # ------------------------------------------------------------ learning rates
    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Learning rate of each trainable node (``graph.trainable`` order); device writes only, no reallocation."""
        lrs = list(lrs)
        if len(lrs) != len(self.trainable):
            raise ValueError(f"{len(lrs)} learning rates for {len(self.trainable)} trainable nodes")
        for t, lr in zip(self.trainable, lrs):
            g, i = self.slot[t]
            self.optimizer.set_lr(g, i, lr)
        self.optimizer.refresh()

    # ------------------------------------------------------------ checkpoints
    def adopt_nets(self) -> None:
        # The nets' tensors are views into the stacks; only re-bind any a caller replaced.
        for g in self.groups:
            g.adopt_nets()

    def node_grads(self, t: int) -> dict[str, Optional[torch.Tensor]]:
        """Gradients of node ``t`` (1-based) from the last step, by parameter name (for tests and debugging)."""
        g, i = self.slot[t]
        return g.node_grads(i)

    def momentum_buffers(self) -> list[Optional[dict[str, torch.Tensor]]]:
        out: list[Optional[dict[str, torch.Tensor]]] = [None] * len(self.nets)
        for t in self.trainable:
            out[t - 1] = self.optimizer.node_momentum(*self.slot[t])
        return out

    def load_momentum_buffers(self, bufs: Sequence[Optional[dict[str, torch.Tensor]]]) -> None:
        if len(bufs) != len(self.nets):
            raise ValueError(f"momentum buffers for {len(bufs)} nodes, the graph has {len(self.nets)}")
        self.optimizer.load_momentum([(*self.slot[t], bufs[t - 1]) for t in self.trainable])

    def _forget_optimizer_state(self, nodes: Sequence[int]) -> None:
        for t in nodes:
            if t in self.slot and t in self.trainable:
                self.optimizer.zero_node_momentum(*self.slot[t])

    def loss_scale_state(self) -> Optional[dict[str, torch.Tensor]]:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_loss_scale_state(self, state: Optional[dict[str, torch.Tensor]]) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
