"""Train several graphs at once as one block-diagonal super-graph (:mod:`ktg_fast.pack`).

Every member (a search trial) keeps its own initialisation seed, gates,
learning rates, schedule and linear-gate progress; all members see the same
batches, those of the pack's data seed.  A member that joins at pack epoch
``p`` trains its epoch ``e`` on the pack's epoch ``p + e``, which is what a
lone :class:`~ktg_fast.trainer.Trainer` sees with ``data_seed`` = the pack's
seed and ``data_offset = p`` (both written into the member's recipe): so a
packed member ends with the weights it would reach alone, and its
``checkpoint.pt``, ``metrics.jsonl``, ``final.json`` and ``nodes/`` are those
of a lone run, which resumes it if the pack dies.

Members join and leave only between epochs; the step (its node groups) is
rebuilt then, carrying the weights and momentum of the members that stay (on CUDA
the rebuilt step is re-captured as a CUDA graph, not recompiled).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Hashable, Optional, Sequence

import torch
from torch import nn

from .checkpoint import checkpoint_payload, run_fingerprint
from .data.spec import DataSpec
from .device import resolve_device, use_device
from .epoch_stats import EpochStats, evaluate_nodes
from .graph import Graph
from .io import append_jsonl, atomic_torch_save, atomic_write_json
from .nodes import build_nodes, save_model_checkpoint
from .pack import PackedGraph, pack_graphs
from .recipe import TrainConfig, lr_at_epoch
from .run_data import RunData, load_run_data
from .run_files import truncate_metrics
from .steps import TrainStep, default_precision, make_step
from .data import canonical_name

__all__ = ["Member", "MemberEpoch", "PackTrainer"]

log = logging.getLogger("ktg_fast")


@dataclass(eq=False)
class Member:
    """One graph of a pack.

    Attributes:
        key: the caller's name for it (a trial number).
        graph, cfg, out: as for a lone :class:`~ktg_fast.trainer.Trainer` (``cfg.data_seed`` and
            ``cfg.data_offset`` are set by the pack when the member joins).
        epoch, step: epochs and optimizer steps done.
        failed: why the member stopped (a non-finite loss), or None.
    """

    key: Hashable
    graph: Graph
    cfg: TrainConfig
    out: Path
    epoch: int = 0
    step: int = 0
    failed: Optional[str] = None
    nets: list[nn.Module] = field(default_factory=list, repr=False)
    milestones: list[int] = field(default_factory=list, repr=False)

    @property
    def done(self) -> bool:
        return self.epoch >= self.cfg.epochs


@dataclass
class MemberEpoch:
    """A member's outcome of one pack epoch: its metrics record (the lone run's format), or a failure."""

    member: Member
    record: Optional[dict] = None
    failure: Optional[str] = None


class PackTrainer:
    """Train members (graphs) together, one epoch at a time.

    Args:
        data: the dataset every member trains on.
        batch_size, augment: the members' shared batches (every member's recipe must agree).
        data_seed: seeds the pack's batch order and augmentation (with the pack's epoch).
        device, step, loss_impl, teacher_dir, compile_cache, precision: as for the trainer.
        save_checkpoints: write each member's ``checkpoint.pt`` after every epoch.

    Raises:
        ValueError: a member whose batch size or augmentation differs from the pack's.
    """

    def __init__(self, data: DataSpec, *, batch_size: int, augment: bool = True, data_seed: int = 0,
                 device: str | torch.device = "auto", step: str = "auto", loss_impl: str = "auto",
                 teacher_dir: Optional[str | os.PathLike] = None, precision: Optional[str] = None,
                 compile_cache: Optional[str | os.PathLike] = None, save_checkpoints: bool = True):
        data.validate()
        self.data, self.batch_size, self.augment, self.data_seed = data, batch_size, augment, data_seed
        self.device = use_device(resolve_device(device))
        self.step_kind, self.loss_impl, self.teacher_dir = step, loss_impl, teacher_dir
        self.precision = precision or default_precision(self.device)
        self.compile_cache, self.save_checkpoints = compile_cache, save_checkpoints
        self.run_data: RunData = load_run_data(data, batch_size=batch_size, seed=data_seed, augment=augment,
                                               device=self.device)
        self.iters_per_epoch = len(self.run_data.train_loader)
        self.members: list[Member] = []
        self.epoch = 0  # pack epochs run
        self.packed: Optional[PackedGraph] = None
        self.layout: list[Member] = []  # the members of the current step, in its node order
        self.train_step: Optional[TrainStep] = None
        self.rebuilds = 0  # steps built (one per change of members)
        self._dirty = True

    # ------------------------------------------------------------ members
    def add(self, key: Hashable, graph: Graph, cfg: TrainConfig, out: str | os.PathLike) -> Member:
        """A new member, starting at its epoch 0 with the pack's next epoch; its nets are built now
        (seeded by ``cfg.seed``, exactly as a lone run builds them)."""
        if cfg.batch_size != self.batch_size or cfg.augment != self.augment:
            raise ValueError(f"member {key!r}: batch size {cfg.batch_size} / augment {cfg.augment} differ from the "
                             f"pack's {self.batch_size} / {self.augment}; pack only trials of one recipe")
        if cfg.precision not in (None, self.precision) or (self.members and graph.temperature !=
                                                            self.members[0].graph.temperature):
            raise ValueError(f"member {key!r}: precision and temperature must be the pack's")
        cfg = dataclasses.replace(cfg, data_seed=self.data_seed, data_offset=self.epoch)
        cfg.validate()
        rd = self.run_data
        torch.manual_seed(cfg.seed)
        nets = build_nodes(graph, num_classes=rd.num_classes, in_channels=rd.in_channels,
                           dataset=canonical_name(self.data.dataset), device=self.device,
                           teacher_dir=self.teacher_dir, val_size=self.data.val_size)
        m = Member(key=key, graph=graph, cfg=cfg, out=Path(out), nets=nets,
                   milestones=cfg.resolved_milestones(canonical_name(self.data.dataset)))
        m.out.mkdir(parents=True, exist_ok=True)
        graph.save(m.out / "graph.yaml")
        truncate_metrics(m.out / "metrics.jsonl", 0)
        self.members.append(m)
        self._dirty = True
        return m

    def remove(self, member: Member) -> None:
        """Take a member out of the pack (pruned, failed or done) from the next epoch; the others continue."""
        self.members.remove(member)
        self._dirty = True

    def _rebuild(self) -> None:
        """A step over the current members, carrying the momentum of those that stay."""
        momentum: dict[int, Optional[dict]] = {}
        if self.train_step is not None and self.packed is not None:
            bufs = self.train_step.momentum_buffers()
            for net, buf in zip(self.train_step.nets, bufs):
                momentum[id(net)] = buf
            self.train_step.adopt_nets()  # (the nets' tensors are the step's: views into fused stacks)
        self.layout = list(self.members)
        self.packed = pack_graphs([m.graph for m in self.layout])
        nets = [net for m in self.layout for net in m.nets]
        k_end = max(m.cfg.epochs for m in self.layout) * self.iters_per_epoch
        # The shared recipe (momentum, weight decay); each member's rates are set per epoch.
        base = dataclasses.replace(self.layout[0].cfg, node_lr=None)
        # A pack's layout changes at most refills (a search prunes after nearly every epoch): on CUDA the
        # CUDA-graph step captures the fused step (a capture per rebuild) rather than compiling (a compile per
        # rebuild), unless --step compiled asks for it.
        self.train_step = make_step(self.step_kind, self.packed.graph, nets, base, loss_impl=self.loss_impl,
                                    total_steps=k_end, precision=self.precision, channels_last=base.channels_last,
                                    compile_cache=self.compile_cache, compile=False if self.step_kind != "compiled"
                                    else None)
        self.rebuilds += 1
        self.train_step.load_momentum_buffers([momentum.get(id(net)) for net in nets])
        self._dirty = False

    # --------------------------------------------------------------- epoch
    def run_epoch(self) -> list[MemberEpoch]:
        """Train every member for one epoch; evaluate, record and checkpoint each one.

        Returns one :class:`MemberEpoch` per member (in pack order); failed members keep their slot
        until the caller removes them.
        """
        if not self.members:
            raise RuntimeError("the pack has no member to train")
        if self._dirty:
            self._rebuild()
        sup, ts, members = self.packed, self.train_step, self.layout
        m_total = sup.graph.num_nodes
        lrs: dict[int, float] = {}
        for mem, off in zip(members, sup.offsets):
            scale = lr_at_epoch(1.0, mem.epoch, mem.milestones, mem.cfg.gamma)
            rates = mem.cfg.node_rates(mem.graph.num_nodes)
            for t in mem.graph.trainable:
                lrs[off + t] = rates[t - 1] * scale
        ts.set_lrs([lrs[t] for t in sup.graph.trainable])
        # Each member's progress k / k_end for every step of this epoch, in float64, then rounded as the
        # lone trainer fills step / k_end into a default-dtype tensor: row i is the (sum M_k,) per-destination progress of step i.
        n = self.iters_per_epoch
        ks = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
        start = sup.per_node([mem.step for mem in members], dtype=torch.float64)
        k_end = sup.per_node([mem.cfg.epochs * n for mem in members], dtype=torch.float64)
        table = ((start[None, :] + ks) / k_end[None, :]).to(self.device, torch.get_default_dtype())
        loader = self.run_data.train_loader
        loader.set_epoch(self.epoch)
        stats = EpochStats(m_total, self.device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            node_loss, logits = ts(x, y, table[i])
            stats.add(i + 1, node_loss, logits, y)
        elapsed = time.perf_counter() - t0
        finite = torch.isfinite(stats.loss_sum).tolist()
        evals = {split: evaluate_nodes(ts, ld, m_total, self.device) for split, ld in self.run_data.eval_loaders.items()}
        losses, accs = stats.mean_loss(n), stats.accuracy()
        out: list[MemberEpoch] = []
        for k, mem in enumerate(members):
            nodes = sup.nodes_of(k)
            mem.step += n
            mem.epoch += 1
            bad = [t - sup.offsets[k] for t in nodes if not finite[t - 1]]
            if bad:
                names = ", ".join(f"node {t} ({mem.graph.nodes[t - 1].model})" for t in bad)
                mem.failed = (f"non-finite loss in epoch {mem.epoch} in {names}: lower the learning rate "
                              f"(--lr {mem.cfg.lr:g}) or check the data")
                out.append(MemberEpoch(mem, failure=mem.failed))
                continue
            sl = slice(sup.offsets[k], sup.offsets[k] + mem.graph.num_nodes)
            record = {"epoch": mem.epoch, "step": mem.step,
                      "lr": [lrs.get(t) for t in nodes],
                      "train_loss": losses[sl], "train_acc": accs[sl],
                      "images_per_s": stats.seen / elapsed if elapsed > 0 else None, "time_s": elapsed,
                      **{f"{split}_acc": acc[sl] for split, acc in evals.items()}}
            append_jsonl(mem.out / "metrics.jsonl", record)
            if self.save_checkpoints:
                self._save_checkpoint(k, mem)
            out.append(MemberEpoch(mem, record=record))
        self.epoch += 1
        return out

    # -------------------------------------------------------------- files
    def _member_slice(self, k: int, per_node: Sequence[Any]) -> list[Any]:
        off = self.packed.offsets[k]
        return list(per_node[off:off + self.layout[k].graph.num_nodes])

    def _save_checkpoint(self, k: int, mem: Member) -> None:
        """The member's ``checkpoint.pt``, as its lone run would write it (it resumes there)."""
        ts = self.train_step
        scale = ts.loss_scale_state()
        if scale is not None:
            off = self.packed.offsets[k]
            scale = {name: v[off:off + mem.graph.num_nodes].clone() for name, v in scale.items()}
        atomic_torch_save(checkpoint_payload(
            epoch=mem.epoch, step=mem.step, fingerprint=run_fingerprint(mem.graph, self.data, mem.cfg),
            nets=self._member_slice(k, ts.node_state_dicts()), momentum=self._member_slice(k, ts.momentum_buffers()),
            loss_scale=scale), mem.out / "checkpoint.pt")

    def save_node(self, member: Member, t: int, **meta: Any) -> Path:
        """Write the member's network node ``t`` (1-based, in its own graph) as a model checkpoint,
        ``<out>/nodes/node<t>_<model>.pt`` with ``meta`` (epochs, val_acc, pruned...), as a lone run's
        :meth:`~ktg_fast.trainer.Trainer.save_node` does; call it after an epoch, before the layout changes."""
        k = self.layout.index(member)
        self.train_step.adopt_nets()
        net = self._member_slice(k, self.train_step.nets)[t - 1]
        node, rd = member.graph.nodes[t - 1], self.run_data
        path = member.out / "nodes" / f"node{t}_{node.model}.pt"
        save_model_checkpoint(path, net, name=node.model, num_classes=rd.num_classes, in_channels=rd.in_channels,
                              dataset=self.data.dataset, **{"epochs": member.cfg.epochs, **meta})
        return path

    def finish(self, member: Member, record: dict) -> dict:
        """Write the member's ``nodes/`` and ``final.json`` as its lone run would; return the final record."""
        k = self.layout.index(member)  # its place in the step of the epoch just run
        self.train_step.adopt_nets()
        nets = self._member_slice(k, self.train_step.nets)
        m = member.graph.num_nodes
        rd = self.run_data
        for t, (net, node) in enumerate(zip(nets, member.graph.nodes), start=1):
            save_model_checkpoint(member.out / "nodes" / f"node{t}_{node.model}.pt", net, name=node.model,
                                  num_classes=rd.num_classes, in_channels=rd.in_channels, dataset=self.data.dataset,
                                  epochs=member.cfg.epochs, test_acc=record.get("test_acc", [None] * m)[t - 1],
                                  val_acc=record.get("val_acc", [None] * m)[t - 1])
        final = {"graph": member.graph.to_dict(), "dataset": self.data.dataset, "seed": member.cfg.seed,
                 "epochs": member.cfg.epochs, "step_path": self.train_step.kind, "precision": self.precision,
                 "loader": rd.loader_kind, "packed": True, **record}
        atomic_write_json(member.out / "final.json", final)
        return final
