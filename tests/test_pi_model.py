"""pi_model.py: the consistency loss by hand; its gradient into both passes (into one with --stop-grad); the
consistency term trains the network; the ramp-up."""

import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, checkpoint, rows, run, run_inprocess, run_keeping_step


def test_consistency_loss_by_hand(data_dir, tmp_path):
    """Eq. (2): 1/(C mu B) sum_i ||z(u_i) - z~(u_i)||^2 over two passes of the same images under independent
    augmentation; Eq. (1) the labeled cross-entropy; the total with w(t) = w_max (no ramp)."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 1, "--ramp-up", 0, "--unsup-weight", 7]
    g = run_keeping_step("pi_model.py", *args, "--run-dir", tmp_path)
    b, n = len(g["x_l"]), len(g["x_u"])
    assert torch.equal(g["x"][b : b + n], g["x_u"]) and torch.equal(g["x"][b + n :], g["x_u"])  # the same images
    z1, z2 = g["logits_u1"].detach(), g["logits_u2"].detach()
    assert not torch.equal(z1, z2)  # augmented independently
    squared = (z1.softmax(1) - z2.softmax(1)) ** 2
    expected = squared.sum() / (squared.shape[1] * n)
    assert g["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    for wrong in (squared.sum(1).mean(), ((z1 - z2) ** 2).mean()):  # summed over classes; on the logits
        assert g["loss_u"].item() != pytest.approx(wrong.item(), rel=1e-3)
    assert g["loss_x"].item() == pytest.approx(F.cross_entropy(g["logits_l"].detach(), g["y_l"]).item(), rel=1e-5)
    assert g["unsup_w"].item() == 7.0
    assert g["loss"].item() == pytest.approx((g["loss_x"] + 7 * g["loss_u"]).item(), rel=1e-6)


@pytest.mark.parametrize("stop_grad", [False, True])
def test_gradient_into_both_passes_unless_stop_grad(data_dir, tmp_path, stop_grad):
    """The paper's default: the gradient of w (2) reaches both passes, w 2 (z - z~) / (C n) into z and its negative
    into z~; --stop-grad (TorchSSL, USB) detaches the second pass: nothing into z~, z's gradient unchanged."""
    grads, mse_loss = {}, F.mse_loss

    def spy(z, z_tilde, *a, **k):  # the step's one MSE: hooks on its two inputs keep the gradients backward brings
        for name, p in (("z", z), ("z~", z_tilde)):
            if p.requires_grad:
                p.register_hook(lambda grad, name=name: grads.__setitem__(name, grad))
        return mse_loss(z, z_tilde, *a, **k)

    args = [*TINY, "--data-dir", data_dir, "--total-steps", 1, "--ramp-up", 0, "--unsup-weight", 7]
    with mock.patch.object(F, "mse_loss", spy):
        g = run_keeping_step("pi_model.py", *args, *(["--stop-grad"] if stop_grad else []), "--run-dir", tmp_path)
    p1, p2 = g["logits_u1"].detach().softmax(1), g["logits_u2"].detach().softmax(1)
    by_hand = 7 * 2 * (p1 - p2) / p1.numel()  # d/dz of w 1/(C n) sum (z - z~)^2
    assert by_hand.abs().max() > 0 and torch.allclose(grads["z"], by_hand, rtol=1e-4, atol=1e-9)
    if stop_grad:
        assert list(grads) == ["z"]
    else:
        assert torch.allclose(grads["z~"], -by_hand, rtol=1e-4, atol=1e-9)


def test_consistency_trains_the_network(data_dir, tmp_path):
    """Same seed, same batches: only the consistency term differs between the runs, so the weights
    must differ. (USB's Mean Teacher compared a tensor with itself for years: zero gradient,
    silently supervised-only.) Detaching one branch must change the gradient too."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 3, "--ramp-up", 0]
    run("pi_model.py", *args, "--unsup-weight", 0, "--run-dir", tmp_path / "off")
    run("pi_model.py", *args, "--unsup-weight", 100, "--run-dir", tmp_path / "on")
    run("pi_model.py", *args, "--unsup-weight", 100, "--stop-grad", "--run-dir", tmp_path / "half")
    off, on, half = (checkpoint(tmp_path / d)["model"] for d in ("off", "on", "half"))
    assert not torch.equal(off["conv1.weight"], on["conv1.weight"])
    assert not torch.equal(on["conv1.weight"], half["conv1.weight"])
    assert all(r["losses/unsup"] > 0 for r in rows(tmp_path / "on") if "losses/unsup" in r)


def test_logged_weight_follows_the_sigmoid_ramp(data_dir, tmp_path):
    """Eq. (3) at K = 10, ramp-up 0.5, w_max 2: w(t) = 2 exp(-5 (1 - min(t / 5, 1))^2) at the step t = 1..10 being
    taken, so w_max from step 5 on. A linear ramp (TorchSSL's shape) or one counted from t - 1 fails."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 10, "--ramp-up", 0.5, "--unsup-weight", 2]
    run_inprocess("pi_model.py", *args, "--log-every", 1, "--run-dir", tmp_path)
    logged = {r["step"]: r["train/unsup_weight"] for r in rows(tmp_path) if "train/unsup_weight" in r}
    assert logged == pytest.approx({t: 2 * math.exp(-5 * (1 - min(t / 5, 1)) ** 2) for t in range(1, 11)}, rel=1e-6)


def test_rampup_endpoints():
    import pi_model

    assert pi_model.sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert pi_model.sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert pi_model.sigmoid_rampup(100, 100) == 1.0 == pi_model.sigmoid_rampup(500, 100)
    assert pi_model.sigmoid_rampup(0, 0) == 1.0
