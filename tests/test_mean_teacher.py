"""mean_teacher.py: the consistency loss by hand, gradient into the student and none into the teacher, the EMA's
closed form, the teacher's own BatchNorm statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, rows, run_keeping_step

import common


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two 3-step runs in this process, identical but for the consistency weight (and the last step's locals)."""
    out = {}
    for w in (0, 100):
        out[w] = run_keeping_step(
            "mean_teacher.py",
            *TINY,
            "--data-dir",
            data_dir,
            "--total-steps",
            3,
            "--ramp-up",
            0,
            "--unsup-weight",
            w,
            "--run-dir",
            tmp_path_factory.mktemp(f"mt{w}"),
        )
    return out


def test_consistency_loss_by_hand(runs):
    """Paper Eq. (1): w(t) 1/(C mu B) sum_i ||f(a(u_i); theta) - f(a'(u_i); theta')||^2, the teacher's side a constant;
    the labeled cross-entropy; the total with w(t) = w_max (no ramp)."""
    g = runs[100]
    student, teacher = g["logits_u"].detach(), g["logits_u_teacher"]
    assert not teacher.requires_grad and len(student) == len(g["x_u"])
    squared = (student.softmax(1) - teacher.softmax(1)) ** 2
    expected = squared.sum() / squared.numel()  # C mu B terms
    assert g["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    for wrong in (squared.sum(1).mean(), ((student - teacher) ** 2).mean()):  # summed over classes; on the logits
        assert g["loss_u"].item() != pytest.approx(wrong.item(), rel=1e-3)
    assert g["loss_x"].item() == pytest.approx(F.cross_entropy(g["logits_l"].detach(), g["y_l"]).item(), rel=1e-5)
    assert g["loss"].item() == pytest.approx((g["loss_x"] + 100 * g["loss_u"]).item(), rel=1e-6)


def test_consistency_gradient_reaches_the_student_only(runs):
    student, teacher = runs[100]["model"], runs[100]["ema_model"]
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # same seed, same batches: only the consistency term differs, so the student must differ
    assert not torch.equal(runs[0]["model"].conv1.weight, student.conv1.weight)
    assert min(r["losses/unsup"] for r in rows(runs[100]["run_dir"]) if "losses/unsup" in r) > 0  # logged means


def test_teacher_batchnorm_statistics_are_its_own_and_move(runs):
    student, teacher = runs[100]["model"], runs[100]["ema_model"]
    bn = [(s, t) for s, t in zip(student.modules(), teacher.modules()) if isinstance(t, torch.nn.BatchNorm2d)]
    assert all(t.running_mean.abs().sum() > 0 and (t.running_var != 1).any() for _, t in bn)  # moved from init
    assert all(not torch.equal(s.running_mean, t.running_mean) for s, t in bn)  # not copies of the student's
    # its forwards are in train mode (batch statistics): one per step, each counted (an eval-mode forward counts none)
    assert all(int(t.num_batches_tracked) == 3 for _, t in bn)


@pytest.mark.parametrize("decay", [0.999, 0.6])
def test_ema_update_matches_closed_form(decay):
    """theta'_k = prod_t alpha_t theta_0 + sum_t (1 - alpha_t) prod_{s>t} alpha_s theta_t with
    alpha_t = min(1 - 1/(t+1), decay): at 0.999 the plain mean of theta_0..theta_k."""
    import mean_teacher

    torch.manual_seed(0)
    student = common.WideResNet(10, depth=10, width=1)
    teacher = copy.deepcopy(student)
    thetas = [torch.nn.utils.parameters_to_vector(student.parameters()).detach().clone()]
    alphas = []
    for t in range(1, 6):
        for p in student.parameters():
            p.data.normal_()
        for b in student.buffers():
            b.fill_(t)
        thetas.append(torch.nn.utils.parameters_to_vector(student.parameters()).detach().clone())
        alphas.append(min(1 - 1 / (t + 1), decay))
        mean_teacher.ema_update(teacher, student, torch.tensor(1 - alphas[-1]))  # the weight 1 - alpha_t, a tensor
    coef = [1.0] * 6
    for t in range(1, 6):  # fold step t in: everything so far times alpha_t, theta_t times 1 - alpha_t
        coef = [c * alphas[t - 1] for c in coef[:t]] + [1 - alphas[t - 1]] + coef[t + 1 :]
    expected = sum(c * th for c, th in zip(coef, thetas))
    if decay == 0.999:
        assert torch.allclose(expected, torch.stack(thetas).mean(0), atol=1e-6)
    assert torch.allclose(torch.nn.utils.parameters_to_vector(teacher.parameters()), expected, atol=1e-5)
    # ema_update is the template's and copies the BN buffers too: the training loop puts the teacher's own back
    # (test_teacher_batchnorm_statistics_are_its_own_and_move)
