"""fixmatch.py: the hard label of the weak view trains the strong view where the weak view is confident; the
unlabeled term averages over all mu B images; the label carries no gradient; a confidence equal to tau passes.

The first step of two runs with the same seed and data sees the same batches, augmentations and weights, so its
logits are the same whatever the threshold: a probe run gives them, and the threshold of the second run is set
between two of its middle confidences, so that part of the batch passes and a wrong mask shows."""

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, assert_tie_kept, middle_threshold, rows, run_keeping_graph, run_keeping_step


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """probe: the default tau (nothing passes at init); on: tau between two middle confidences of the probe's weak
    view, its graph kept; tie: tau equal to the probe's median confidence itself."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 1]
    probe = run_keeping_step("fixmatch.py", *args, "--run-dir", tmp_path_factory.mktemp("probe"))
    threshold = middle_threshold(probe["logits_w"])
    on_dir = tmp_path_factory.mktemp("on")
    on = run_keeping_graph("fixmatch.py", *args, "--threshold", threshold, "--run-dir", on_dir)
    confidence = probe["logits_w"].detach().softmax(1).max(1).values
    tied = confidence.sort().values[len(confidence) // 2].item()  # a float32 value: exact as a float and as text
    tie = run_keeping_step("fixmatch.py", *args, "--threshold", tied, "--run-dir", tmp_path_factory.mktemp("tie"))
    return {"probe": probe, "on": on, "threshold": threshold, "on_dir": on_dir, "tie": tie, "tied": tied}


def test_same_first_step(runs):
    for k in ("on", "tie"):
        assert torch.equal(runs["probe"]["logits"], runs[k]["logits"]), k


def test_unsup_loss_by_hand(runs):
    """1/(mu B) sum 1(max q >= tau) CE(argmax q, p(y | A(u))), q from the weak view (Eq. 4)."""
    g = runs["on"]
    weak, strong = g["logits_w"].detach(), g["logits_s"].detach()
    assert len(weak) == 7 * 8  # mu B at the default mu 7
    q = weak.softmax(1)
    mask = (q.max(1).values >= runs["threshold"]).float()
    assert 0 < mask.sum() < len(mask)  # part of the batch passes: a wrong mask would show
    per_sample = -strong.log_softmax(1).gather(1, q.argmax(1, keepdim=True)).squeeze(1)
    expected = (per_sample * mask).sum() / len(weak)
    assert g["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    wrong = {
        "mean over the kept images": (per_sample * mask).sum() / mask.sum(),
        "the weak view trained (Pseudo-Label)": (F.cross_entropy(weak, q.argmax(1), reduction="none") * mask).mean(),
        "soft targets": (-(q * strong.log_softmax(1)).sum(1) * mask).mean(),
    }
    for name, value in wrong.items():
        assert g["loss_u"].item() != pytest.approx(value.item(), rel=1e-3), name
    assert g["loss_x"].item() == pytest.approx(F.cross_entropy(g["logits_l"].detach(), g["y_l"]).item(), rel=1e-5)
    assert g["loss"].item() == pytest.approx((g["loss_x"] + g["loss_u"]).item(), rel=1e-6)  # lambda_u 1


def test_logged_mask_and_pseudo_label_accuracy(runs):
    g = runs["on"]
    q = g["logits_w"].detach().softmax(1)
    mask = (q.max(1).values >= runs["threshold"]).float()
    row = rows(runs["on_dir"])[0]
    assert row["train/mask_ratio"] == pytest.approx(mask.mean().item(), rel=1e-6)
    correct = (q.argmax(1) == g["y_u"]).float()  # fake Fashion-MNIST: every unlabeled image has its label
    assert row["train/pseudo_acc"] == pytest.approx(((correct * mask).sum() / mask.sum()).item(), rel=1e-6)


def test_the_label_is_a_constant_and_the_strong_view_gets_the_gradient(runs):
    """The gradient of the script's own loss_u: mask (softmax(strong) - onehot(label)) / (mu B) on the strong view's
    logits, as CE with a constant label gives, and none on the weak view's, the label's source (a label carrying a
    gradient, soft or straight-through, would reach them)."""
    g = runs["on"]
    grad_w, grad_s = torch.autograd.grad(g["loss_u"], [g["logits_w"], g["logits_s"]], allow_unused=True)
    weak, strong = g["logits_w"].detach(), g["logits_s"].detach()
    q = weak.softmax(1)
    mask = (q.max(1).values >= runs["threshold"]).float()
    expected = mask[:, None] * (strong.softmax(1) - F.one_hot(q.argmax(1), q.shape[1])) / len(q)
    assert grad_w is None
    assert torch.allclose(grad_s, expected, atol=1e-8) and grad_s.abs().sum() > 0
    assert not g["max_probs"].requires_grad  # the confidence is taken from detached logits too


def test_a_confidence_equal_to_tau_passes(runs):
    """The gate is max q >= tau (Eq. 4, TorchSSL): --threshold set to one image's own confidence keeps that image."""
    g, tied = runs["tie"], runs["tied"]
    assert_tie_kept(g["logits_w"], g["mask"], tied)
