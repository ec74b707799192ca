"""Tiny random datasets written in torchvision's exact on-disk formats (shared by tests/ and bench/).

`make_fake_dataset(name, root)` lays files out so that the *real* torchvision
loaders read them with ``download=False``; it returns the ground truth in one
canonical layout: images uint8 (N, C, H, W), labels int64 in 0..C-1 exactly as
torchvision reports them.  CIFAR/SVHN/STL-10 loaders verify md5 sums, so load
them inside ``fake_integrity()`` (or the ``patched_integrity`` fixture).
"""

import contextlib
import gzip
import os
import pickle
import struct
from unittest import mock

import numpy as np

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
# (num classes, channels, side) per dataset
SPECS = {
    "cifar10": (10, 3, 32),
    "cifar100": (100, 3, 32),
    "svhn": (10, 3, 32),
    "stl10": (10, 3, 96),
    "mnist": (10, 1, 28),
    "fashion_mnist": (10, 1, 28),
}
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _images(rng, n, c, s):
    return rng.integers(0, 256, size=(n, c, s, s), dtype=np.uint8)


def _labels(rng, n, k):
    """Labels cycling through all k classes (each appears if n >= k), shuffled."""
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _truth(name, n_train, n_test, n_unlabeled, seed):
    k, c, s = SPECS[name]
    rng = np.random.default_rng(seed)
    t = {
        "train_x": _images(rng, n_train, c, s),
        "train_y": _labels(rng, n_train, k),
        "test_x": _images(rng, n_test, c, s),
        "test_y": _labels(rng, n_test, k),
    }
    t["unlabeled_x"] = _images(rng, n_unlabeled if name in ("stl10", "svhn") else 0, c, s)
    if name == "svhn":  # SVHN's extra split has labels (the scripts train on train + extra)
        t["unlabeled_y"] = _labels(rng, len(t["unlabeled_x"]), k)
    return t


def _dump(obj, path):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


# ---------------------------------------------------------------- writers
def _write_cifar10(root, t):
    d = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(d, exist_ok=True)
    # rows are channel-major: R plane (1024), G plane, B plane == (3,32,32).ravel()
    parts = zip(np.array_split(t["train_x"], 5), np.array_split(t["train_y"], 5))
    for i, (x, y) in enumerate(parts, 1):
        _dump(
            {
                "batch_label": f"training batch {i} of 5",
                "labels": y.tolist(),
                "data": x.reshape(len(x), -1),
                "filenames": [f"{j}.png" for j in range(len(x))],
            },
            os.path.join(d, f"data_batch_{i}"),
        )
    x, y = t["test_x"], t["test_y"]
    _dump(
        {
            "batch_label": "testing batch 1 of 1",
            "labels": y.tolist(),
            "data": x.reshape(len(x), -1),
            "filenames": [f"{j}.png" for j in range(len(x))],
        },
        os.path.join(d, "test_batch"),
    )
    _dump(
        {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 10000, "num_vis": 3072}, os.path.join(d, "batches.meta")
    )


def _write_cifar100(root, t):
    d = os.path.join(root, "cifar-100-python")
    os.makedirs(d, exist_ok=True)
    for split, x, y in (("train", t["train_x"], t["train_y"]), ("test", t["test_x"], t["test_y"])):
        _dump(
            {
                "filenames": [f"{j}.png" for j in range(len(x))],
                "batch_label": f"{split} batch",
                "fine_labels": y.tolist(),
                "coarse_labels": (y // 5).tolist(),
                "data": x.reshape(len(x), -1),
            },
            os.path.join(d, split),
        )
    _dump(
        {
            "fine_label_names": [f"class_{i:03d}" for i in range(100)],
            "coarse_label_names": [f"superclass_{i:02d}" for i in range(20)],
        },
        os.path.join(d, "meta"),
    )


def _write_svhn(root, t):
    from scipy.io import savemat

    os.makedirs(root, exist_ok=True)
    for split, x, y in (
        ("train", t["train_x"], t["train_y"]),
        ("test", t["test_x"], t["test_y"]),
        ("extra", t["unlabeled_x"], t["unlabeled_y"]),
    ):
        # .mat holds X as (H, W, C, N) and y as (N, 1) with digit 0 stored as 10
        savemat(
            os.path.join(root, f"{split}_32x32.mat"),
            {
                "X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)),
                "y": np.where(y == 0, 10, y).astype(np.uint8).reshape(-1, 1),
            },
        )


def _write_stl10(root, t, rng):
    d = os.path.join(root, "stl10_binary")
    os.makedirs(d, exist_ok=True)

    def write_x(fname, x):  # column-major images: stored (N, C, W, H) in C order
        np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tofile(os.path.join(d, fname))

    for split in ("train", "test"):
        write_x(f"{split}_X.bin", t[f"{split}_x"])
        (t[f"{split}_y"] + 1).astype(np.uint8).tofile(os.path.join(d, f"{split}_y.bin"))  # 1-based
    write_x("unlabeled_X.bin", t["unlabeled_x"])
    with open(os.path.join(d, "class_names.txt"), "w") as f:
        f.write("\n".join(STL10_CLASSES) + "\n")
    folds = np.array_split(rng.permutation(len(t["train_y"])), 10)
    with open(os.path.join(d, "fold_indices.txt"), "w") as f:
        f.write("".join(" ".join(map(str, fold)) + " \n" for fold in folds))


def _idx_bytes(arr):
    """IDX (SN3 'Pascal Vincent') bytes for a uint8 array: magic 0x0000 08 <ndim>, big-endian dims."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    return struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def _idx_payloads(t):
    return dict(
        zip(
            IDX_FILES,
            (
                _idx_bytes(t["train_x"][:, 0]),
                _idx_bytes(t["train_y"]),
                _idx_bytes(t["test_x"][:, 0]),
                _idx_bytes(t["test_y"]),
            ),
        )
    )


def write_mnist_idx(root, folder, train_x, train_y, test_x, test_y):
    """Write grey-scale images uint8 (N, 1, H, W) and labels 0..255 as the four gunzipped IDX files
    torchvision's MNIST-style loaders read from root/folder/raw/ (folder "MNIST", "FashionMNIST")."""
    d = os.path.join(root, folder, "raw")
    os.makedirs(d, exist_ok=True)
    t = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    for fname, payload in _idx_payloads(t).items():
        with open(os.path.join(d, fname), "wb") as f:
            f.write(payload)


def _write_mnist(root, t, folder):
    write_mnist_idx(root, folder, t["train_x"], t["train_y"], t["test_x"], t["test_y"])


# ---------------------------------------------------------------- public API
def make_fake_dataset(name, root, n_train=None, n_test=50, n_unlabeled=60, seed=0):
    """Write a small random `name` dataset under `root`; return its ground truth.

    n_train defaults to 100 (300 for cifar100). Returned dict: train_x/test_x/
    unlabeled_x uint8 (N, C, H, W) and train_y/test_y int64 in 0..C-1
    (unlabeled_x is empty except for stl10 and svhn, whose extra split it is, with unlabeled_y).
    """
    if name not in SPECS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(SPECS)}")
    if n_train is None:
        n_train = 300 if name == "cifar100" else 100
    root = os.fspath(root)
    t = _truth(name, n_train, n_test, n_unlabeled, seed)
    if name == "cifar10":
        _write_cifar10(root, t)
    elif name == "cifar100":
        _write_cifar100(root, t)
    elif name == "svhn":
        _write_svhn(root, t)
    elif name == "stl10":
        _write_stl10(root, t, np.random.default_rng(seed + 1))
    else:
        _write_mnist(root, t, "MNIST" if name == "mnist" else "FashionMNIST")
    return t


def make_debian_fashion_mnist(dir, n_train=100, n_test=50, seed=0):
    """Write the 4 gzip'd IDX files the way Debian's dataset-fashion-mnist package
    lays them out in /usr/share/datasets/fashion-mnist; return ground truth."""
    dir = os.fspath(dir)
    os.makedirs(dir, exist_ok=True)
    t = _truth("fashion_mnist", n_train, n_test, 0, seed)
    for fname, payload in _idx_payloads(t).items():
        with gzip.GzipFile(os.path.join(dir, fname + ".gz"), "wb", mtime=0) as f:
            f.write(payload)
    return t


def _exists_only(fpath, md5=None):
    return os.path.isfile(fpath)


INTEGRITY_TARGETS = (
    "torchvision.datasets.utils.check_integrity",
    "torchvision.datasets.cifar.check_integrity",
    "torchvision.datasets.svhn.check_integrity",
    "torchvision.datasets.stl10.check_integrity",
)


@contextlib.contextmanager
def fake_integrity():
    """Skip only the md5 comparison: a missing file is still reported missing."""
    with contextlib.ExitStack() as stack:
        for target in INTEGRITY_TARGETS:
            stack.enter_context(mock.patch(target, _exists_only))
        yield
