"""Simultaneous training of every node of a graph (Algorithm 1), with evaluation,
metrics, atomic per-epoch checkpoints and exact resume.

Exact resume: model initialisation is seeded by ``seed``; each epoch's batch
order and augmentation are seeded by (seed, epoch) (``data_seed`` and
``data_offset`` of the recipe replace them: a packed trial's batches); the checkpoint holds every
node's weights, momentum buffers and (fp16) loss scales.  A run killed anywhere
and resumed ends with the same weights as an uninterrupted one.

The trainer runs the epochs; its parts live beside it: the data (:mod:`.run_data`),
checkpoints (:mod:`.checkpoint`), per-epoch measurements and evaluation
(:mod:`.epoch_stats`), the run's files and time estimates (:mod:`.run_files`).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .checkpoint import (RunExistsError, checkpoint_to_resume, read_checkpoint, restore_checkpoint,
                         run_fingerprint, save_checkpoint)
from .data import canonical_name
from .data.spec import DataSpec
from .device import autotune_convolutions, resolve_device, use_device
from .distributed import DistContext, distributed_step_kind
from .epoch_stats import EpochStats, evaluate_nodes
from .graph import Graph
from .io import CheckpointError, append_jsonl, atomic_write_json
from .nodes import build_nodes, default_teacher_dir, resolve_checkpoint, save_model_checkpoint
from .recipe import TrainConfig, lr_at_epoch
from .run_data import load_run_data
from .run_files import (early_estimate_line, epoch_line, estimate_line, fingerprint_diff, format_duration, is_tty,
                        read_json, read_metrics, short_record, truncate_metrics)
from .steps import TrainStep, default_precision, make_step, precision_warning
from .steps.base import say_once
from .sync_bn import convert_sync_batchnorm

__all__ = ["Trainer", "CheckpointError", "NonFiniteLossError", "RunExistsError", "fingerprint_diff", "read_metrics"]

log = logging.getLogger("ktg_fast")


def divergence_message(graph: Graph, step: int, epoch: int, nodes: list[int], node_lrs: dict[int, float],
                       lr: float) -> str:
    """"non-finite loss at step k (epoch e) in node t (model), ...: lower the learning rate (...) or check the
    data": one wording for a lone run and a pack member (a search counts one failure reason for both).

    ``step`` and ``epoch`` are the run's (1-based); ``node_lrs`` the current rate of each trainable node."""
    names = ", ".join(f"node {t} ({graph.nodes[t - 1].model})" for t in nodes)
    rates = ", ".join(f"node {t}'s is {node_lrs[t]:g}" for t in nodes if t in node_lrs)
    advice = f"{rates}; --lr {lr:g}" if rates else f"--lr {lr:g}"
    return (f"non-finite loss at step {step} (epoch {epoch}) in {names}: lower the learning rate ({advice}) "
            "or check the data")


class NonFiniteLossError(RuntimeError):
    """A node's loss became NaN or infinite; the message names the node and the step."""


class Trainer:
    """Train all nodes of ``graph`` on one dataset.

    Args:
        graph: the knowledge transfer graph.
        data: what to train and evaluate on.
        cfg: optimiser, schedule, epochs, seed.
        out_dir: run folder: ``checkpoint.pt``, ``metrics.jsonl``,
            ``final.json``, ``graph.yaml``, ``nodes/node<t>_<model>.pt``.
        device: ``auto``, ``cpu``, ``cuda``...
        step: ``auto`` or a kind of :data:`ktg_fast.steps.STEP_KINDS`.
        teacher_dir: where frozen nodes marked ``pretrained`` are found.
        on_epoch_end: called with each epoch's metrics record; a search
            reports to its pruner here (and may raise to stop the run).
        progress: show tqdm bars.
        dist: this process's place in a data-parallel run (torchrun; :mod:`.distributed`): the loaders
            shard every global batch and evaluation set, gradients are summed over the ranks, rank 0
            alone writes files; ``device`` is then the rank's own.  None: one process.
        expected_epochs: the epochs the run is expected to train, when a pruner may stop it early (a
            search trial: :func:`ktg_fast.search.budget.expected_epochs_per_trial`, 4.8 of the paper's
            200); weighs ``step="auto"``'s compile decision.  None: ``cfg.epochs``.
    """

    def __init__(self, graph: Graph, data: DataSpec, cfg: TrainConfig, out_dir: str | os.PathLike, *,
                 device: str | torch.device = "auto", step: str = "auto", loss_impl: str = "auto",
                 teacher_dir: Optional[str | os.PathLike] = None,
                 on_epoch_end: Optional[Callable[[dict], None]] = None, progress: bool = True,
                 save_checkpoints: bool = True, compile_cache: Optional[str | os.PathLike] = None,
                 dist: Optional[DistContext] = None, expected_epochs: Optional[float] = None):
        cfg.validate()
        data.validate()
        self.graph, self.data, self.cfg = graph, data, cfg
        self.out = Path(out_dir)
        self.dist = dist
        self.writes = dist is None or dist.is_main  # rank 0 alone writes the run's files
        self.device = use_device(dist.device if dist is not None else resolve_device(device))
        autotune_convolutions(self.device)
        self.step_kind, self.loss_impl = step, loss_impl
        self.compile_cache = compile_cache
        self.expected_epochs = cfg.epochs if expected_epochs is None else min(float(expected_epochs), cfg.epochs)
        self.teacher_dir = teacher_dir
        self.on_epoch_end = on_epoch_end
        self.show_progress = progress
        self.save_checkpoints = save_checkpoints
        self.milestones = cfg.resolved_milestones(canonical_name(data.dataset))
        late = [m for m in self.milestones if m >= cfg.epochs]
        if late and cfg.milestones is not None:  # the defaults scale with the epochs; a user's list may not
            log.warning("learning-rate milestone%s %s never reached in %d epoch%s: the rate never decays there",
                        "s" if len(late) > 1 else "", ", ".join(map(str, late)), cfg.epochs,
                        "s" if cfg.epochs != 1 else "")
        self.node_lrs: dict[int, float] = {}  # node -> learning rate of the running epoch
        self._early_eta = False  # the in-epoch time estimate was logged

    # ------------------------------------------------------------------ data
    def _load_data(self) -> None:
        run_data = load_run_data(self.data, batch_size=self.cfg.batch_size, seed=self.cfg.batch_seed,
                                 augment=self.cfg.augment, device=self.device)
        self.train_loader, self.eval_loaders = run_data.train_loader, run_data.eval_loaders
        if self.dist is not None:  # each rank its slice of every global batch, its part of each eval set
            for loader in (self.train_loader, *self.eval_loaders.values()):
                loader.set_shard(self.dist.rank, self.dist.world)
        self.loader_kind = run_data.loader_kind
        self.num_classes, self.in_channels = run_data.num_classes, run_data.in_channels

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        nets = build_nodes(self.graph, num_classes=self.num_classes, in_channels=self.in_channels,
                           dataset=canonical_name(self.data.dataset), device=self.device,
                           teacher_dir=self.teacher_dir, val_size=self.data.val_size)
        self.iters_per_epoch = len(self.train_loader)
        self.k_end = self.cfg.epochs * self.iters_per_epoch
        self.precision = self.cfg.precision or default_precision(self.device)
        slow = precision_warning(self.device, self.precision)
        if slow and self.writes:
            say_once(logging.WARNING, "%s", slow)  # once per process, not once per seed
        kind = self.step_kind
        if self.dist is not None:
            kind = distributed_step_kind(kind)
            if self.dist.sync_bn:
                for t in self.graph.trainable:
                    convert_sync_batchnorm(nets[t - 1])
        # The steps the run will likely take (not k_end where a pruner may stop it): compiling must pay for them.
        expected_steps = max(1, round(self.expected_epochs * self.iters_per_epoch))
        self.train_step: TrainStep = make_step(
            kind, self.graph, nets, self.cfg, loss_impl=self.loss_impl, total_steps=expected_steps,
            precision=self.precision, channels_last=self.cfg.channels_last, compile_cache=self.compile_cache)
        self.train_step.dist = self.dist
        log.info("step path: %s (%s)%s", self.train_step.kind, self.precision,
                 "" if self.dist is None else f", {self.dist.world} processes"
                 + (", BatchNorm over the global batch" if self.dist.sync_bn else ""))

    # ----------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _save_checkpoint(self, epoch: int, step: int) -> None:
        if not self.writes:
            return
        save_checkpoint(self.checkpoint_path, epoch=epoch, step=step, train_step=self.train_step,
                        fingerprint=run_fingerprint(self.graph, self.data, self.cfg), batchnorm=self._batchnorm())

    def _batchnorm(self) -> str:
        """What BatchNorm normalises over in this run: the global batch, or each process's slice."""
        if self.dist is None or self.dist.sync_bn:
            return "the global batch"
        return f"each of {self.dist.world} processes' own slice (no --sync-bn)"

    def _read_checkpoint(self) -> dict:
        """Load ``checkpoint.pt`` and check it was written by this run's settings (before anything is written)."""
        return read_checkpoint(self.checkpoint_path, run_fingerprint(self.graph, self.data, self.cfg))

    def _restore(self, ckpt: dict) -> tuple[int, int]:
        """Load the checked checkpoint into the built step; return its (epoch, step)."""
        done = restore_checkpoint(ckpt, self.checkpoint_path, self.train_step, self.graph)
        log.info("resumed %s after epoch %d", self.out, ckpt["epoch"])
        before = ckpt.get("batchnorm", "the global batch")
        if before != self._batchnorm() and self.writes:
            log.warning("the checkpoint's epochs normalised BatchNorm over %s, this run over %s: from here "
                        "on the updates differ from an uninterrupted run (resume with the same --sync-bn and, "
                        "without it, the same number of processes)", before, self._batchnorm())
        return done

    def _checkpoint_to_resume(self, resume: bool) -> Optional[dict]:
        return checkpoint_to_resume(self.out, run_fingerprint(self.graph, self.data, self.cfg), resume=resume,
                                    dist=self.dist)

    def evaluate(self, split: str) -> list[float]:
        """Top-1 accuracy (%) of every node on ``split`` (``val`` or ``test``)."""
        return evaluate_nodes(self.train_step, self.eval_loaders[split], self.graph.num_nodes, self.device,
                              self.dist)

    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False) -> dict:
        """Train for ``cfg.epochs`` (continuing a checkpoint when ``resume``); return the final record.

        Everything that can refuse the run (an existing run without ``resume``, a checkpoint that
        cannot be read or was written with other settings) is checked before any file is written.
        """
        ckpt = self._checkpoint_to_resume(resume)
        teachers = default_teacher_dir() if self.teacher_dir is None else self.teacher_dir
        for node in self.graph.nodes:  # a missing teacher is named before minutes of loading data
            if node.checkpoint:
                resolve_checkpoint(node.checkpoint, model=node.model, dataset=canonical_name(self.data.dataset),
                                   teacher_dir=teachers, val_size=self.data.val_size, base_dir=self.graph.base_dir)
        self._load_data()
        self._build()
        start_epoch, step = self._restore(ckpt) if ckpt is not None else (0, 0)
        if self.writes:
            self.out.mkdir(parents=True, exist_ok=True)
            self.graph.save(self.out / "graph.yaml")
            # Records after the checkpoint (or any, with none) are redone: one record per epoch.
            truncate_metrics(self.out / "metrics.jsonl", start_epoch)
        if start_epoch >= self.cfg.epochs:
            return self._already_complete(start_epoch, step)

        m = self.graph.num_nodes
        progress_t = torch.zeros((), device=self.device)
        epochs = range(start_epoch, self.cfg.epochs)
        # Bars only on a terminal: in a log file their cursor moves would leave escape codes.
        bars = self.show_progress and is_tty(sys.stderr) and self.writes
        bar = tqdm(epochs, desc=f"train {self.out.name}", unit="epoch", disable=not bars,
                   initial=start_epoch, total=self.cfg.epochs)
        record: dict = {}
        run_t0 = time.perf_counter()
        for epoch in bar:
            lr_scale = lr_at_epoch(1.0, epoch, self.milestones, self.cfg.gamma)
            base = self.cfg.node_rates(m)
            self.node_lrs = {t: base[t - 1] * lr_scale for t in self.graph.trainable}
            self.train_step.set_lrs([self.node_lrs[t] for t in self.graph.trainable])
            self.train_loader.set_epoch(epoch + self.cfg.data_offset)
            stats = EpochStats(m, self.device)
            t0 = time.perf_counter()
            first_epoch = epoch == start_epoch
            batches = tqdm(self.train_loader, desc=f"epoch {epoch + 1}", leave=False, unit="batch",
                           disable=not bars)
            # The speed is measured from the steady state on: the calls before it compile or capture.
            steady_at, t_steady, warmup_s = self.train_step.steady_after, t0, 0.0
            for i, (x, y) in enumerate(batches):
                step += 1
                progress_t.fill_(step / self.k_end)
                node_loss, logits = self.train_step(x, y, progress_t)
                if first_epoch and i + 1 == steady_at:
                    t_steady = time.perf_counter()
                    warmup_s = t_steady - t0
                stats.add(step, node_loss, logits, y)  # on the device; the host reads once per check_every steps
                if (i + 1) % self.cfg.check_every == 0 or i + 1 == self.iters_per_epoch:
                    self._check_finite(stats, epoch)
                    if bars:
                        batches.set_postfix(loss=f"{(stats.loss_sum.sum() / (i + 1)).item():.3f}")
                    if first_epoch and i + 1 < self.iters_per_epoch and not self._early_eta and i + 1 > steady_at:
                        self._early_estimate(i + 1 - steady_at, time.perf_counter() - t_steady, epoch)
            batches.close()
            self._check_finite(stats, epoch)
            stats.reduce_(self.dist)
            elapsed = time.perf_counter() - t0
            record = {
                # One rate per network node (None for frozen ones): per-node rates are the recipe's too.
                "epoch": epoch + 1, "step": step, "lr": [self.node_lrs.get(t) for t in range(1, m + 1)],
                "train_loss": stats.mean_loss(self.iters_per_epoch), "train_acc": stats.accuracy(),
                "images_per_s": stats.seen / elapsed if elapsed > 0 else None, "time_s": elapsed,
            }
            for split in self.eval_loaders:
                record[f"{split}_acc"] = self.evaluate(split)
            if self.writes:
                append_jsonl(self.out / "metrics.jsonl", record)
            if self.save_checkpoints:
                self._save_checkpoint(epoch + 1, step)
            if first_epoch:
                # Compiling or capturing (steps before the steady state) is paid once, not every epoch.
                self._estimate(epoch, time.perf_counter() - run_t0, warmup_s if steady_at > 1 else 0.0)
            if bars:
                bar.set_postfix(short_record(record, self.graph.target))
            else:
                log.info("epoch %d/%d: %s (%s)", epoch + 1, self.cfg.epochs, epoch_line(record, self.graph.target),
                         format_duration(time.perf_counter() - t0))
            if self.on_epoch_end is not None and self.writes:
                self.on_epoch_end(record)
        bar.close()
        return self._finish(record)

    def _already_complete(self, epoch: int, step: int) -> dict:
        """The final record of a run whose checkpoint holds every epoch (rank 0's files decide, for all ranks)."""
        log.info("%s is already complete", self.out)
        final, last = None, None
        if self.writes:
            path = self.out / "final.json"
            # A kill after the last checkpoint but before final.json: finish from the last record.
            final = read_json(path) if path.exists() else None
            records = read_metrics(self.out / "metrics.jsonl")
            last = records[-1] if records else None
        if self.dist is not None:
            final, last = self.dist.broadcast_object((final, last))
        if final is not None:
            return final
        if last is None:  # (every rank evaluates: the counts are summed over the ranks)
            last = {"epoch": epoch, "step": step, **{f"{sp}_acc": self.evaluate(sp) for sp in self.eval_loaders}}
        return self._finish(last)

    def _early_estimate(self, done: int, seconds: float, epoch: int) -> None:
        """During the first epoch (after at least 10 s and 10 batches): the run's time from the speed so far."""
        if seconds >= 10 and done >= 10:
            self._early_eta = True
            log.info("%s", early_estimate_line(done, seconds, self.iters_per_epoch, self.cfg.epochs - epoch))

    def _estimate(self, epoch: int, seconds: float, warmup_s: float = 0.0) -> None:
        """After the first epoch of this process: the run's total time at the measured speed (``warmup_s``:
        compiling or capturing, paid once)."""
        log.info("%s", estimate_line(epoch, seconds, self.cfg.epochs, warmup_s))

    def _check_finite(self, stats: EpochStats, epoch: int) -> None:
        """Raise :class:`NonFiniteLossError` if a node's loss was NaN or infinite at a step of ``stats``."""
        bad = stats.first_non_finite()
        if bad is None:
            return
        k, nodes = bad
        if not self.save_checkpoints:
            where = "this run keeps no checkpoints: start it anew"
        elif self.checkpoint_path.exists():
            where = f"the last good checkpoint is {self.checkpoint_path} (epoch {epoch})"
        else:
            where = "no checkpoint was written before (the run diverged in its first epoch): start it anew"
        raise NonFiniteLossError(f"{divergence_message(self.graph, k, epoch + 1, nodes, self.node_lrs, self.cfg.lr)}; "
                                 f"{where}")

    def save_node(self, t: int, path: Optional[str | os.PathLike] = None, **meta: Any) -> Path:
        """Write network node ``t``'s (1-based) current weights as a model checkpoint; return its path.

        The file (default ``<out>/nodes/node<t>_<model>.pt``) loads with
        ``checkpoint: <path>`` in a graph; ``meta`` (epochs, val_acc, pruned, ...)
        is stored beside the weights.  Written atomically.
        """
        node = self.graph.nodes[t - 1]
        path = Path(path) if path is not None else self.out / "nodes" / f"node{t}_{node.model}.pt"
        self.train_step.adopt_nets()
        save_model_checkpoint(path, self.train_step.nets[t - 1], name=node.model, num_classes=self.num_classes,
                              in_channels=self.in_channels, dataset=self.data.dataset,
                              **{"epochs": self.cfg.epochs, **meta})
        return path

    def _finish(self, record: dict) -> dict:
        m = len(self.graph.nodes)
        final = {"graph": self.graph.to_dict(), "dataset": self.data.dataset, "seed": self.cfg.seed,
                 "epochs": self.cfg.epochs, "step_path": self.train_step.kind, "precision": self.precision,
                 "loader": self.loader_kind, **({} if self.dist is None else {"processes": self.dist.world}),
                 **record}
        if not self.writes:
            return final
        for t in range(1, m + 1):
            self.save_node(t, test_acc=record.get("test_acc", [None] * m)[t - 1],
                           val_acc=record.get("val_acc", [None] * m)[t - 1], train_subset=self.data.train_subset)
        atomic_write_json(self.out / "final.json", final)
        return final

