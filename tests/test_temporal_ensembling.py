"""temporal_ensembling.py: the ensemble buffer and its bias-corrected target against the closed form,
rows never sampled, the buffer in the checkpoint, the consistency term's gradient."""

import pytest
import torch
from scriptrun import TINY, checkpoint, rows, run


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
