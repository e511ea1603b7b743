"""How long the plan takes: a short throughput probe of each model, and the time of each sub-run from it.

The probe trains each model alone for a few batches of random images of the dataset's shape, on the
device and step path the runs will use (without compiling), and times its evaluation forward in the
trainer's evaluation batches. A
run's time is then its epochs times the batches of its split times the sum of its nodes' step times
(a frozen node costs a forward), plus evaluation and the start-up of each process and training run.
A search's trials train the expected epochs of successive halving, each auxiliary node costing the
mean of the models it may draw.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from statistics import median
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from ..data import DatasetNotFoundError
    from .plan import Work

__all__ = ["Sizes", "Speed", "Probe", "dataset_sizes", "probe_speeds", "run_seconds", "device_label", "missing_note",
           "KNOWN_SIZES"]

# Measured on 2 CPU cores: starting a sub-command (Python, torch and ktg_fast imports, reading the dataset)
# takes about 5 s; each training run in it (a seed, a trial: splitting the data, building the nets) about 1.5 s.
PROCESS_S = 5.0
TRAINING_S = 1.5
# The trainer evaluates in batches of 1,000 (on a CPU, per image, up to 2.5x slower than batches of 64).
EVAL_BATCH = 1000
# Image counts (train, test) of the real datasets: Tiny-ImageNet's are always taken from here (loading its
# folder of JPEGs takes minutes); the others' when a dry run does not find the files.
KNOWN_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000), "fashion-mnist": (60_000, 10_000),
               "tiny-imagenet": (100_000, 10_000)}


@dataclass(frozen=True)
class Sizes:
    """Images of the dataset: ``train``/``test`` splits, and ``val`` held out of train by the search."""

    train: int
    test: int
    val: int

    def split(self, split: str, train_subset: Optional[int], eval_subset: Optional[int]) -> tuple[int, int]:
        """(training images, evaluated images) of the full split (``train``) or the search's (``search``)."""
        n_train, n_eval = (self.train, self.test) if split == "train" else (self.train - self.val, self.val)
        if train_subset:
            n_train = min(n_train, train_subset)
        if eval_subset:
            n_eval = min(n_eval, eval_subset)
        return n_train, n_eval


@dataclass(frozen=True)
class Speed:
    """One model's speed: seconds per training step (a batch of ``--batch-size``) and per evaluated image."""

    train_s: float
    eval_s: float


@dataclass
class Probe:
    """What the probe measured: the device, the step path, the batch and each model's speed."""

    device: str
    step: str
    precision: str
    batch_size: int
    speeds: dict[str, Speed] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Probe":
        return cls(d["device"], d["step"], d["precision"], d["batch_size"],
                   {k: Speed(**v) for k, v in d["speeds"].items()})


def dataset_sizes(dataset: str, root: Optional[str], val: int, *, missing_ok: bool = False,
                  download: bool = False, fetch: bool = False) -> tuple[Sizes, str]:
    """Image counts of ``dataset``'s splits, read from the files, and a note when they could not be.

    ``fetch`` (a real run with ``--download``) downloads a missing dataset now, before any sub-run: a search
    sub-run, which may come first, takes no ``--download``.  Otherwise a missing dataset raises its own
    error (where it looked, how to get it), unless ``missing_ok`` (a dry run) and its sizes are known:
    then they are assumed and the note says so (see :func:`missing_note`).
    """
    if dataset == "tiny-imagenet":
        return Sizes(*KNOWN_SIZES[dataset], val), ""
    from ..data import DatasetNotFoundError, load_dataset

    try:
        return Sizes(*(len(load_dataset(dataset, root, split=split, download=fetch)) for split in ("train", "test")),
                     val), ""
    except DatasetNotFoundError as e:
        if not missing_ok or dataset not in KNOWN_SIZES:
            raise
        return Sizes(*KNOWN_SIZES[dataset], val), missing_note(dataset, e, download=download)


def missing_note(dataset: str, e: "DatasetNotFoundError", *, download: bool) -> str:
    """What a plan made without ``dataset``'s files says: where they were looked for and, with
    ``download``, that the run fetches them before its first sub-run; else the whole error (paths, how
    to get it) and that the run itself stops on it. Both say which image counts the estimate assumes."""
    train, test = KNOWN_SIZES[dataset]
    assumed = f"the estimate assumes its {train:,} training and {test:,} test images"
    if download:
        return (f"dataset {dataset!r} is not there yet (looked in {', '.join(e.looked_in)}): the run fetches it "
                f"(--download) before its first sub-run; {assumed}")
    return f"{e}\nThe plan is made without it ({assumed}); the run itself stops with this error until it is there."


def device_label(device: str) -> str:
    """``NVIDIA H200 (cuda:0)`` or ``CPU (2 threads)``: what the estimate's hours are hours of."""
    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'' if n == 1 else 's'})"


def probe_speeds(models: Sequence[str], *, dataset: str, batch_size: int, device: str = "auto", step: str = "auto",
                 precision: Optional[str] = None, channels_last: bool = False, batches: int = 4) -> Probe:
    """Time ``batches`` training steps of each model (after one warm-up) and two evaluation batches."""
    import torch

    from ..data import dataset_info
    from ..device import resolve_device, use_device
    from ..graph import preset
    from ..models import get_model
    from ..recipe import TrainConfig
    from ..steps import default_precision, make_step

    dev = use_device(resolve_device(device))
    prec = precision or default_precision(dev)
    kind = "fused" if step == "compiled" else step  # the probe never compiles (minutes for seconds of timing)
    c, size, classes = dataset_info(dataset)
    result = Probe(str(dev), kind, prec, batch_size)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, c, size, size, generator=gen).to(dev)
    y = torch.randint(0, classes, (batch_size,), generator=gen).to(dev)
    x_eval = torch.rand(EVAL_BATCH, c, size, size, generator=gen).to(dev)
    for model in dict.fromkeys(models):
        torch.manual_seed(0)
        net = get_model(model, num_classes=classes, in_channels=c).to(dev)
        train_step = make_step(kind, preset("vanilla", model=model), [net], TrainConfig(batch_size=batch_size),
                               precision=prec, channels_last=channels_last, compile=False)
        result.step = train_step.kind
        progress = torch.zeros((), device=dev)
        times = []
        for i in range(batches + 1):
            sync()
            t0 = time.perf_counter()
            train_step(x, y, progress)
            sync()
            if i:  # the first step warms up (allocations, kernel choice, CUDA-graph capture)
                times.append(time.perf_counter() - t0)
        evals = []
        with torch.no_grad():
            for i in range(3):
                sync()
                t0 = time.perf_counter()
                train_step.eval_logits(x_eval)
                sync()
                if i:
                    evals.append(time.perf_counter() - t0)
        result.speeds[model] = Speed(median(times), median(evals) / EVAL_BATCH)
        del train_step, net
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _epoch_s(nodes: Sequence[Sequence[str]], frozen: Sequence[str], probe: Probe, n_train: int, n_eval: int) -> float:
    """Seconds of one epoch: each trained node's step (the mean over its candidate models), each frozen
    node's forward, on every batch; then every node's forward over the evaluated images."""
    sp = probe.speeds

    def mean(models: Sequence[str], attr: str) -> float:
        return sum(getattr(sp[m], attr) for m in models) / len(models)

    steps = max(1, n_train // probe.batch_size)
    frozen_s = sum(sp[m].eval_s for m in frozen)  # per image
    train = steps * (sum(mean(n, "train_s") for n in nodes) + probe.batch_size * frozen_s)
    evaluate = n_eval * (sum(mean(n, "eval_s") for n in nodes) + frozen_s)
    return train + evaluate


def run_seconds(work: Work, probe: Probe, sizes: Sizes, *, train_subset: Optional[int],
                eval_subset: Optional[int]) -> float:
    """Estimated seconds of a sub-run's :class:`~ktg_fast.reproduce.plan.Work` (and the work it entails)."""
    n_train, n_eval = sizes.split(work.split, train_subset, eval_subset)
    per_training = TRAINING_S + work.epochs * _epoch_s(work.nodes, work.frozen, probe, n_train, n_eval)
    total = work.processes * PROCESS_S + work.trainings * per_training
    for extra in work.extra:
        total += run_seconds(extra, probe, sizes, train_subset=train_subset, eval_subset=eval_subset)
    return total if math.isfinite(total) else 0.0
