"""Simultaneous training of every node of a graph (Algorithm 1), with evaluation,
metrics, atomic per-epoch checkpoints and exact resume.

Exact resume: model initialisation is seeded by ``seed``; each epoch's batch
order and augmentation are seeded by (seed, epoch); the checkpoint holds every
node's weights and momentum buffers.  A run killed anywhere and resumed ends
with the same weights as an uninterrupted one.
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

from .graph import Graph
from .io import CheckpointError, append_jsonl, atomic_torch_save, atomic_write_json, check_state_dict, load_checkpoint
from .nodes import build_nodes, save_model_checkpoint
from .recipe import TrainConfig, lr_at_epoch
from .data import canonical_name, load_dataset, load_image_folder, make_loader, train_val_split
from .data.spec import SPLIT_SEED, DataSpec
from .device import resolve_device, use_device
from .run_files import (early_estimate_line, epoch_line, estimate_line, fingerprint_diff, format_duration, is_tty,
                        read_json, read_metrics, short_record, truncate_metrics)
from .steps import TrainStep, default_precision, make_step

__all__ = ["Trainer", "CheckpointError", "NonFiniteLossError", "RunExistsError", "fingerprint_diff", "read_metrics"]

log = logging.getLogger("ktg_fast")


class NonFiniteLossError(RuntimeError):
    """A node's loss became NaN or infinite; the message names the node and the step."""


class RunExistsError(FileExistsError):
    """The output folder already holds a run and ``resume`` was not asked for."""




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
    """

    def __init__(self, graph: Graph, data: DataSpec, cfg: TrainConfig, out_dir: str | os.PathLike, *,
                 device: str | torch.device = "auto", step: str = "auto", loss_impl: str = "auto",
                 teacher_dir: Optional[str | os.PathLike] = None,
                 on_epoch_end: Optional[Callable[[dict], None]] = None, progress: bool = True,
                 save_checkpoints: bool = True, compile_cache: Optional[str | os.PathLike] = None):
        cfg.validate()
        data.validate()
        self.graph, self.data, self.cfg = graph, data, cfg
        self.out = Path(out_dir)
        self.device = use_device(resolve_device(device))
        self.step_kind, self.loss_impl = step, loss_impl
        self.compile_cache = compile_cache
        self.teacher_dir = teacher_dir
        self.on_epoch_end = on_epoch_end
        self.show_progress = progress
        self.save_checkpoints = save_checkpoints
        self.milestones = cfg.resolved_milestones(_dataset_key(data.dataset))
        self.node_lrs: dict[int, float] = {}  # node -> learning rate of the running epoch
        self._early_eta = False  # the in-epoch time estimate was logged

    # ------------------------------------------------------------------ data
    def _load_data(self) -> None:
        d = self.data
        # Image-folder datasets stay files so DALI can decode them; other loaders decode them into memory.
        if canonical_name(d.dataset) == "tiny-imagenet" and d.loader in ("auto", "dali"):
            def load(split):
                return load_image_folder(d.dataset, d.root, split=split)
        else:
            def load(split):
                return load_dataset(d.dataset, d.root, split=split, download=d.download)
        train = load("train")
        val = None
        if d.val_size:
            train, val = train_val_split(train, d.val_size, seed=SPLIT_SEED)
        if d.train_subset is not None:
            train = train.subset(range(min(d.train_subset, len(train))))
        test = load("test") if d.test else None
        if d.eval_subset is not None:
            val = val.subset(range(min(d.eval_subset, len(val)))) if val is not None else None
            test = test.subset(range(min(d.eval_subset, len(test)))) if test is not None else None
        if len(train) < self.cfg.batch_size:
            raise ValueError(f"{len(train)} training images are fewer than one batch of {self.cfg.batch_size}")
        self.num_classes = train.num_classes
        self.in_channels = train.image_shape[0]
        self.train_loader, chosen, why = make_loader(d.loader, train, self.cfg.batch_size, train=True,
                                                     seed=self.cfg.seed, device=self.device,
                                                     augment=self.cfg.augment)
        self.loader_kind = chosen
        self.eval_loaders = {}
        for name, ds in (("val", val), ("test", test)):
            if ds is not None:
                self.eval_loaders[name], _, _ = make_loader(chosen, ds, 1000, train=False, seed=0,
                                                            device=self.device, augment=False,
                                                            reason="as the training loader")

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        nets = build_nodes(self.graph, num_classes=self.num_classes, in_channels=self.in_channels,
                           dataset=_dataset_key(self.data.dataset), device=self.device,
                           teacher_dir=self.teacher_dir, val_size=self.data.val_size)
        self.iters_per_epoch = len(self.train_loader)
        self.k_end = self.cfg.epochs * self.iters_per_epoch
        self.precision = self.cfg.precision or default_precision(self.device)
        self.train_step: TrainStep = make_step(
            self.step_kind, self.graph, nets, self.cfg, loss_impl=self.loss_impl, total_steps=self.k_end,
            precision=self.precision, channels_last=self.cfg.channels_last, compile_cache=self.compile_cache)
        log.info("step path: %s (%s)", self.train_step.kind, self.precision)

    def _fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed."""
        return {"graph": self.graph.to_dict(), "dataset": self.data.dataset, "val_size": self.data.val_size,
                "train_subset": self.data.train_subset, "config": self.cfg.to_dict()}

    # ----------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _save_checkpoint(self, epoch: int, step: int) -> None:
        # Plain types and tensors only: read back with weights_only=True.
        atomic_torch_save({
            "epoch": epoch, "step": step, "fingerprint": self._fingerprint(),
            "nets": self.train_step.node_state_dicts(), "momentum": self.train_step.momentum_buffers(),
            "torch_rng": torch.get_rng_state(),
        }, self.checkpoint_path)

    def _read_checkpoint(self) -> dict:
        """Load ``checkpoint.pt`` (tensors and plain types only) and check it was written by this run's
        settings; nothing is written before this check passes."""
        path = self.checkpoint_path
        ckpt = load_checkpoint(path)
        need = ("epoch", "step", "fingerprint", "nets", "momentum", "torch_rng")
        if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
            raise CheckpointError(f"{path} is not a training checkpoint of ktg_fast (it lacks "
                                  f"{[k for k in need if not isinstance(ckpt, dict) or k not in ckpt]}); "
                                  "move it away or choose another --out folder")
        diffs = fingerprint_diff(_upgrade_fingerprint(ckpt["fingerprint"]), self._fingerprint())
        if diffs:
            raise ValueError(f"{path} was written with other settings: {'; '.join(diffs)}. Resume with the "
                             "same settings, or use another --out folder for a new run")
        return ckpt

    def _restore(self, ckpt: dict) -> tuple[int, int]:
        """Load the checked checkpoint's weights, momentum and RNG into the built step."""
        if len(ckpt["nets"]) != len(self.train_step.nets):
            raise CheckpointError(f"{self.checkpoint_path} holds {len(ckpt['nets'])} networks, the graph has "
                                  f"{len(self.train_step.nets)}")
        for t, (net, state, node) in enumerate(zip(self.train_step.nets, ckpt["nets"], self.graph.nodes), start=1):
            check_state_dict(net, state, self.checkpoint_path, what=f"node {t} ({node.model})")
        try:
            self.train_step.load_node_state_dicts(ckpt["nets"])
            self.train_step.load_momentum_buffers(ckpt["momentum"])
            torch.set_rng_state(ckpt["torch_rng"])
        except (RuntimeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{self.checkpoint_path} does not fit this run: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        log.info("resumed %s after epoch %d", self.out, ckpt["epoch"])
        return ckpt["epoch"], ckpt["step"]

    # ------------------------------------------------------------- evaluate
    @torch.no_grad()
    def evaluate(self, split: str) -> list[float]:
        """Top-1 accuracy (%) of every node on ``split`` (``val`` or ``test``)."""
        loader = self.eval_loaders[split]
        correct = torch.zeros(self.graph.num_nodes, dtype=torch.long, device=self.device)
        total = 0
        for x, y in loader:
            logits = self.train_step.eval_logits(x)
            correct += (logits.argmax(-1) == y.unsqueeze(0)).sum(-1)
            total += y.shape[0]
        return (correct.double() * 100.0 / max(total, 1)).tolist()

    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False) -> dict:
        """Train for ``cfg.epochs`` (continuing a checkpoint when ``resume``); return the final record.

        Everything that can refuse the run (an existing run without ``resume``, a checkpoint that
        cannot be read or was written with other settings) is checked before any file is written.
        """
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {self.out} is a file, not a folder: choose a folder path for the run")
        ckpt = None
        if self.checkpoint_path.exists():
            if not resume:
                raise RunExistsError(f"{self.out} already holds a run: pass --resume to continue it, "
                                     "or choose another --out")
            ckpt = self._read_checkpoint()
        elif resume:
            log.info("no checkpoint in %s to resume: starting a fresh run", self.out)
        self._load_data()
        self._build()
        start_epoch, step = self._restore(ckpt) if ckpt is not None else (0, 0)
        self.out.mkdir(parents=True, exist_ok=True)
        self.graph.save(self.out / "graph.yaml")
        # Records after the checkpoint (or any, with none) are redone: one record per epoch.
        truncate_metrics(self.out / "metrics.jsonl", start_epoch)
        if start_epoch >= self.cfg.epochs:
            log.info("%s is already complete", self.out)
            final = self.out / "final.json"
            # A kill after the last checkpoint but before final.json: finish from the last record.
            if final.exists():
                return read_json(final)
            records = read_metrics(self.out / "metrics.jsonl")
            last = records[-1] if records else {
                "epoch": start_epoch, "step": step, **{f"{sp}_acc": self.evaluate(sp) for sp in self.eval_loaders}}
            return self._finish(last)

        m = self.graph.num_nodes
        progress_t = torch.zeros((), device=self.device)
        epochs = range(start_epoch, self.cfg.epochs)
        # Bars only on a terminal: in a log file their cursor moves would leave escape codes.
        bars = self.show_progress and is_tty(sys.stderr)
        bar = tqdm(epochs, desc=f"train {self.out.name}", unit="epoch", disable=not bars,
                   initial=start_epoch, total=self.cfg.epochs)
        record: dict = {}
        run_t0 = time.perf_counter()
        for epoch in bar:
            lr_scale = lr_at_epoch(1.0, epoch, self.milestones, self.cfg.gamma)
            base = self.cfg.node_rates(m)
            self.node_lrs = {t: base[t - 1] * lr_scale for t in self.graph.trainable}
            self.train_step.set_lrs([self.node_lrs[t] for t in self.graph.trainable])
            self.train_loader.set_epoch(epoch)
            loss_sum = torch.zeros(m, dtype=torch.float64, device=self.device)
            correct = torch.zeros(m, dtype=torch.long, device=self.device)
            bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
            bad_nodes = torch.zeros(m, dtype=torch.bool, device=self.device)
            seen = 0
            t0 = time.perf_counter()
            first_epoch = epoch == start_epoch
            batches = tqdm(self.train_loader, desc=f"epoch {epoch + 1}", leave=False, unit="batch",
                           disable=not bars)
            for i, (x, y) in enumerate(batches):
                step += 1
                progress_t.fill_(step / self.k_end)
                node_loss, logits = self.train_step(x, y, progress_t)
                # Accumulate on the device; the host reads once per check_every steps.
                finite = torch.isfinite(node_loss)
                first = (bad_step < 0) & ~finite.all()
                bad_step = torch.where(first, torch.full_like(bad_step, step), bad_step)
                bad_nodes = torch.where(first, ~finite, bad_nodes)
                loss_sum += node_loss.double()
                correct += (logits.argmax(-1) == y.unsqueeze(0)).sum(-1)
                seen += y.shape[0]
                if (i + 1) % self.cfg.check_every == 0 or i + 1 == self.iters_per_epoch:
                    self._check_finite(bad_step, bad_nodes, epoch)
                    if bars:
                        batches.set_postfix(loss=f"{(loss_sum.sum() / (i + 1)).item():.3f}")
                    if first_epoch and i + 1 < self.iters_per_epoch and not self._early_eta:
                        self._early_estimate(i + 1, time.perf_counter() - t0, epoch)
            batches.close()
            self._check_finite(bad_step, bad_nodes, epoch)
            elapsed = time.perf_counter() - t0
            record = {
                # One rate per network node (None for frozen ones): per-node rates are the recipe's too.
                "epoch": epoch + 1, "step": step, "lr": [self.node_lrs.get(t) for t in range(1, m + 1)],
                "train_loss": (loss_sum / max(self.iters_per_epoch, 1)).tolist(),
                "train_acc": (correct.double() * 100.0 / max(seen, 1)).tolist(),
                "images_per_s": seen / elapsed if elapsed > 0 else None, "time_s": elapsed,
            }
            for split in self.eval_loaders:
                record[f"{split}_acc"] = self.evaluate(split)
            append_jsonl(self.out / "metrics.jsonl", record)
            if self.save_checkpoints:
                self._save_checkpoint(epoch + 1, step)
            if first_epoch:
                self._estimate(epoch, time.perf_counter() - run_t0)
            if bars:
                bar.set_postfix(short_record(record, self.graph.target))
            else:
                log.info("epoch %d/%d: %s (%s)", epoch + 1, self.cfg.epochs, epoch_line(record, self.graph.target),
                         format_duration(time.perf_counter() - t0))
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)
        bar.close()
        return self._finish(record)

    def _early_estimate(self, done: int, seconds: float, epoch: int) -> None:
        """During the first epoch (after at least 10 s and 10 batches): the run's time from the speed so far."""
        if seconds >= 10 and done >= 10:
            self._early_eta = True
            log.info("%s", early_estimate_line(done, seconds, self.iters_per_epoch, self.cfg.epochs - epoch))

    def _estimate(self, epoch: int, seconds: float) -> None:
        """After the first epoch of this process: the run's total time at the measured speed."""
        log.info("%s", estimate_line(epoch, seconds, self.cfg.epochs))

    def _check_finite(self, bad_step: torch.Tensor, bad_nodes: torch.Tensor, epoch: int) -> None:
        k = int(bad_step)
        if k < 0:
            return
        nodes = [t + 1 for t in bad_nodes.nonzero().flatten().tolist()]
        names = ", ".join(f"node {t} ({self.graph.nodes[t - 1].model})" for t in nodes)
        lrs = self.node_lrs
        rates = ", ".join(f"node {t}'s is {lrs[t]:g}" for t in nodes if t in lrs)
        advice = (f"lower the learning rate ({rates}; --lr {self.cfg.lr:g})" if rates
                  else f"lower the learning rate (--lr {self.cfg.lr:g})")
        if not self.save_checkpoints:
            where = "this run keeps no checkpoints: start it anew"
        elif self.checkpoint_path.exists():
            where = f"the last good checkpoint is {self.checkpoint_path} (epoch {epoch})"
        else:
            where = "no checkpoint was written before (the run diverged in its first epoch): start it anew"
        raise NonFiniteLossError(f"non-finite loss at step {k} (epoch {epoch + 1}) in {names}: {advice} "
                                 f"or check the data; {where}")

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
        for t in range(1, m + 1):
            self.save_node(t, test_acc=record.get("test_acc", [None] * m)[t - 1],
                           val_acc=record.get("val_acc", [None] * m)[t - 1])
        final = {"graph": self.graph.to_dict(), "dataset": self.data.dataset, "seed": self.cfg.seed,
                 "epochs": self.cfg.epochs, "step_path": self.train_step.kind, "precision": self.precision,
                 "loader": self.loader_kind, **record}
        atomic_write_json(self.out / "final.json", final)
        return final


def _dataset_key(name: str) -> str:
    return canonical_name(name)


def _upgrade_fingerprint(old: Any) -> Any:
    """A checkpoint's settings as this version names them: recipe fields added since take their
    defaults, fields since removed are dropped (checkpoints of earlier versions still resume)."""
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        return old
    defaults = TrainConfig().to_dict()
    cfg = {k: v for k, v in old["config"].items() if k in defaults}
    return {**old, "config": {**{k: v for k, v in defaults.items() if k not in cfg}, **cfg}}
