"""Loaders: exact seeded epochs, identical batches across tensor / torch / DALI, augmentation
frequencies, static buffers, and the ``--loader`` choice."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from ktg_fast.data import (ArrayDataset, BatchLoader, CropFlip, DaliUnavailableError, ImageFolder,
                           load_image_folder, make_loader)
from ktg_fast.data import factory
from ktg_fast.data.dali import dali_status

from test_data import (chi_square_critical, chi_square_uniform, decode_offsets, numpy_crop_flip,
                       write_tiny_imagenet)

DALI_OK, DALI_MSG = dali_status()
needs_dali = pytest.mark.skipif(not DALI_OK, reason=f"DALI CPU mode not testable: {DALI_MSG}")
needs_cuda = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
KINDS = ["tensor", "torch", pytest.param("dali", marks=needs_dali)]


def tagged(n: int, size: int = 12, classes: int = 7) -> ArrayDataset:
    """Channel 0/1: each pixel's row/column; channel 2: the sample's index (n <= 256)."""
    assert n <= 256
    r = torch.arange(size).view(size, 1).expand(size, size)
    c = torch.arange(size).view(1, size).expand(size, size)
    img = torch.stack([r, c, torch.zeros_like(r)]).expand(n, 3, size, size).clone()
    img[:, 2] = torch.arange(n).view(n, 1, 1)
    return ArrayDataset(img.to(torch.uint8), torch.arange(n) % classes, classes, "tagged")


def ids(x: torch.Tensor) -> list[int]:
    """Sample indices of a batch of ``tagged`` images."""
    return (x[:, 2, 0, 0] * 255).round().long().tolist()


def collect(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def batches_equal(a, b, atol: float = 0.0) -> bool:
    return len(a) == len(b) and all(
        torch.allclose(xa, xb, atol=atol, rtol=0) and torch.equal(ya, yb)
        for (xa, ya), (xb, yb) in zip(a, b))


def build(kind: str, ds, batch_size: int, **kw):
    loader, chosen, _ = make_loader(kind, ds, batch_size, **kw)
    assert chosen == kind
    return loader


# ------------------------------------------------------------------ exact epochs


@pytest.mark.parametrize("kind", KINDS)
def test_training_epoch_visits_each_sample_once(kind):
    ds = tagged(100)
    loader = build(kind, ds, 16, train=True, seed=0)
    assert len(loader) == 6  # 100 // 16, the incomplete batch dropped
    for _ in range(2):  # two epochs: different orders, each without repeats
        got = collect(loader)
        seen = [i for x, _ in got for i in ids(x)]
        assert len(got) == 6 and all(x.shape == (16, 3, 12, 12) for x, _ in got)
        assert len(set(seen)) == 96 and set(seen) <= set(range(100))
        assert all(x.dtype == torch.float32 and y.dtype == torch.int64 for x, y in got)
        assert all(torch.equal(y, torch.tensor(ids(x)) % 7) for x, y in got)
    exact = build(kind, tagged(96), 16, train=True, seed=3)
    assert sorted(i for x, _ in exact for i in ids(x)) == list(range(96))


@pytest.mark.parametrize("kind", KINDS)
def test_evaluation_covers_whole_split_in_order(kind):
    ds = tagged(100)
    loader = build(kind, ds, 16, train=False, seed=0)
    got = collect(loader)
    assert len(loader) == len(got) == 7 and got[-1][0].shape[0] == 4
    assert [i for x, _ in got for i in ids(x)] == list(range(100))
    x = torch.cat([x for x, _ in got])
    assert torch.allclose(x, ds.images.float() / 255, atol=1e-6, rtol=0)  # never augmented


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_batches_other_seed_differs(kind):
    ds = tagged(64)
    a = build(kind, ds, 8, train=True, seed=5)
    b = build(kind, ds, 8, train=True, seed=5)
    c = build(kind, ds, 8, train=True, seed=6)
    ea, eb, ec = collect(a), collect(b), collect(c)
    assert batches_equal(ea, eb)
    assert not batches_equal(ea, ec)
    assert not batches_equal(collect(a), ea)  # epoch 1 differs from epoch 0


@pytest.mark.parametrize("kind", KINDS)
def test_set_epoch_reproduces_epoch_and_resumes_mid_epoch(kind):
    ds = tagged(64)
    a = build(kind, ds, 8, train=True, seed=1)
    epochs = [collect(a) for _ in range(3)]
    b = build(kind, ds, 8, train=True, seed=1)
    b.set_epoch(2)
    assert b.epoch == 2 and batches_equal(collect(b), epochs[2])
    b.set_epoch(1, batch=5)
    assert batches_equal(collect(b), epochs[1][5:])
    assert b.epoch == 2  # iteration moves on to the next epoch
    with pytest.raises(ValueError, match="batch must be"):
        b.set_epoch(0, batch=9)


@pytest.mark.parametrize("kind", KINDS)
def test_an_unread_iterator_takes_no_epoch(kind):
    """tqdm.auto's bar calls iter() twice (tqdm.asyncio's __init__ and __iter__): set_epoch(e) must still
    run epoch e, not e + 1 (the trainer's bars once shifted every epoch's batches by one)."""
    from tqdm.auto import tqdm

    ds = tagged(64)
    ref = build(kind, ds, 8, train=True, seed=3)
    epochs = [collect(ref) for _ in range(2)]
    a = build(kind, ds, 8, train=True, seed=3)
    a.set_epoch(0)
    iter(a)  # made and dropped unread
    assert batches_equal(collect(tqdm(a, disable=True)), epochs[0])
    a.set_epoch(1)
    assert batches_equal(collect(tqdm(a, disable=False, file=open(os.devnull, "w"))), epochs[1])


# ------------------------------------------------------------------ identical batches


def test_three_loaders_identical_with_forced_crops_and_flips():
    """Forced offsets (corners included) and flips: every kind equals the numpy reference."""
    ds = tagged(48, size=10)
    g = torch.Generator().manual_seed(0)
    offsets = torch.randint(0, 9, (48, 2), generator=g)
    offsets[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0]])
    flips = torch.rand(48, generator=g) < 0.5
    forced = CropFlip(offsets, flips)
    kinds = ["tensor", "torch"] + (["dali"] if DALI_OK else [])
    results = {k: collect(build(k, ds, 12, train=True, seed=2, crop_flip=forced)) for k in kinds}
    ref = results["tensor"]
    for x, y in ref:
        idx = np.array(ids(x))
        want = numpy_crop_flip(ds.images.numpy()[idx], 4, offsets.numpy()[idx], flips.numpy()[idx])
        assert np.array_equal((x * 255).round().to(torch.uint8).numpy(), want)
    for k in kinds[1:]:
        assert batches_equal(results[k], ref, atol=1e-6), k


def test_three_loaders_identical_with_random_augmentation():
    ds = tagged(80)
    kinds = ["tensor", "torch"] + (["dali"] if DALI_OK else [])
    norm = ((0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    results = {k: collect(build(k, ds, 16, train=True, seed=9, normalize=norm)) for k in kinds}
    for k in kinds[1:]:
        assert batches_equal(results[k], results["tensor"], atol=1e-5), k


@pytest.mark.parametrize("kind", KINDS)
def test_random_offsets_and_flips_frequencies(kind):
    """Every shift in [-4, 4]^2 and both flips appear uniformly (chi-square at a fixed seed)."""
    n = 81 * 2 * 4
    base = tagged(256, size=12)
    ds = ArrayDataset(base.images[:1].expand(n, 3, 12, 12).contiguous(), torch.zeros(n, dtype=torch.long),
                      1, "coords")
    loader = build(kind, ds, 216, train=True, seed=0)
    counts = torch.zeros(162, dtype=torch.long)
    for _ in range(3):  # 3 epochs x 1944 samples = 5832 draws, 36 per cell expected
        for x, _ in loader:
            d, f = decode_offsets((x[:, :2] * 255).round().to(torch.uint8))
            assert int(d.abs().max()) <= 4
            cell = ((d[:, 0] + 4) * 9 + (d[:, 1] + 4)) * 2 + f.long()
            counts += torch.bincount(cell, minlength=162)
    assert int(counts.min()) > 0
    assert chi_square_uniform(counts) < chi_square_critical(161)


@pytest.mark.parametrize("kind", KINDS)
def test_no_augmentation_and_normalisation(kind):
    ds = tagged(40)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    loader = build(kind, ds, 8, train=True, seed=0, augment=False, normalize=(mean, std))
    for x, _ in loader:
        raw = ds.images[ids_from_normalised(x, mean, std)].float() / 255
        want = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert torch.allclose(x, want, atol=1e-5, rtol=0)


def ids_from_normalised(x: torch.Tensor, mean, std) -> list[int]:
    return ((x[:, 2, 0, 0] * std[2] + mean[2]) * 255).round().long().tolist()


# ------------------------------------------------------------------ static buffers


@pytest.mark.parametrize("kind", KINDS)
def test_fill_static_buffers(kind):
    ds = tagged(50)
    ref = collect(build(kind, ds, 16, train=False, seed=0))
    loader = build(kind, ds, 16, train=False, seed=0)
    xb, yb = torch.empty(16, 3, 12, 12), torch.empty(16, dtype=torch.long)
    sizes, got = [], []
    while (n := loader.fill_(xb, yb)):
        sizes.append(n)
        got.append((xb[:n].clone(), yb[:n].clone()))
    assert sizes == [16, 16, 16, 2] and batches_equal(got, ref)
    assert loader.fill_(xb, yb) == 16  # the next epoch starts
    # ``out=`` yields the buffers themselves
    train = build(kind, ds, 16, train=True, seed=4, out=(xb, yb))
    plain = collect(build(kind, ds, 16, train=True, seed=4))
    for (x, y), (xr, yr) in zip(train, plain):
        assert x.data_ptr() == xb.data_ptr() and torch.equal(x, xr) and torch.equal(y, yr)
    with pytest.raises(ValueError, match="x buffer must be float32"):
        loader.fill_(torch.empty(8, 3, 12, 12), yb)


# ------------------------------------------------------------------ image folders


def write_png_folder(root, n_per_class: int = 5, size: int = 16):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("b", "a", "c"):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
                d / f"{cls}{i}.png")
    return ImageFolder.from_class_dirs(root, (3, size, size), name="pngs")


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_dali_file_reader_matches_decoded_tensor_loader(tmp_path, train):
    folder = write_png_folder(tmp_path)  # PNG decodes exactly: the batches must be equal
    assert folder.labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    dali = build("dali", folder, 4, train=train, seed=3)
    torch_path = build("torch", folder, 4, train=train, seed=3)
    for _ in range(2):
        a, b = collect(dali), collect(torch_path)
        assert len(a) == (3 if train else 4) and batches_equal(a, b, atol=1e-6)
    if not train:
        assert a[-1][0].shape[0] == 3  # last partial batch kept, reader padding cut off
    for loader in (dali, torch_path):  # a mid-epoch resume starts the reader at that batch
        loader.set_epoch(1, batch=2)
    assert batches_equal(collect(dali), collect(torch_path), atol=1e-6)


@needs_dali
def test_dali_tiny_imagenet_jpeg_decoding_close_to_pil(tmp_path):
    write_tiny_imagenet(tmp_path, np.random.default_rng(5), per_class=3)
    folder = load_image_folder("tiny-imagenet", tmp_path, split="train")
    loader, kind, reason = make_loader("auto", folder, 4, train=True, seed=0)
    assert kind == "dali" and "file reader" in reason
    ref = collect(build("torch", folder, 4, train=True, seed=0))
    got = collect(loader)
    assert len(got) == 2 and all(torch.equal(y, yr) for (_, y), (_, yr) in zip(got, ref))
    # two JPEG decoders may round a few pixels differently, never by much
    diff = torch.cat([(x - xr).abs().flatten() for (x, _), (xr, _) in zip(got, ref)])
    assert float(diff.mean()) < 2 / 255 and float(diff.max()) < 40 / 255


# ------------------------------------------------------------------ choice and errors


def test_auto_choice_and_reasons(tmp_path, monkeypatch):
    ds = tagged(20)
    loader, kind, reason = make_loader("auto", ds, 4, train=True, seed=0, device="cpu")
    assert kind == "torch" and isinstance(loader, BatchLoader) and "no GPU" in reason
    assert loader.storage == "host"
    assert make_loader("tensor", ds, 4, train=True, seed=0)[0].storage == "device"
    folder = write_png_folder(tmp_path, 2)
    monkeypatch.setattr(factory, "dali_status", lambda: (False, "DALI missing; pip install 'ktg_fast[dali]'"))
    loader, kind, reason = make_loader("auto", folder, 2, train=False, seed=0)
    assert kind == "torch" and "decoded into memory" in reason and "ktg_fast[dali]" in reason
    assert len(collect(loader)) == 3


def test_impossible_choices_are_explained(monkeypatch):
    ds = tagged(20)
    with pytest.raises(ValueError, match="auto.*tensor.*dali.*torch"):
        make_loader("fast", ds, 4, train=True, seed=0)
    import ktg_fast.data.dali as dali_mod

    monkeypatch.setattr(dali_mod, "dali_status", lambda: (False, "NVIDIA DALI is not installed; "
                                                                  + dali_mod.INSTALL_HINT))
    with pytest.raises(DaliUnavailableError, match=r"ktg_fast\[dali\]"):
        make_loader("dali", ds, 4, train=True, seed=0)
    with pytest.raises(ValueError, match="exceeds the 20 training samples"):
        BatchLoader(ds, 32, train=True, seed=0)
    with pytest.raises(ValueError, match="normalize"):
        BatchLoader(ds, 4, train=True, seed=0, normalize=((0.5, 0.5), (1.0,)))
    with pytest.raises(ValueError, match="storage"):
        BatchLoader(ds, 4, train=True, seed=0, storage="disk")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"no CUDA device is available: use the CPU \(--device cpu, device='cpu'\)"):
            BatchLoader(ds, 4, train=True, seed=0, device="cuda")


def test_dali_too_old_is_reported(monkeypatch):
    import sys
    import types

    import ktg_fast.data.dali as dali_mod

    fake = types.ModuleType("nvidia.dali")
    fake.__version__ = "1.2.0"
    monkeypatch.setitem(sys.modules, "nvidia.dali", fake)
    ok, msg = dali_mod.dali_status()
    assert not ok and "too old" in msg and "ktg_fast[dali]" in msg


# ------------------------------------------------------------------ CUDA


@pytest.mark.parametrize("storage", ["device", "host"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_loader_equals_cpu(storage, train):
    ds = tagged(100)
    cpu = collect(BatchLoader(ds, 16, train=train, seed=7))
    gpu = BatchLoader(ds, 16, train=train, seed=7, device="cuda", storage=storage)
    assert gpu.storage == storage and (gpu.images.is_pinned() if storage == "host" else True)
    got = collect(gpu)
    assert all(x.is_cuda and y.is_cuda for x, y in got)
    # The same indices, crops and flips; the uint8 -> float arithmetic may round differently in the
    # last bit on CUDA (a scalar division there is a multiplication by the reciprocal): 1 ulp near 1.
    assert batches_equal([(x.cpu(), y.cpu()) for x, y in got], cpu, atol=1e-7)
    loader, kind, _ = make_loader("auto", ds, 16, train=train, seed=7, device="cuda")
    assert kind == "tensor" and loader.storage == "device" and loader.images.is_cuda


@needs_dali
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dali_equals_cpu_tensor_loader(tmp_path):
    ds = tagged(100)
    cpu = collect(BatchLoader(ds, 16, train=True, seed=7))
    got = collect(build("dali", ds, 16, train=True, seed=7, device="cuda"))
    assert batches_equal([(x.cpu(), y.cpu()) for x, y in got], cpu, atol=1e-6)
    folder = write_png_folder(tmp_path)
    a = collect(build("dali", folder, 4, train=True, seed=1, device="cuda"))
    b = collect(build("torch", folder, 4, train=True, seed=1))
    assert batches_equal([(x.cpu(), y.cpu()) for x, y in a], b, atol=1e-6)


# ------------------------------------------------------------------ data-parallel shards
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("world", [2, 3])
def test_shards_together_deliver_the_single_process_batches(kind, world):
    """Each rank's loader (set_shard) delivers its contiguous slice of every global batch, with the
    single-process augmentation; evaluation shards cover the split once, in order."""
    ds = tagged(100)
    whole = collect(build(kind, ds, 16, train=True, seed=4))
    ranks = []
    for r in range(world):
        ld = build(kind, ds, 16, train=True, seed=4)
        ld.set_shard(r, world)
        assert len(ld) == len(whole) == 6
        ranks.append(collect(ld))
    for k, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([ranks[r][k][0] for r in range(world)]), x)
        assert torch.equal(torch.cat([ranks[r][k][1] for r in range(world)]), y)
    seen = []
    for r in range(world):
        ld = build(kind, ds, 16, train=False, seed=0)
        ld.set_shard(r, world)
        got = collect(ld)
        assert len(ld) == len(got)
        seen += [i for x, _ in got for i in ids(x)]
    assert seen == list(range(100))


@needs_dali
def test_dali_file_reader_shards_like_the_tensor_loader(tmp_path):
    folder = write_png_folder(tmp_path)
    for r in range(2):
        dali = build("dali", folder, 4, train=True, seed=3)
        ref = build("torch", folder, 4, train=True, seed=3)
        for ld in (dali, ref):
            ld.set_shard(r, 2)
        assert batches_equal(collect(dali), collect(ref), atol=1e-6)


def test_a_global_batch_smaller_than_the_processes_is_refused():
    ld = build("torch", tagged(20), 2, train=True, seed=0)
    with pytest.raises(ValueError, match="raise --batch-size to at least 3"):
        ld.set_shard(0, 3)
