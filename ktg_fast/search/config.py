"""Every setting of a search, saved as ``<out>/search.json`` so a rerun resumes it.

Settings fall in two kinds.  *Study* settings (the search space, data, recipe,
epochs, pruner, heartbeat) must be the same for every worker of a study: they
are stored in the study itself and a worker with different ones is refused.
*Local* settings (output folder, devices, workers, teacher folder...) belong to
one machine.  ``trials`` is the study's budget: stored in the study and raised
or lowered by any command that passes ``--trials``.
"""
from __future__ import annotations

import json
import os
import socket
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..data import canonical_name, default_val_size
from ..data.spec import DataSpec
from ..data.synthetic import DEFAULT_SIZE
from ..io import atomic_write_json
from ..recipe import TrainConfig
from ..nodes import default_teacher_dir
from .budget import expected_epochs_per_trial
from .space import DEFAULT_GATES, DEFAULT_MODELS, SearchError, SearchSpace
from .storage import default_storage_url, sqlite_path

__all__ = ["SearchConfig", "STUDY_KEYS", "CONFIG_FILE", "load_config", "sampler_seed"]

CONFIG_FILE = "search.json"

# Keys that define a study; every worker must agree on them.
STUDY_KEYS = (
    "nodes", "target", "models", "gates", "temperature",
    "dataset", "val_size", "train_subset", "eval_subset",
    "epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "milestones", "gamma", "augment", "precision",
    "min_resource", "reduction_factor", "min_early_stopping_rate", "teacher_epochs",
    "heartbeat", "grace",
)


@dataclass
class SearchConfig:
    """All settings of ``python -m ktg_fast.search`` (defaults: the paper's search)."""

    out: str
    dataset: str = ""
    # search space
    nodes: int = 3
    target: str = "resnet32"
    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    gates: list[str] = field(default_factory=lambda: list(DEFAULT_GATES))
    temperature: float = 1.0
    # budget and pruner
    trials: int = 1500
    epochs: int = 200
    sampler: str = "random"
    min_resource: int = 1
    reduction_factor: int = 2
    min_early_stopping_rate: int = 0
    # data (val_size None: the dataset's default search split)
    data_root: Optional[str] = None
    val_size: Optional[int] = None
    train_subset: Optional[int] = None
    eval_subset: Optional[int] = None
    loader: str = "auto"
    # recipe: the paper's defaults, taken from TrainConfig so the two never drift apart
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    momentum: float = TrainConfig.momentum
    nesterov: bool = TrainConfig.nesterov
    weight_decay: float = TrainConfig.weight_decay
    milestones: Optional[list[int]] = None
    gamma: float = TrainConfig.gamma
    augment: bool = TrainConfig.augment
    seed: int = TrainConfig.seed
    # teachers of frozen nodes
    teachers: Optional[str] = None
    teacher_epochs: Optional[int] = None
    pretrain: bool = True
    # storage and fault tolerance
    storage: Optional[str] = None
    study: Optional[str] = None
    heartbeat: int = 60
    grace: Optional[int] = None
    max_retry: int = 3
    # execution
    workers: int = 1
    pack: int | str = "auto"  # trials trained at once per worker, or "auto" (a probe on the device; see pack_probe)
    device: str = "auto"
    step: str = "auto"
    precision: Optional[str] = None  # None: fp32 on the CPU, bf16 on a CUDA device that has it
    channels_last: bool = False
    compile_cache: Optional[str] = None  # None: <out>/inductor-cache, shared by every trial and worker
    cpu_threads: Optional[int] = None
    poll_s: float = 5.0
    # written by the search for the record: the sampler seed of each local worker (see sampler_seed)
    sampler_seeds: Optional[list[int]] = None

    # ------------------------------------------------------------ derived
    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def space(self) -> SearchSpace:
        return SearchSpace(nodes=self.nodes, target=self.target, models=tuple(self.models),
                           gates=tuple(self.gates), temperature=self.temperature)

    def storage_url(self) -> str:
        return self.storage or default_storage_url(self.out)

    def study_name(self) -> str:
        """``--study``, else the one saved in search.json, else (a new search) the --out folder's name."""
        return self.study or Path(self.out).resolve().name

    def sampler_seed(self, worker: int) -> int:
        """Worker ``worker``'s sampler seed, from ``--seed`` and its index (plus the host name when the
        storage may be shared by several machines, so that they do not draw the same graphs)."""
        shared = sqlite_path(self.storage_url()) is None
        return sampler_seed(self.seed, worker, socket.gethostname() if shared else None)

    def resolved_val_size(self) -> int:
        if self.val_size is not None:
            return self.val_size
        name = canonical_name(self.dataset)
        if name == "synthetic":
            return default_val_size(name, DEFAULT_SIZE["train"])
        return default_val_size(name)

    def teacher_dir(self) -> Path:
        """``--teachers``; else ``<out>/teachers`` for subset runs (their teachers are not the real ones);
        else ``$KTG_TEACHERS`` or ./teachers."""
        if self.teachers:
            return Path(self.teachers)
        if self.train_subset:
            return self.out_dir / "teachers"
        return default_teacher_dir()

    def resolved_teacher_epochs(self) -> int:
        return self.teacher_epochs or self.epochs

    def data_spec(self):
        return DataSpec(dataset=self.dataset, root=self.data_root, val_size=self.resolved_val_size(), test=False,
                        train_subset=self.train_subset, eval_subset=self.eval_subset, loader=self.loader)

    def train_config(self, seed: int, epochs: Optional[int] = None, *, data_seed: Optional[int] = None,
                     data_offset: int = 0) -> TrainConfig:
        """A trial's recipe; ``data_seed``/``data_offset``: the batches of a packed trial (see ``pack_trainer``)."""
        return TrainConfig(epochs=epochs or self.epochs, batch_size=self.batch_size, lr=self.lr,
                           momentum=self.momentum, nesterov=self.nesterov, weight_decay=self.weight_decay,
                           milestones=self.milestones, gamma=self.gamma, seed=seed, augment=self.augment,
                           precision=self.precision, channels_last=self.channels_last, data_seed=data_seed,
                           data_offset=data_offset)

    def expected_epochs_per_trial(self) -> float:
        """Mean epochs a trial trains under this search's ASHA rungs (:mod:`.budget`; 4.78 of 200 in the
        paper's setting)."""
        return expected_epochs_per_trial(self.epochs, self.min_resource, self.reduction_factor,
                                         self.min_early_stopping_rate)

    def compile_cache_folder(self) -> Path:
        """Inductor's cache folder for every trial's compiled step (``--compile-cache``)."""
        return Path(self.compile_cache) if self.compile_cache else Path(self.out) / "inductor-cache"

    def study_spec(self) -> dict[str, Any]:
        """The study settings, normalised (canonical names, resolved split and teacher epochs)."""
        space = self.space()
        d = {k: getattr(self, k) for k in STUDY_KEYS}
        d.update(space.to_dict())
        d["dataset"] = canonical_name(self.dataset)
        d["val_size"] = self.resolved_val_size()
        d["teacher_epochs"] = self.resolved_teacher_epochs()
        d["grace"] = self.grace or 2 * self.heartbeat
        return json.loads(json.dumps(d))

    # ---------------------------------------------------------- checking
    def validate(self) -> None:
        """Raise :class:`SearchError` naming the first bad setting."""
        if not self.dataset:
            raise SearchError("--dataset is required for a new search (e.g. --dataset cifar100)")
        try:
            canonical_name(self.dataset)
        except ValueError as e:
            raise SearchError(f"--dataset: {e}") from None
        self.space()
        positive = {"trials": self.trials, "epochs": self.epochs, "batch_size": self.batch_size,
                    "min_resource": self.min_resource, "workers": self.workers, "heartbeat": self.heartbeat}
        for k, v in positive.items():
            if not isinstance(v, int) or v < 1:
                raise SearchError(f"--{k.replace('_', '-')} must be a positive integer; got {v}")
        if self.reduction_factor < 2:
            raise SearchError(f"--reduction-factor must be at least 2; got {self.reduction_factor}")
        if self.min_early_stopping_rate < 0:
            raise SearchError(f"--min-early-stopping-rate must be >= 0; got {self.min_early_stopping_rate}")
        if self.grace is not None and self.grace <= self.heartbeat:
            raise SearchError(f"--grace ({self.grace} s) must exceed --heartbeat ({self.heartbeat} s), "
                              "or live workers would be taken for dead")
        if not (self.pack == "auto" or (isinstance(self.pack, int) and not isinstance(self.pack, bool)
                                        and self.pack >= 1)):
            raise SearchError(f"--pack must be a positive integer (trials trained at once per worker) or auto; "
                              f"got {self.pack!r}")
        if self.max_retry < 0:
            raise SearchError(f"--max-retry must be >= 0; got {self.max_retry}")
        if self.sampler not in ("random", "tpe"):
            raise SearchError(f"--sampler must be random or tpe; got {self.sampler!r}")
        for k in ("train_subset", "eval_subset", "cpu_threads", "teacher_epochs"):
            v = getattr(self, k)
            if v is not None and v < 1:
                raise SearchError(f"--{k.replace('_', '-')} must be a positive integer; got {v}")
        if self.val_size is not None and self.val_size < 1:
            raise SearchError(f"--val-size must be positive (a search never uses the test set); got {self.val_size}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise SearchError("--lr must be positive, --weight-decay >= 0 and --momentum in [0, 1)")

    def check_budget(self, trials: int) -> None:
        """Refuse a budget larger than the number of distinct graphs (small spaces only)."""
        distinct = self.space().count_distinct()
        if distinct is not None and trials > distinct:
            raise SearchError(f"the search space holds only {distinct} distinct trainable graphs, fewer than "
                              f"--trials {trials}: lower --trials or widen --models/--gates/--nodes")

    # --------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise SearchError(f"unknown settings {sorted(unknown)} in {CONFIG_FILE}; it was written by a "
                              "newer ktg_fast, or edited by hand")
        return cls(**d)

    def save(self) -> Path:
        return atomic_write_json(self.out_dir / CONFIG_FILE, self.to_dict())


def load_config(out: str | os.PathLike) -> Optional[SearchConfig]:
    """The settings saved in ``<out>/search.json``, or None when there are none."""
    path = Path(out) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SearchError(f"{path} is not valid JSON ({e}); delete it to start a new search in {out}") from None
    d["out"] = str(out)
    return SearchConfig.from_dict(d)


def sampler_seed(seed: int, worker: int, host: Optional[str] = None) -> int:
    """The sampler seed of worker ``worker``: from ``--seed`` and the worker's index (and, for a storage
    shared by several machines, the host name), distinct per worker and the same on every rerun."""
    entropy = [int(seed) & 0xFFFFFFFF, int(worker)] + ([zlib.crc32(host.encode())] if host else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def spec_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two study specs, as 'key: a vs b'."""
    out = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            out.append(f"{k}: {a.get(k)!r} vs {b.get(k)!r}")
    return out
