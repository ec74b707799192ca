"""mean_teacher.py: the consistency loss by hand, gradient into the student and none into the teacher (its forward
under no_grad), the teacher's own augmentation of the same images, the EMA's closed form, the teacher's own BatchNorm
statistics, the ramp-up."""

import copy
import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, rows, run_inprocess, run_keeping_step

import common


def run_recording(*args):
    """run_keeping_step("mean_teacher.py", *args) with the teacher's parameters left requiring grad (the script's
    requires_grad_(False) made a no-op), so that its no_grad forward alone keeps the gradient out of it. Adds under
    "augment" each common.weak_augment call's (input, output), under "forwards" each network forward's (module,
    input, training)."""
    augment, forwards, weak_augment = [], [], common.weak_augment

    def spy(x, *a, **k):
        augment.append((x.clone(), weak_augment(x, *a, **k)))
        return augment[-1][1].clone()

    def forward(module, inputs):
        if isinstance(module, common.WideResNet):
            forwards.append((module, inputs[0].detach().clone(), module.training))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(forward)
    try:
        with (
            mock.patch.object(common, "weak_augment", spy),
            mock.patch.object(torch.nn.Module, "requires_grad_", lambda module, requires_grad=True: module),
        ):
            g = run_keeping_step("mean_teacher.py", *args)
    finally:
        hook.remove()
    return {**g, "augment": augment, "forwards": forwards}


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two 3-step runs in this process, identical but for the consistency weight (and the last step's locals), by
    run_recording: the teacher's parameters require grad in them."""
    out = {}
    for w in (0, 100):
        out[w] = run_recording(
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
    """Paper Eq. (1): w(t) 1/(C mu B) sum_i ||f(a(u_i); theta) - f(a'(u_i); theta')||^2, the teacher's side a constant
    (no grad_fn, though its parameters require grad in these runs); the labeled cross-entropy; the total with
    w(t) = w_max (no ramp). a and a' are two draws: test_teacher_sees_its_own_augmentation_of_the_same_images."""
    g = runs[100]
    student, teacher = g["logits_u"].detach(), g["logits_u_teacher"]
    assert teacher.grad_fn is None and not teacher.requires_grad and len(student) == len(g["x_u"])
    squared = (student.softmax(1) - teacher.softmax(1)) ** 2
    expected = squared.sum() / squared.numel()  # C mu B terms
    assert g["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    for wrong in (squared.sum(1).mean(), ((student - teacher) ** 2).mean()):  # summed over classes; on the logits
        assert g["loss_u"].item() != pytest.approx(wrong.item(), rel=1e-3)
    assert g["loss_x"].item() == pytest.approx(F.cross_entropy(g["logits_l"].detach(), g["y_l"]).item(), rel=1e-5)
    assert g["loss"].item() == pytest.approx((g["loss_x"] + 100 * g["loss_u"]).item(), rel=1e-6)


def test_consistency_gradient_reaches_the_student_only(runs):
    """The teacher's parameters require grad in these runs (run_recording): its no_grad forward is what keeps the
    consistency gradient out of it."""
    student, teacher = runs[100]["model"], runs[100]["ema_model"]
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.requires_grad for p in teacher.parameters())  # the premise
    assert all(p.grad is None for p in teacher.parameters())
    # same seed, same batches: only the consistency term differs, so the student must differ
    assert not torch.equal(runs[0]["model"].conv1.weight, student.conv1.weight)
    assert min(r["losses/unsup"] for r in rows(runs[100]["run_dir"]) if "losses/unsup" in r) > 0  # logged means


def test_teacher_sees_its_own_augmentation_of_the_same_images(runs):
    """a and a' of Eq. (1): per step two weak_augment calls, the student's on [labeled, unlabeled] and then the
    teacher's on the same unlabeled images, with different outputs; each network forward takes its call's output."""
    g = runs[100]
    b, n = len(g["x_l"]), len(g["x_u"])
    assert len(g["augment"]) == 2 * 3  # two a step, three steps
    trained = [(m, x) for m, x, training in g["forwards"] if training]  # not evaluate()'s
    student = [x for m, x in trained if m is g["model"]]
    teacher = [x for m, x in trained if m is g["ema_model"]]
    assert len(student) == len(teacher) == 3 and len(trained) == 6
    for step in range(3):
        (x, a), (u, a_teacher) = g["augment"][2 * step : 2 * step + 2]
        assert len(x) == b + n and torch.equal(x[b:], u)  # the same unlabeled images
        assert not torch.equal(a[b:], a_teacher)  # augmented independently
        assert torch.equal(student[step], common.normalize(a, g["info"]))
        assert torch.equal(teacher[step], common.normalize(a_teacher, g["info"]))
    assert torch.equal(u, g["x_u"])  # the last step's unlabeled batch


def test_teacher_batchnorm_statistics_are_its_own_and_move(runs):
    student, teacher = runs[100]["model"], runs[100]["ema_model"]
    bn = [(s, t) for s, t in zip(student.modules(), teacher.modules()) if isinstance(t, torch.nn.BatchNorm2d)]
    assert all(t.running_mean.abs().sum() > 0 and (t.running_var != 1).any() for _, t in bn)  # moved from init
    assert all(not torch.equal(s.running_mean, t.running_mean) for s, t in bn)  # not copies of the student's
    # its forwards are in train mode (batch statistics): one per step, each counted (an eval-mode forward counts none)
    assert all(int(t.num_batches_tracked) == 3 for _, t in bn)


@pytest.mark.parametrize("decay", [0.999, 0.6])
def test_ema_update_matches_closed_form(decay):
    """ema_update (paper Eq. (2)) against its closed form over a sequence of decays alpha_t:
    theta'_k = prod_t alpha_t theta_0 + sum_t (1 - alpha_t) prod_{s>t} alpha_s theta_t. The sequence fed in is
    min(1 - 1/(t+1), decay), whose closed form at 0.999 is the plain mean of theta_0..theta_k: a test input, not the
    script's rule (min((1 + t) / (10 + t), ema_decay), checked in test_scripts.py)."""
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


def test_logged_weight_follows_the_sigmoid_ramp(data_dir, tmp_path):
    """w(t) = w_max exp(-5 (1 - T)^2), T = min(t / (ramp_up K), 1), at K = 10, ramp-up 0.5, w_max 2 and the step
    t = 1..10 being taken: w_max from step 5 on. A linear ramp (TorchSSL's shape) or one counted from t - 1 fails."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 10, "--ramp-up", 0.5, "--unsup-weight", 2]
    run_inprocess("mean_teacher.py", *args, "--log-every", 1, "--run-dir", tmp_path)
    logged = {r["step"]: r["train/unsup_weight"] for r in rows(tmp_path) if "train/unsup_weight" in r}
    assert logged == pytest.approx({t: 2 * math.exp(-5 * (1 - min(t / 5, 1)) ** 2) for t in range(1, 11)}, rel=1e-6)
