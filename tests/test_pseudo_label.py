"""pseudo_label.py: the weak view's own confident hard prediction is its label (the same forward, the gradient
through the prediction only, a confidence equal to tau kept), the unlabeled term averages over all mu B images, the
weight ramps up linearly over --ramp-up of the run, and mu is 1 by default (TorchSSL, USB)."""

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, assert_tie_kept, middle_threshold, rows, run_inprocess, run_keeping_graph, run_keeping_step

K = 20  # steps of the ramp run


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """probe: one step at the default tau; on: tau between two middle confidences of the probe's, its graph kept;
    tie: tau equal to the probe's median confidence itself; ramp: K steps of the ramp-up."""
    args = [*TINY, "--data-dir", data_dir]
    probe = run_keeping_step("pseudo_label.py", *args, "--total-steps", 1, "--run-dir", tmp_path_factory.mktemp("p"))
    threshold = middle_threshold(probe["logits_w"])
    on_dir = tmp_path_factory.mktemp("on")
    on = run_keeping_graph(
        "pseudo_label.py", *args, "--total-steps", 1, "--threshold", threshold, "--ramp-up", 0, "--run-dir", on_dir
    )
    confidence = probe["logits_w"].detach().softmax(1).max(1).values
    tied = confidence.sort().values[len(confidence) // 2].item()  # a float32 value: exact as a float and as text
    tie_dir = tmp_path_factory.mktemp("tie")
    tie = run_keeping_step("pseudo_label.py", *args, "--total-steps", 1, "--threshold", tied, "--run-dir", tie_dir)
    ramp_dir = tmp_path_factory.mktemp("ramp")
    run_inprocess(
        "pseudo_label.py",
        *args,
        "--total-steps",
        K,
        "--log-every",
        1,
        "--ramp-up",
        0.5,
        "--unsup-weight",
        2,
        "--run-dir",
        ramp_dir,
    )
    out = {"probe": probe, "on": on, "threshold": threshold, "on_dir": on_dir, "ramp_dir": ramp_dir}
    return {**out, "tie": tie, "tied": tied}


def test_same_first_step(runs):
    for k in ("on", "tie"):
        assert torch.equal(runs["probe"]["logits"], runs[k]["logits"]), k


def test_mu_is_one_by_default(runs):
    g = runs["probe"]
    assert g["args"].mu == 1 and len(g["logits_w"]) == len(g["logits_l"]) == 8


def test_unsup_loss_by_hand(runs):
    """1/(mu B) sum 1(max q >= tau) CE(argmax q, q), q the weak view's prediction."""
    g = runs["on"]
    weak = g["logits_w"].detach()
    q = weak.softmax(1)
    mask = (q.max(1).values >= runs["threshold"]).float()
    assert 0 < mask.sum() < len(mask)
    per_sample = -weak.log_softmax(1).gather(1, q.argmax(1, keepdim=True)).squeeze(1)
    expected = (per_sample * mask).sum() / len(weak)
    assert g["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    for wrong in ((per_sample * mask).sum() / mask.sum(), (-(q * weak.log_softmax(1)).sum(1) * mask).mean()):
        assert g["loss_u"].item() != pytest.approx(wrong.item(), rel=1e-3)
    row = rows(runs["on_dir"])[0]
    assert row["train/mask_ratio"] == pytest.approx(mask.mean().item(), rel=1e-6)
    assert g["loss"].item() == pytest.approx((g["loss_x"] + g["loss_u"]).item(), rel=1e-6)  # --ramp-up 0: weight 1
    assert g["unsup_w"].item() == 1.0  # the device tensor the step read


def test_the_gradient_goes_through_the_prediction_not_the_label(runs):
    """The gradient of the script's own loss_u on the logits: mask (softmax - onehot(argmax)) / (mu B), what CE with a
    constant label gives; a label carrying a gradient (soft, or straight-through) would add its own term."""
    g = runs["on"]
    (grad,) = torch.autograd.grad(g["loss_u"], [g["logits_w"]])
    logits = g["logits_w"].detach()
    label = logits.argmax(1)
    mask = (logits.softmax(1).max(1).values >= runs["threshold"]).float()
    expected = mask[:, None] * (logits.softmax(1) - F.one_hot(label, logits.shape[1])) / len(logits)
    assert torch.allclose(grad, expected, atol=1e-8) and grad.abs().sum() > 0
    assert not g["max_probs"].requires_grad  # the confidence is taken from detached logits too


def test_a_confidence_equal_to_tau_passes(runs):
    """The gate is max q >= tau (TorchSSL): --threshold set to one image's own confidence keeps that image."""
    g, tied = runs["tie"], runs["tied"]
    assert_tie_kept(g["logits_w"], g["mask"], tied)


def test_the_weight_ramps_linearly(runs):
    """alpha at step t is lambda_u min(1, (t - 1) / (r K)): 0 at the first step (TorchSSL's and USB's it = 0)."""
    logged = [r for r in rows(runs["ramp_dir"]) if "train/unsup_weight" in r]
    assert [r["step"] for r in logged] == list(range(1, K + 1))
    expected = [2 * min(1.0, (t - 1) / (0.5 * K)) for t in range(1, K + 1)]
    assert [r["train/unsup_weight"] for r in logged] == pytest.approx(expected, abs=1e-6)
    for r in logged:
        assert r["losses/total"] == pytest.approx(
            r["losses/sup"] + r["train/unsup_weight"] * r["losses/unsup"], rel=1e-5
        )
