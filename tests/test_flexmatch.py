"""flexmatch.py: the flexible thresholds against the formula computed by hand (with and without
warm-up, each mapping), every sample passing at the start, marks only over the fixed tau, the marks
in a real run, in its checkpoint and back on resume, the unlabeled term changing the weights."""

import math

import pytest
import torch
from scriptrun import TINY, checkpoint, rows, run_inprocess, run_keeping_step


def test_mapping_functions():
    from flexmatch import MAPPINGS

    x = torch.tensor([0.0, 0.5, 0.8, 1.0])
    expected = {
        "convex": [0.0, 1 / 3, 2 / 3, 1.0],  # x / (2 - x)
        "linear": [0.0, 0.5, 0.8, 1.0],
        "concave": [0.0, 0.5849625, 0.8479969, 1.0],
    }  # ln(1 + x) / ln 2
    assert set(MAPPINGS) == set(expected)
    for name, values in expected.items():
        assert torch.allclose(MAPPINGS[name](x), torch.tensor(values), atol=1e-6), name
    assert math.isclose(MAPPINGS["concave"](torch.tensor(0.25)).item(), math.log(1.25) / math.log(2), rel_tol=1e-6)


def test_thresholds_by_hand():
    from flexmatch import class_thresholds

    # 3 classes, 12 rows: class 0 marked 4 times, class 1 twice, class 2 never, 6 rows unused
    marks = torch.tensor([-1, 0, 1, -1, 0, -1, -1, 1, 0, -1, 0, -1])
    # warm-up: beta = sigma / max(4, 6) = [2/3, 1/3, 0]; convex M = [0.5, 0.2, 0]
    assert torch.allclose(class_thresholds(marks, 3, 0.95, "convex", True), torch.tensor([0.475, 0.19, 0.0]))
    # no warm-up: beta = sigma / 4 = [1, 0.5, 0]; convex M = [1, 1/3, 0]
    assert torch.allclose(class_thresholds(marks, 3, 0.95, "convex", False), torch.tensor([0.95, 0.95 / 3, 0.0]))
    assert torch.allclose(class_thresholds(marks, 3, 0.95, "linear", True), torch.tensor([0.95 * 2 / 3, 0.95 / 3, 0.0]))
    assert torch.allclose(class_thresholds(marks, 3, 0.8, "linear", False), torch.tensor([0.8, 0.4, 0.0]))
    # once the unused no longer dominate, warm-up changes nothing: beta = [5, 4] / 5, convex M(0.8) = 2/3
    marks = torch.tensor([1, 0, 0, -1, 1, 0, 1, 0, 1, 0])
    for warmup in (True, False):
        assert torch.allclose(class_thresholds(marks, 2, 0.9, "convex", warmup), torch.tensor([0.9, 0.6]))


def test_at_the_start_every_sample_passes():
    from flexmatch import MAPPINGS, class_thresholds

    marks = torch.full((50,), -1)
    probs = torch.randn(64, 10).softmax(1)
    max_probs, pseudo_label = probs.max(1)
    for mapping in MAPPINGS:
        for warmup in (True, False):
            thresholds = class_thresholds(marks, 10, 0.95, mapping, warmup)
            assert torch.equal(thresholds, torch.zeros(10))  # beta = 0 (0 / 0 guarded), so T = 0, no NaN
            assert (max_probs >= thresholds[pseudo_label]).all()


def test_only_predictions_over_the_fixed_tau_mark():
    from flexmatch import mark_confident

    marks = torch.tensor([-1, -1, 3, 1, -1, -1, 2, -1])
    idx = torch.tensor([5, 2, 7, 0, 6])
    max_probs = torch.tensor([0.96, 0.50, 0.95, 0.9499, 0.99])
    pseudo_label = torch.tensor([1, 0, 0, 2, 4])
    mark_confident(marks, idx, max_probs, pseudo_label, 0.95)
    # row 5 marked 1, row 2 keeps 3 (0.5 < tau), row 7 marked 0 (= tau), row 0 stays unused, row 6 re-marked 4
    assert marks.tolist() == [-1, -1, 3, 1, -1, 1, 4, 0]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two 6-step runs in this process, identical but for the unlabeled weight, with a tau low
    enough that a barely trained network marks samples."""
    out = {}
    for w in (0, 1):
        run_dir = tmp_path_factory.mktemp(f"flex{w}")
        args = [
            *TINY,
            "--data-dir",
            data_dir,
            "--total-steps",
            6,
            "--mu",
            2,
            "--threshold",
            0.2,
            "--log-every",
            1,
            "--run-dir",
            run_dir,
        ]
        out[w] = run_keeping_step("flexmatch.py", *args, "--unsup-weight", w), run_dir, args
    return out


def test_unsupervised_term_changes_the_weights(runs):
    (g0, _, _), (g1, _, _) = runs[0], runs[1]
    # same seed, same batches and augmentations: only the unlabeled term differs
    assert not torch.equal(g0["model"].conv1.weight, g1["model"].conv1.weight)
    assert g1["loss_u"] > 0


def test_marks_in_a_real_run_and_its_checkpoint(runs):
    g, run_dir, _ = runs[1]
    marks = checkpoint(run_dir)["selected_label"]
    assert marks.dtype == torch.long and marks.shape == (200,)  # one mark per unlabeled image
    assert torch.equal(marks, g["selected_label"])  # the last step saves
    assert ((marks >= -1) & (marks < 10)).all()
    marked = int((marks >= 0).sum())
    assert 0 < marked <= 6 * 16  # at most mu B = 16 new marks a step
    # the last step's batch: marked exactly where its weak-view confidence reached tau
    confident = g["max_probs"] >= 0.2
    assert torch.equal(marks[g["idx_u"]][confident], g["pseudo_label"][confident])
    assert len(g["idx_u"].unique()) == 16  # drawn without replacement
    train = [r for r in rows(run_dir) if "train/unused_ratio" in r]  # logged every step
    # up to and including the first step that marks, thresholds come from marks all -1: 0, every sample passes
    first = next(i for i, r in enumerate(train) if r["train/unused_ratio"] < 1)
    assert train[0]["step"] == 1 and first < len(train) - 1
    assert all(r["train/threshold_mean"] == 0 and r["train/mask_ratio"] == 1 for r in train[: first + 1])
    last = train[-1]
    assert last["step"] == 6 and math.isclose(last["train/unused_ratio"], 1 - marked / 200, abs_tol=1e-6)
    assert last["train/threshold_mean"] > 0  # the marks moved the thresholds off zero


def test_resume_restores_the_marks(runs):
    _, run_dir, args = runs[1]
    saved = checkpoint(run_dir)["selected_label"]
    assert (saved >= 0).any()  # not the fresh all -1 state
    g = run_inprocess("flexmatch.py", "--resume", run_dir, "--eval-only", exit_ok=True)  # loads the state, runs nothing
    assert torch.equal(g["selected_label"], saved)
