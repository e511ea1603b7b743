"""Simultaneous training of every node of a graph (Algorithm 1), with evaluation,
metrics, atomic per-epoch checkpoints and exact resume.

Exact resume: model initialisation is seeded by ``seed``; each epoch's batch
order and augmentation are seeded by (seed, epoch); the checkpoint holds every
node's weights and momentum buffers.  A run killed anywhere and resumed ends
with the same weights as an uninterrupted one.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from tqdm.auto import tqdm

from .graph import Graph
from .io import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text
from .nodes import build_nodes, save_model_checkpoint
from .recipe import TrainConfig, lr_at_epoch
from .step import TrainStep, make_step

__all__ = ["Trainer", "NonFiniteLossError", "RunExistsError", "DataSpec", "read_metrics", "resolve_device"]

log = logging.getLogger("ktg_fast")


class NonFiniteLossError(RuntimeError):
    """A node's loss became NaN or infinite; the message names the node and the step."""


class RunExistsError(FileExistsError):
    """The output folder already holds a run and ``resume`` was not asked for."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` is CUDA when available, else the CPU; unknown or absent devices get a clear error."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but no CUDA device is available: use --device cpu")
    return dev


@dataclass
class DataSpec:
    """Which data a run trains and evaluates on.

    ``val_size > 0`` holds out that many training images (seeded split, the
    same for every run) as the validation split; ``test`` evaluates on the
    test split too (a search never does).  ``train_subset`` keeps only the
    first N training images after the split (for quick runs).
    """

    dataset: str
    root: Optional[str] = None
    val_size: int = 0
    test: bool = True
    train_subset: Optional[int] = None
    eval_subset: Optional[int] = None
    loader: str = "auto"
    download: bool = False
    options: dict[str, Any] = field(default_factory=dict)


# Seed of the train/validation split: fixed, so teachers, searches and
# retraining all see the same split whatever their training seed.
SPLIT_SEED = 0


class Trainer:
    """Train all nodes of ``graph`` on one dataset.

    Args:
        graph: the knowledge transfer graph.
        data: what to train and evaluate on.
        cfg: optimiser, schedule, epochs, seed.
        out_dir: run folder: ``checkpoint.pt``, ``metrics.jsonl``,
            ``final.json``, ``graph.yaml``, ``nodes/node<t>_<model>.pt``.
        device: ``auto``, ``cpu``, ``cuda``...
        step: ``auto``, ``eager``, ``fused`` or ``graph`` (see ``step.py``).
        teacher_dir: where frozen nodes marked ``pretrained`` are found.
        on_epoch_end: called with each epoch's metrics record; a search
            reports to its pruner here (and may raise to stop the run).
        progress: show tqdm bars.
    """

    def __init__(self, graph: Graph, data: DataSpec, cfg: TrainConfig, out_dir: str | os.PathLike, *,
                 device: str | torch.device = "auto", step: str = "auto", loss_impl: str = "auto",
                 teacher_dir: Optional[str | os.PathLike] = None,
                 on_epoch_end: Optional[Callable[[dict], None]] = None, progress: bool = True,
                 save_checkpoints: bool = True):
        cfg.validate()
        self.graph, self.data, self.cfg = graph, data, cfg
        self.out = Path(out_dir)
        self.device = resolve_device(device)
        self.step_kind, self.loss_impl = step, loss_impl
        self.teacher_dir = teacher_dir
        self.on_epoch_end = on_epoch_end
        self.progress = progress
        self.save_checkpoints = save_checkpoints
        self.milestones = cfg.resolved_milestones(_dataset_key(data.dataset))

    # ------------------------------------------------------------------ data
    def _load_data(self) -> None:
        from .data import canonical_name, load_dataset, load_image_folder, make_loader, train_val_split

        d = self.data
        # Image-folder datasets stay files so DALI can decode them; other loaders decode them into memory.
        if canonical_name(d.dataset) == "tiny-imagenet" and d.loader in ("auto", "dali"):
            def load(split):
                return load_image_folder(d.dataset, d.root, split=split)
        else:
            def load(split):
                return load_dataset(d.dataset, d.root, split=split, download=d.download, **d.options)
        train = load("train")
        val = None
        if d.val_size:
            train, val = train_val_split(train, d.val_size, seed=SPLIT_SEED)
        if d.train_subset:
            train = train.subset(range(min(d.train_subset, len(train))))
        test = load("test") if d.test else None
        if d.eval_subset:
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
                                                            device=self.device, augment=False)

    # ----------------------------------------------------------------- setup
    def _build(self) -> None:
        torch.manual_seed(self.cfg.seed)
        nets = build_nodes(self.graph, num_classes=self.num_classes, in_channels=self.in_channels,
                           dataset=_dataset_key(self.data.dataset), device=self.device,
                           teacher_dir=self.teacher_dir, val_size=self.data.val_size)
        self.step: TrainStep = make_step(self.step_kind, self.graph, nets, self.cfg, loss_impl=self.loss_impl)
        log.info("step path: %s", self.step.kind)
        self.iters_per_epoch = len(self.train_loader)
        self.k_end = self.cfg.epochs * self.iters_per_epoch

    def _fingerprint(self) -> dict:
        """What must match for a checkpoint to be resumed."""
        return {"graph": self.graph.to_dict(), "dataset": self.data.dataset, "val_size": self.data.val_size,
                "train_subset": self.data.train_subset, "config": self.cfg.to_dict()}

    # ----------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _save_checkpoint(self, epoch: int, step: int) -> None:
        atomic_torch_save({
            "epoch": epoch, "step": step, "fingerprint": self._fingerprint(),
            "nets": self.step.node_state_dicts(), "momentum": self.step.momentum_buffers(),
            "torch_rng": torch.get_rng_state(),
        }, self.checkpoint_path)

    def _resume(self) -> tuple[int, int]:
        ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        mine, theirs = self._fingerprint(), ckpt["fingerprint"]
        for key in mine:
            if mine[key] != theirs.get(key):
                raise ValueError(
                    f"{self.checkpoint_path} was written with a different {key} ({theirs.get(key)!r}, now "
                    f"{mine[key]!r}); resume with the same settings or use another --out folder"
                )
        self.step.load_node_state_dicts(ckpt["nets"])
        self.step.load_momentum_buffers(ckpt["momentum"])
        torch.set_rng_state(ckpt["torch_rng"])
        _truncate_metrics(self.out / "metrics.jsonl", ckpt["epoch"])
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
            logits = self.step.eval_logits(x)
            correct += (logits.argmax(-1) == y.unsqueeze(0)).sum(-1)
            total += y.shape[0]
        return (correct.double() * 100.0 / max(total, 1)).tolist()

    # ------------------------------------------------------------------ run
    def run(self, resume: bool = False) -> dict:
        """Train for ``cfg.epochs`` (continuing a checkpoint when ``resume``); return the final record."""
        self.out.mkdir(parents=True, exist_ok=True)
        if self.checkpoint_path.exists() and not resume:
            raise RunExistsError(f"{self.out} already holds a run: pass --resume to continue it, or choose another --out")
        self._load_data()
        self._build()
        self.graph.save(self.out / "graph.yaml")
        start_epoch, step = (self._resume() if resume and self.checkpoint_path.exists() else (0, 0))
        if start_epoch >= self.cfg.epochs:
            log.info("%s is already complete", self.out)
            final = self.out / "final.json"
            # A kill after the last checkpoint but before final.json: finish from the last record.
            return _read_json(final) if final.exists() else self._finish(read_metrics(self.out / "metrics.jsonl")[-1])
        fault_at = int(os.environ.get("KTG_TEST_KILL_AT_STEP", "0"))  # tests: a real SIGKILL mid-run

        m = self.graph.num_nodes
        progress_t = torch.zeros((), device=self.device)
        epochs = range(start_epoch, self.cfg.epochs)
        bar = tqdm(epochs, desc=f"train {self.out.name}", unit="epoch", disable=not self.progress,
                   initial=start_epoch, total=self.cfg.epochs)
        record: dict = {}
        for epoch in bar:
            lr_scale = lr_at_epoch(1.0, epoch, self.milestones, self.cfg.gamma)
            base = self.cfg.node_lr or [self.cfg.lr] * m
            self.step.set_lrs([base[t - 1] * lr_scale for t in self.graph.trainable])
            self.train_loader.set_epoch(epoch)
            loss_sum = torch.zeros(m, dtype=torch.float64, device=self.device)
            correct = torch.zeros(m, dtype=torch.long, device=self.device)
            bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
            bad_nodes = torch.zeros(m, dtype=torch.bool, device=self.device)
            seen = 0
            t0 = time.perf_counter()
            batches = tqdm(self.train_loader, desc=f"epoch {epoch + 1}", leave=False, unit="batch",
                           disable=not self.progress)
            for i, (x, y) in enumerate(batches):
                step += 1
                if step == fault_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                progress_t.fill_(step / self.k_end)
                node_loss, logits = self.step(x, y, progress_t)
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
                    if self.progress:
                        batches.set_postfix(loss=f"{(loss_sum.sum() / (i + 1)).item():.3f}")
            batches.close()
            self._check_finite(bad_step, bad_nodes, epoch)
            elapsed = time.perf_counter() - t0
            record = {
                "epoch": epoch + 1, "step": step, "lr": self.cfg.lr * lr_scale,
                "train_loss": (loss_sum / max(self.iters_per_epoch, 1)).tolist(),
                "train_acc": (correct.double() * 100.0 / max(seen, 1)).tolist(),
                "images_per_s": seen / elapsed if elapsed > 0 else None, "time_s": elapsed,
            }
            for split in self.eval_loaders:
                record[f"{split}_acc"] = self.evaluate(split)
            append_jsonl(self.out / "metrics.jsonl", record)
            if self.save_checkpoints:
                self._save_checkpoint(epoch + 1, step)
            bar.set_postfix(_short(record, self.graph.target))
            if self.on_epoch_end is not None:
                self.on_epoch_end(record)
        bar.close()
        return self._finish(record)

    def _check_finite(self, bad_step: torch.Tensor, bad_nodes: torch.Tensor, epoch: int) -> None:
        k = int(bad_step)
        if k < 0:
            return
        nodes = [t + 1 for t in bad_nodes.nonzero().flatten().tolist()]
        names = ", ".join(f"node {t} ({self.graph.nodes[t - 1].model})" for t in nodes)
        raise NonFiniteLossError(
            f"non-finite loss at step {k} (epoch {epoch + 1}) in {names}: lower the learning rate "
            f"(now {self.cfg.lr}) or check the data; the last good checkpoint is {self.checkpoint_path}"
        )

    def _finish(self, record: dict) -> dict:
        nodes_dir = self.out / "nodes"
        for t, (net, node) in enumerate(zip(self.step.nets, self.graph.nodes), start=1):
            self.step.sync_to_nets()
            save_model_checkpoint(nodes_dir / f"node{t}_{node.model}.pt", net, name=node.model,
                                  num_classes=self.num_classes, in_channels=self.in_channels,
                                  dataset=self.data.dataset, epochs=self.cfg.epochs,
                                  test_acc=record.get("test_acc", [None] * len(self.graph.nodes))[t - 1],
                                  val_acc=record.get("val_acc", [None] * len(self.graph.nodes))[t - 1])
        final = {"graph": self.graph.to_dict(), "dataset": self.data.dataset, "seed": self.cfg.seed,
                 "epochs": self.cfg.epochs, "step_path": self.step.kind, "loader": self.loader_kind, **record}
        atomic_write_json(self.out / "final.json", final)
        return final


def _dataset_key(name: str) -> str:
    from .data import canonical_name

    return canonical_name(name)


def _short(record: dict, target: int) -> dict:
    out = {"loss": f"{sum(record['train_loss']):.3f}"}
    for split in ("val", "test"):
        if f"{split}_acc" in record:
            out[split] = f"{record[f'{split}_acc'][target - 1]:.2f}"
    return out


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop metric lines written after the checkpoint (a kill between the two writes)."""
    if not path.exists():
        return
    keep = [json.dumps(r) for r in read_metrics(path) if r["epoch"] <= epoch]
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict]:
    """Records of a ``metrics.jsonl`` (none if it is missing); a line cut short by a kill is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())
