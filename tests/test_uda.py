"""uda.py: the mask from unsharpened probabilities (a confidence equal to the threshold kept), the
temperature on the target only, the average over all unlabeled samples, no gradient through the
target; TSA's schedules and its effect (on the true class's probability).

The first step of two runs with the same seed and data sees the same batches, augmentations and
weights, so its logits are the same whatever the UDA flags: a probe run gives them, and a second
run's flags are chosen from them so that each check below can tell a right loss from a wrong one."""

import math

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, assert_tie_kept, middle_threshold, rows, run_inprocess, run_keeping_graph, run_keeping_step

T = 0.4  # the script's default --temperature


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """probe: one step without the consistency term (default threshold 0.8, which nothing reaches at
    init). on: the same step with it, the threshold between two middle confidences of the probe's
    weak view, so that part of the unlabeled batch passes and sharpening would let more through (its graph kept).
    tie: the threshold equal to the probe's median confidence itself."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 1]
    probe_dir = tmp_path_factory.mktemp("probe")
    probe = run_keeping_step("uda.py", *args, "--unsup-weight", 0, "--run-dir", probe_dir)
    threshold = middle_threshold(probe["logits_weak"])
    on_dir = tmp_path_factory.mktemp("on")
    on = run_keeping_graph("uda.py", *args, "--unsup-weight", 1, "--threshold", threshold, "--run-dir", on_dir)
    confidence = probe["logits_weak"].detach().softmax(1).max(1).values
    tied = confidence.sort().values[len(confidence) // 2].item()  # a float32 value: exact as a float and as text
    tie = run_keeping_step("uda.py", *args, "--threshold", tied, "--run-dir", tmp_path_factory.mktemp("tie"))
    out = {"probe": probe, "on": on, "threshold": threshold, "probe_dir": probe_dir, "on_dir": on_dir}
    return {**out, "tie": tie, "tied": tied}


def test_same_first_step(runs):
    """The premise of the other tests: the UDA flags change nothing before the first loss."""
    for k in ("on", "tie"):
        assert torch.equal(runs["probe"]["logits"], runs[k]["logits"]), k


def test_mask_from_unsharpened_probabilities(runs):
    g, threshold = runs["on"], runs["threshold"]
    weak = g["logits_weak"].detach()
    unsharpened = (weak.softmax(1).max(1).values >= threshold).float()
    sharpened = ((weak / T).softmax(1).max(1).values >= threshold).float()
    assert 0 < unsharpened.sum() < len(unsharpened)  # the case can fail a wrong mask ...
    assert not torch.equal(unsharpened, sharpened)  # ... in particular one taken after sharpening
    assert torch.equal(g["mask"], unsharpened)
    row = rows(runs["on_dir"])[0]
    assert row["train/mask_ratio"] == pytest.approx(unsharpened.mean().item(), rel=1e-6)
    known = unsharpened * (g["y_u"] >= 0)  # fake Fashion-MNIST: every unlabeled image has its label
    correct = (weak.argmax(1) == g["y_u"]).float()
    assert row["train/pseudo_acc"] == pytest.approx(((correct * known).sum() / known.sum()).item(), rel=1e-6)


def test_unsup_loss_by_hand(runs):
    """CE(softmax(weak / T), softmax(strong)) times the mask, summed, divided by mu*B."""
    g = runs["on"]
    weak, strong, mask = g["logits_weak"].detach(), g["logits_strong"].detach(), g["mask"]
    n = len(weak)
    assert n == 7 * 8  # mu * B
    target = (weak / T).softmax(1)
    per_sample = -(target * strong.log_softmax(1)).sum(1)
    expected = (per_sample * mask).sum() / n
    assert g["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert rows(runs["on_dir"])[0]["losses/unsup"] == pytest.approx(expected.item(), rel=1e-5)
    assert g["loss_u"].item() > 0
    # the ways to get it wrong give other numbers on this batch
    over_kept = (per_sample * mask).sum() / mask.sum()
    student_temperature = (-(target * (strong / T).log_softmax(1)).sum(1) * mask).sum() / n  # tllib
    sharpened_mask = ((weak / T).softmax(1).max(1).values >= runs["threshold"]).float()
    for wrong in (over_kept, student_temperature, (per_sample * sharpened_mask).sum() / n):
        assert g["loss_u"].item() != pytest.approx(wrong.item(), rel=1e-3)
    # the sup and total losses of the same step
    assert g["loss_x"].item() == pytest.approx(F.cross_entropy(g["logits_l"].detach(), g["y_l"]).item(), rel=1e-5)
    assert g["loss"].item() == pytest.approx((g["loss_x"] + g["loss_u"]).item(), rel=1e-6)


def test_target_is_sharpened_and_carries_no_gradient(runs):
    """The gradient of the script's own loss_u: mask (softmax(strong) - target) / (mu B) on the strong view's logits,
    as CE with a constant target gives, and none on the weak view's, the target's source."""
    g = runs["on"]
    assert not g["target"].requires_grad  # a constant: no gradient flows through it
    assert torch.allclose(g["target"], (g["logits_weak"].detach() / T).softmax(1), atol=1e-7)
    grad_weak, grad_strong = torch.autograd.grad(g["loss_u"], [g["logits_weak"], g["logits_strong"]], allow_unused=True)
    strong, target, mask = g["logits_strong"].detach(), g["target"], g["mask"]
    assert grad_weak is None
    expected = mask[:, None] * (strong.softmax(1) - target) / len(strong)
    assert torch.allclose(grad_strong, expected, atol=1e-8) and grad_strong.abs().sum() > 0


def test_a_confidence_equal_to_the_threshold_passes(runs):
    """The mask keeps max p >= beta (TorchSSL): --threshold set to one image's own confidence keeps that image."""
    g, tied = runs["tie"], runs["tied"]
    assert_tie_kept(g["logits_weak"], g["mask"], tied)


def test_consistency_trains_the_network(runs):
    """Same seed, same batches: only the consistency term differs between the two runs."""
    assert not torch.equal(runs["probe"]["model"].conv1.weight, runs["on"]["model"].conv1.weight)


@pytest.mark.parametrize(
    "schedule, start, end",
    [
        ("linear", 0.1, 1.0),
        ("log", 0.1, 1 - math.exp(-5) * 0.9),
        ("exp", math.exp(-5) * 0.9 + 0.1, 1.0),
        ("none", 1.0, 1.0),
    ],
)
def test_tsa_threshold_endpoints(schedule, start, end):
    import uda

    assert uda.tsa_threshold(schedule, 0, 1000, 10) == pytest.approx(start, abs=1e-12)
    assert uda.tsa_threshold(schedule, 1000, 1000, 10) == pytest.approx(end, abs=1e-12)
    assert uda.tsa_threshold(schedule, 5000, 1000, 10) == pytest.approx(end, abs=1e-12)  # stays there
    assert uda.tsa_threshold(schedule, 0, 1000, 100) == pytest.approx(
        0.01 if schedule in ("linear", "log") else start if schedule == "none" else math.exp(-5) * 0.99 + 0.01
    )


def test_tsa_schedule_midpoints():
    import uda

    assert uda.tsa_threshold("linear", 500, 1000, 10) == pytest.approx(0.55)
    assert uda.tsa_threshold("log", 500, 1000, 10) == pytest.approx((1 - math.exp(-2.5)) * 0.9 + 0.1)
    assert uda.tsa_threshold("exp", 500, 1000, 10) == pytest.approx(math.exp(-2.5) * 0.9 + 0.1)


def probe_supervised(runs):
    """Step 1's true-class probabilities, top-class probabilities and per-example CE (from the probe)."""
    logits_l, y_l = runs["probe"]["logits_l"].detach(), runs["probe"]["y_l"]
    probs = logits_l.softmax(1)
    return (
        probs.gather(1, y_l[:, None]).squeeze(1),
        probs.max(1).values,
        F.cross_entropy(logits_l, y_l, reduction="none"),
    )


def test_tsa_leaves_out_confident_examples(runs, data_dir, tmp_path):
    """--tsa exp with the shortest K whose eta_1 falls under the largest true-class probability of
    step 1: the examples above eta_1 leave the supervised term, which is the mean of the others. TSA gates on the
    probability of the TRUE class, not the top one: on this batch the two give other examples."""
    import uda

    p_true, p_top, ce = probe_supervised(runs)
    K = next((k for k in range(1, 11) if uda.tsa_threshold("exp", 1, k, 10) < p_true.max()), None)
    assert K is not None, "the probe's predictions are too flat for a short run"
    eta_1 = uda.tsa_threshold("exp", 1, K, 10)
    kept = (p_true <= eta_1).float()
    assert 0 < kept.sum() < len(kept)
    kept_top = (p_top <= eta_1).float()
    assert not torch.equal(kept, kept_top)  # the case can fail a TSA on the top-class probability
    run_inprocess(
        "uda.py",
        *TINY,
        "--data-dir",
        data_dir,
        "--total-steps",
        K,
        "--log-every",
        1,
        "--tsa",
        "exp",
        "--run-dir",
        tmp_path,
    )
    first = rows(tmp_path)[0]
    assert first["step"] == 1
    assert first["train/tsa_threshold"] == pytest.approx(eta_1, rel=1e-6)
    assert first["train/tsa_kept"] == pytest.approx(kept.mean().item(), rel=1e-6)
    assert first["losses/sup"] == pytest.approx(((ce * kept).sum() / kept.sum()).item(), rel=1e-5)
    top = (ce * kept_top).sum() / kept_top.sum().clamp(min=1)
    for wrong in (ce.mean(), (ce * kept).mean(), top):  # no TSA; TorchSSL's division by B; the top-class gate
        assert first["losses/sup"] != pytest.approx(wrong.item(), rel=1e-3)
    assert first["train/tsa_kept"] != pytest.approx(kept_top.mean().item())


def test_tsa_linear_end_to_end(runs, data_dir, tmp_path):
    """Two steps of --tsa linear: eta = 0.55 then 1 (everything kept: the plain mean at step 1), logged
    each step, and the run evaluates and saves as any other."""
    p_true, _, ce = probe_supervised(runs)
    assert p_true.max() < 0.55
    g = run_inprocess(
        "uda.py",
        *TINY,
        "--data-dir",
        data_dir,
        "--total-steps",
        2,
        "--log-every",
        1,
        "--tsa",
        "linear",
        "--run-dir",
        tmp_path,
    )
    log = rows(tmp_path)
    train = [r for r in log if "losses/sup" in r]
    assert [(r["step"], r["train/tsa_threshold"]) for r in train] == [(1, pytest.approx(0.55)), (2, pytest.approx(1.0))]
    assert [r["train/tsa_kept"] for r in train] == [1.0, 1.0]
    assert train[0]["losses/sup"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert all(math.isfinite(r["losses/total"]) for r in train)
    assert any("eval/acc" in r and r["step"] == 2 for r in log)
    assert (tmp_path / "checkpoint.pt").is_file() and g["tsa_eta"].item() == 1.0  # the device tensor, last filled
