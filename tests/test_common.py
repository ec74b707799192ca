"""common.py: the labeled split, the datasets through the real torchvision loaders, the WideResNet."""

import errno
import gzip
import hashlib
import json
import os
import shutil
import stat
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from fakedata import SPECS, make_debian_fashion_mnist, make_fake_dataset

import common

# --- labeled split -------------------------------------------------------------------------------


def test_split_is_balanced_deterministic_and_seeded():
    targets = torch.arange(1000) % 10
    idx = common.labeled_split(targets, 40, 10, seed=1)
    assert len(idx) == 40 and len(set(idx.tolist())) == 40
    assert torch.bincount(targets[idx], minlength=10).tolist() == [4] * 10
    assert torch.equal(idx, common.labeled_split(targets, 40, 10, seed=1))
    assert not torch.equal(idx, common.labeled_split(targets, 40, 10, seed=2))
    assert torch.equal(common.labeled_split(targets, None, 10, seed=0), torch.arange(1000))


@pytest.mark.parametrize(
    "num_labels, message",
    [(45, "multiple"), (5, "multiple"), (0, "multiple"), (-10, "multiple"), (1010, "rarest class")],
)
def test_split_rejects_bad_counts(num_labels, message):
    with pytest.raises(ValueError, match=message):
        common.labeled_split(torch.arange(1000) % 10, num_labels, 10, seed=0)


def test_a_split_read_from_a_file_is_those_images_sorted_whatever_the_seed(data_dir, tmp_path):
    """--labeled-indices: a JSON list of distinct training indices, in any order, not class-balanced (all of class
    0 and one of class 1 here), is the split; the seed draws nothing."""
    train_y = common.load_ssl_data("fashion_mnist", data_dir, 20, 0, "cpu").y_unlabeled
    idx = torch.nonzero(train_y == 0).flatten()[:6].tolist() + torch.nonzero(train_y == 1).flatten()[:1].tolist()
    (tmp_path / "split.json").write_text(json.dumps(idx[::-1]))
    for seed in (0, 1):
        data = common.load_ssl_data("fashion_mnist", data_dir, 7, seed, "cpu", labeled_indices=tmp_path / "split.json")
        assert data.labeled_idx.tolist() == sorted(idx)
        assert torch.equal(data.y_labeled, train_y[sorted(idx)]) and len(data.x_unlabeled) == 200


@pytest.mark.parametrize(
    "text, num_labels, message",
    [
        ("[3, 1, 2]", 4, ": it holds 3 indices, not --num-labels 4: give --num-labels 3"),
        ("[3, 1, 2]", None, ": it holds 3 indices, not every label (the default here): give --num-labels 3"),
        ("[3, 1, 3]", 3, ": index 3 is there more than once"),
        ("[3, 1, 200]", 3, ": index 200 is outside the training set (0 to 199)"),
        ("[3, 1, -1]", 3, ": index -1 is outside the training set (0 to 199)"),
        ("[3, 1, 2.0]", 3, ": not a JSON list of indices (a run's labeled_indices.json is one)"),
        ("[3, 1, true]", 3, ": not a JSON list of indices (a run's labeled_indices.json is one)"),
        ('{"3": 1}', 1, ": not a JSON list of indices (a run's labeled_indices.json is one)"),
        ("[]", 0, ": not a JSON list of indices (a run's labeled_indices.json is one)"),
        ("[3, 1", 2, ": not a JSON list of indices (a run's labeled_indices.json is one)"),
        (
            None,
            3,
            ": cannot be read (No such file or directory); a run made with it holds the same list in its "
            "labeled_indices.json",
        ),
    ],
)
def test_a_split_file_that_is_not_one_is_one_line(text, num_labels, message, tmp_path):
    path = tmp_path / "split.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ValueError) as e:
        common.read_labeled_indices(path, num_labels, 200)
    assert str(e.value) == f"--labeled-indices {path}{message}"


# --- datasets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_each_dataset_loads_exactly_through_torchvision(name, tmp_path, patched_integrity):
    truth = make_fake_dataset(name, tmp_path)
    train_x, train_y, test_x, test_y, extra_x = common.load_dataset(name, str(tmp_path))
    info = common.DATASETS[name]
    assert train_x.dtype == torch.uint8 and train_y.dtype == torch.int64
    assert train_x.shape[1:] == (info.channels, info.size, info.size)
    if name == "svhn":  # the training set is train + extra, labels included (TorchSSL, USB, FixMatch)
        for k in ("x", "y"):
            truth[f"train_{k}"] = np.concatenate([truth[f"train_{k}"], truth[f"unlabeled_{k}"]])
    for got, want in [(train_x, "train_x"), (train_y, "train_y"), (test_x, "test_x"), (test_y, "test_y")]:
        assert torch.equal(got, torch.from_numpy(truth[want])), want
    if name == "stl10":  # STL-10's unlabeled split
        assert torch.equal(extra_x, torch.from_numpy(truth["unlabeled_x"]))
    else:
        assert extra_x is None


def test_ssl_data_on_device_and_unlabeled_stream(tmp_path, patched_integrity):
    truth = make_fake_dataset("stl10", tmp_path, n_train=100, n_unlabeled=30)
    data = common.load_ssl_data("stl10", str(tmp_path), 20, seed=3, device="cpu")
    assert torch.bincount(data.y_labeled, minlength=10).tolist() == [2] * 10
    assert torch.equal(data.x_labeled, torch.from_numpy(truth["train_x"])[data.labeled_idx])
    # unlabeled stream = whole training set + STL-10's unlabeled split, labels -1 where unknown
    assert len(data.x_unlabeled) == 130 and (data.y_unlabeled[100:] == -1).all()
    assert torch.equal(data.y_unlabeled[:100], torch.from_numpy(truth["train_y"]))
    idx, x, y = common.sample_batch(64, data.x_unlabeled, data.y_unlabeled)
    assert torch.equal(x, data.x_unlabeled[idx]) and torch.equal(y, data.y_unlabeled[idx])


def test_svhn_training_set_is_train_plus_extra(tmp_path, patched_integrity, monkeypatch):
    """TorchSSL, USB and FixMatch: SVHN's training set is train + extra, with extra's labels; the labeled split is
    drawn from all of it, and all of it feeds the unlabeled stream. svhn_extra=False: train alone. Without
    extra_32x32.mat the error names the flag."""
    truth = make_fake_dataset("svhn", tmp_path, n_train=50, n_unlabeled=30)
    x = torch.from_numpy(np.concatenate([truth["train_x"], truth["unlabeled_x"]]))
    y = torch.from_numpy(np.concatenate([truth["train_y"], truth["unlabeled_y"]]))
    data = common.load_ssl_data("svhn", str(tmp_path), 20, seed=0, device="cpu")
    assert torch.equal(data.x_unlabeled, x) and torch.equal(data.y_unlabeled, y)
    assert torch.equal(data.labeled_idx, common.labeled_split(y, 20, 10, seed=0))
    assert (data.labeled_idx >= 50).any()  # some labeled images come from extra
    assert torch.equal(data.x_labeled, x[data.labeled_idx]) and torch.equal(data.y_labeled, y[data.labeled_idx])
    without = common.load_ssl_data("svhn", str(tmp_path), 20, seed=0, device="cpu", svhn_extra=False)
    assert torch.equal(without.x_unlabeled, x[:50]) and torch.equal(without.y_unlabeled, y[:50])
    assert torch.equal(without.labeled_idx, common.labeled_split(y[:50], 20, 10, seed=0))
    (tmp_path / "extra_32x32.mat").unlink()

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.svhn, "download_url", offline)
    assert (
        len(common.load_ssl_data("svhn", str(tmp_path), 20, seed=0, device="cpu", svhn_extra=False).x_unlabeled) == 50
    )
    with pytest.raises(FileNotFoundError, match="--no-svhn-extra"):
        common.load_ssl_data("svhn", str(tmp_path), 20, seed=0, device="cpu")


def test_fashion_mnist_from_debian_package(tmp_path, monkeypatch):
    """Loaded from the package's .gz files; while they are unpacked, a file under its final name is
    always whole (another rank may be reading it), and no temporary file is left."""
    truth = make_debian_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    sizes = {f.name[:-3]: len(gzip.decompress(f.read_bytes())) for f in (tmp_path / "debian").glob("*.gz")}
    seen, copy = [], shutil.copyfileobj

    def copy_and_look(src, dst, *args):
        seen.append({f.name: f.stat().st_size for f in raw.iterdir() if f.name in sizes})
        return copy(src, dst, *args)

    monkeypatch.setattr(shutil, "copyfileobj", copy_and_look)
    train_x, train_y, test_x, test_y, _ = common.load_dataset("fashion_mnist", str(tmp_path / "data"))
    assert torch.equal(train_x, torch.from_numpy(truth["train_x"]))
    assert torch.equal(test_y, torch.from_numpy(truth["test_y"]))
    assert len(seen) == 4 and all(size == sizes[name] for files in seen for name, size in files.items())
    assert sorted(f.name for f in raw.iterdir()) == sorted(sizes)


def test_debian_unpacks_only_what_the_data_dir_lacks_with_a_new_files_permissions(tmp_path, monkeypatch):
    """The data dir's own files are kept (only the missing test files come from the package), and an unpacked
    file is readable as a plain new file would be under the umask, not 0600 as its temporary file was."""
    debian = make_debian_fashion_mnist(tmp_path / "debian", seed=0)
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    own = make_fake_dataset("fashion_mnist", tmp_path / "data", seed=1)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / name).unlink()
    umask = os.umask(0o002)
    try:
        train_x, train_y, test_x, test_y, _ = common.load_dataset("fashion_mnist", str(tmp_path / "data"))
    finally:
        os.umask(umask)
    got = {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}
    want = {k: own[k] if k.startswith("train") else debian[k] for k in got}
    assert all(torch.equal(got[k], torch.from_numpy(want[k])) for k in got)
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in raw.glob("t10k-*")} == dict.fromkeys(
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), 0o664
    )


def test_a_full_disk_while_unpacking_leaves_no_part_file(tmp_path, monkeypatch):
    """The data dir existed before: it stays, with the files unpacked whole before the fault and no part file."""
    make_debian_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    (tmp_path / "data").mkdir()
    copy, calls = shutil.copyfileobj, []

    def full_at_the_second(src, dst, *args):
        calls.append(dst.name)
        if len(calls) == 2:
            dst.write(src.read(10))
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy(src, dst, *args)

    monkeypatch.setattr(shutil, "copyfileobj", full_at_the_second)
    with pytest.raises(FileNotFoundError, match="No space left on device"):
        common.load_dataset("fashion_mnist", str(tmp_path / "data"))
    left = sorted(f.name for f in (tmp_path / "data" / "FashionMNIST" / "raw").iterdir())
    assert len(calls) == 2 and left == ["train-images-idx3-ubyte"]


# A damaged file of each kind torchvision's MNIST reader meets (these files carry no checksum): (file, damage, what
# the one line says). "fewer labels" keeps the file's header consistent, so only the set's two counts disagree.
DAMAGE = {
    "truncated": ("train-images-idx3-ubyte", lambda b: b[:1000], "RuntimeError: shape"),
    "not an IDX file": ("train-images-idx3-ubyte", lambda b: b"\x00\x00\x63\x09" + b[4:], "AssertionError"),
    "empty": ("t10k-labels-idx1-ubyte", lambda b: b"", "ValueError"),
    "other image size": (
        "train-images-idx3-ubyte",
        lambda b: b[:8] + struct.pack(">II", 16, 49) + b[16:],
        "(1, 16, 49)",
    ),
    "a label out of range": (
        "t10k-labels-idx1-ubyte",
        lambda b: b[:-1] + bytes([200]),
        "test labels run from 0 to 200",
    ),
    "fewer labels": ("t10k-labels-idx1-ubyte", lambda b: b[:4] + struct.pack(">I", 30) + b[8:38], "50 images but 30"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_files_are_one_line_and_never_overwritten(case, tmp_path, monkeypatch):
    """Damaged Fashion-MNIST files in the data dir are refused in one line naming the damage; Debian's package,
    there to fill a data dir that lacks the files, never replaces them (they may be the user's own)."""
    make_debian_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(common, "DEBIAN_FASHION_MNIST", str(tmp_path / "debian"))
    make_fake_dataset("fashion_mnist", tmp_path / "data", seed=1)
    fname, damage, says = DAMAGE[case]
    path = tmp_path / "data" / "FashionMNIST" / "raw" / fname
    path.write_bytes(damage(path.read_bytes()))
    damaged = path.read_bytes()
    with pytest.raises(ValueError, match="unreadable or damaged") as e:
        common.load_dataset("fashion_mnist", str(tmp_path / "data"))
    assert says in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == damaged


def test_missing_data_says_what_to_put_where(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        common.load_dataset("cifar10", str(tmp_path))


def test_a_data_dir_with_some_files_names_those_missing_and_those_not_as_published(tmp_path, monkeypatch):
    """Offline, torchvision says only "Dataset not found or corrupted" (its md5 check of CIFAR's files failed):
    with data_batch_2 cut short and data_batch_5 gone the one line names both, and never says CIFAR-10 is not
    there; with data_batch_2 whole again, it names the missing file. The md5s torchvision checks are set to
    the fake files' own, so its real check runs; the files are left as they were."""

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    make_fake_dataset("cifar10", tmp_path)
    base, cls = tmp_path / "cifar-10-batches-py", torchvision.datasets.CIFAR10
    md5 = lambda name: hashlib.md5((base / name).read_bytes()).hexdigest()
    for key in ("train_list", "test_list"):  # the fake files as the published ones
        monkeypatch.setattr(cls, key, [[name, md5(name)] for name, _ in getattr(cls, key)])
    monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5(cls.meta["filename"])})
    common.load_dataset("cifar10", str(tmp_path))  # whole: loads
    whole = (base / "data_batch_2").read_bytes()
    (base / "data_batch_2").write_bytes(whole[:-1000])
    (base / "data_batch_5").unlink()
    with pytest.raises(ValueError, match="unreadable or damaged") as e:
        common.load_dataset("cifar10", str(tmp_path))
    said = "cifar-10-batches-py/data_batch_2 not matching torchvision's md5, cifar-10-batches-py/data_batch_5 missing"
    assert said in str(e.value) and "no network" in str(e.value) and "\n" not in str(e.value)
    assert len((base / "data_batch_2").read_bytes()) == len(whole) - 1000
    (base / "data_batch_2").write_bytes(whole)
    with pytest.raises(
        FileNotFoundError, match=r"cifar10 is incomplete in .* \(cifar-10-batches-py/data_batch_5 missing"
    ):
        common.load_dataset("cifar10", str(tmp_path))


def test_normalize_uses_dataset_constants():
    info = common.DATASETS["cifar10"]
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = common.normalize(x, info)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], (1 - torch.tensor(info.mean)) / torch.tensor(info.std))


# --- WideResNet ----------------------------------------------------------------------------------


def test_wrn_28_2_parameter_count():
    assert sum(p.numel() for p in common.WideResNet(10).parameters()) == 1_467_626


def test_wrn_features_and_head():
    torch.manual_seed(0)
    model = common.WideResNet(7, depth=10, width=1, in_channels=1).eval()
    x = torch.randn(3, 1, 28, 28)
    features = model.features(x)
    assert features.shape == (3, model.num_features) == (3, 64)
    assert torch.allclose(model.fc(features), model(x))


def test_wrn_bn_momentum_and_bad_depth():
    model = common.WideResNet(10, depth=10, width=1, bn_momentum=0.1)
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}
    for depth in (12, 11, 5):
        with pytest.raises(ValueError, match="6n\\+4 .* or 8n\\+5"):
            common.WideResNet(10, depth=depth)


def test_wrn_37_2_is_the_stl10_variant():
    """Depth 8n+5: TorchSSL's and USB's WideResNetVar (FixMatch's WRN-37-2 for STL-10): four groups of 4 blocks,
    16 to 256 channels, the first group at stride 2, so 96 px end at 6 x 6. The parameter count, summed here layer
    by layer from USB's wrn_var_37_2 (a bias on the stem only), is 5,929,450."""

    def block(c_in, c_out):  # bn1, conv1, bn2, conv2, and a 1x1 shortcut where the shape changes
        return 2 * c_in + 9 * c_in * c_out + 2 * c_out + 9 * c_out * c_out + (c_in * c_out if c_in != c_out else 0)

    channels = [16, 32, 64, 128, 256]
    count = 3 * 16 * 9 + 16 + 2 * 256 + 256 * 10 + 10  # stem conv and bias, last BatchNorm, classifier
    count += sum(block(channels[g] if i == 0 else channels[g + 1], channels[g + 1]) for g in range(4) for i in range(4))
    model = common.WideResNet(10, depth=37, width=2).eval()
    assert sum(p.numel() for p in model.parameters()) == count == 5_929_450
    maps = []
    model.blocks.register_forward_hook(lambda module, inputs, out: maps.append(out.shape))
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, 10) and maps == [(2, 256, 6, 6)]
    assert model.num_features == 256
    # width 1: the first block keeps 16 channels but halves the size, so its shortcut is a strided 1x1 conv too
    # (TorchSSL's WideResNetVar, which tests the channels alone, fails there)
    for depth in (13, 37):
        model = common.WideResNet(10, depth=depth, width=1).eval()
        assert model.blocks[0].shortcut.stride == (2, 2) and model(torch.randn(2, 3, 96, 96)).shape == (2, 10)


def test_wrn_every_block_gets_gradient():
    """The TF-original block: no BatchNorm left unused (the PyTorch ports leave one per group)."""
    model = common.WideResNet(10, depth=10, width=1)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
