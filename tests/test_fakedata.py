"""The fakes must go through the REAL torchvision loaders and round-trip exactly."""

import gzip
import os
import shutil

import numpy as np
import pytest
from fakedata import SPECS, fake_integrity, make_debian_fashion_mnist, make_fake_dataset
from torchvision import datasets

LOADERS = {  # name -> split -> dataset constructor
    "cifar10": lambda r, s: datasets.CIFAR10(r, train=s == "train"),
    "cifar100": lambda r, s: datasets.CIFAR100(r, train=s == "train"),
    "svhn": lambda r, s: datasets.SVHN(r, split=s),
    "stl10": lambda r, s: datasets.STL10(r, split=s),
    "mnist": lambda r, s: datasets.MNIST(r, train=s == "train"),
    "fashion_mnist": lambda r, s: datasets.FashionMNIST(r, train=s == "train"),
}
MD5_CHECKED = ["cifar10", "cifar100", "svhn", "stl10"]


def as_canonical(ds):
    """(N, C, H, W) uint8 images and int64 labels, exactly as ds[i] yields them."""
    imgs, labels = zip(*(ds[i] for i in range(len(ds))))
    x = np.stack([np.asarray(im) for im in imgs])
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    return x, np.asarray(labels, dtype=np.int64)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_roundtrip_through_real_loader(name, tmp_path, patched_integrity):
    truth = make_fake_dataset(name, tmp_path, n_train=30 if name != "cifar100" else 120, n_test=20)
    k, c, s = SPECS[name]
    assert truth["train_x"].shape == (len(truth["train_y"]), c, s, s)
    assert set(truth["train_y"].tolist()) == set(range(k))
    for split in ("train", "test"):
        ds = LOADERS[name](str(tmp_path), split)
        x, y = as_canonical(ds)
        assert x.dtype == np.uint8 and y.dtype == np.int64
        np.testing.assert_array_equal(x, truth[f"{split}_x"])
        np.testing.assert_array_equal(y, truth[f"{split}_y"])
        if hasattr(ds, "classes"):
            assert len(ds.classes) == k


def test_default_sizes(tmp_path):
    t = make_fake_dataset("cifar100", tmp_path / "c")
    assert len(t["train_y"]) == 300 and len(t["test_y"]) == 50 and t["unlabeled_x"].shape == (0, 3, 32, 32)
    t = make_fake_dataset("stl10", tmp_path / "s")
    assert len(t["train_y"]) == 100 and t["unlabeled_x"].shape == (60, 3, 96, 96)


def test_raw_data_attributes(tmp_path, patched_integrity):
    """Spot-check the layouts of ds.data that code may use directly."""
    t = make_fake_dataset("cifar10", tmp_path, n_train=12, n_test=4)
    np.testing.assert_array_equal(datasets.CIFAR10(tmp_path).data, t["train_x"].transpose(0, 2, 3, 1))
    t = make_fake_dataset("svhn", tmp_path, n_train=12, n_test=4)
    ds = datasets.SVHN(tmp_path)
    np.testing.assert_array_equal(ds.data, t["train_x"])
    assert 0 in ds.labels and 10 not in ds.labels
    t = make_fake_dataset("mnist", tmp_path, n_train=12, n_test=4)
    np.testing.assert_array_equal(datasets.MNIST(tmp_path).data.numpy(), t["train_x"][:, 0])


def test_stl10_unlabeled_and_folds(tmp_path, patched_integrity):
    t = make_fake_dataset("stl10", tmp_path, n_train=20, n_test=5, n_unlabeled=7)
    x, y = as_canonical(datasets.STL10(tmp_path, split="unlabeled"))
    np.testing.assert_array_equal(x, t["unlabeled_x"])
    assert (y == -1).all()
    ds = datasets.STL10(tmp_path, split="train+unlabeled")
    assert len(ds) == 27 and ds.classes[0] == "airplane"
    for fold in range(10):
        assert len(datasets.STL10(tmp_path, split="train", folds=fold)) == 2


@pytest.mark.parametrize("name", MD5_CHECKED)
def test_md5_is_really_checked(name, tmp_path):
    make_fake_dataset(name, tmp_path, n_train=10 if name != "cifar100" else 100, n_test=5)
    with pytest.raises(RuntimeError):
        LOADERS[name](str(tmp_path), "train")
    with fake_integrity():
        LOADERS[name](str(tmp_path), "train")
    with pytest.raises(RuntimeError):  # patch is undone on exit
        LOADERS[name](str(tmp_path), "train")


def test_patch_still_reports_missing_files(tmp_path):
    make_fake_dataset("stl10", tmp_path, n_train=10, n_test=5)
    os.remove(tmp_path / "stl10_binary" / "unlabeled_X.bin")
    with fake_integrity(), pytest.raises(RuntimeError):
        datasets.STL10(tmp_path, split="train")
    with fake_integrity(), pytest.raises(RuntimeError):
        datasets.SVHN(tmp_path)


def test_mnist_needs_no_patch(tmp_path):
    t = make_fake_dataset("fashion_mnist", tmp_path, n_train=10, n_test=5)
    x, y = as_canonical(datasets.FashionMNIST(tmp_path, train=False))
    np.testing.assert_array_equal(x, t["test_x"])
    np.testing.assert_array_equal(y, t["test_y"])


def test_debian_fashion_mnist(tmp_path):
    deb = tmp_path / "deb"
    t = make_debian_fashion_mnist(deb, n_train=20, n_test=10, seed=3)
    names = sorted(os.listdir(deb))
    assert names == sorted(
        f + ".gz"
        for f in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        )
    )
    raw = tmp_path / "tv" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for n in names:  # decompressed, they must be exactly what torchvision reads
        with gzip.open(deb / n) as src, open(raw / n[:-3], "wb") as dst:
            shutil.copyfileobj(src, dst)
    for split, train in (("train", True), ("test", False)):
        x, y = as_canonical(datasets.FashionMNIST(tmp_path / "tv", train=train))
        np.testing.assert_array_equal(x, t[f"{split}_x"])
        np.testing.assert_array_equal(y, t[f"{split}_y"])


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="Debian package absent")
def test_debian_headers_match_real_package(tmp_path):
    make_debian_fashion_mnist(tmp_path)
    for n in os.listdir("/usr/share/datasets/fashion-mnist"):
        with gzip.open(os.path.join("/usr/share/datasets/fashion-mnist", n)) as real, gzip.open(tmp_path / n) as fake:
            r, f = real.read(16), fake.read(16)
        assert r[:4] == f[:4]  # same magic: uint8 and same rank
        if "images" in n:
            assert r[8:16] == f[8:16]  # 28 x 28
