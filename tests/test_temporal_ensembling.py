"""temporal_ensembling.py: the ensemble buffer and its bias-corrected target against the closed form,
rows never sampled, the unsupervised term and its gradient by hand (rows without a target count in the mean), the
logged accuracy of the targets, the buffer in the checkpoint, the consistency term trains the network, the ramp-up."""

import math
from unittest import mock

import pytest
import torch
from scriptrun import TINY, checkpoint, rows, run, run_inprocess, run_keeping_step


def test_ensemble_and_target_closed_form():
    from temporal_ensembling import ensemble_step

    torch.manual_seed(0)
    alpha, Z, count = 0.6, torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)
    preds = torch.randn(4, 3).softmax(1)  # four successive predictions for row 2
    other = torch.randn(3).softmax(0)
    for k, p in enumerate(preds):
        target, seen = ensemble_step(Z, count, torch.tensor([2, 0]), torch.stack([p, other]), alpha)
        if k == 0:
            assert not seen.any()  # no ensemble yet: no target
        else:  # target = bias-corrected EMA of the k predictions before this one
            ema = (1 - alpha) * sum(alpha ** (k - 1 - j) * preds[j] for j in range(k))
            assert seen.all() and torch.allclose(target[0], ema / (1 - alpha**k), atol=1e-6)
        if k == 1:
            assert torch.allclose(target[0], preds[0], atol=1e-6)  # one update: exactly that prediction
            assert torch.allclose(target[1], other, atol=1e-6)
    assert torch.allclose(Z[2], (1 - alpha) * sum(alpha ** (3 - j) * preds[j] for j in range(4)), atol=1e-6)
    assert count.tolist() == [4, 0, 4, 0, 0]
    assert (Z[[1, 3, 4]] == 0).all()  # rows never sampled: untouched
    _, seen = ensemble_step(Z, count, torch.tensor([4]), preds[:1], alpha)
    assert not seen.any()  # ... and they contribute nothing to the loss


def test_unsup_term_by_hand_divides_by_the_whole_batch(data_dir, tmp_path):
    """At step 6 some of the 16 rows have a target and some not: the unsupervised term is
    1/(C mu B) sum_i [t_i > 0] ||z_i - target_i||^2, the rows without one in the mean as zeros (not a mean over
    the rows that have one); its gradient into z_i is w 2 [t_i > 0] (z_i - target_i) / (C mu B), the target a
    constant."""
    grads, softmax = [], torch.Tensor.softmax

    def spy(logits, *a, **k):  # the step's z = softmax(logits_u): a hook keeps the gradient backward brings
        z = softmax(logits, *a, **k)
        if z.requires_grad:
            z.register_hook(grads.append)
        return z

    args = [*TINY, "--data-dir", data_dir, "--total-steps", 6, "--ramp-up", 0, "--mu", 2, "--unsup-weight", 30]
    with mock.patch.object(torch.Tensor, "softmax", spy):
        g = run_keeping_step("temporal_ensembling.py", *args, "--run-dir", tmp_path)
    z, target, seen = g["probs_u"].detach(), g["target"], g["seen"]
    n, c = z.shape
    assert n == 16 and torch.equal(seen, g["count"][g["idx_u"]] > 1)  # a target: updated before this step's update
    assert 0 < seen.sum() < n  # the premise: rows with a target and rows without
    # the target is the ensemble BEFORE this step's update, rebuilt here from the buffer after it (Z = a Z' + (1 - a) z,
    # one more count): a target read after the update, or from other rows, fails
    alpha, idx = 0.6, g["idx_u"]
    before, n_before = (g["Z"][idx] - (1 - alpha) * z) / alpha, g["count"][idx] - 1
    assert torch.equal(seen, n_before > 0)
    assert torch.allclose(target[seen], (before / (1 - alpha ** n_before.float()).unsqueeze(1))[seen], atol=1e-5)
    squared = seen.unsqueeze(1) * (z - target) ** 2
    assert g["loss_u"].item() == pytest.approx(squared.sum().item() / (c * n), rel=1e-5)
    assert g["loss_u"].item() != pytest.approx(squared.sum().item() / (c * seen.sum().item()), rel=1e-3)
    assert len(grads) == 6 and torch.allclose(grads[-1], 30 * 2 * seen.unsqueeze(1) * (z - target) / (c * n), atol=1e-8)
    # the logged target accuracy: the argmax of the rows' targets against their true labels, over the rows with one
    y = g["data"].y_unlabeled[g["idx_u"]]  # fake Fashion-MNIST: every unlabeled image has its label
    right = (target.argmax(1) == y)[seen].float()
    assert 0 < right.sum() < len(right)  # right and wrong targets: an accuracy over the wrong rows would show
    assert g["stats"]["train/target_acc"].item() == right.sum().item()  # a row divides by the rows with a target
    assert g["stats"]["n/train/target_acc"].item() == len(right)


def test_buffer_in_checkpoint_and_consistency_trains(data_dir, tmp_path):
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 12, "--ramp-up", 0, "--mu", 2]
    run("temporal_ensembling.py", *args, "--unsup-weight", 0, "--run-dir", tmp_path / "off")
    run("temporal_ensembling.py", *args, "--unsup-weight", 100, "--run-dir", tmp_path / "on")
    ckpt = checkpoint(tmp_path / "on")
    Z, count = ckpt["ensemble"], ckpt["ensemble_count"]
    assert Z.shape == (200, 10) and count.sum() == 12 * 16  # every unlabeled row drawn, 16 a step
    assert torch.allclose(Z.sum(1), 1 - 0.6 ** count.float(), atol=1e-5)  # EMA of distributions, not yet corrected
    assert not torch.equal(checkpoint(tmp_path / "off")["model"]["conv1.weight"], ckpt["model"]["conv1.weight"])


def test_default_weight_is_the_papers_30(data_dir, tmp_path):
    """w_max 30 (the paper's, whose M/N scaling only undoes its CE averaged over mixed batches):
    after the ramp the logged weight is 30 and the total is sup + 30 * unsup."""
    run(
        "temporal_ensembling.py",
        *TINY,
        "--data-dir",
        data_dir,
        "--total-steps",
        4,
        "--log-every",
        1,
        "--ramp-up",
        0,
        "--run-dir",
        tmp_path / "r",
    )
    train = [r for r in rows(tmp_path / "r") if "losses/total" in r]
    assert [r["train/unsup_weight"] for r in train] == [30.0] * 4
    assert any(r["losses/unsup"] > 0 for r in train)
    for r in train:
        assert r["losses/total"] == pytest.approx(r["losses/sup"] + 30 * r["losses/unsup"], rel=1e-5)


def test_logged_weight_follows_the_sigmoid_ramp(data_dir, tmp_path):
    """w(t) = w_max exp(-5 (1 - T)^2), T = min(t / (ramp_up K), 1), at K = 10, ramp-up 0.5, w_max 2 and the step
    t = 1..10 being taken: w_max from step 5 on. A linear ramp or one counted from t - 1 fails."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 10, "--ramp-up", 0.5, "--unsup-weight", 2]
    run_inprocess("temporal_ensembling.py", *args, "--log-every", 1, "--run-dir", tmp_path)
    logged = {r["step"]: r["train/unsup_weight"] for r in rows(tmp_path) if "train/unsup_weight" in r}
    assert logged == pytest.approx({t: 2 * math.exp(-5 * (1 - min(t / 5, 1)) ** 2) for t in range(1, 11)}, rel=1e-6)
