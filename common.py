"""Data and network shared by every script, and nothing else (CleanRL style: EMA, schedules,
evaluation, logging and checkpoints live in each script so that each one reads on its own).

- Datasets through torchvision, kept whole as uint8 tensors on the training device.
- The class-balanced labeled split, drawn from the seed.
- Batched weak / strong augmentation on the device (uint8 in, uint8 out, per-image randomness).
- The WideResNet of FixMatch / TorchSSL / USB, with access to the penultimate features.
"""

import collections
import glob
import gzip
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from urllib.error import URLError

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF

_CONSTANTS = {}


def _constant(values, device, dtype=torch.float32):
    """Small constant tensor (nested tuples of numbers) on `device`, cached: copying host data to a
    GPU waits for the queued work, so it happens once per device and not on every call."""
    key = (values, str(device), dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return _CONSTANTS[key]


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    num_classes: int
    channels: int
    size: int  # images are size x size
    mean: tuple  # per-channel normalisation, applied on the device after augmentation
    std: tuple
    flip: bool  # horizontal flip in the weak view (never for digits)
    files: str  # what to put where when torchvision cannot download (relative to --data-dir)
    classes: tuple = ()  # class names, where known (--dataset folder)


# Normalisation constants of TorchSSL (its datasets code: 0-255 values / 255 for CIFAR and STL-10; USB has the same but
# for CIFAR-10, which it normalises with ImageNet's); MNIST's are the usual ones, Fashion-MNIST's its training set's.
_255 = lambda *v: tuple(x / 255 for x in v)
DATASETS = {
    "cifar10": DatasetInfo(
        10,
        3,
        32,
        _255(125.3, 123.0, 113.9),
        _255(63.0, 62.1, 66.7),
        True,
        "cifar-10-batches-py/ (extract cifar-10-python.tar.gz there)",
    ),
    "cifar100": DatasetInfo(
        100,
        3,
        32,
        _255(129.3, 124.1, 112.4),
        _255(68.2, 65.4, 70.4),
        True,
        "cifar-100-python/ (extract cifar-100-python.tar.gz there)",
    ),
    "svhn": DatasetInfo(
        10,
        3,
        32,
        (0.4380, 0.4440, 0.4730),
        (0.1751, 0.1771, 0.1744),
        False,
        "train_32x32.mat, test_32x32.mat and extra_32x32.mat (or pass --no-svhn-extra)",
    ),
    "stl10": DatasetInfo(
        10,
        3,
        96,
        _255(112.4, 109.1, 98.6),
        _255(68.4, 66.6, 68.5),
        True,
        "stl10_binary/ (extract stl10_binary.tar.gz there)",
    ),
    "mnist": DatasetInfo(10, 1, 28, (0.1307,), (0.3081,), False, "MNIST/raw/ (the four *-ubyte files, gunzipped)"),
    "fashion_mnist": DatasetInfo(
        10,
        1,
        28,
        (0.2860,),
        (0.3530,),
        True,
        "FashionMNIST/raw/ (the four *-ubyte files, gunzipped), or install Debian's dataset-fashion-mnist package",
    ),
}
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # apt-get install dataset-fashion-mnist
FOLDER = "folder"  # --dataset folder: your own images (load_folder)


def _torchvision_splits(name, root, download, svhn_extra=True):
    """(train_x, train_y, test_x, test_y, extra_x) as numpy/tensor data straight from torchvision."""
    D = torchvision.datasets
    if name in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
        hwc = lambda d: torch.from_numpy(d.data).permute(0, 3, 1, 2)  # stored (N, H, W, C)
        return hwc(tr), torch.tensor(tr.targets), hwc(te), torch.tensor(te.targets), None
    if name == "svhn":  # the training set: train, or train + extra (with its labels)
        splits = ("train", "extra") if svhn_extra else ("train",)
        tr, te = [D.SVHN(root, s, download=download) for s in splits], D.SVHN(root, "test", download=download)
        train_x, train_y = (torch.cat([torch.from_numpy(getattr(d, k)) for d in tr]) for k in ("data", "labels"))
        return train_x, train_y, torch.from_numpy(te.data), torch.from_numpy(te.labels), None
    if name == "stl10":
        tr, te, un = (D.STL10(root, s, download=download) for s in ("train", "test", "unlabeled"))
        return (
            torch.from_numpy(tr.data),
            torch.from_numpy(tr.labels).long(),
            torch.from_numpy(te.data),
            torch.from_numpy(te.labels).long(),
            torch.from_numpy(un.data),
        )
    cls = D.MNIST if name == "mnist" else D.FashionMNIST
    tr, te = cls(root, train=True, download=download), cls(root, train=False, download=download)
    return tr.data[:, None], tr.targets, te.data[:, None], te.targets, None


def _unpack_debian_fashion_mnist(root):
    """Gunzip Debian's Fashion-MNIST files that root lacks into the folder torchvision's loader reads.
    (Debian re-compressed them, so torchvision's md5 of the .gz archives would not match.) A file
    already there is never overwritten. Each file is written under a temporary name and renamed
    whole: processes unpacking at once (torchrun's ranks on a fresh data dir) never read another's
    half-written file, and a fault (a full disk) leaves none behind. A file gets the permissions a
    plain new file would (the temporary one has 0600)."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    umask = os.umask(0o022)
    os.umask(umask)
    for fname, _ in torchvision.datasets.FashionMNIST.resources:
        if os.path.exists(os.path.join(raw, fname[:-3])):
            continue
        with (
            gzip.open(os.path.join(DEBIAN_FASHION_MNIST, fname)) as src,
            tempfile.NamedTemporaryFile(dir=raw, suffix=".part", delete=False) as dst,
        ):
            try:
                shutil.copyfileobj(src, dst)
            except BaseException:  # a full disk, Ctrl-C: no part file is left behind
                os.unlink(dst.name)
                raise
        os.chmod(dst.name, 0o666 & ~umask)
        os.replace(dst.name, os.path.join(raw, fname[:-3]))


def _torchvision_files(name, root, svhn_extra=True):
    """[(path, md5 or None)]: the files torchvision's loader reads for name under root, with the md5 it checks
    them against (MNIST's unpacked files have none), as its dataset classes list them."""
    D = torchvision.datasets
    if name in ("cifar10", "cifar100", "stl10"):
        cls = {"cifar10": D.CIFAR10, "cifar100": D.CIFAR100, "stl10": D.STL10}[name]
        named = cls.train_list + cls.test_list + ([[cls.meta["filename"], cls.meta["md5"]]] if name != "stl10" else [])
        return [(os.path.join(root, cls.base_folder, f), md5) for f, md5 in named]
    if name == "svhn":
        splits = ("train", "test", "extra") if svhn_extra else ("train", "test")
        return [(os.path.join(root, D.SVHN.split_list[s][1]), D.SVHN.split_list[s][2]) for s in splits]
    cls = D.MNIST if name == "mnist" else D.FashionMNIST
    raw = os.path.join(root, cls.__name__, "raw")
    return [(os.path.join(raw, os.path.basename(url)[: -len(".gz")]), None) for url, _ in cls.resources]


def _damaged(name, data_dir, problem):
    """The one-line error for dataset files that are there but cannot be read as what torchvision wrote
    (problem: a sentence, or the exception the reader raised)."""
    if isinstance(problem, Exception):  # its type, and its message on one line where it has one
        problem = type(problem).__name__ + (f": {' '.join(str(problem).split())[:200]}" if str(problem) else "")
    return ValueError(
        f"{name}'s files in {data_dir} are unreadable or damaged ({problem}): delete them to fetch them "
        f"again, or put whole ones under {data_dir}: {DATASETS[name].files}"
    )


def _consistent(name, data_dir, splits):
    """splits, once each set has as many labels as images, labels in 0..C-1 and images of the dataset's shape:
    MNIST's files carry no checksum, and a damaged one would otherwise fail only at the first evaluation."""
    info = DATASETS[name]
    shape, top = (info.channels, info.size, info.size), info.num_classes - 1
    train_x, train_y, test_x, test_y, extra_x = splits
    for which, x, y in (("training", train_x, train_y), ("test", test_x, test_y), ("unlabeled", extra_x, None)):
        if x is None:
            continue
        if y is not None and len(x) != len(y):
            raise _damaged(name, data_dir, f"its {which} set has {len(x)} images but {len(y)} labels")
        if len(x) == 0 and y is not None:
            raise _damaged(name, data_dir, f"its {which} set is empty")
        if tuple(x.shape[1:]) != shape:
            raise _damaged(name, data_dir, f"its {which} images are {tuple(x.shape[1:])}, not {shape}")
        if y is not None and not 0 <= int(y.min()) <= int(y.max()) <= top:
            labels = f"{int(y.min())} to {int(y.max())}"
            raise _damaged(name, data_dir, f"its {which} labels run from {labels}, not 0 to {top}")
    return splits


def load_dataset(name, data_dir="./data", svhn_extra=True):
    """Load a dataset whole: uint8 images (N, C, H, W) and int64 labels as CPU tensors.

    Returns (train_x, train_y, test_x, test_y, extra_x); extra_x holds images that feed only the
    unlabeled stream (STL-10's 100k unlabeled split), or None. SVHN's training set is train + extra
    (73k + 531k labeled images) unless svhn_extra is False, as in TorchSSL, USB and FixMatch: the
    labeled split is drawn from all 604k, and all of them feed the unlabeled stream. Files missing from
    data_dir are downloaded by torchvision; Fashion-MNIST is taken from Debian's package when that
    is installed. Raises FileNotFoundError with one line saying what to put where, and ValueError with one
    line for files that are there but damaged (never overwritten).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "svhn":
        try:
            import scipy.io  # noqa: F401  (torchvision reads SVHN's .mat files with it)
        except ImportError:
            raise ValueError("svhn needs scipy to read its .mat files: pip install scipy") from None
    try:  # already on disk: no integrity check against the network, no "verified" chatter
        splits = _torchvision_splits(name, data_dir, download=False, svhn_extra=svhn_extra)
    except RuntimeError as e:  # torchvision's "Dataset not found [or corrupted]" (a file missing, a bad checksum)
        if not str(e).startswith("Dataset not found"):
            raise _damaged(name, data_dir, e) from None
        splits = None  # fetched below
    except (AssertionError, KeyError, ValueError, OSError, EOFError) as e:  # there, but not what torchvision
        raise _damaged(name, data_dir, e) from None  # wrote: MNIST's files have no checksum to catch that
    if splits is not None:
        return _consistent(name, data_dir, splits)
    created = not os.path.exists(data_dir)
    try:
        if name == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST):
            _unpack_debian_fashion_mnist(data_dir)
            splits = _torchvision_splits(name, data_dir, download=False)
        else:
            splits = _torchvision_splits(name, data_dir, download=True, svhn_extra=svhn_extra)
    except (RuntimeError, URLError, OSError) as e:
        if created:  # leave no empty data dir behind
            shutil.rmtree(data_dir, ignore_errors=True)
        reason = " ".join(str(e).split())[:200] or type(e).__name__  # one line
        files, check = _torchvision_files(name, data_dir, svhn_extra), torchvision.datasets.utils.check_integrity
        missing = [os.path.relpath(p, data_dir) for p, _ in files if not os.path.isfile(p)]
        wrong = [os.path.relpath(p, data_dir) for p, md5 in files if md5 and os.path.isfile(p) and not check(p, md5)]
        if wrong:  # there, but not the files torchvision's md5 names (a copy cut short, a disk fault)
            problem = f"{', '.join(wrong)} not matching torchvision's md5" + "".join(f", {m} missing" for m in missing)
            raise _damaged(name, data_dir, f"{problem}; no download: {reason}") from None
        if len(missing) < len(files):  # some there: name the ones that are not
            raise FileNotFoundError(
                f"{name} is incomplete in {data_dir} ({', '.join(missing)} missing) and could not be loaded or "
                f"downloaded ({reason}): put under {data_dir}: {DATASETS[name].files}; or run once with network access"
            ) from None
        raise FileNotFoundError(
            f"{name} is not in {data_dir} and could not be loaded or downloaded ({reason}): put "
            f"under {data_dir}: {DATASETS[name].files}; or run once with network access"
        ) from None
    except (AssertionError, KeyError, ValueError, EOFError) as e:  # a file there already, as above
        raise _damaged(name, data_dir, e) from None
    return _consistent(name, data_dir, splits)


def load_folder(root):
    """Your own images in torchvision's ImageFolder layout: root/train/<class>/*, root/test/<class>/* (the same
    class folders) and, optionally, root/unlabeled/ holding images without labels (in any subfolders), which feed
    only the unlabeled stream. Every image is converted to RGB and resized to S x S, S = the shorter side of the
    first training image (in sorted order). Normalisation: the per-channel mean and std of the training images.
    Returns (train_x, train_y, test_x, test_y, extra_x, info); a bad layout raises ValueError with one line."""
    from PIL import Image, UnidentifiedImageError

    hint = f"put one folder of images per class in {root}/train/ and {root}/test/"
    sets = {}
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            raise ValueError(f"--dataset folder: no folder {os.path.join(root, split)}: {hint}")
        try:
            sets[split] = torchvision.datasets.ImageFolder(os.path.join(root, split))
        except FileNotFoundError as e:  # no class folder, or a class folder without images
            raise ValueError(f"--dataset folder: {' '.join(str(e).split())[:160]}: {hint}") from None
    if sets["train"].classes != sets["test"].classes:
        raise ValueError(
            f"--dataset folder: train/ has classes {sets['train'].classes} but test/ has "
            f"{sets['test'].classes}: give both the same class folders"
        )
    unlabeled_dir = os.path.join(root, "unlabeled")
    unlabeled = sorted(
        f
        for f in glob.glob(os.path.join(unlabeled_dir, "**", "*"), recursive=True)
        if f.lower().endswith(torchvision.datasets.folder.IMG_EXTENSIONS)
    )
    if os.path.isdir(unlabeled_dir) and not unlabeled:
        raise ValueError(f"--dataset folder: {unlabeled_dir} holds no images (.png, .jpg, ...): fill it or remove it")

    def read(path, size=None):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                size = size or min(img.size)
                return TF.pil_to_tensor(img.resize((size, size), Image.BILINEAR))
        except (OSError, UnidentifiedImageError) as e:
            raise ValueError(f"--dataset folder: cannot read {path} as an image ({type(e).__name__})") from None

    size = read(sets["train"].samples[0][0]).shape[-1]
    stack = lambda paths: torch.stack([read(p, size) for p in paths])
    train_x, test_x = (stack([p for p, _ in sets[s].samples]) for s in ("train", "test"))
    extra_x = stack(unlabeled) if unlabeled else None
    pixels = train_x.float().div(255).transpose(0, 1).flatten(1)  # (3, N H W)
    info = DatasetInfo(
        len(sets["train"].classes),
        3,
        size,
        tuple(pixels.mean(1).tolist()),
        tuple(pixels.std(1).clamp(min=1e-3).tolist()),
        True,
        hint,
        tuple(sets["train"].classes),
    )
    return (train_x, torch.tensor(sets["train"].targets), test_x, torch.tensor(sets["test"].targets), extra_x, info)


def labeled_split(targets, num_labels, num_classes, seed):
    """Class-balanced labeled indices into the training set, num_labels // num_classes per class,
    drawn from `seed` alone (the same seed gives the same split on every machine). None: all."""
    if num_labels is None:
        return torch.arange(len(targets))
    if num_labels < num_classes or num_labels % num_classes:
        raise ValueError(
            f"--num-labels {num_labels} must be a positive multiple of the class "
            f"count ({num_classes}) so that every class gets the same number"
        )
    per_class = num_labels // num_classes
    counts = torch.bincount(targets, minlength=num_classes)
    if per_class > counts.min():
        raise ValueError(
            f"--num-labels {num_labels} asks for {per_class} per class, but the "
            f"training set has only {int(counts.min())} of its rarest class"
        )
    g = torch.Generator().manual_seed(seed)
    idx = [torch.nonzero(targets == c).flatten() for c in range(num_classes)]
    idx = [i[torch.randperm(len(i), generator=g)[:per_class]] for i in idx]
    return torch.cat(idx).sort().values


def read_labeled_indices(path, num_labels, num_train):
    """A labeled split from a file (`--labeled-indices`): a JSON list of distinct indices into the training set, as
    every run writes to its labeled_indices.json, so that a run's split, or another codebase's, can be reused. It need
    not be class-balanced. Returns them sorted, as labeled_split's."""
    where = f"--labeled-indices {path}"
    not_a_list = f"{where}: not a JSON list of indices (a run's labeled_indices.json is one)"
    try:
        with open(path) as f:
            idx = json.load(f)
    except OSError as e:
        again = "a run made with it holds the same list in its labeled_indices.json"  # for a resume, --eval-only
        raise ValueError(f"{where}: cannot be read ({e.strerror}); {again}") from None
    except ValueError:  # not JSON, or not text
        raise ValueError(not_a_list) from None
    if not isinstance(idx, list) or not idx or any(type(i) is not int for i in idx):
        raise ValueError(not_a_list)
    if len(idx) != num_labels:
        asked = f"--num-labels {num_labels}" if num_labels else "every label (the default here)"
        raise ValueError(f"{where}: it holds {len(idx)} indices, not {asked}: give --num-labels {len(idx)}")
    outside = [i for i in idx if not 0 <= i < num_train]
    if outside:
        raise ValueError(f"{where}: index {outside[0]} is outside the training set (0 to {num_train - 1})")
    twice = [i for i, n in collections.Counter(idx).items() if n > 1]
    if twice:
        raise ValueError(f"{where}: index {twice[0]} is there more than once")
    return torch.tensor(sorted(idx))


@dataclass
class SSLData:
    """One dataset on one device. The unlabeled stream is the whole training set (labeled images
    included, as in every reference) plus extra unlabeled images where the dataset has them; its
    labels are -1 where none exist and are only ever used for logging (pseudo-label accuracy)."""

    info: DatasetInfo
    labeled_idx: torch.Tensor  # (L,) indices into the training set, CPU, saved with each run
    x_labeled: torch.Tensor  # (L, C, H, W) uint8
    y_labeled: torch.Tensor  # (L,) int64
    x_unlabeled: torch.Tensor  # (U, C, H, W) uint8
    y_unlabeled: torch.Tensor  # (U,) int64, -1 = unknown
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_ssl_data(name, data_dir, num_labels, seed, device, svhn_extra=True, labeled_indices=None):
    """Everything a script trains and evaluates on, moved to `device` once; the labeled split drawn from `seed`, or
    read from the file `labeled_indices`."""
    if name == FOLDER:
        train_x, train_y, test_x, test_y, extra_x, info = load_folder(data_dir)
    else:
        train_x, train_y, test_x, test_y, extra_x = load_dataset(name, data_dir, svhn_extra)
        info = DATASETS[name]
    if labeled_indices is None:
        labeled_idx = labeled_split(train_y, num_labels, info.num_classes, seed)
    else:
        labeled_idx = read_labeled_indices(labeled_indices, num_labels, len(train_y))
    x_u, y_u = train_x, train_y
    if extra_x is not None:
        x_u = torch.cat([train_x, extra_x])
        y_u = torch.cat([train_y, torch.full((len(extra_x),), -1, dtype=train_y.dtype)])
    dev = lambda t: t.contiguous().to(device)
    return SSLData(
        info,
        labeled_idx,
        dev(train_x[labeled_idx]),
        dev(train_y[labeled_idx]),
        dev(x_u),
        dev(y_u),
        dev(test_x),
        dev(test_y),
    )


def sample_batch(batch_size, *tensors, replace=True):
    """A batch drawn uniformly, on the tensors' device, from torch's global RNG: no epochs, no host
    sync, and resuming only needs the RNG state. With replacement by default; replace=False gives
    distinct rows (for methods that update per-sample state). Returns (idx, *tensors[idx])."""
    n, device = len(tensors[0]), tensors[0].device
    if replace:
        idx = torch.randint(n, (batch_size,), device=device)
    else:
        idx = torch.randperm(n, device=device)[:batch_size]
    return (idx, *(t[idx] for t in tensors))


def normalize(x, info):
    """uint8 (N, C, H, W) -> float32, standardised per channel with the dataset's constants."""
    mean = _constant(info.mean, x.device).view(1, -1, 1, 1)  # cached: no host-to-device copy per call
    std = _constant(info.std, x.device).view(1, -1, 1, 1)
    return (x.float() / 255 - mean) / std


# ---------------------------------------------------------------------------------------------
# Augmentation on the device
# ---------------------------------------------------------------------------------------------

# Batched augmentation of uint8 (N, C, H, W) tensors on any device. Random numbers come from
# torch's global generator of x.device (torch.manual_seed reproduces a batch). No Python loop over
# images and no host syncs (past the first call on a device, which caches a few constants there):
# per-image choices are tensors used in gathers, torch.where and broadcasting. Each single-op
# function `_op(x, magnitude)` reproduces its PIL counterpart per image (ImageOps, ImageEnhance,
# Image.transform), truncation back to uint8 included.

# FixMatch's RandAugment ops and magnitude ranges as in TorchSSL (datasets/augmentation/
# randaugment.py, augment_list): a drawn op gets magnitude low + (high - low) * U(0, 1).
# Posterize keeps int(magnitude) bits, i.e. 4..7 as in TorchSSL.
_RA_OPS = {
    "autocontrast": (0, 1),
    "brightness": (0.05, 0.95),
    "color": (0.05, 0.95),
    "contrast": (0.05, 0.95),
    "equalize": (0, 1),
    "identity": (0, 1),
    "posterize": (4, 8),
    "rotate": (-30, 30),
    "sharpness": (0.05, 0.95),
    "shear_x": (-0.3, 0.3),
    "shear_y": (-0.3, 0.3),
    "solarize": (0, 256),
    "translate_x": (-0.3, 0.3),
    "translate_y": (-0.3, 0.3),
}
_OP = {name: code for code, name in enumerate(_RA_OPS)}
# Grey where a warp samples outside the image, as the TF AutoAugment code of FixMatch (pil_unwrap
# zeroes those pixels of the [-1, 1] image); TorchSSL and kekmodel keep PIL's default black.
_GEOMETRIC_FILL = 128
_CUTOUT_FILL = 127  # kekmodel's Cutout colour (TorchSSL's is (125, 123, 114))


def weak_augment(x, flip=True, pad=None):
    """Per image: reflect-pad by `pad` (default round(H / 8)), crop back to H x W at uniform
    offsets in [0, 2 pad], then flip horizontally with p = 0.5 if `flip`. Exact (pure indexing).
    x: uint8 (N, C, H, W); returns the same shape, dtype and device."""
    n, c, h, w = x.shape
    dev = x.device
    pad = int(0.125 * h + 0.5) if pad is None else pad
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = torch.randint(0, 2 * pad + 1, (n, 1), device=dev) + torch.arange(h, device=dev)
    cols = torch.randint(0, 2 * pad + 1, (n, 1), device=dev) + torch.arange(w, device=dev)
    if flip:
        cols = torch.where(torch.rand(n, 1, device=dev) < 0.5, cols.flip(1), cols)
    batch = torch.arange(n, device=dev).view(n, 1, 1, 1)
    channel = torch.arange(c, device=dev).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def strong_augment(x, flip=True, pad=None, num_ops=3, cutout=0.5):
    """weak_augment, then FixMatch's RandAugment (TorchSSL's ops and ranges; per image `num_ops`
    ops drawn uniformly with replacement, each with its own uniform magnitude), then Cutout (per
    image a square of side U(0, cutout) * H, centred at a uniform point, clipped at the borders,
    filled with grey 127).

    The order follows USB: crop and flip first, then RandAugment (TorchSSL applies RandAugment
    first, then crop and flip). Unlike TorchSSL, which applies an image's ops in drawn order, its
    geometric ops (rotate, shear, translate) are composed into one affine matrix and applied first,
    as one warp, then its colour ops follow in drawn order. The warp is bilinear (smoother than PIL's default
    nearest) and fills grey 128 where the sample point falls outside the image; as in PIL, values
    are truncated to uint8. x: uint8 (N, C, H, W), C = 1 or 3; returns the same shape, dtype and
    device."""
    x = weak_augment(x, flip, pad)
    n = x.shape[0]
    ops = torch.randint(len(_RA_OPS), (num_ops, n), device=x.device)
    low, high = _constant(tuple(_RA_OPS.values()), x.device)[ops].unbind(-1)
    magnitudes = low + (high - low) * torch.rand(num_ops, n, device=x.device)
    box = [torch.rand(n, 1, 1, device=x.device) for _ in range(3)]  # Cutout: U(0, 1) for half its side, centre y, x
    return _apply_strong(x, ops, magnitudes, box, cutout)


def _strong_ops(x, ops, magnitudes, box, cutout):
    """strong_augment past its random draws: a pure function of them (so compile_augment can compile it)."""
    return _cutout(_rand_augment(x, ops, magnitudes), cutout, *box)


_apply_strong = _strong_ops


def compile_augment():
    """Compile strong_augment's ops for the GPU (torch.compile, fixed shapes: fewer kernels, less memory traffic). The
    random draws stay eager, so the compiled ops see the eager draws and can be checked against the eager ops."""
    global _apply_strong
    _apply_strong = torch.compile(_strong_ops, fullgraph=True, dynamic=False)


def _rand_augment(x, ops, magnitudes):
    """Apply per image the op codes ops[k] with magnitudes[k], both (num_ops, N): the composed
    geometric ops as one warp, then the colour ops slot by slot."""
    n, _, h, w = x.shape
    matrix = torch.eye(3, device=x.device).expand(n, 3, 3)
    for slot in _op_matrix(ops, magnitudes, h, w):  # (num_ops, N, 3, 3); output->input maps: compose rightwards
        matrix = _compose(matrix, slot)
    x = _affine(x, matrix, _GEOMETRIC_FILL)
    for op, magnitude in zip(ops, magnitudes, strict=True):
        x = _colour_op(x, op, magnitude)
    return x


def _colour_op(x, op, magnitude):
    """One RandAugment slot's colour op per image (op codes and magnitudes (N,)); images whose op
    is geometric or identity pass through unchanged."""
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return _colour_op_no_sync(x, op, magnitude)
    out = x.clone()  # on the CPU, reading the codes costs no sync: each image computes only the op it drew
    for name, apply in _COLOUR_OPS.items():
        rows = (op == _OP[name]).nonzero().squeeze(1)
        if len(rows):
            out[rows] = apply(x[rows], magnitude[rows])
    return out


def _colour_op_no_sync(x, op, magnitude):
    """_colour_op without a host sync (for GPUs): every op on every image, then a per-image pick."""
    # The four ImageEnhance ops are one blend with different degenerate images; blending with degenerate = x
    # (all other ops) returns x exactly.
    grey = _grey(x)
    degenerate = _pick(
        op,
        x,
        {"brightness": torch.zeros_like(x), "color": grey, "contrast": _grey_mean(grey), "sharpness": _smooth(x)},
    )
    return _pick(
        op,
        _blend(x, degenerate, magnitude),
        {
            "autocontrast": _autocontrast(x),
            "equalize": _equalize(x),
            "posterize": _posterize(x, magnitude),
            "solarize": _solarize(x, magnitude),
        },
    )


def _pick(op, default, candidates):
    """Per image, candidates[name of its op] (broadcast to default's shape), or `default` if that
    name is not a key. One stack and one gather, cheaper than a chain of torch.where."""
    names = list(candidates)
    table = tuple(names.index(name) + 1 if name in names else 0 for name in _RA_OPS)
    stacked = torch.stack([default, *(v.expand_as(default) for v in candidates.values())])
    index = _constant(table, op.device, torch.long)[op]
    return stacked[index, torch.arange(len(op), device=op.device)]


# --- colour ops: x uint8 (N, C, H, W), magnitudes (N,) -------------------------------------------


def _blend(x, degenerate, factor):
    """PIL Image.blend(degenerate, x, factor): degenerate + factor * (x - degenerate) in float32,
    clamped and truncated to uint8. `degenerate` broadcasts against x."""
    d = degenerate.float()
    out = d + factor.view(-1, 1, 1, 1) * (x.float() - d)
    return out.clamp_(0, 255).to(torch.uint8)  # truncation, as PIL


def _grey(x):
    """PIL convert("L"): (19595 R + 38470 G + 7471 B + 2**15) >> 16 as (N, 1, H, W) uint8;
    1-channel images are returned as they are."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.int().unbind(1)
    return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).unsqueeze(1).to(torch.uint8)


def _grey_mean(grey):
    """ImageEnhance.Contrast's degenerate grey level int(mean(L) + 0.5) of grey images L = _grey(x),
    as (N, 1, 1, 1) uint8 (integer arithmetic, so exact)."""
    pixels = grey.shape[2] * grey.shape[3]
    total = grey.sum((1, 2, 3), dtype=torch.int64, keepdim=True)
    return torch.div(2 * total + pixels, 2 * pixels, rounding_mode="floor").to(torch.uint8)


def _smooth(x):
    """PIL ImageFilter.SMOOTH, ImageEnhance.Sharpness's degenerate: kernel [[1, 1, 1], [1, 5, 1],
    [1, 1, 1]] / 13 rounded on interior pixels, border pixels kept (as TF.adjust_sharpness). Sums
    of slices, not a convolution: faster on CPU, and exact where cuDNN would use TF32."""
    xf = x.float()
    box = xf[:, :, :-2] + xf[:, :, 1:-1] + xf[:, :, 2:]  # separable 3x3 box sum
    box = box[..., :-2] + box[..., 1:-1] + box[..., 2:]
    out = x.clone()
    out[:, :, 1:-1, 1:-1] = ((box + 4 * xf[:, :, 1:-1, 1:-1]) / 13).round()  # no ties: 13 is odd
    return out


def _posterize(x, bits):
    """ImageOps.posterize(img, int(bits)) per image: keep the int(bits) high bits (0 to 8)."""
    shift = (8 - bits.long()).clamp(0, 8)
    mask = ((255 << shift) & 255).to(torch.uint8)
    return x & mask.view(-1, 1, 1, 1)


def _solarize(x, threshold):
    """ImageOps.solarize(img, threshold) per image: invert the values >= threshold."""
    return torch.where(x < threshold.view(-1, 1, 1, 1), x, 255 - x)


def _autocontrast(x):
    """ImageOps.autocontrast(img) per image and channel: floor(255 (v - lo) / (hi - lo)), constant
    channels kept. Exact, in integers: PIL's double LUT can land one level low where the result is a
    whole number, and a compiler may lower a float division to an approximate one (Triton's, on an
    H200: the compiled float version was one level low on 96 % of the values of random images)."""
    lo = x.amin((2, 3), keepdim=True).int()
    hi = x.amax((2, 3), keepdim=True).int()
    xi = x.int()
    stretched = torch.div((xi - lo) * 255, (hi - lo).clamp(min=1), rounding_mode="floor")
    return torch.where(hi > lo, stretched, xi).to(torch.uint8)


def _equalize(x):
    """ImageOps.equalize(img) per image and channel (torchvision's batched port of PIL's LUT)."""
    return TF.equalize(x)


_COLOUR_OPS = {  # name -> op(x, magnitudes) per image, as PIL's: the CPU path computes each on its images only
    "brightness": lambda x, m: _blend(x, torch.zeros_like(x), m),  # ImageEnhance.Brightness
    "color": lambda x, m: _blend(x, _grey(x), m),  # ImageEnhance.Color (the identity on 1-channel images)
    "contrast": lambda x, m: _blend(x, _grey_mean(_grey(x)), m),  # ImageEnhance.Contrast
    "sharpness": lambda x, m: _blend(x, _smooth(x), m),  # ImageEnhance.Sharpness
    "autocontrast": lambda x, m: _autocontrast(x),
    "equalize": lambda x, m: _equalize(x),
    "posterize": _posterize,
    "solarize": _solarize,
}


# --- geometric ops --------------------------------------------------------------------------------
# A matrix maps output pixel coordinates to input ones, like the data (a, b, c, d, e, f) of PIL's
# img.transform(size, Image.AFFINE, data): (x, y) -> (a x + b y + c, d x + e y + f), with pixel
# centres at +0.5. Matrices are (..., 3, 3) with last row (0, 0, 1), so they compose by products.
# No matmul here: with TF32 allowed (torch.set_float32_matmul_precision("high")) a GPU rounds its
# inputs to 10 mantissa bits, which would move sample points by up to ~0.05 pixel.


def _compose(a, b):
    """a @ b for (..., 3, 3) matrices, in full float32 precision (broadcast product and sum)."""
    return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)


def _op_matrix(op, magnitude, h, w):
    """Each image's geometric op as a matrix, the identity for the other ops (op codes and magnitudes of
    any shape S give (*S, 3, 3)). As PIL data:
    - img.rotate(degrees), counter-clockwise about the image centre (cx, cy):
      (cos, -sin, cx - cos cx + sin cy, sin, cos, cy - sin cx - cos cy);
    - TorchSSL's ShearX / ShearY: (1, shear_x, 0, shear_y, 1, 0);
    - TorchSSL's TranslateX / TranslateY, tx = magnitude * width, ty = magnitude * height: (1, 0, tx, 0, 1, ty),
      output pixel (x, y) shows input (x + tx, y + ty).
    An image draws one op, so in the sums below the other two ops' terms are 0 (and cos 0 = 1): each entry is
    exactly that op's, and equal bit for bit to the product of the three matrices."""

    def pick(name):
        return torch.where(op == _OP[name], magnitude, 0.0)

    radians = pick("rotate") * (math.pi / 180)
    cos, sin = radians.cos(), radians.sin()
    cx, cy = w / 2, h / 2
    a, b, c = cos, pick("shear_x") - sin, cx - cos * cx + sin * cy + pick("translate_x") * w
    d, e, f = sin + pick("shear_y"), cos, cy - sin * cx - cos * cy + pick("translate_y") * h
    zero = torch.zeros_like(cos)
    return torch.stack([a, b, c, d, e, f, zero, zero, zero + 1], -1).unflatten(-1, (3, 3))


def _affine(x, matrix, fill):
    """Warp each image by its (N, 3, 3) matrix like PIL's transform(size, AFFINE, data,
    resample=BILINEAR, fillcolor=fill): bilinear between edge-clamped neighbours where the sample
    point lies inside the image, `fill` where it does not, truncated to uint8. One grid_sample for
    the whole batch."""
    h, w = x.shape[2:]
    m = matrix[:, :2, :, None, None]  # entries as (N, 1, 1), to broadcast over output pixels
    xs = torch.arange(w, device=x.device) + 0.5  # output pixel centres
    ys = torch.arange(h, device=x.device).view(h, 1) + 0.5
    src_x = m[:, 0, 0] * xs + m[:, 0, 1] * ys + m[:, 0, 2]  # (N, H, W) sample points
    src_y = m[:, 1, 0] * xs + m[:, 1, 1] * ys + m[:, 1, 2]
    inside = (src_x >= 0) & (src_x < w) & (src_y >= 0) & (src_y < h)  # PIL's test
    # grid_sample's units with align_corners=False: -1 and 1 are the outer edges of the image.
    grid = torch.stack([src_x * (2 / w) - 1, src_y * (2 / h) - 1], -1)
    out = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    # Truncate like PIL, after a 0.01 margin that absorbs the float32 error of the grid, so that
    # samples at exact pixel centres (identity, whole-pixel shifts) stay exact.
    out = out.add_(0.01).clamp_(0, 255)
    return torch.where(inside.unsqueeze(1), out, float(fill)).to(torch.uint8)


def _cutout(x, size, u_half, u_y, u_x):
    """Per image, fill with grey 127 the pixels whose centres fall in a square of side
    U(0, size) * H (half-open bounds: at most ceil(size * H) pixels a side) centred at a uniform
    point of the image; u_half, u_y, u_x (N, 1, 1) are the U(0, 1) draws."""
    _, _, h, w = x.shape
    half, cy, cx = u_half * (size * h / 2), u_y * h, u_x * w
    ys = torch.arange(h, device=x.device).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device).view(1, 1, w) + 0.5
    box = (ys >= cy - half) & (ys < cy + half) & (xs >= cx - half) & (xs < cx + half)
    return torch.where(box.unsqueeze(1), _CUTOUT_FILL, x)


# ---------------------------------------------------------------------------------------------
# WideResNet
# ---------------------------------------------------------------------------------------------


class _Block(nn.Module):
    """Pre-activation basic block: BN-LeakyReLU-conv3x3-BN-LeakyReLU-(dropout)-conv3x3 + shortcut.

    As in FixMatch's TF original: the residual branch always sees the activated input, the shortcut
    sees the raw input, except with `activate_before_residual` (the first block of the network),
    where both take the activated one. The PyTorch ports (kekmodel, TorchSSL, USB at 5d09751) feed the
    RAW input to conv1 in the first block of groups 2 and 3, which leaves that block's bn1 unused; an
    earlier USB (167842a) activates the input of every block that changes shape, for the shortcut too.
    The parameter count is the same either way."""

    def __init__(self, c_in, c_out, stride, drop_rate, activate_before_residual, bn_momentum):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in, eps=0.001, momentum=bn_momentum)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, eps=0.001, momentum=bn_momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        same = c_in == c_out and stride == 1  # the raw input fits the branch's output (WRN-37-1's first block: no)
        self.shortcut = None if same else nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        self.drop_rate, self.activate_before_residual = drop_rate, activate_before_residual

    def forward(self, x):
        out = F.leaky_relu(self.bn1(x), 0.1)
        if self.activate_before_residual:
            x = out
        out = F.leaky_relu(self.bn2(self.conv1(out)), 0.1)
        out = self.conv2(F.dropout(out, self.drop_rate, self.training))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016) as used by FixMatch, TorchSSL and USB: LeakyReLU
    0.1, BatchNorm momentum 0.001 (PyTorch convention: 1 - TF's 0.999) and eps 0.001 (TorchSSL; USB at
    5d09751 keeps PyTorch's 1e-5 in the blocks, 0.001 in the last BatchNorm; kekmodel 1e-5), kaiming-normal
    conv init (fan_out), xavier-normal fc init, a bias on the stem conv only (as USB at 5d09751; TorchSSL and
    an earlier USB, 167842a, put one on every conv, kekmodel on none).
    WRN-28-2, 10 classes: 1,467,626 parameters.

    Depth 6n+4: three groups of n blocks (16, 32, 64 times width channels), the first at stride 1. Depth 8n+5
    (WRN-37-2, FixMatch's network for STL-10's 96 px images): TorchSSL's and USB's WideResNetVar, a fourth group
    of 128 times width channels, and the first group at stride 2 too (their first_stride 2 on STL-10), so 96 px
    end at 6 x 6.

    `model(x)` gives logits; `model.features(x)` the pooled penultimate features (N, model.num_features)
    and `model.fc` the classifier, for methods that add heads on the features (DST, MAXL).
    `drop_rate` is dropout inside the blocks, `fc_dropout` dropout before the classifier (MPL)."""

    def __init__(self, num_classes, depth=28, width=2, in_channels=3, bn_momentum=0.001, drop_rate=0.0, fc_dropout=0.0):
        super().__init__()
        if depth >= 10 and (depth - 4) % 6 == 0:
            groups, n, first_stride = 3, (depth - 4) // 6, 1
        elif depth >= 13 and (depth - 5) % 8 == 0:
            groups, n, first_stride = 4, (depth - 5) // 8, 2
        else:
            raise ValueError(
                f"WideResNet depth must be 6n+4 (10, 16, 22, 28, ...) or 8n+5 (13, 21, 29, 37, ...), got {depth}"
            )
        channels = [16] + [16 * width * 2**g for g in range(groups)]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, 1, 1, bias=True)  # the stem's bias, as TorchSSL / USB
        blocks = []
        for g in range(groups):
            for i in range(n):
                blocks.append(
                    _Block(
                        channels[g] if i == 0 else channels[g + 1],
                        channels[g + 1],
                        (first_stride if g == 0 else 2) if i == 0 else 1,
                        drop_rate,
                        g == 0 and i == 0,
                        bn_momentum,
                    )
                )
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels[-1], eps=0.001, momentum=bn_momentum)
        self.num_features = channels[-1]
        self.fc_dropout = fc_dropout
        self.fc = nn.Linear(channels[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x):
        out = F.leaky_relu(self.bn(self.blocks(self.conv1(x))), 0.1)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)  # (N, num_features)

    def forward(self, x):
        return self.fc(F.dropout(self.features(x), self.fc_dropout, self.training))
