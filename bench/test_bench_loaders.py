"""Loader throughput (images/s): the tensor loader vs DALI vs torchvision's DataLoader, all in
the same run, at batch 64 and 512 for 32x32 and 64x64 images; on a GPU also the rate at which
the fastest training step (vanilla ResNet-20, best step path) consumes images.

    pytest bench/test_bench_loaders.py --benchmark-only    # CPU: small sizes, under a minute;
                                                           # on a GPU: also bench/results/*.json

Each case times whole epochs (warm-up epoch excluded); on CUDA with CUDA events and a
synchronisation at the end of each epoch. The table and ratios print at the end of the module.
"""
from __future__ import annotations


import numpy as np
import pytest
import torch

from benchutil import CUDA, DEVICE, QUICK, write_result  # noqa: E402

from ktg_fast.data import dali_status, make_loader, make_synthetic

DALI_OK, DALI_MSG = dali_status()
SIZES = [32, 64]
BATCHES = [64, 512]
# images per timed epoch: small on CPU (the whole module stays under a minute on 2 cores)
N_IMAGES = {32: 50_000, 64: 20_000} if CUDA else {32: 2048, 64: 1024}
ROUNDS = 3 if CUDA else 2
if CUDA and QUICK:  # bench/gpu.sh: the CIFAR size only
    SIZES, N_IMAGES = [32], {32: 20_000}
LOADERS = ["tensor", "dali", "dataloader"]
if not CUDA:
    # On a small shared CPU, intra-op thread pools mostly wait for each other (a 2-thread
    # OpenMP region under load costs ~10 ms); the DataLoader's workers run 1 thread each too.
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def table(bench_report):
    """Collects images/s per (loader, size, batch); the table and ratios go to the summary."""
    rows: dict[tuple[str, int, int], dict] = {}
    yield rows
    lines = _format(rows)
    bench_report.extend(lines)
    if CUDA and rows:
        record = {"dali": DALI_MSG,
                  "rows": [{"loader": k[0], "size": k[1], "batch": k[2], **v} for k, v in rows.items()],
                  "table": lines}
        path = write_result("loaders", record)
        bench_report.append(f"written: {path}")


def _format(rows: dict) -> list[str]:
    head = f"{'size':>5} {'batch':>5} " + " ".join(f"{k:>18}" for k in LOADERS + ["train step"])
    clock = "CUDA events" if CUDA else f"wall clock, {torch.get_num_threads()} torch thread(s)"
    lines = [f"loader throughput, images/s on {DEVICE} ({clock})",
             head]
    for size in SIZES:
        for batch in BATCHES:
            cells = []
            for k in LOADERS + ["step"]:
                r = rows.get((k, size, batch))
                cells.append(f"{r['images_per_s']:>12,.0f} ({r['device'][:3]})" if r else f"{'-':>18}")
            lines.append(f"{size:>5} {batch:>5} " + " ".join(cells))
            t, d, l, s = (rows.get((k, size, batch)) for k in LOADERS + ["step"])
            ratios = []
            if t and l:
                ratios.append(f"tensor/DataLoader {t['images_per_s'] / l['images_per_s']:.1f}x")
            if t and d:
                ratios.append(f"tensor/DALI {t['images_per_s'] / d['images_per_s']:.1f}x")
            if d and l:
                ratios.append(f"DALI/DataLoader {d['images_per_s'] / l['images_per_s']:.1f}x")
            if t and s:
                ratios.append(f"tensor/train step {t['images_per_s'] / s['images_per_s']:.1f}x "
                              f"(target >= 5x)")
            if ratios:
                lines.append("            " + ", ".join(ratios))
    if not DALI_OK:
        lines.append(f"DALI not measured: {DALI_MSG}")
    elif not CUDA:
        lines.append("DALI measured in its CPU-only mode (no GPU here)")
    return lines


def _dataset(size: int):
    return make_synthetic(10, N_IMAGES[size], (3, size, size), seed=0)


def _timed_epochs(benchmark, epoch_fn, images: int) -> float:
    """Run ``epoch_fn`` for ROUNDS timed epochs after a warm-up; images per second."""
    seconds: list[float] = []

    def run() -> None:
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            epoch_fn()
            end.record()
            torch.cuda.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            import time

            t0 = time.perf_counter()
            epoch_fn()
            seconds.append(time.perf_counter() - t0)

    if benchmark is None:
        for _ in range(ROUNDS + 1):
            run()
    else:
        benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    return images / float(np.median(seconds[1:]))  # seconds[0] is the warm-up


def _consume(loader) -> int:
    n = 0
    for x, y in loader:
        n += x.shape[0]
    return n


class _PILDataset(torch.utils.data.Dataset):
    """The classic baseline: torchvision-style PIL images through torchvision transforms."""

    def __init__(self, ds, transform) -> None:
        self.images = ds.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = ds.labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def _tensor_loader_rate(benchmark, size: int, batch: int) -> float:
    """Images/s of the tensor loader on DEVICE (whole epochs, warm-up excluded)."""
    ds = _dataset(size)
    n_per_epoch = (len(ds) // batch) * batch
    loader, _, _ = make_loader("tensor", ds, batch, train=True, seed=0, device=DEVICE)

    def epoch() -> None:
        assert _consume(loader) == n_per_epoch

    return _timed_epochs(benchmark, epoch, n_per_epoch)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("kind", LOADERS)
def test_loader_throughput(benchmark, table, kind, size, batch):
    ds = _dataset(size)
    n_per_epoch = (len(ds) // batch) * batch
    if kind == "dataloader":
        import torchvision.transforms as T

        transform = T.Compose([T.RandomCrop(size, padding=4, padding_mode="reflect"),
                               T.RandomHorizontalFlip(), T.ToTensor()])
        dl = torch.utils.data.DataLoader(_PILDataset(ds, transform), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=2, persistent_workers=True,
                                         pin_memory=CUDA)

        def epoch() -> None:
            for x, y in dl:
                x.to(DEVICE, non_blocking=True), y.to(DEVICE, non_blocking=True)
        device = "cpu workers"
    else:
        if kind == "dali" and not DALI_OK:
            pytest.skip(DALI_MSG)
        loader, _, _ = make_loader(kind, ds, batch, train=True, seed=0, device=DEVICE)

        def epoch() -> None:
            assert _consume(loader) == n_per_epoch
        device = str(DEVICE)
    rate = _timed_epochs(benchmark, epoch, n_per_epoch)
    table[(kind, size, batch)] = {"images_per_s": rate, "device": device, "images": n_per_epoch}
    benchmark.extra_info.update(images_per_s=rate, device=device)
    assert rate > 0


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="the training step's consumption rate is measured on a GPU")
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("size", SIZES)
def test_training_step_consumption(benchmark, table, size, batch):
    """Images/s the fastest training step (vanilla ResNet-20, best step path) consumes, and the
    tensor loader's target of 5x that rate."""
    from ktg_fast.graph import preset
    from ktg_fast.models import get_model
    from ktg_fast.recipe import TrainConfig
    from ktg_fast.steps import make_step

    graph = preset("vanilla", model="resnet20")
    nets = [get_model("resnet20", num_classes=10).to(DEVICE)]
    step = make_step("auto", graph, nets, TrainConfig(batch_size=batch))
    x = torch.rand(batch, 3, size, size, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    progress = torch.zeros((), device=DEVICE)
    steps = 50

    def epoch() -> None:
        for _ in range(steps):
            step(x, y, progress)

    rate = _timed_epochs(benchmark, epoch, steps * batch)
    table[("step", size, batch)] = {"images_per_s": rate, "device": str(DEVICE),
                                    "step_path": getattr(step, "kind", "?")}
    tensor = table.get(("tensor", size, batch))
    if tensor is None:  # this test selected alone: measure the loader here rather than compare with nothing
        table[("tensor", size, batch)] = {"images_per_s": _tensor_loader_rate(None, size, batch),
                                          "device": str(DEVICE)}
    # The ratio against the 5x target is printed with the table (and in bench/gpu.sh's summary).
