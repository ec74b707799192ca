"""mpl.py: the direction of the teacher's signal (on a toy problem where the answer is known), h and
its moving baseline, the schedules, one step of the real script checked against its formulas, the
confidence gate at a tie, the gradient paths of the two losses, the finetuning phase (and its dropout),
and resume inside / across it."""

import copy
import json
import math
import time
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, checkpoint, flat, rows, run, run_inprocess, run_keeping_step, run_killed, same

import common
import mpl

SMOOTHING, TEMPERATURE, THRESHOLD = 0.15, 0.7, 0.2  # the script's defaults, and a threshold some samples pass at init

# ---------------------------------------------------------------------------------------------
# The toy problem: a linear student on 2-D points, one labeled point (class 0), one unlabeled point
# close to it. Training the student on pseudo label 0 for the unlabeled point helps its labeled loss,
# training on 1 hurts it. A linear teacher gives the unlabeled point its class probabilities.
# ---------------------------------------------------------------------------------------------
X_L, Y_L = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
X_U = torch.tensor([[1.0, 0.3]])
W0 = torch.tensor([[0.2, -0.1], [0.1, 0.3]])  # student weights (classes x features)
V0 = torch.tensor([[0.3, 0.2], [-0.1, 0.4]])  # teacher weights


def student_step(y_hat, lr):
    """One SGD step of the student on CE(y_hat, S(x_u)); returns CE_old, CE_new on the labeled point."""
    w = W0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(F.cross_entropy(X_U @ w.T, y_hat), w)
    w_new = W0 - lr * grad
    return F.cross_entropy(X_L @ W0.T, Y_L), F.cross_entropy(X_L @ w_new.T, Y_L)


def teacher_step(h, y_hat, lr=0.5):
    """One SGD step of the teacher on the MPL term alone, through mpl.py's own function; returns the
    teacher's probabilities for the unlabeled point before and after."""
    v = V0.clone().requires_grad_()
    (grad,) = torch.autograd.grad(mpl.mpl_term(h, X_U @ v.T, y_hat), v)
    return (X_U @ V0.T).softmax(1)[0], (X_U @ (V0 - lr * grad).T).softmax(1)[0]


def test_direction_on_a_toy_problem():
    """The key test: the teacher makes the helpful pseudo label more likely and the harmful one less
    likely; kekmodel's sign (CE_new - CE_old) would do the opposite."""
    zero = torch.zeros(())
    helpful, harmful = torch.tensor([0]), torch.tensor([1])
    h_good, _ = mpl.mpl_signal(*student_step(helpful, lr=0.5), zero, 1.0)  # baseline off
    h_bad, _ = mpl.mpl_signal(*student_step(harmful, lr=0.5), zero, 1.0)
    assert h_good > 0 > h_bad  # the premise: 0 helps, 1 hurts
    before, after = teacher_step(h_good, helpful)
    assert after[0] > before[0]  # the helpful label becomes more likely
    before, after = teacher_step(h_bad, harmful)
    assert after[1] < before[1]  # the harmful label less likely
    # kekmodel's sign moves both the wrong way: the test tells the two apart
    before, after = teacher_step(-h_good, helpful)
    assert after[0] < before[0]
    before, after = teacher_step(-h_bad, harmful)
    assert after[1] > before[1]


def test_h_is_the_first_order_dot_product():
    """Taylor: CE_old - CE_new = eta grad CE_l . grad CE_u + O(eta^2), the paper's h, with its sign."""
    for y_hat in (torch.tensor([0]), torch.tensor([1])):
        w = W0.clone().requires_grad_()
        (g_l,) = torch.autograd.grad(F.cross_entropy(X_L @ w.T, Y_L), w)
        (g_u,) = torch.autograd.grad(F.cross_entropy(X_U @ w.T, y_hat), w)
        eta = 1e-3
        h, _ = mpl.mpl_signal(*student_step(y_hat, eta), torch.zeros(()), 1.0)
        assert h.item() == pytest.approx(eta * (g_l * g_u).sum().item(), rel=1e-2)


def test_expected_mpl_gradient_is_the_exact_teacher_gradient():
    """Score function, exactly: averaged over y_hat ~ p_T, the gradient of h(y_hat) * CE(y_hat, T) is the
    gradient of E_{y_hat ~ p_T}[CE_new(y_hat)] w.r.t. the teacher, computed here by autograd through the
    probabilities (two classes: the expectation is a finite sum). Any lr, not only small ones."""
    v = V0.clone().requires_grad_()
    p = (X_U @ v.T).softmax(1)[0]
    ce_new = {y: student_step(torch.tensor([y]), lr=0.5)[1] for y in (0, 1)}
    (exact,) = torch.autograd.grad(sum(p[y] * ce_new[y] for y in (0, 1)), v)
    estimate = torch.zeros_like(V0)
    for y in (0, 1):
        h, _ = mpl.mpl_signal(*student_step(torch.tensor([y]), lr=0.5), torch.zeros(()), 1.0)
        (g,) = torch.autograd.grad(mpl.mpl_term(h, X_U @ v.T, torch.tensor([y])), v)
        estimate += p[y].detach() * g
    assert exact.abs().max() > 1e-3  # not a trivial zero
    assert torch.allclose(estimate, exact, atol=1e-6)
    assert not torch.allclose(-estimate, exact, atol=1e-3)  # kekmodel's sign: the gradient of the opposite objective


def test_mpl_signal_and_baseline_formulas():
    """Several steps against the formulas: b <- d b + (1 - d) h_raw before use, h = h_raw - b."""
    gen = torch.Generator().manual_seed(0)
    ce_old, ce_new = torch.rand(6, generator=gen) + 1, torch.rand(6, generator=gen) + 1
    for decay in (0.99, 1.0, 0.5):
        b_fn, b_hand = torch.zeros(()), 0.0
        for old, new in zip(ce_old, ce_new):
            h_fn, b_fn = mpl.mpl_signal(old, new, b_fn, decay)
            h_raw = old.item() - new.item()
            b_hand = decay * b_hand + (1 - decay) * h_raw
            assert b_fn.item() == pytest.approx(b_hand, rel=1e-5, abs=1e-7)
            assert h_fn.item() == pytest.approx(h_raw - b_hand, rel=1e-5, abs=1e-7)
        if decay == 1.0:
            assert b_fn.item() == 0.0  # the baseline stays off
    # h is a constant for the teacher, positive when the labeled loss went down
    old = torch.tensor(2.0, requires_grad=True)
    h, b = mpl.mpl_signal(old, torch.tensor(1.5), torch.zeros(()), 1.0)
    assert h.item() == pytest.approx(0.5) and not h.requires_grad and not b.requires_grad


def test_warmup_cosine_by_hand():
    """K = 100, warm-up 10, wait 20: lr 0 for steps 0..19, (k - 19) / 10 up to 1 at step 29, then
    0.5 (1 + cos(pi p)) over the 70 remaining steps."""
    f = lambda k, wait=20: mpl.warmup_cosine(k, 100, 10, wait)
    assert [f(k) for k in (0, 5, 19)] == [0.0, 0.0, 0.0]
    assert [f(k) for k in (20, 24, 29)] == pytest.approx([0.1, 0.5, 1.0])
    assert [f(k) for k in (30, 65, 100)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert f(47.5) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert [f(k, wait=0) for k in (0, 9, 10, 55)] == pytest.approx([0.1, 1.0, 1.0, 0.5])  # the teacher: no wait
    assert mpl.warmup_cosine(0, 100, 0) == 1.0  # no warm-up: the cosine from the first step


# ---------------------------------------------------------------------------------------------
# The real script, in-process: two MPL steps (lr not waiting, no dropout so that CE_new can be
# recomputed), and the same two steps followed by one finetuning step at lr 0.
# ---------------------------------------------------------------------------------------------
RUN = [
    "--total-steps",
    2,
    "--log-every",
    1,
    "--warmup-steps",
    0,
    "--student-wait-steps",
    0,
    "--dropout",
    0,
    "--threshold",
    THRESHOLD,
]


@pytest.fixture(scope="module")
def two_steps(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mpl")
    return run_keeping_step("mpl.py", *TINY, "--data-dir", data_dir, *RUN, "--run-dir", run_dir), run_dir


def test_logged_h_baseline_and_losses_match_the_formulas(two_steps):
    g, run_dir = two_steps
    train = [r for r in rows(run_dir) if "train/mpl_h" in r]
    assert [r["step"] for r in train] == [1, 2]
    b = 0.0
    for r in train:  # Eq. (6) from the logged CE_old, CE_new, decay 0.99
        h_raw = r["train/ce_old"] - r["train/ce_new"]
        b = 0.99 * b + 0.01 * h_raw
        assert r["train/mpl_baseline"] == pytest.approx(b, rel=1e-4, abs=1e-7)
        assert r["train/mpl_h"] == pytest.approx(h_raw - b, rel=1e-4, abs=1e-7)
        assert r["losses/total"] == r["losses/student"] > 0
    last = train[-1]
    for key, name in (
        ("train/ce_old", "ce_old"),
        ("train/ce_new", "ce_new"),
        ("train/mpl_h", "h"),
        ("train/mpl_baseline", "mpl_baseline"),
        ("losses/teacher_mpl", "loss_t_mpl"),
    ):
        assert last[key] == pytest.approx(g[name].item(), rel=1e-6)
    n_l = len(g["y_l"])
    # CE_old: the student's labeled logits of its training forward, unsmoothed
    assert g["ce_old"].item() == pytest.approx(F.cross_entropy(g["s_logits"][:n_l].detach(), g["y_l"]).item(), rel=1e-6)
    # CE_new: the same augmented labeled images through the UPDATED student (the final weights), train mode
    student = copy.deepcopy(g["model"]).train()
    with torch.no_grad():
        ce_new = F.cross_entropy(student(g["prep"](g["x_lw"])), g["y_l"])
    assert g["ce_new"].item() == pytest.approx(ce_new.item(), rel=1e-5)
    assert g["ce_new"].item() != pytest.approx(g["ce_old"].item(), rel=1e-4)  # the student moved
    # the learning rates: K = 2, no warm-up, no wait. The student's (the template's train/lr) read after each step's
    # schedule: lr * cos-schedule(1), (2); the teacher's read inside the step, the lr it used: lr * cos-schedule(0), (1)
    assert [r["train/lr"] for r in train] == pytest.approx([0.025, 0.0], rel=1e-6, abs=1e-12)  # float32 tensors
    assert [r["train/lr_teacher"] for r in train] == pytest.approx([0.05, 0.025], rel=1e-6)
    assert g["stats"]["train/lr_teacher"] is g["teacher_optimizer"].param_groups[0]["lr"]  # the optimizer's own


def test_student_learns_the_teachers_weak_view_label_alone(two_steps):
    """Eq. (3)-(4): y_hat = argmax of the teacher's weak-view target q (not of its strong-view logits),
    the student's loss is the smoothed CE on it and nothing else, and the MPL term (7) scores the same
    y_hat on the weak-view logits that produced it."""
    g, run_dir = two_steps
    t_us, t_uw, s_us = g["t_logits_us"].detach(), g["t_logits_uw"].detach(), g["s_logits_us"].detach()
    weak_label = (t_uw / TEMPERATURE).softmax(1).argmax(1)  # argmax q
    strong_label = t_us.argmax(1)  # the earlier choice (the official code's view)
    assert not torch.equal(weak_label, strong_label)  # the premise: the two views disagree somewhere
    assert torch.equal(g["y_hat"], weak_label)
    expected = F.cross_entropy(s_us, weak_label, label_smoothing=SMOOTHING)
    assert g["loss_s"].item() == pytest.approx(expected.item(), rel=1e-6)
    for wrong in (
        F.cross_entropy(s_us, strong_label, label_smoothing=SMOOTHING),
        F.cross_entropy(s_us, g["y_hat"]),
        expected + F.cross_entropy(g["s_logits"][: len(g["y_l"])].detach(), g["y_l"]),
    ):
        assert g["loss_s"].item() != pytest.approx(wrong.item(), rel=1e-4)
    h = g["h"]
    assert g["loss_t_mpl"].item() == pytest.approx((h * F.cross_entropy(t_uw, weak_label)).item(), rel=1e-6)
    for wrong in (h * F.cross_entropy(t_us, weak_label), h * F.cross_entropy(t_us, strong_label)):
        assert g["loss_t_mpl"].item() != pytest.approx(wrong.item(), rel=1e-4)
    row = [r for r in rows(run_dir) if "train/pseudo_acc" in r][-1]
    assert row["train/pseudo_acc"] == pytest.approx((g["y_hat"] == g["y_u"]).float().mean().item(), rel=1e-6)


def test_teacher_uda_loss_and_mask_on_the_sharpened_target(two_steps):
    g, run_dir = two_steps
    t_l, t_uw, t_us = (g[k].detach() for k in ("t_logits_l", "t_logits_uw", "t_logits_us"))
    q = (t_uw / TEMPERATURE).softmax(1)
    sharpened = (q.max(1).values >= THRESHOLD).float()
    unsharpened = (t_uw.softmax(1).max(1).values >= THRESHOLD).float()
    assert 0 < sharpened.sum() < len(sharpened) and not torch.equal(sharpened, unsharpened)  # the case discriminates
    assert torch.equal(g["mask"], sharpened)
    uda = (-(q * t_us.log_softmax(1)).sum(1) * sharpened).sum() / len(q)  # over all mu B
    assert g["loss_t_uda"].item() == pytest.approx(uda.item(), rel=1e-5)
    sup = F.cross_entropy(t_l, g["y_l"], label_smoothing=SMOOTHING)
    assert g["loss_t_sup"].item() == pytest.approx(sup.item(), rel=1e-6)
    w_u = 8.0 * 2 / 5000  # lambda_u min(1, k / K_uda) at step 2, filled into a float32 device tensor before the step
    assert g["uda_w"].item() == torch.tensor(w_u).item() and g["stats"]["train/uda_weight"] is g["uda_w"]
    assert g["loss_t"].item() == pytest.approx((sup + w_u * uda + g["loss_t_mpl"]).item(), rel=1e-6)
    row = [r for r in rows(run_dir) if "train/mask_ratio" in r][-1]
    assert row["train/mask_ratio"] == pytest.approx(sharpened.mean().item(), rel=1e-6)


def autograd_leaves(loss):
    """The tensors a loss's backward accumulates gradients into (its graph's leaves)."""
    found, stack, seen = set(), [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            found.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return found


def test_gradient_paths(two_steps):
    """The student's loss reaches the student only (no gradient into the teacher through y_hat); the
    teacher's loss reaches the teacher only (h, CE_old and CE_new are constants for it)."""
    g, _ = two_steps
    student = {id(p) for p in g["model"].parameters()}
    teacher = {id(p) for p in g["teacher"].parameters()}
    assert autograd_leaves(g["loss_s"]) == student
    assert autograd_leaves(g["loss_t"]) == teacher
    assert not g["y_hat"].requires_grad and not g["h"].requires_grad and not g["ce_new"].requires_grad


def test_schedules_are_wired(two_steps):
    """The run's own schedulers, evaluated for an MPL phase of K - N = 100 steps, warm-up 10, student wait 20."""
    g, _ = two_steps
    args = copy.copy(g["args"])
    student, teacher = g["scheduler"].lr_lambdas[0], g["teacher_scheduler"].lr_lambdas[0]
    scope = student.__globals__  # the run's own globals, which the schedules read at each call
    mpl_steps, scope["mpl_steps"] = scope["mpl_steps"], 100
    g["args"].warmup_steps, g["args"].student_wait_steps = 10, 20
    try:
        assert [student(k) for k in (0, 19, 20, 29, 65, 100)] == pytest.approx([0, 0, 0.1, 1, 0.5, 0], abs=1e-12)
        assert [teacher(k) for k in (0, 9, 55, 100)] == pytest.approx([0.1, 1, 0.5, 0], abs=1e-12)
    finally:
        scope["mpl_steps"] = mpl_steps
        vars(g["args"]).update(vars(args))


def test_checkpoint_holds_the_teacher_and_the_method_state(two_steps):
    g, run_dir = two_steps
    ckpt = checkpoint(run_dir)
    assert set(ckpt) >= {
        "teacher",
        "teacher_optimizer",
        "teacher_scheduler",
        "teacher_scaler",
        "finetune_optimizer",
        "mpl_baseline",
    }
    assert all(torch.equal(v, ckpt["teacher"][k]) for k, v in g["teacher"].state_dict().items())
    assert not torch.equal(ckpt["teacher"]["fc.weight"], ckpt["model"]["fc.weight"])
    assert torch.equal(ckpt["mpl_baseline"], g["mpl_baseline"]) and ckpt["mpl_baseline"].item() != 0
    assert len(ckpt["teacher_optimizer"]["state"]) == len(list(g["teacher"].parameters()))  # momentum buffers
    assert ckpt["teacher_scheduler"]["last_epoch"] == ckpt["scheduler"]["last_epoch"] == 2


def test_finetuning_starts_from_the_ema_student(two_steps, data_dir, tmp_path):
    """--total-steps 3 --finetune-steps 1: the same two MPL steps, then one finetuning step. It starts from the
    EMA student's weights after step 2 with a fresh SGD (nesterov, momentum 0.9, no weight decay: its first step
    moves a weight by -lr (1 + 0.9) grad); the EMA keeps averaging the finetuned student (the evaluated model);
    the teacher is idle; the EMA student of the MPL phase is evaluated at its end (eval/acc_mpl_phase)."""
    g, mpl_dir = two_steps
    lr = 0.1
    f = run_keeping_step(
        "mpl.py",
        *TINY,
        "--data-dir",
        data_dir,
        *RUN,
        "--total-steps",
        3,
        "--finetune-steps",
        1,
        "--finetune-lr",
        lr,
        "--run-dir",
        tmp_path,
    )
    ema_after_mpl = dict(g["ema_model"].named_parameters())
    student_after_mpl = dict(g["model"].named_parameters())
    for name, p in f["model"].named_parameters():  # undo the one finetuning step
        before = p.detach() + lr * 1.9 * p.grad
        assert torch.allclose(before, ema_after_mpl[name], rtol=1e-5, atol=1e-6), name
    assert not all(torch.equal(p, ema_after_mpl[k]) for k, p in f["model"].named_parameters())  # it did move
    assert not all(torch.equal(ema_after_mpl[k], p) for k, p in student_after_mpl.items())  # the EMA is not the student
    decay = min(0.995, (1 + 3) / (10 + 3))  # the template's EMA at step 3
    for name, p in f["ema_model"].named_parameters():
        expected = decay * ema_after_mpl[name] + (1 - decay) * f["model"].state_dict()[name]
        assert torch.allclose(p, expected, rtol=1e-5, atol=1e-6), name
    assert all(torch.equal(v, f["ema_model"].state_dict()[k]) for k, v in f["model"].named_buffers())
    assert all(torch.equal(v, g["teacher"].state_dict()[k]) for k, v in f["teacher"].state_dict().items())
    log = rows(tmp_path)
    assert [r["step"] for r in log if "eval/acc" in r] == [3]
    phase_end = [r for r in log if "eval/acc_mpl_phase" in r]  # the MPL phase's end is evaluated
    mpl_run = [r for r in rows(mpl_dir) if "eval/acc" in r]  # the run of the two MPL steps alone
    assert [r["step"] for r in phase_end] == [2] and phase_end[0]["eval/acc_mpl_phase"] == mpl_run[-1]["eval/acc"]
    assert [r["step"] for r in log if "eval/acc_teacher" in r] == [2, 3]
    finetune_rows = [r for r in log if "losses/finetune" in r]
    assert [r["step"] for r in finetune_rows] == [3] and "losses/teacher" not in finetune_rows[0]
    assert finetune_rows[0]["losses/finetune"] == pytest.approx(f["loss"].item(), rel=1e-6)
    expected = F.cross_entropy(f["logits_l"].detach(), f["y_l"], label_smoothing=SMOOTHING)  # labeled CE, smoothed
    assert f["loss"].item() == pytest.approx(expected.item(), rel=1e-6) and len(f["y_l"]) == 512


def test_finetuning_turns_the_students_dropout_off(data_dir, tmp_path):
    """--dropout 0.2: both networks drop the classifier's input during the MPL phase; finetuning turns the student's
    dropout off (as kekmodel's), the teacher keeps its own. The rate of every train-mode dropout, in order: the MPL
    step's three forwards (the teacher, the student, the updated student), then the finetuning step's one."""
    rates, dropout = [], F.dropout

    def spy(x, p=0.5, training=True, inplace=False):
        if training and x.ndim == 2:  # the pooled features (the blocks' own dropout, at 0, sees feature maps)
            rates.append(p)
        return dropout(x, p, training, inplace)

    args = ["--total-steps", 2, "--finetune-steps", 1, "--finetune-batch-size", 16, "--dropout", 0.2]
    with mock.patch.object(F, "dropout", spy):
        g = run_inprocess("mpl.py", *TINY, "--data-dir", data_dir, *args, "--run-dir", tmp_path)
    assert rates == [0.2, 0.2, 0.2, 0.0]
    assert g["model"].fc_dropout == 0.0 and g["teacher"].fc_dropout == 0.2 == g["args"].dropout


def test_the_confidence_gate_keeps_a_tie(data_dir, tmp_path):
    """m_i = 1[max_c q_ic >= beta]: a sample whose sharpened confidence is exactly --threshold is kept. A probe run
    reads the median sample's confidence at step 1; the same run with --threshold that value (the float32 written
    out exactly) sees the same q, since the threshold acts only from the mask on."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 1]
    probe = run_keeping_step("mpl.py", *args, "--run-dir", tmp_path / "probe")
    confidence = probe["q"].max(1).values
    i = confidence.argsort()[len(confidence) // 2]
    beta = confidence[i].item()  # a float32, exact as a Python float
    g = run_keeping_step("mpl.py", *args, "--threshold", repr(beta), "--run-dir", tmp_path / "tie")
    assert torch.equal(g["q"], probe["q"]) and g["args"].threshold == beta  # argparse's float is the value itself
    assert confidence[i] == g["args"].threshold and not confidence[i] > g["args"].threshold  # a tie in the comparison
    kept = (confidence >= beta).float()
    assert 0 < kept.sum() < len(kept) and torch.equal(g["mask"], kept)
    assert g["mask"][i] == 1  # > would drop it


@pytest.mark.parametrize(
    "mpl_steps, finetune", [(1, 5), (6, 1)], ids=["killed-while-finetuning", "killed-before-finetuning"]
)
def test_kill_and_resume_with_finetuning(mpl_steps, finetune, data_dir, tmp_path):
    """The first checkpoint (step 5) falls inside the finetuning phase, or before it so that the resumed run
    crosses the switch: either way the same checkpoint and metrics as a run never stopped."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    total = mpl_steps + finetune  # --total-steps is the whole run
    args = [
        *TINY,
        "--data-dir",
        data_dir,
        "--total-steps",
        total,
        "--finetune-steps",
        finetune,
        "--finetune-batch-size",
        16,
    ]
    out = run("mpl.py", *args, "--run-dir", straight).stdout
    step = run_killed("mpl.py", *args, "--run-dir", killed)
    assert step == 5 and (step > mpl_steps) == (mpl_steps == 1)
    run("mpl.py", "--resume", killed)
    a, b = (flat({k: v for k, v in checkpoint(d).items() if k != "args"}) for d in (straight, killed))
    assert a.keys() == b.keys()
    assert [k for k in a if not same(a[k], b[k])] == []
    assert rows(straight) == rows(killed)
    ckpt = checkpoint(straight)
    assert ckpt["step"] == total
    assert ckpt["teacher_scheduler"]["last_epoch"] == mpl_steps  # idle while finetuning
    assert ckpt["scheduler"]["last_epoch"] == mpl_steps  # the student's MPL schedule, idle while finetuning too
    assert len(ckpt["finetune_optimizer"]["state"]) > 0
    # the first finetuning row's interval spans the switch (log every 4): it holds the finetuning steps alone
    finetune_rows = [r for r in rows(straight) if "losses/finetune" in r]
    assert finetune_rows and all("losses/teacher" not in r for r in finetune_rows)
    assert all(r["train/lr"] == pytest.approx(3e-5, rel=1e-6) for r in finetune_rows)  # the lr that trains
    console = [line for line in out.splitlines() if " finetune " in line]  # the rows of the finetuning steps
    assert len(console) == len(finetune_rows) and all("| lr 3e-05 |" in line for line in console), out
    assert all(r["losses/total"] == r["losses/finetune"] for r in finetune_rows)


def test_it_per_sec_leaves_out_the_teachers_evaluation(data_dir, tmp_path, monkeypatch):
    """The teacher is evaluated before the template's log row: its time is taken out of the row's interval, as the
    template takes out its own evaluation. A clock that jumps 100 s whenever the 40 test images are normalised makes
    an evaluation counted in the interval read as under 0.05 it/s (the old code: rows 4 and 6)."""
    clock, normalize, jumped = time.perf_counter, common.normalize, [0.0]

    def normalize_jumping(x, info):
        jumped[0] += 100 if len(x) == 40 else 0  # the fake test set: an evaluation "takes" 100 s
        return normalize(x, info)

    monkeypatch.setattr(time, "perf_counter", lambda: clock() + jumped[0])
    monkeypatch.setattr(common, "normalize", normalize_jumping)
    flags = ["--total-steps", 6, "--log-every", 2, "--eval-every", 4, "--save-every", 6]
    run_inprocess("mpl.py", *TINY, "--data-dir", data_dir, *flags, "--run-dir", tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "losses/total" in r]  # with the wall-clock fields rows() leaves out
    assert [r["step"] for r in train] == [2, 4, 6] and jumped[0] >= 400  # 2 evaluations of teacher and of the EMA
    assert all(r["train/it_per_sec"] > 0.1 for r in train), train


def test_the_teacher_given_as_both_models_is_evaluated_in_one_pass():
    """The script evaluates its teacher as both of the template's models, evaluate(teacher, teacher): one forward a
    test batch (the old template ran it twice: 4.1 s against 2.0 s for 1,000 images on WRN-10-2, one CPU thread,
    bench/results/mpl_teacher_eval.md), the figures two copies of it give, and the teacher back in train mode."""
    torch.manual_seed(0)
    teacher = common.WideResNet(10, depth=10, width=1, in_channels=1, bn_momentum=0.1)
    x_test, y_test = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8), torch.arange(20) % 10
    info, off = common.DATASETS["fashion_mnist"], torch.autocast("cpu", enabled=False)
    expected = mpl.evaluate(teacher, copy.deepcopy(teacher), x_test, y_test, info, off, batch_size=8)
    forwards = []
    teacher.register_forward_hook(lambda module, inputs, output: forwards.append(len(inputs[0])))
    assert mpl.evaluate(teacher, teacher, x_test, y_test, info, off, batch_size=8) == expected
    assert forwards == [8, 8, 4] and teacher.training


def test_the_edges_of_mpls_flags_are_valid():
    """Their bad values are refused in test_robust.py (every method flag); the edges of their ranges are not."""
    args = mpl.parse_args(["--device", "cpu", "--threshold", "1", "--baseline-decay", "1", "--finetune-steps", "0"])
    assert (args.threshold, args.baseline_decay, args.finetune_steps) == (1, 1, 0)


def test_finetuning_must_leave_an_mpl_phase(data_dir, tmp_path, capsys):
    """--finetune-steps N is the last N steps of --total-steps K: N >= K is one line, exit 2, nothing written."""
    with pytest.raises(SystemExit) as exit_info:
        run_inprocess(
            "mpl.py",
            *TINY,
            "--data-dir",
            data_dir,
            "--total-steps",
            3,
            "--finetune-steps",
            3,
            "--run-dir",
            tmp_path / "run",
        )
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "--finetune-steps 3 must be below --total-steps 3" in err and not (tmp_path / "run").exists()


def test_a_resume_keeps_the_side_of_the_mpl_phases_end_its_checkpoint_is_on(data_dir, tmp_path, capsys):
    """A run finetuning since step 4 (--total-steps 6 --finetune-steps 2), continued with a larger --total-steps
    alone, went back to MPL steps on the finetuned student and then finetuned a second time from the EMA: refused in
    one line, with nothing written. Grown by as much as --total-steps, --finetune-steps continues the finetuning. A
    checkpoint in the MPL phase (step 4 of a run without finetuning) cannot have the phase end before it either."""
    args = [*TINY, "--data-dir", data_dir, "--mu", 1, "--save-every", 2]
    finetuning, mpl_phase = tmp_path / "finetuning", tmp_path / "mpl_phase"
    run_inprocess("mpl.py", *args, "--total-steps", 6, "--finetune-steps", 2, "--run-dir", finetuning)
    run_inprocess("mpl.py", *args, "--total-steps", 4, "--run-dir", mpl_phase)
    before = {d: sorted((f.name, f.stat().st_mtime_ns) for f in d.iterdir()) for d in (finetuning, mpl_phase)}
    refusals = [
        (finetuning, ["--total-steps", 8], "it finetunes since step 4: keep --total-steps - --finetune-steps = 4"),
        (finetuning, ["--total-steps", 8, "--finetune-steps", 6], "finetunes since step 4"),
        (mpl_phase, ["--total-steps", 6, "--finetune-steps", 3], "its step 4 is in the MPL phase"),
    ]
    for run_dir, more, says in refusals:
        with pytest.raises(SystemExit) as exit_info:
            run_inprocess("mpl.py", "--resume", run_dir, *more)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert before == {d: sorted((f.name, f.stat().st_mtime_ns) for f in d.iterdir()) for d in (finetuning, mpl_phase)}
    run_inprocess("mpl.py", "--resume", finetuning, "--total-steps", 8, "--finetune-steps", 4)
    assert [(r["step"], "losses/finetune" in r) for r in rows(finetuning) if "losses/total" in r] == [
        (2, False),
        (4, False),
        (6, True),
        (8, True),
    ]
    run_inprocess("mpl.py", "--resume", mpl_phase, "--total-steps", 6, "--finetune-steps", 2)
    assert checkpoint(mpl_phase)["step"] == 6 and checkpoint(mpl_phase)["teacher_scheduler"]["last_epoch"] == 4


def test_start_up_note_when_the_uda_weight_comes_too_early(data_dir, tmp_path, capsys):
    """The reference's weight 8 ramped over a short --uda-steps trains the teacher on its own guesses
    before it has learned from its labels: the script says so once at start-up, and not with weight 1."""
    base = [*TINY, "--data-dir", data_dir, "--total-steps", 1, "--uda-steps", 10]
    run_inprocess("mpl.py", *base, "--run-dir", tmp_path / "w8")
    out = capsys.readouterr().out
    assert out.count("note:") == 1 and "--uda-weight 1" in out
    run_inprocess("mpl.py", *base, "--uda-weight", 1, "--run-dir", tmp_path / "w1")
    assert "note:" not in capsys.readouterr().out
