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

Members join and leave only between epochs, and the step's shape stays put:
its network nodes are places, each of one architecture (model, frozen or not),
in vmapped node groups.  A newcomer takes free places of its nodes' kinds in
place, wherever they are: its initial weights are written into the step's tensors,
its momentum and fp16 loss scale start over, and its gates are written into the
graph loss's device tensors (:mod:`ktg_fast.live_gates`), so nothing is
reallocated, recompiled or re-captured.  A free place is masked: every edge into
it is cutoff (its loss and gradient are exactly zero), its learning rate is 0 and
its weights are zeroed (finite, whatever its last trial left).  The step is
rebuilt, carrying the weights and momentum of the members that stay, only when a
newcomer finds no free places of its kinds, or when at most half the places are in
use (a search's tail: fewer nodes to run); on CUDA a rebuilt step is re-captured
as a CUDA graph, not recompiled.

The graph loss: when every member has the same node count m (a search's), one
block launch computes it, a block of m nodes per member (NB * m^2 pairs a row,
any number of nodes), and the blocks are regrouped in place on each refill, so
a newcomer's places need not be contiguous.  Members of several node counts use
fixed ranges of whole members of at most the kernel's 16 nodes, one launch each,
and a newcomer takes free places within one range.
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
from .device import autotune_convolutions, resolve_device, use_device
from .epoch_stats import EpochStats, evaluate_nodes
from . import gates as _gates
from .graph import Graph
from .io import append_jsonl, atomic_torch_save, atomic_write_json
from .live_gates import kernel_node_limit, merge_blocks
from .loss import GraphLoss
from .nodes import build_nodes, save_model_checkpoint
from .pack import PackedGraph, pack_graphs
from .recipe import TrainConfig, lr_at_epoch
from .run_data import RunData, load_run_data
from .run_files import truncate_metrics
from .steps import TrainStep, default_precision, make_step
from .trainer import divergence_message
from .data import canonical_name

__all__ = ["Member", "MemberEpoch", "PackTrainer"]

# Recipe fields one step serves for all its members (each member keeps its own rates, schedule and seed).
_SHARED_RECIPE = ("momentum", "nesterov", "weight_decay", "channels_last")

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
        places: the 1-based node of the pack's step that each of its nodes occupies (its order).
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
    places: list[int] = field(default_factory=list, repr=False)

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
        ValueError: (from :meth:`add`) a member whose batch size, augmentation, precision, temperature,
            momentum, nesterov, weight decay or channels_last differs from the pack's, or whose key or
            output folder another member has.
    """

    def __init__(self, data: DataSpec, *, batch_size: int, augment: bool = True, data_seed: int = 0,
                 device: str | torch.device = "auto", step: str = "auto", loss_impl: str = "auto",
                 teacher_dir: Optional[str | os.PathLike] = None, precision: Optional[str] = None,
                 compile_cache: Optional[str | os.PathLike] = None, save_checkpoints: bool = True):
        data.validate()
        self.data, self.batch_size, self.augment, self.data_seed = data, batch_size, augment, data_seed
        self.device = use_device(resolve_device(device))
        autotune_convolutions(self.device)
        self.step_kind, self.loss_impl, self.teacher_dir = step, loss_impl, teacher_dir
        self.precision = precision or default_precision(self.device)
        self.compile_cache, self.save_checkpoints = compile_cache, save_checkpoints
        self.run_data: RunData = load_run_data(data, batch_size=batch_size, seed=data_seed, augment=augment,
                                               device=self.device)
        self.iters_per_epoch = len(self.run_data.train_loader)
        self.members: list[Member] = []
        self.epoch = 0  # pack epochs run
        self.packed: Optional[PackedGraph] = None  # the members the step was built for (its places' kinds)
        self.layout: list[Member] = []  # the members in the step
        self.train_step: Optional[TrainStep] = None
        self.loss: Optional[GraphLoss] = None  # the step's graph loss; gates set in place when not None
        self.rebuilds = 0  # steps built: the first, then for a newcomer without free places of its kinds, or to compact
        self.refills = 0  # newcomers placed into free places in place (no new step)
        self._kinds: list[tuple[str, bool]] = []  # (model, frozen) of each place of the step
        self._ranges: list[tuple[int, int]] = []  # 0-based node ranges an edge may not leave (kernel launches)
        self._shared: dict[str, Any] = {}  # the recipe every member must share (set by the first member)
        self._block_size: Optional[int] = None  # the loss's uniform block size (members' node count), if any
        self._outs: dict[Path, Hashable] = {}  # every member's output folder, past and present

    # ------------------------------------------------------------ members
    def add(self, key: Hashable, graph: Graph, cfg: TrainConfig, out: str | os.PathLike) -> Member:
        """A new member, starting at its epoch 0 with the pack's next epoch; its nets are built now
        (seeded by ``cfg.seed``, exactly as a lone run builds them)."""
        if cfg.batch_size != self.batch_size or cfg.augment != self.augment:
            raise ValueError(f"member {key!r}: batch size {cfg.batch_size} / augment {cfg.augment} differ from the "
                             f"pack's {self.batch_size} / {self.augment}; pack only trials of one recipe")
        if cfg.precision not in (None, self.precision):
            raise ValueError(f"member {key!r}: precision {cfg.precision!r} differs from the pack's {self.precision!r}; "
                             "pack only trials of one precision")
        if self.members and graph.temperature != self.members[0].graph.temperature:
            raise ValueError(f"member {key!r}: temperature {graph.temperature:g} differs from the pack's "
                             f"{self.members[0].graph.temperature:g}; pack only graphs of one temperature")
        # One optimizer and one memory layout serve every place: the first member's settings are the pack's.
        shared = {name: getattr(cfg, name) for name in _SHARED_RECIPE}
        self._shared = self._shared or shared
        diff = [f"{k}={v!r} (the pack's: {self._shared[k]!r})" for k, v in shared.items() if v != self._shared[k]]
        if diff:
            raise ValueError(f"member {key!r}: {', '.join(diff)}; a pack trains one optimizer recipe, so pack only "
                             "trials that share momentum, nesterov, weight decay and channels_last")
        if any(m.key == key for m in self.members):
            raise ValueError(f"member {key!r} is already in the pack; give each member its own key")
        # A folder of a member past or present: adding would truncate its metrics under its final.json and nodes/.
        clash = self._outs.get(Path(out).resolve())
        if clash is not None:
            raise ValueError(f"member {key!r}: output folder {out} is member {clash!r}'s (in this pack now or "
                             "earlier); give each member a new folder")
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
        self._outs[m.out.resolve()] = key
        graph.save(m.out / "graph.yaml")
        truncate_metrics(m.out / "metrics.jsonl", 0)
        self.members.append(m)
        return m

    def remove(self, member: Member) -> None:
        """Take a member out of the pack (pruned, failed or done) from the next epoch; the others continue.

        Its places are freed (masked) at the start of the next epoch; until then :meth:`finish` and
        :meth:`save_node` still read its weights.

        Raises:
            ValueError: a member not in the pack (never added, or removed already).
        """
        if not any(m is member for m in self.members):
            raise ValueError(f"member {member.key!r} is not in the pack (removed already, or never added)")
        self.members.remove(member)

    # -------------------------------------------------------------- places
    def _place(self, member: Member, free: list[int]) -> Optional[list[int]]:
        """Free places (1-based) for ``member``'s nodes, in its node order, all within one launch range; None
        when there are none, or the in-place loss cannot take it (another temperature, custom gates)."""
        g = member.graph
        if self.loss is None or g.temperature != self.loss.temperature or not all(
                c in _gates.KERNEL_GATES for row in g.gate_codes().tolist() for c in row):
            return None
        if self._block_size is not None and g.num_nodes != self._block_size:
            return None  # the loss's blocks hold one member's node count
        frozen = set(g.frozen)
        kinds = [(node.model, t in frozen) for t, node in enumerate(g.nodes, start=1)]
        for a, b in self._ranges:
            left = [p for p in free if a < p <= b]
            spots = []
            for kind in kinds:
                p = next((p for p in left if self._kinds[p - 1] == kind), None)
                if p is None:
                    break
                left.remove(p)
                spots.append(p)
            else:
                return spots
        return None

    def _arrange(self) -> None:
        """Before an epoch: free the places of members that left, give newcomers free places of their kinds,
        and set the loss's gates; rebuild the step instead when that cannot be done or pays."""
        if self.train_step is None:
            return self._rebuild()
        here = {id(m) for m in self.members}
        stay = [m for m in self.layout if id(m) in here]
        placed = {id(m) for m in stay}
        newcomers = [m for m in self.members if id(m) not in placed]
        if len(stay) == len(self.layout) and not newcomers:
            return
        if self.loss is None:  # gates fixed in the loss (custom gates): any change needs a new step
            return self._rebuild()
        total = len(self._kinds)
        free = sorted(set(range(1, total + 1)) - {p for m in stay for p in m.places})
        taken: list[tuple[Member, list[int]]] = []
        for new in newcomers:
            spots = self._place(new, free)
            if spots is None:
                log.debug("pack: member %r finds no free places of its kinds among %s: rebuilding the step",
                          new.key, [self._kinds[p - 1] for p in free])
                return self._rebuild()
            free = [p for p in free if p not in spots]
            taken.append((new, spots))
        if 2 * (total - len(free)) <= total:
            log.debug("pack: %d of %d places in use: rebuilding a smaller step", total - len(free), total)
            return self._rebuild()
        ts = self.train_step
        states: dict[int, dict[str, torch.Tensor]] = {}
        for p in free:  # free places: zero weights, so that their (masked) forward stays finite
            states[p] = {n: torch.zeros_like(v) for n, v in ts.nets[p - 1].state_dict().items()}
        for new, spots in taken:
            states.update({p: net.state_dict() for p, net in zip(spots, new.nets)})
        ts.reset_nodes(states)
        for new, spots in taken:
            new.places = spots
            new.nets = [ts.nets[p - 1] for p in spots]  # the step's nets there now hold its weights
            log.debug("member %r takes places %s in place", new.key, spots)
        self.layout = stay + [new for new, _ in taken]
        self.refills += len(taken)
        self.loss.set_gates(self._gate_codes(), self._groups(free))

    def _groups(self, free: list[int]) -> Optional[list[list[int]]]:
        """The loss's blocks anew (0-based nodes): each member's places, then the free places in blocks of the
        members' node count; None when the loss's blocks are fixed ranges."""
        n = self._block_size
        if n is None:
            return None
        spare = [p - 1 for p in free]
        return [[p - 1 for p in m.places] for m in self.layout] + [spare[i:i + n] for i in range(0, len(spare), n)]

    def _gate_codes(self) -> torch.Tensor:
        """The step's (M+1, M+1) gate codes: each member's gates at its places, cutoff elsewhere."""
        total = len(self._kinds)
        codes = torch.zeros(total + 1, total + 1, dtype=torch.int64)  # cutoff
        for m in self.layout:
            ix = torch.tensor([0, *m.places])
            codes[ix.unsqueeze(1), ix.unsqueeze(0)] = m.graph.gate_codes()
        return codes

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
        sup = self.packed.graph
        for m, off in zip(self.layout, self.packed.offsets):
            m.places = [off + t for t in range(1, m.graph.num_nodes + 1)]
        self._kinds = [(node.model, sup.is_frozen(t)) for t, node in enumerate(sup.nodes, start=1)]
        limit, total = kernel_node_limit(), sup.num_nodes
        sizes = sorted({m.graph.num_nodes for m in self.layout})
        # Members of one node count (a search's): the loss runs one block launch, a block per member, and the
        # blocks are regrouped on each refill, so a newcomer may take free places of its kinds anywhere.
        uniform = len(sizes) == 1 and len(self.layout) > 1 and sizes[0] <= limit
        self._block_size = sizes[0] if uniform else None
        if self._block_size is not None:
            self._ranges, blocks = [(0, total)], self.packed.blocks()
        else:
            # Otherwise edges may join places of one kernel launch range only: whole members, merged up to the
            # kernel's limit.
            self._ranges = [(0, total)]
            if total > limit:
                self._ranges = list(merge_blocks(self.packed.blocks(), limit) or self._ranges)
            blocks = self._ranges
        nets = [net for m in self.layout for net in m.nets]
        codes = sup.gate_codes()
        # Gates set in place when the built-in gates suffice (custom gates: a fixed loss, a rebuild per refill).
        self.loss = None
        if all(c in _gates.KERNEL_GATES for row in codes.tolist() for c in row):
            self.loss = GraphLoss(codes, temperature=sup.temperature, impl=self.loss_impl, blocks=blocks,
                                  device=self.device)
        k_end = max(m.cfg.epochs for m in self.layout) * self.iters_per_epoch
        # The shared recipe (momentum, weight decay); each member's rates are set per epoch.
        base = dataclasses.replace(self.layout[0].cfg, node_lr=None)
        # Refills take free places in place, but a search's tail compacts the step (and a newcomer of other node
        # kinds rebuilds it): on CUDA the CUDA-graph step captures the fused step (a capture per rebuild, seconds)
        # rather than compiling (a compile per rebuild), unless --step compiled asks for it.
        self.train_step = make_step(self.step_kind, self.packed.graph, nets, base, loss_impl=self.loss_impl,
                                    total_steps=k_end, precision=self.precision, channels_last=base.channels_last,
                                    compile_cache=self.compile_cache, compile=False if self.step_kind != "compiled"
                                    else None, loss=self.loss)
        self.rebuilds += 1
        self.train_step.load_momentum_buffers([momentum.get(id(net)) for net in nets])

    # --------------------------------------------------------------- epoch
    def run_epoch(self) -> list[MemberEpoch]:
        """Train every member for one epoch; evaluate, record and checkpoint each one.

        Returns one :class:`MemberEpoch` per member, in the order they joined; failed members keep their
        places until the caller removes them.
        """
        if not self.members:
            raise RuntimeError("the pack has no member to train")
        done = [m for m in self.members if m.done]
        if done:
            raise ValueError(f"member {done[0].key!r} has done its {done[0].cfg.epochs} epochs: finish() it and "
                             "remove() it before the next epoch")
        self._arrange()
        ts, members = self.train_step, self.layout
        m_total = len(self._kinds)
        lrs: dict[int, float] = {}  # by place; a free place's: 0 (masked out of the update)
        for mem in members:
            scale = lr_at_epoch(1.0, mem.epoch, mem.milestones, mem.cfg.gamma)
            rates = mem.cfg.node_rates(mem.graph.num_nodes)
            for t in mem.graph.trainable:
                lrs[mem.places[t - 1]] = rates[t - 1] * scale
        ts.set_lrs([lrs.get(p, 0.0) for p in self.packed.graph.trainable])
        # Each member's progress k / k_end for every step of this epoch, in float64, then rounded as the
        # lone trainer fills step / k_end into a default-dtype tensor: row i is the (M,) per-place progress of
        # step i (free places: any value in [0, 1]; their edges are cutoff).
        n = self.iters_per_epoch
        ks = torch.arange(1, n + 1, dtype=torch.float64)[:, None]
        start = torch.zeros(m_total, dtype=torch.float64)
        k_end = torch.full((m_total,), float(n), dtype=torch.float64)
        for mem in members:
            ix = torch.tensor(mem.places) - 1
            start[ix], k_end[ix] = float(mem.step), float(mem.cfg.epochs * n)
        table = ((start[None, :] + ks) / k_end[None, :]).to(self.device, torch.get_default_dtype())
        loader = self.run_data.train_loader
        loader.set_epoch(self.epoch)
        stats = EpochStats(m_total, self.device)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(loader):
            node_loss, logits = ts(x, y, table[i])
            stats.add(i + 1, node_loss, logits, y)
        elapsed = time.perf_counter() - t0
        evals = {split: evaluate_nodes(ts, ld, m_total, self.device)
                 for split, ld in self.run_data.eval_loaders.items()}
        losses, accs = stats.mean_loss(n), stats.accuracy()
        out: list[MemberEpoch] = []
        for mem in self.members:  # in the order they joined
            bad = stats.first_non_finite(mem.places)
            first_step = mem.step
            mem.step += n
            mem.epoch += 1
            if bad is not None:
                # Worded as the lone trainer's message, so that a search counts one reason for both.
                k, places = bad
                mine = {p: t for t, p in enumerate(mem.places, start=1)}  # place -> the member's node
                rates = {mine[p]: lr for p, lr in lrs.items() if p in mine}
                mem.failed = divergence_message(mem.graph, first_step + k, mem.epoch, [mine[p] for p in places],
                                                rates, mem.cfg.lr)
                out.append(MemberEpoch(mem, failure=mem.failed))
                continue
            record = {"epoch": mem.epoch, "step": mem.step,
                      "lr": [lrs.get(p) for p in mem.places],
                      "train_loss": self._values(mem, losses), "train_acc": self._values(mem, accs),
                      # The pack's rate: every member trains on each batch, so it is each member's too.
                      "images_per_s": stats.seen / elapsed if elapsed > 0 else None, "time_s": elapsed,
                      "pack_size": len(members),
                      **{f"{split}_acc": self._values(mem, acc) for split, acc in evals.items()}}
            append_jsonl(mem.out / "metrics.jsonl", record)
            if self.save_checkpoints:
                self._save_checkpoint(mem)
            out.append(MemberEpoch(mem, record=record))
        self.epoch += 1
        return out

    # -------------------------------------------------------------- files
    def _check_in_step(self, member: Member) -> None:
        """Its weights are read from its places: only valid until the next epoch re-arranges them."""
        if self.train_step is None or not any(m is member for m in self.layout):
            raise ValueError(f"member {member.key!r} did not train in the pack's last epoch, so its places hold no "
                             "weights of its own: call finish() and save_node() right after its epoch, before the "
                             "pack's next run_epoch()")

    @staticmethod
    def _values(member: Member, per_place: Sequence[Any]) -> list[Any]:
        """The member's entries of a per-place sequence of the step, in its node order."""
        return [per_place[p - 1] for p in member.places]

    def _save_checkpoint(self, mem: Member) -> None:
        """The member's ``checkpoint.pt``, as its lone run would write it (it resumes there)."""
        ts = self.train_step
        scale = ts.loss_scale_state()
        if scale is not None:
            ix = torch.tensor(mem.places) - 1
            scale = {name: v[ix].clone() for name, v in scale.items()}
        atomic_torch_save(checkpoint_payload(
            epoch=mem.epoch, step=mem.step, fingerprint=run_fingerprint(mem.graph, self.data, mem.cfg),
            nets=self._values(mem, ts.node_state_dicts()), momentum=self._values(mem, ts.momentum_buffers()),
            loss_scale=scale), mem.out / "checkpoint.pt")

    def save_node(self, member: Member, t: int, **meta: Any) -> Path:
        """Write the member's network node ``t`` (1-based, in its own graph) as a model checkpoint,
        ``<out>/nodes/node<t>_<model>.pt`` with ``meta`` (epochs, val_acc, pruned...), as a lone run's
        :meth:`~ktg_fast.trainer.Trainer.save_node` does; call it after an epoch, before the next one.

        Raises:
            ValueError: a member that did not train in the pack's last epoch (its places may hold another's).
        """
        self._check_in_step(member)
        if not (isinstance(t, int) and 1 <= t <= member.graph.num_nodes):
            raise ValueError(f"member {member.key!r}: node {t!r} does not exist; t is 1-based, "
                             f"1..{member.graph.num_nodes} (node 0 is the label)")
        self.train_step.adopt_nets()
        net = self.train_step.nets[member.places[t - 1] - 1]
        node, rd = member.graph.nodes[t - 1], self.run_data
        path = member.out / "nodes" / f"node{t}_{node.model}.pt"
        save_model_checkpoint(path, net, name=node.model, num_classes=rd.num_classes, in_channels=rd.in_channels,
                              dataset=self.data.dataset, **{"epochs": member.cfg.epochs, **meta})
        return path

    def finish(self, member: Member, record: dict) -> dict:
        """Write the member's ``nodes/`` and ``final.json`` as its lone run would; return the final record.

        Call it after the member's last epoch, before the pack's next one.

        Raises:
            ValueError: a member that did not train in the pack's last epoch (its places may hold another's),
                or has epochs left (a pruned member's nodes go through :meth:`save_node`).
        """
        self._check_in_step(member)
        if not member.done:
            raise ValueError(f"member {member.key!r} has done {member.epoch} of its {member.cfg.epochs} epochs: "
                             "finish() writes a finished run's final.json; save a pruned member's nodes with "
                             "save_node()")
        self.train_step.adopt_nets()
        nets = self._values(member, self.train_step.nets)  # its places in the step of the epoch just run
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

