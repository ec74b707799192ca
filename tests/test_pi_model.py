"""pi_model.py: the consistency loss by hand; the consistency term trains the network; the ramp-up."""

import math

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, checkpoint, rows, run, run_keeping_step


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


def test_rampup_endpoints():
    import pi_model

    assert pi_model.sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert pi_model.sigmoid_rampup(50, 100) == pytest.approx(math.exp(-1.25))
    assert pi_model.sigmoid_rampup(100, 100) == 1.0 == pi_model.sigmoid_rampup(500, 100)
    assert pi_model.sigmoid_rampup(0, 0) == 1.0
