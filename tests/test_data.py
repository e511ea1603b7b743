"""Datasets in their real on-disk formats, splits, and batched augmentation."""
from __future__ import annotations

import gzip
import math
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from ktg_fast.data import (ArrayDataset, DatasetNotFoundError, ImageFolder, available_datasets,
                           dataset_info, default_root, default_val_size, load_dataset,
                           load_image_folder, make_synthetic, random_crop_flip, reflect_pad,
                           train_val_split)
from ktg_fast.data import cifar, fashion_mnist
from ktg_fast.data.augment import sample_crop_flip

# ---------------------------------------------------------------- writers of the real formats


def write_cifar(root: Path, name: str, rng: np.random.Generator) -> dict[str, tuple]:
    """A tiny CIFAR copy in torchvision's layout; returns the arrays written per split."""
    if name == "cifar10":
        folder, key, k = root / "cifar-10-batches-py", b"labels", 10
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        folder, key, k = root / "cifar-100-python", b"fine_labels", 100
        files = {"train": ["train"], "test": ["test"]}
    folder.mkdir(parents=True)
    written = {}
    for split, names in files.items():
        datas, labels = [], []
        for i, fname in enumerate(names):
            n = 3 + i  # uneven batch sizes catch concatenation mistakes
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            lab = rng.integers(0, k, n).tolist()
            d = {b"data": data, key: lab, b"batch_label": b"x"}
            if name == "cifar100":
                d[b"coarse_labels"] = [0] * n
            with open(folder / fname, "wb") as f:
                pickle.dump(d, f)
            datas.append(data)
            labels += lab
        written[split] = (np.concatenate(datas), np.array(labels))
    return written


def write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def write_tiny_imagenet(root: Path, rng: np.random.Generator, per_class: int = 2) -> Path:
    """Tiny-ImageNet's folder layout with 3 classes (wnids listed unsorted on purpose)."""
    from PIL import Image

    base = root / "tiny-imagenet-200"
    wnids = ["n0300", "n0100", "n0200"]
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        (base / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                d / f"{w}_{i}.JPEG")
    (base / "val" / "images").mkdir(parents=True)
    lines = []
    for i, w in enumerate(["n0200", "n0100", "n0300", "n0200"]):
        arr = rng.integers(0, 256, (64, 64), dtype=np.uint8)  # a grayscale JPEG, as in the real set
        Image.fromarray(arr).save(base / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_reads_torchvision_layout(tmp_path, name):
    written = write_cifar(tmp_path, name, np.random.default_rng(0))
    for split in ("train", "test"):
        ds = load_dataset(name, tmp_path, split=split)
        data, labels = written[split]
        assert ds.name == name and ds.num_classes == (10 if name == "cifar10" else 100)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(data), 3, 32, 32)
        assert np.array_equal(ds.images.numpy().reshape(len(data), -1), data)
        assert np.array_equal(ds.labels.numpy(), labels) and ds.labels.dtype == torch.int64
        assert len(ds) == len(data)
    # root may also be the batches folder itself
    inner = next(p for p in tmp_path.iterdir() if p.is_dir())
    assert len(load_dataset(name, inner, split="test")) == len(written["test"][0])


def test_cifar_missing_lists_paths_and_remedy(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(cifar, "_download", offline)
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("CIFAR-10", tmp_path, download=True)
    msg = str(e.value)
    assert isinstance(e.value, FileNotFoundError)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in msg
    assert "download=True" in msg and "network unreachable" in msg and "--data-root" in msg


def test_cifar_download_then_load(tmp_path, monkeypatch):
    calls = []

    def fake_download(name, root, train):  # what torchvision would leave on disk
        calls.append((name, root, train))
        write_cifar(root, name, np.random.default_rng(4))

    monkeypatch.setattr(cifar, "_download", fake_download)
    ds = load_dataset("cifar100", tmp_path, split="test", download=True)
    assert calls == [("cifar100", tmp_path, False)] and len(ds) == 3
    load_dataset("cifar100", tmp_path, split="test", download=True)
    assert len(calls) == 1  # present now: no second download


def test_cifar_corrupt_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for f in ("train", "test"):
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(ValueError, match="fine_labels"):
        load_dataset("cifar100", tmp_path)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_torchvision_layout(tmp_path, gz, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    rng = np.random.default_rng(1)
    raw = tmp_path / "FashionMNIST" / "raw"
    arrays = {}
    for prefix, n in (("train", 7), ("t10k", 5)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labs = rng.integers(0, 10, n).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labs, gz)
        arrays[prefix] = (imgs, labs)
    for alias, split, prefix in (("fashion_mnist", "train", "train"),
                                 ("FashionMNIST", "test", "t10k")):
        ds = load_dataset(alias, tmp_path, split=split)
        assert ds.name == "fashion-mnist" and ds.images.shape == (len(arrays[prefix][0]), 1, 28, 28)
        assert np.array_equal(ds.images[:, 0].numpy(), arrays[prefix][0])
        assert np.array_equal(ds.labels.numpy(), arrays[prefix][1])


def test_fashion_mnist_bad_idx_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    d = tmp_path / "fashion-mnist"
    write_idx(d / "train-labels-idx1-ubyte", np.zeros(4, np.uint8), gz=False)
    (d / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 4, 28, 28)
                                                + b"\x00" * 100)
    with pytest.raises(ValueError, match="truncated"):
        load_dataset("fashion-mnist", tmp_path)
    (d / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="magic"):
        load_dataset("fashion-mnist", tmp_path)


def test_fashion_mnist_missing_message(tmp_path, monkeypatch):
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian")
    (tmp_path / "root").mkdir()  # a root without the files (a root that does not exist: the next test)
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("fashion-mnist", tmp_path / "root", split="test")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg and "--data-root" in msg
    assert str(tmp_path / "root" / "FashionMNIST" / "raw") in msg
    assert str(tmp_path / "no-debian") in msg and "t10k-images-idx3-ubyte" in msg


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "tiny-imagenet"])
def test_a_data_root_that_does_not_exist_is_named(tmp_path, name, caplog):
    """A --data-root that does not exist is an error naming it, not a quiet fall-back to Debian's copy."""
    with pytest.raises(DatasetNotFoundError, match=r"the data root .*nosuch does not exist: fix --data-root"):
        load_dataset(name, tmp_path / "nosuch")
    assert load_dataset("synthetic", tmp_path / "nosuch", size=4).images.shape[0] == 4  # no files to find


@pytest.mark.skipif(not fashion_mnist.DEBIAN_DIR.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_debian_package(tmp_path, caplog):
    caplog.set_level("INFO", logger="ktg_fast")
    ds = load_dataset("fashion-mnist", tmp_path, split="test")
    assert ds.images.shape == (10_000, 1, 28, 28)
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 1000))
    assert dataset_info("fashion-mnist") == (1, 28, 10)
    assert f"fashion-mnist test: {fashion_mnist.DEBIAN_DIR}" in caplog.text  # the log names the copy read


# ---------------------------------------------------------------- Tiny-ImageNet


def test_tiny_imagenet_folder_layout(tmp_path):
    from PIL import Image

    base = write_tiny_imagenet(tmp_path, np.random.default_rng(2))
    train = load_dataset("tiny-imagenet", tmp_path, split="train", num_threads=2)
    assert train.images.shape == (6, 3, 64, 64) and train.num_classes == 3
    # class ids follow the sorted wnids, not the file's order
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    first = base / "train" / "n0100" / "images" / "n0100_0.JPEG"
    expect = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(train.images[0].numpy(), expect)
    test = load_dataset("tiny-imagenet", tmp_path, split="test")
    assert test.labels.tolist() == [1, 0, 2, 1]
    # the grayscale file became 3 equal channels
    assert torch.equal(test.images[0, 0], test.images[0, 2])
    folder = load_image_folder("tiny_imagenet", tmp_path, split="test")
    assert isinstance(folder, ImageFolder) and folder.files[2].endswith("val_2.JPEG")
    assert torch.equal(folder.decode().images, test.images)


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="wnids.txt"):
        load_dataset("tiny-imagenet", tmp_path)
    base = write_tiny_imagenet(tmp_path, np.random.default_rng(3), per_class=1)
    from PIL import Image

    Image.new("RGB", (32, 32)).save(base / "train" / "n0200" / "images" / "small.JPEG")
    with pytest.raises(ValueError, match="small.JPEG.*64x64"):
        load_dataset("tiny-imagenet", tmp_path)
    with pytest.raises(ValueError, match="stored as arrays"):
        load_image_folder("cifar10", tmp_path)


# ---------------------------------------------------------------- synthetic and registry


def test_synthetic_seeded_and_shaped():
    a = make_synthetic(5, 50, (1, 12, 10), seed=3)
    b = load_dataset("synthetic", split="train", num_classes=5, size=50, image_shape=(1, 12, 10),
                     seed=3)
    assert a.images.shape == (50, 1, 12, 10) and torch.equal(a.images, b.images)
    assert torch.equal(torch.bincount(a.labels), torch.full((5,), 10))
    c = make_synthetic(5, 50, (1, 12, 10), seed=4)
    assert not torch.equal(a.images, c.images)
    t = make_synthetic(5, 50, (1, 12, 10), seed=3, split="test")
    assert not torch.equal(a.images, t.images)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(1)


def test_synthetic_is_learnable():
    """A linear classifier trained a few dozen steps beats chance by far on the test split."""
    torch.manual_seed(0)
    train = make_synthetic(10, 1000, (3, 16, 16), seed=0)
    test = make_synthetic(10, 300, (3, 16, 16), seed=0, split="test")
    model = torch.nn.Linear(3 * 16 * 16, 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    xs = train.images.flatten(1).float() / 255 - 0.5
    xt = test.images.flatten(1).float() / 255 - 0.5

    def acc() -> float:
        return (model(xt).argmax(1) == test.labels).float().mean().item()

    before = acc()
    for step in range(60):
        idx = torch.randint(0, len(train), (64,))
        loss = torch.nn.functional.cross_entropy(model(xs[idx]), train.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = acc()
    assert after > 0.6 and after > before + 0.3, (before, after)


def test_registry_names_and_info(monkeypatch, tmp_path):
    assert set(available_datasets()) == {"cifar10", "cifar100", "fashion-mnist", "tiny-imagenet",
                                         "synthetic"}
    assert dataset_info("CIFAR100") == (3, 32, 100)
    assert dataset_info("tiny_imagenet") == (3, 64, 200)
    assert dataset_info("synthetic", num_classes=4, image_shape=(1, 8, 8)) == (1, 8, 4)
    ds = load_dataset("synthetic", num_classes=4, size=8, image_shape=(1, 8, 8))
    assert (ds.images.shape[1], ds.images.shape[2], ds.num_classes) == (1, 8, 4)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*cifar10"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="split"):
        load_dataset("synthetic", split="val")
    with pytest.raises(TypeError, match="size"):
        load_dataset("cifar10", tmp_path, size=3)
    monkeypatch.setenv("KTG_DATA_ROOT", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"
    with pytest.raises(DatasetNotFoundError, match="elsewhere"):
        load_dataset("cifar100")
    monkeypatch.delenv("KTG_DATA_ROOT")
    assert default_root() == Path("data")


def test_array_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ArrayDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64), 2, "x")
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        ArrayDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), 2, "x")


# ---------------------------------------------------------------- splits


def test_train_val_split_seeded_disjoint():
    ids = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 4, 4)
    tagged = ArrayDataset(ids.contiguous(), torch.arange(100) % 4, 4, "t")
    tr, va = train_val_split(tagged, 20, seed=7)
    ids_tr, ids_va = tr.images[:, 0, 0, 0].long(), va.images[:, 0, 0, 0].long()
    assert len(tr) == 80 and len(va) == 20
    assert set(ids_tr.tolist()).isdisjoint(ids_va.tolist())
    assert sorted(ids_tr.tolist() + ids_va.tolist()) == list(range(100))
    assert torch.equal(tr.labels, ids_tr % 4)  # labels travel with their images
    tr2, va2 = train_val_split(tagged, 20, seed=7)
    assert torch.equal(va2.images, va.images)
    _, va3 = train_val_split(tagged, 20, seed=8)
    assert not torch.equal(va3.images, va.images)
    with pytest.raises(ValueError, match="val_size"):
        train_val_split(tagged, 100, seed=0)


def test_split_of_image_folder_and_default_sizes(tmp_path):
    folder = ImageFolder([f"f{i}" for i in range(10)], torch.arange(10), 10, "t", (3, 8, 8))
    tr, va = train_val_split(folder, 3, seed=0)
    assert len(va) == 3 and sorted(tr.files + va.files) == sorted(folder.files)
    assert all(int(f[1:]) == int(y) for f, y in zip(va.files, va.labels))
    assert default_val_size("cifar10") == 10_000 == default_val_size("tiny-imagenet")
    assert default_val_size("fashion_mnist") == 10_000
    assert default_val_size("synthetic", 1000) == 200
    with pytest.raises(ValueError, match="num_samples"):
        default_val_size("synthetic")


# ---------------------------------------------------------------- augmentation


def numpy_crop_flip(x: np.ndarray, pad: int, offsets: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """The plain reference: numpy reflect pad, slice, flip, one sample at a time."""
    _, _, h, w = x.shape
    p = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.stack([p[b, :, oy:oy + h, ox:ox + w] for b, (oy, ox) in enumerate(offsets)])
    out[flips] = out[flips][..., ::-1]
    return out


@pytest.mark.parametrize("shape,pad", [((2, 3, 8, 8), 4), ((3, 1, 5, 7), 2), ((1, 2, 6, 6), 5),
                                       ((2, 3, 4, 4), 0)])
def test_reflect_pad_equals_numpy(shape, pad):
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    want = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    assert np.array_equal(reflect_pad(x, pad).numpy(), want)
    xf = x.float()
    assert torch.equal(reflect_pad(xf, pad), torch.nn.functional.pad(xf, (pad,) * 4, mode="reflect"))
    with pytest.raises(ValueError, match="pad"):
        reflect_pad(x, min(shape[-2:]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_forced_crop_flip_matches_numpy(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 10, 12), generator=g).to(dtype)
    offsets, flips = sample_crop_flip(64, 4, g)
    offsets[:4] = torch.tensor([[0, 0], [8, 8], [0, 8], [8, 0]])  # the extreme corners
    got = random_crop_flip(x, 4, offsets=offsets, flips=flips)
    assert got.dtype == dtype and got.shape == x.shape
    want = numpy_crop_flip(x.numpy(), 4, offsets.numpy(), flips.numpy())
    assert np.array_equal(got.numpy(), want)
    # centre crop without flip is the identity
    same = random_crop_flip(x, 4, offsets=torch.full((64, 2), 4), flips=torch.zeros(64, dtype=torch.bool))
    assert torch.equal(same, x)


def test_random_crop_flip_seeded_and_validated():
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    a = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    b = random_crop_flip(x, generator=torch.Generator().manual_seed(1))
    c = random_crop_flip(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"\[0, 8\]"):
        random_crop_flip(x, offsets=torch.full((16, 2), 9), flips=torch.zeros(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="B, C, H, W"):
        random_crop_flip(x[0])


def coordinate_images(n: int, size: int = 16) -> torch.Tensor:
    """Images whose channel 0 is the row index and channel 1 the column index of each pixel."""
    r = torch.arange(size).view(size, 1).expand(size, size)
    c = torch.arange(size).view(1, size).expand(size, size)
    return torch.stack([r, c]).to(torch.uint8).expand(n, 2, size, size).contiguous()


def decode_offsets(out: torch.Tensor, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Recover (dy, dx) in [-pad, pad] and the flip of each augmented coordinate image."""
    m = out.shape[-1] // 2
    o = out.long()
    dy = o[:, 0, m, m] - m
    flipped = o[:, 1, m, m + 1] < o[:, 1, m, m]
    dx = torch.where(flipped, o[:, 1, m, m] - (out.shape[-1] - 1 - m), o[:, 1, m, m] - m)
    return torch.stack([dy, dx], 1), flipped


def chi_square_uniform(counts: torch.Tensor) -> float:
    expected = counts.sum().item() / counts.numel()
    return float(((counts.double() - expected) ** 2 / expected).sum())


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(df), Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_random_crop_flip_frequencies():
    """Every shift in [-4, 4]^2 and both flips occur uniformly (chi-square, fixed seed)."""
    n = 81 * 2 * 60
    out = random_crop_flip(coordinate_images(n), 4, generator=torch.Generator().manual_seed(0))
    d, f = decode_offsets(out)
    assert int(d.min()) == -4 and int(d.max()) == 4
    cell = ((d[:, 0] + 4) * 9 + (d[:, 1] + 4)) * 2 + f.long()
    counts = torch.bincount(cell, minlength=162)
    assert counts.numel() == 162 and int(counts.min()) > 0
    assert chi_square_uniform(counts) < chi_square_critical(161)
