"""A class-balanced subset of Fashion-MNIST's training images, written where the scripts read it: a smaller
unlabeled pool, so that a run of the same length visits each image more often.

    python bench/subset.py --per-class 600 --out runs/bench_subset/fashion_6000/data
    python bench/convergence.py --dataset fashion_mnist --data-dir runs/bench_subset/fashion_6000/data ...

Reads the whole dataset the way the scripts do (`common.load_dataset`: --data-dir, else Debian's
dataset-fashion-mnist) and writes --out/FashionMNIST/raw/, the four gunzipped IDX files torchvision reads:
--per-class training images of each class, drawn at random with --seed (numpy's default_rng) and kept in
their original order, and the whole test set. The scripts then draw their labeled split from the subset
and use all of it as the unlabeled pool. Refuses an --out that exists (it writes nothing there).
"""

import os
import shutil
import sys

import numpy as np
from fakedata import write_mnist_idx
from scripts import ROOT, check_writable, fail, nonnegative, parser, path, positive

sys.path.insert(0, str(ROOT))
import common  # noqa: E402


def choose(labels, per_class, seed):
    """Sorted indices of `per_class` rows of each class of `labels` (a numpy int array), drawn with `seed`."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        of_c = np.flatnonzero(labels == c)
        if len(of_c) < per_class:
            fail(f"--per-class {per_class}: class {c} has only {len(of_c)} training images")
        rows.append(rng.choice(of_c, per_class, replace=False))
    return np.sort(np.concatenate(rows))


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("--per-class", type=positive, required=True, help="training images kept of each class")
    p.add_argument("--seed", type=nonnegative, default=0, help="which images (numpy's default_rng)")
    p.add_argument(
        "--data-dir", type=path, default="./data", help="where the scripts find the whole dataset (as theirs)"
    )
    p.add_argument("--out", type=path, required=True, help="a new folder: the subset's data dir")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        fail(f"--out {args.out} exists: give a new folder")
    check_writable("--out", args.out, folder=True)
    try:
        train_x, train_y, test_x, test_y, _ = common.load_dataset("fashion_mnist", args.data_dir)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    train_x, train_y, test_x, test_y = (t.numpy() for t in (train_x, train_y, test_x, test_y))
    keep = choose(train_y, args.per_class, args.seed)
    try:
        write_mnist_idx(args.out, "FashionMNIST", train_x[keep], train_y[keep], test_x, test_y)
    except OSError as e:  # a full disk: --out was new, so none of it is left
        shutil.rmtree(args.out, ignore_errors=True)
        fail(f"--out {args.out}: cannot write it ({e.strerror})")
    print(f"wrote {len(keep)} of {len(train_y)} training images and all {len(test_y)} test images to {args.out}")


if __name__ == "__main__":
    main()
