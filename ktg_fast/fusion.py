"""Fast training steps: node groups, CUDA streams, a whole-step CUDA graph.

At batch 64 a small CIFAR network leaves a GPU nearly idle: a step is bound by
kernel launches and Python, not arithmetic.  This module pays that cost once
per group of nodes instead of once per node (:class:`FusedStep`), and then
not at all (:class:`GraphStep`).  Both keep the :class:`~ktg_fast.step.TrainStep`
interface and compute what :class:`~ktg_fast.step.EagerStep` computes.

Node groups
    Nodes of one architecture (same model name, module type, parameter and
    buffer shapes) and the same role (trainable or frozen) form a
    :class:`NodeGroup`.  Its K parameters of each name are stored stacked
    (K, ...) in one flat buffer per dtype, and each node's ``nn.Module`` keeps
    *views* into those buffers: ``nets[i].state_dict()`` is always current,
    and loading a state dict into a net writes into the stacks, so checkpoints
    stay per node and load into any step path.  One forward is
    ``vmap(functional_call)`` over the stacks on the shared input; BatchNorm
    buffers are stacked too, so every node keeps its own running statistics.
    A group of one node, or an architecture vmap cannot batch (with a
    warning), runs its nets one after another instead ("loop" mode): the
    parameters, gradients and optimizer state stay in the same flat buffers.

Optimizer
    SGD with (Nesterov) momentum and weight decay written over the flat
    buffers: a handful of kernels per group whatever the parameter count, with
    a per-element learning-rate tensor so each node keeps its own rate, held on
    the device so a CUDA-graph replay sees new values.  The math is
    ``torch.optim.SGD``'s (dampening 0): ``d = g + wd * p``;
    ``buf = momentum * buf + d`` (a zero buffer makes the first step
    ``buf = d`` exactly, as SGD's clone); ``d = d + momentum * buf`` with
    Nesterov, else ``d = buf``; ``p -= lr * d``.  A parameter that gets no
    gradient is not updated at all, as SGD skips it.

Streams and CUDA graph
    On CUDA, groups run their forward on separate streams that join before
    the loss; autograd runs each backward op on its forward's stream, so the
    backward passes overlap too.  :class:`GraphStep` captures the forward of
    every group, the graph loss, the backward and the optimizer update once
    (after a few eager warm-up steps) and replays it per batch from static
    input buffers; learning rates and linear-gate progress are device tensors.
    Where capture fails it falls back to the fused step and says so once.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call, vmap

from .graph import Graph
from .loss import graph_loss
from .models import canonical_model_name
from .recipe import TrainConfig
from .step import EagerStep, TrainStep, node_lrs, eval_mode_logits

__all__ = ["NodeGroup", "FusedStep", "GraphStep", "make_fused_step", "group_nodes", "architecture_key", "FUSED_KINDS",
           "CPU_AUTO_KIND"]

log = logging.getLogger("ktg_fast")

FUSED_KINDS = ("auto", "fused", "graph")

# On the CPU "auto" takes the eager step.  bench/test_bench_step.py (batch 16,
# 32x32; 3 x resnet8, and resnet8/wrn10_1/resnet8/resnet14) put the fused step
# at 0.75-1.1x the eager one over several runs on 1 and 2 shared cores: a CPU
# step is arithmetic-bound, not launch-bound, and oneDNN runs vmap's grouped
# convolutions no faster than separate ones, so fusing buys nothing there.
CPU_AUTO_KIND = "eager"

_said: set[str] = set()


def _say_once(level: int, msg: str, *args: object) -> None:
    """Log a message once per process (fallbacks are announced, not repeated per step)."""
    key = msg % args if args else msg
    if key not in _said:
        _said.add(key)
        log.log(level, msg, *args)


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


# ----------------------------------------------------------------------- flat storage
@dataclass
class _Region:
    """Where one parameter name of a group lives: ``flat[offset : offset + K * numel]`` as (K, *shape)."""

    flat: "_Flat"
    offset: int
    numel: int
    shape: tuple[int, ...]

    def stacked(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.offset: self.offset + self.flat.k * self.numel].view(self.flat.k, *self.shape)

    def node(self, t: torch.Tensor, k: int) -> torch.Tensor:
        start = self.offset + k * self.numel
        return t[start: start + self.numel].view(self.shape)


@dataclass
class _Flat:
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
    regions: list[_Region] = field(default_factory=list)


def _replace_tensors(net: nn.Module, params: dict[int, nn.Parameter], buffers: dict[int, torch.Tensor]) -> None:
    """Swap a module tree's parameters and buffers (matched by identity, so tied ones stay tied)."""
    for mod in net.modules():
        for key, val in list(mod._parameters.items()):
            if val is not None and id(val) in params:
                mod._parameters[key] = params[id(val)]
        for key, val in list(mod._buffers.items()):
            if val is not None and id(val) in buffers:
                mod._buffers[key] = buffers[id(val)]


class NodeGroup:
    """K network nodes of one architecture and role, their parameters and buffers stacked.

    Args:
        nodes: 1-based graph node indices, ascending.
        nets: the K nets (their parameters and buffers become views into the stacks).
        trainable: train mode with autograd, or eval mode under ``no_grad``.
        vmap_ok: try ``vmap`` (K > 1); False forces loop mode.
    """

    def __init__(self, nodes: Sequence[int], nets: Sequence[nn.Module], *, trainable: bool, vmap_ok: bool = True):
        if len(nodes) != len(nets) or not nets:
            raise ValueError("a node group needs one net per node and at least one node")
        self.nodes = list(nodes)
        self.nets = list(nets)
        self.k = len(nets)
        self.trainable = trainable
        self.mode = "vmap" if (vmap_ok and self.k > 1) else "loop"
        self._probed: set[bool] = set()  # train/eval modes in which vmap has run once
        self.names = [n for n, _ in nets[0].named_parameters()]
        self.requires_grad = {n: p.requires_grad for n, p in nets[0].named_parameters()}
        self.buffer_names = [n for n, _ in nets[0].named_buffers()]
        self._stack(nets)
        self.base: Optional[nn.Module] = None
        if self.mode == "vmap":
            try:  # the structure only; the tensors come from the stacks
                self.base = copy.deepcopy(nets[0]).to("meta")
            except Exception as e:  # noqa: BLE001 - any model-specific failure means "cannot batch"
                self._to_loop(f"cannot copy its module structure ({type(e).__name__}: {e})")
        self.set_mode()
        self._grads_bound = False

    # ------------------------------------------------------------ storage
    def _stack(self, nets: Sequence[nn.Module]) -> None:
        k = self.k
        first = nets[0]
        device = next(iter(first.parameters())).device if self.names else torch.device("cpu")
        per_node = [dict(net.named_parameters()) for net in nets]
        by_dtype: dict[torch.dtype, list[str]] = {}
        for n in self.names:
            by_dtype.setdefault(per_node[0][n].dtype, []).append(n)
        self.flats: list[_Flat] = []
        self.regions: dict[str, _Region] = {}
        for dtype, names in by_dtype.items():
            sizes = [per_node[0][n].numel() for n in names]
            flat = _Flat(k=k, param=torch.empty(k * sum(sizes), dtype=dtype, device=device))
            off = 0
            for n, size in zip(names, sizes):
                reg = _Region(flat, off, size, tuple(per_node[0][n].shape))
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
    def sync_from_nets(self) -> None:
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
            _say_once(logging.WARNING, "nodes %s: parameters %s get no gradient; like SGD, they are not updated",
                      self.nodes, ", ".join(missing))
        self.missing = set(missing)
        self.bind_grads()

    # ------------------------------------------------------------ modes
    def set_mode(self) -> None:
        """Trainable nets in train mode, frozen ones in eval mode (as EagerStep and build_nodes leave them)."""
        for net in self.nets:
            net.train(self.trainable)
        if self.base is not None:
            self.base.train(self.trainable)

    def _to_loop(self, why: str) -> None:
        _say_once(logging.WARNING, "nodes %s (%s) run one after another, not batched with vmap: %s",
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

    # ------------------------------------------------------------ per-node access
    def node_grads(self, i: int) -> dict[str, Optional[torch.Tensor]]:
        """Gradient of each parameter of node slot ``i`` (views into the flat buffer; None before any step)."""
        if not self._grads_bound:
            if self.mode == "vmap":
                return {n: (None if self.leaves[n].grad is None else self.leaves[n].grad[i]) for n in self.names}
            return {n: p.grad for n, p in self.nets[i].named_parameters()}
        return {n: self.regions[n].node(self.regions[n].flat.grad, i) for n in self.names}

    def node_momentum(self, i: int) -> dict[str, torch.Tensor]:
        return {n: self.regions[n].node(self.regions[n].flat.momentum, i)
                for n in self.names if n not in getattr(self, "missing", ())}


# ------------------------------------------------------------------------ the steps
class FusedStep(TrainStep):
    """Algorithm 1 with same-architecture nodes batched: one forward per node group, one flat SGD per group.

    Args:
        graph: the knowledge transfer graph.
        nets: one net per node, in node order, on one device; their tensors
            become views into the groups' stacks (keep using ``step.nets``).
        cfg: learning rates, momentum, Nesterov, weight decay.
        loss_impl: passed to :func:`~ktg_fast.loss.graph_loss`.
        streams: on CUDA, run groups on separate streams.
        use_vmap: batch groups with vmap (False: every group loops over its nets).
    """

    kind = "fused"

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, loss_impl: str = "auto",
                 streams: bool = True, use_vmap: bool = True):
        if len(nets) != graph.num_nodes:
            raise ValueError(f"{len(nets)} nets for a graph of {graph.num_nodes} network nodes")
        devices = {p.device for net in nets for p in net.parameters()} | {b.device for net in nets for b in net.buffers()}
        if len(devices) > 1:
            raise ValueError(f"all nets must be on one device for a fused step, found {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        self.graph = graph
        self.nets = list(nets)
        self.codes = graph.gate_codes()
        self.loss_impl = loss_impl
        self.trainable = graph.trainable
        self.momentum = float(cfg.momentum)
        self.nesterov = bool(cfg.nesterov)
        self.weight_decay = float(cfg.weight_decay)
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
        # float64, so each parameter dtype gets the rate rounded once, as SGD's Python-float lr is.
        self.lrs = {g: torch.zeros(g.k, dtype=torch.float64, device=self.device) for g in self.train_groups}
        self._first_step_done = False
        self._has_momentum = False
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
        logits = self.forward(x, True)
        res = graph_loss(logits, y, self.codes, temperature=self.graph.temperature, progress=progress,
                         impl=self.loss_impl)
        res.node_loss.sum().backward()
        self._join_streams()
        if first:
            for g in self.train_groups:
                g.adopt_first_grads()
            self._first_step_done = True
            self._refresh_lr_elements()
        self._sgd_update()
        return res.node_loss.detach(), logits.detach()

    @torch.no_grad()
    def _sgd_update(self) -> None:
        mu, wd = self.momentum, self.weight_decay
        for g in self.train_groups:
            for f in g.flats:
                d = torch.add(f.grad, f.param, alpha=wd) if wd else f.grad.clone()
                if mu:
                    f.momentum.mul_(mu).add_(d)
                    if self.nesterov:
                        d.add_(f.momentum, alpha=mu)
                    else:
                        d = f.momentum
                f.param.addcmul_(d, f.lr, value=-1.0)
        if mu:
            self._has_momentum = True

    # ------------------------------------------------------------ learning rates
    def set_lrs(self, lrs: Sequence[float]) -> None:
        """Learning rate of each trainable node (``graph.trainable`` order); device writes only, no reallocation."""
        lrs = list(lrs)
        if len(lrs) != len(self.trainable):
            raise ValueError(f"{len(lrs)} learning rates for {len(self.trainable)} trainable nodes")
        for t, lr in zip(self.trainable, lrs):
            g, i = self.slot[t]
            self.lrs[g][i].fill_(float(lr))
        self._refresh_lr_elements()

    @torch.no_grad()
    def _refresh_lr_elements(self) -> None:
        for g in self.train_groups:
            for f in g.flats:
                torch.index_select(self.lrs[g].to(f.lr.dtype), 0, f.node_of, out=f.lr)
                if f.active is not None:
                    f.lr.mul_(f.active)

    # ------------------------------------------------------------ checkpoints
    def sync_to_nets(self) -> None:
        # The nets' tensors are views into the stacks; only re-bind any a caller replaced.
        for g in self.groups:
            g.sync_from_nets()

    def sync_from_nets(self) -> None:
        for g in self.groups:
            g.sync_from_nets()

    def node_grads(self, t: int) -> dict[str, Optional[torch.Tensor]]:
        """Gradients of node ``t`` (1-based) from the last step, by parameter name (for tests and debugging)."""
        g, i = self.slot[t]
        return g.node_grads(i)

    def momentum_buffers(self) -> list[Optional[dict[str, torch.Tensor]]]:
        out: list[Optional[dict[str, torch.Tensor]]] = [None] * len(self.nets)
        for t in self.trainable:
            g, i = self.slot[t]
            out[t - 1] = ({n: b.detach().cpu().clone() for n, b in g.node_momentum(i).items()}
                          if self._has_momentum else {})
        return out

    @torch.no_grad()
    def load_momentum_buffers(self, bufs: Sequence[Optional[dict[str, torch.Tensor]]]) -> None:
        if len(bufs) != len(self.nets):
            raise ValueError(f"momentum buffers for {len(bufs)} nodes, the graph has {len(self.nets)}")
        for g in self.train_groups:
            for f in g.flats:
                f.momentum.zero_()  # a missing buffer is SGD's "none yet", which a zero buffer reproduces
        loaded = False
        for t in self.trainable:
            g, i = self.slot[t]
            named = bufs[t - 1] or {}
            unknown = set(named) - set(g.names)
            if unknown:
                raise ValueError(f"momentum buffers of node {t} name unknown parameters: {sorted(unknown)}")
            for n, b in named.items():
                reg = g.regions[n]
                reg.node(reg.flat.momentum, i).copy_(b)
                loaded = True
        self._has_momentum = loaded


class GraphStep(FusedStep):
    """The fused step captured once as a CUDA graph and replayed per batch.

    The first ``warmup`` calls run the fused step eagerly on a side stream
    (they are real training steps: lazy initialisation, autotuning and the
    first-step bookkeeping happen there); the next call copies its batch into
    static buffers, captures forward, loss, backward and update, and replays.
    Later batches are copied into the static buffers and replayed; a batch of
    another shape runs eagerly.  Returned tensors are copies, safe to keep.
    If capture raises, the step stays on the fused path (logged once).
    """

    kind = "graph"

    def __init__(self, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *, loss_impl: str = "auto",
                 streams: bool = True, use_vmap: bool = True, warmup: int = 3):
        super().__init__(graph, nets, cfg, loss_impl=loss_impl, streams=streams, use_vmap=use_vmap)
        if self.device.type != "cuda":
            raise ValueError("a CUDA-graph step needs the nets on a CUDA device; use the fused step on "
                             f"{self.device.type}")
        self.warmup = max(1, int(warmup))
        self.steady_after = self.warmup + 1  # warm-up calls, then the call that captures
        self._calls = 0
        self._graph: Optional["torch.cuda.CUDAGraph"] = None
        self._failed = False
        self._last_shape: Optional[tuple] = None
        self._side = torch.cuda.Stream(self.device)
        self._capture_stream = torch.cuda.Stream(self.device)

    def __call__(self, x, y, progress):
        with self._on_device():
            return self._call(x, y, progress)

    def _call(self, x, y, progress):
        if self._graph is not None and x.shape == self._sx.shape and y.shape == self._sy.shape:
            self._sx.copy_(x)
            self._sy.copy_(y)
            if isinstance(progress, torch.Tensor):
                self._sp.copy_(progress.reshape(()))
            else:
                self._sp.fill_(float(progress))
            self._graph.replay()
            return self._out_loss.clone(), self._out_logits.clone()
        shape = (tuple(x.shape), tuple(y.shape))
        # Capture after the warm-up, on a batch shaped like the last one (not an odd one out).
        if self._graph is None and not self._failed and self._calls >= self.warmup and shape == self._last_shape:
            try:
                self._capture(x, y, progress)
            except Exception as e:  # noqa: BLE001 - any capture failure means "stay eager"
                self._capture_failed(e)
            else:
                self._graph.replay()
                return self._out_loss.clone(), self._out_logits.clone()
        self._calls += 1
        self._last_shape = shape
        return self._eager_side(x, y, progress)

    def _eager_side(self, x, y, progress) -> tuple[torch.Tensor, torch.Tensor]:
        # Warm-up on a side stream, as the torch.cuda.graphs recipe asks.
        main = torch.cuda.current_stream(self.device)
        self._side.wait_stream(main)
        with torch.cuda.stream(self._side):
            for t in (x, y, progress):
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(self._side)
            node_loss, logits = self._train_body(x, y, progress)
        main.wait_stream(self._side)
        return node_loss.clone(), logits.clone()  # allocated on main, so the caller may free them there

    def _capture(self, x, y, progress) -> None:
        self._sx = x.detach().clone()
        self._sy = y.detach().clone()
        self._sp = torch.zeros((), dtype=torch.float32, device=self.device)
        if isinstance(progress, torch.Tensor):
            self._sp.copy_(progress.reshape(()))
        else:
            self._sp.fill_(float(progress))
        graph = torch.cuda.CUDAGraph()
        prev = torch.cuda.current_stream(self.device)
        try:
            # A capture stream of the nets' device (torch.cuda.graph's default is made on whichever device
            # is current at its first use), and thread-local errors: DALI's and other threads' CUDA calls
            # during the capture are theirs, not an invalidation of ours.
            with torch.cuda.graph(graph, stream=self._capture_stream, capture_error_mode="thread_local"):
                loss, logits = self._train_body(self._sx, self._sy, self._sp)
        except BaseException:
            torch.cuda.set_stream(prev)  # an aborted capture may leave its stream current
            raise
        self._out_loss, self._out_logits = loss, logits
        self._graph = graph

    def _capture_failed(self, e: BaseException) -> None:
        self._failed = True
        self._graph = None
        self.kind = "fused"
        if self._streams is not None:  # streams that took part in an aborted capture are not reused
            self._streams = [torch.cuda.Stream(self.device) for _ in self.groups]
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - a capture error can surface here once; it is the one we report
            pass
        _say_once(logging.WARNING, "CUDA graph capture failed (%s: %s); using the fused step without a graph",
                  type(e).__name__, str(e).splitlines()[0] if str(e) else "")


# ------------------------------------------------------------------------ factory
def _capture_possible(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def make_fused_step(kind: str, graph: Graph, nets: Sequence[nn.Module], cfg: TrainConfig, *,
                    loss_impl: str = "auto") -> TrainStep:
    """Build a fast step: ``fused``, ``graph``, or ``auto`` (the fastest that works here).

    ``auto`` is the CUDA-graph step on CUDA (it falls back to the fused step
    if capture fails) and :data:`CPU_AUTO_KIND` on the CPU.  ``graph`` on the
    CPU falls back to the fused step with one warning.
    """
    if kind not in FUSED_KINDS:
        raise ValueError(f"unknown fast step {kind!r}; choose from {', '.join(FUSED_KINDS)}")
    nets = list(nets)
    devices = {p.device for net in nets for p in net.parameters()}
    device = next(iter(devices)) if len(devices) == 1 else torch.device("cpu")
    if kind == "auto":
        if _capture_possible(device):
            chosen, why = "graph", "CUDA: fused groups, streams, whole-step CUDA graph"
        else:
            chosen, why = CPU_AUTO_KIND, f"{device.type}: no CUDA graphs; {CPU_AUTO_KIND} is fastest here"
        _say_once(logging.INFO, "step auto -> %s (%s)", chosen, why)
        kind = chosen
    if kind == "graph" and not _capture_possible(device):
        _say_once(logging.WARNING, "step 'graph' needs CUDA (the nets are on %s); using the fused step", device.type)
        kind = "fused"
    if kind == "eager":
        return EagerStep(graph, nets, cfg, loss_impl=loss_impl)
    if kind == "graph":
        return GraphStep(graph, nets, cfg, loss_impl=loss_impl)
    return FusedStep(graph, nets, cfg, loss_impl=loss_impl)
