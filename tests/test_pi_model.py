"""pi_model.py: the consistency term trains the network; the ramp-up."""

import math

import pytest
import torch
from scriptrun import TINY, checkpoint, rows, run


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
