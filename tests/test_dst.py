"""dst.py: the gradient reversal layer, its warm start, the worst-case loss, which head learns from what,
and which head is evaluated."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, rows, run_keeping_step

import common
import dst

FAST = [*TINY, "--mu", "1"]  # one unlabeled image per labeled one: the strong augmentation dominates a CPU step


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return dst.DSTNet(10, depth=10, width=1, in_channels=1, bn_momentum=0.1, head_width=32)


def test_reversal_layer_multiplies_the_gradient_by_minus_coeff():
    torch.manual_seed(0)
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    coeff = torch.tensor(0.37)
    y = dst.GradReverse.apply(x, coeff)
    assert torch.equal(y, x)  # the identity forward
    (y * w).sum().backward()
    assert torch.allclose(x.grad, -0.37 * w)  # d/dx sum(x * w) = w, reversed and scaled
    x.grad = None
    (dst.GradReverse.apply(x, torch.tensor(0.0)) * w).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(w))  # lambda = lo = 0 on the first step: no feature gradient


def test_coefficient_schedule_endpoints():
    # 2 / (1 + exp(-t)) - 1 = tanh(t / 2): lambda_k = lo + (hi - lo) tanh(alpha k / (2 N))
    assert dst.grl_coefficient(0, 1000, 0.0, 0.1, 1.0) == 0.0
    assert dst.grl_coefficient(0, 1000, 0.02, 0.1, 1.0) == pytest.approx(0.02)
    assert dst.grl_coefficient(1000, 1000, 0.0, 0.1, 1.0) == pytest.approx(0.1 * math.tanh(0.5))  # 0.046 at k = N
    assert dst.grl_coefficient(10_000, 1000, 0.0, 0.1, 1.0) == pytest.approx(0.1 * math.tanh(5))  # k = K = 10 N
    assert 0.1 - dst.grl_coefficient(10_000, 1000, 0.0, 0.1, 1.0) < 1e-5
    assert dst.grl_coefficient(10**9, 1000, 0.0, 0.1, 1.0) == pytest.approx(0.1)
    assert dst.grl_coefficient(500, 1000, 0.02, 0.1, 3.0) == pytest.approx(0.02 + 0.08 * math.tanh(0.75))
    assert dst.grl_coefficient(0, 0, 0.0, 0.1, 1.0) == 0.1  # no warm start asked for


def test_worst_case_loss_equals_its_formula():
    logits_l = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2]])  # h predicts 0, 1
    worst_l = torch.tensor([[0.3, -0.2, 1.1], [1.5, 0.0, -0.7]])
    logits_u = torch.tensor([[0.0, 0.0, 3.0], [1.0, -2.0, 0.5], [-1.0, 4.0, 0.0]])  # h predicts 2, 0, 1
    worst_u = torch.tensor([[0.2, 0.4, 2.5], [-0.3, 0.8, 0.1], [1.2, 1.0, -0.5]])

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    eta_prime = 2.0
    labeled = sum(-math.log(softmax(w)[k]) for w, k in zip(worst_l.tolist(), [0, 1])) / 2
    unlabeled = sum(-math.log(1 - softmax(w)[k]) for w, k in zip(worst_u.tolist(), [2, 0, 1])) / 3
    loss = dst.worst_case_loss(logits_l, worst_l, logits_u, worst_u, eta_prime)
    assert loss.item() == pytest.approx(eta_prime * labeled + unlabeled, rel=1e-6)


def test_worst_case_loss_stays_finite_where_the_naive_form_overflows():
    """p_y rounds to 1 in fp32: -log(1 - p_y) is inf there, the exact value is 100 - log 2."""
    logits_u = torch.tensor([[5.0, 0.0, 0.0]])
    worst_u = torch.tensor([[100.0, 0.0, 0.0]], requires_grad=True)
    assert torch.isinf(-torch.log(1 - worst_u.softmax(1)[0, 0]))
    loss = dst.worst_case_loss(torch.zeros(1, 3), torch.zeros(1, 3), logits_u, worst_u, 0.0)  # eta' 0: no labeled term
    assert loss.item() == pytest.approx(100 - math.log(2), rel=1e-6)
    loss.backward()
    # d/dz of log(sum exp z) - log(sum_{j != y} exp z_j): p - q, q the softmax over the other classes
    assert torch.allclose(worst_u.grad, torch.tensor([[1.0, -0.5, -0.5]]), atol=1e-6)


def test_main_head_gets_no_gradient_from_the_pseudo_and_worst_losses():
    net = tiny_net().train()
    x = torch.randn(12, 1, 28, 28)
    logits, logits_p, logits_w = net(x, torch.tensor(0.1))
    confidence, pseudo = logits[4:8].detach().softmax(1).max(1)  # as dst.py: 4 labeled, 4 weak, 4 strong rows
    loss_p = F.cross_entropy(logits_p[8:], pseudo)
    loss_w = dst.worst_case_loss(logits[:4], logits_w[:4], logits[4:8], logits_w[4:8], 2.0)
    head = [net.fc.weight, net.fc.bias]
    for loss in (loss_p, loss_w):
        grads = torch.autograd.grad(loss, [*head, net.conv1.weight], retain_graph=True, allow_unused=True)
        assert all(g is None or not g.any() for g in grads[:2])  # h: nothing
        assert grads[2] is not None and grads[2].abs().sum() > 0  # psi: something
    grads = torch.autograd.grad(F.cross_entropy(logits[:4], torch.arange(4)), head)
    assert all(g.abs().sum() > 0 for g in grads)  # h learns from the labeled loss


def test_the_worst_head_reads_the_features_through_the_reversal_layer():
    """model(x, c) puts R between psi and h_w: the worst-case loss's gradient on a backbone weight is -c times the
    one through net.worst_head(net.features(x)) without R, and h_w's own gradient is not reversed. Both forwards in
    train mode on the same batch: BatchNorm normalises with that batch's statistics, and h_w has no dropout."""
    net = tiny_net().train()
    torch.manual_seed(1)
    x = torch.randn(8, 1, 28, 28)  # 4 labeled, 4 unlabeled rows
    coeff = torch.tensor(0.1)
    backbone, head = [net.conv1.weight, net.blocks[0].conv1.weight], [net.worst_head[0].weight]

    def grads(logits, worst):  # (3) with h's predictions as targets (an argmax: no gradient through h)
        loss = dst.worst_case_loss(logits[:4], worst[:4], logits[4:], worst[4:], 2.0)
        return torch.autograd.grad(loss, [*backbone, *head])

    logits, _, worst = net(x, coeff)
    reversed_ = grads(logits, worst)
    f = net.features(x)
    logits_plain, worst_plain = net.fc(f), net.worst_head(f)
    assert torch.equal(logits_plain, logits) and torch.equal(worst_plain, worst)  # the same forward: R is the identity
    plain = grads(logits_plain, worst_plain)
    for g, g_plain in zip(reversed_[:2], plain[:2]):
        assert g_plain.abs().sum() > 0
        expected = -coeff * g_plain  # to float32 rounding: R scales the features' gradient, not this one
        assert torch.allclose(g, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert torch.equal(reversed_[2], plain[2])  # h_w minimises (3): its gradient is not reversed


def test_evaluation_uses_the_main_head_only():
    net = tiny_net().eval()
    info = common.DATASETS["fashion_mnist"]
    torch.manual_seed(1)
    x_test = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        logits = net.fc(net.features(common.normalize(x_test, info)))
    y_test = torch.arange(20) % 10
    y_test[:10] = logits[:10].argmax(1)  # the first half right by construction, the second half right by chance
    expected = 100 * (logits.argmax(1) == y_test).float().mean().item()
    assert expected >= 50
    off = torch.autocast("cpu", enabled=False)
    acc, loss, acc_raw = dst.evaluate(net, net, x_test, y_test, info, off)  # as the EMA model and the raw one
    assert acc == pytest.approx(expected) and loss == pytest.approx(F.cross_entropy(logits, y_test).item(), rel=1e-5)
    assert acc_raw == acc
    with torch.no_grad():  # heads that evaluate() would read if it used them
        for p in [*net.pseudo_head.parameters(), *net.worst_head.parameters()]:
            p.normal_()
    assert dst.evaluate(net, net, x_test, y_test, info, off) == (acc, loss, acc)
    with torch.no_grad():
        net.fc.weight.neg_()
    assert dst.evaluate(net, net, x_test, y_test, info, off)[0] != acc


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """In-process runs, identical but for the pseudo and worst-case weights: one step with every
    pseudo label admitted and the reversal on from the start, with and without (2) and (3), and two steps
    with the defaults, with and without (3)."""
    out = {}
    for name, extra in {
        "one_on": ["--total-steps", 1, "--threshold", 0, "--grl-lo", 0.05],
        "one_off": ["--total-steps", 1, "--threshold", 0, "--grl-lo", 0.05, "--pseudo-weight", 0, "--worst-weight", 0],
        "two_on": ["--total-steps", 2],
        "two_no_worst": ["--total-steps", 2, "--worst-weight", 0],
    }.items():
        out[name] = run_keeping_step(
            "dst.py", *FAST, "--data-dir", data_dir, *extra, "--run-dir", tmp_path_factory.mktemp(name)
        )
    return out


def test_pseudo_and_worst_losses_train_the_backbone_and_heads_but_not_h(runs):
    """Same seed, same batches, same forward: the weights change only the backward. After one step
    h's gradient and weights are bit-identical, the backbone's and both MLP heads' are not."""
    on, off = runs["one_on"]["model"], runs["one_off"]["model"]
    assert runs["one_on"]["loss_p"] > 0 and runs["one_on"]["loss_w"] > 0
    assert torch.equal(on.fc.weight.grad, off.fc.weight.grad) and torch.equal(on.fc.bias.grad, off.fc.bias.grad)
    assert torch.equal(on.fc.weight, off.fc.weight)
    assert not torch.equal(on.conv1.weight.grad, off.conv1.weight.grad)
    assert not torch.equal(on.conv1.weight, off.conv1.weight)
    for head in ("pseudo_head", "worst_head"):
        assert getattr(on, head)[0].weight.grad.abs().sum() > 0
        assert not getattr(off, head)[0].weight.grad.any()  # weight 0: only weight decay moves it


def test_defaults_change_the_backbone(runs):
    """Step 1: lambda = lo = 0 and no pseudo label passes tau at init; step 2: lambda ~ 0.1, so the
    worst-case loss must reach the backbone: the run differs from one without it (--worst-weight 0)."""
    row = next(r for r in rows(runs["two_on"]["run_dir"]) if "train/mask_ratio" in r)
    assert row["step"] == 2 and row["train/mask_ratio"] == 0  # the mean over steps 1 and 2: no pseudo label passed
    assert not runs["two_on"]["mask"].any() and runs["two_on"]["loss_p"].item() == 0  # step 2's, kept
    on, off = runs["two_on"]["model"], runs["two_no_worst"]["model"]
    assert not torch.equal(on.conv1.weight, off.conv1.weight)
    assert not torch.equal(on.blocks[0].conv1.weight, off.blocks[0].conv1.weight)


def test_logged_coefficient_and_pseudo_label_accuracy(runs):
    # two steps, N = 0.1 * 2: k = 0 then 1, logged as their mean
    row = next(r for r in rows(runs["two_on"]["run_dir"]) if "train/grl_coeff" in r)
    assert row["train/grl_coeff"] == pytest.approx((0 + 0.1 * math.tanh(1 / (2 * 0.2))) / 2, rel=1e-6)
    assert {"losses/pseudo", "losses/worst", "train/mask_ratio"} <= row.keys()
    assert row["train/mask_ratio"] == 0 and "train/pseudo_acc" not in row  # none kept: no accuracy, not 0 %
    g = runs["two_on"]  # the coefficient: one device tensor, filled before each step with lambda_k, k = step - 1
    assert g["stats"]["train/grl_coeff"] is g["coeff"] and g["coeff"].dtype == torch.float32
    assert g["coeff"].item() == torch.tensor(dst.grl_coefficient(1, 0.2, 0.0, 0.1, 1.0)).item()  # step 2: k = 1
    g = runs["one_on"]  # tau = 0: every pseudo label admitted
    assert g["stats"]["train/mask_ratio"].item() == 1.0
    known = g["y_u"] >= 0
    assert known.all()  # Fashion-MNIST: every unlabeled image has its label
    expected = (g["pseudo_label"] == g["y_u"]).float().mean()
    assert g["stats"]["train/pseudo_acc"].item() / g["stats"]["n/train/pseudo_acc"].item() == pytest.approx(
        expected.item()
    )


@pytest.fixture(scope="module")
def tie(runs, data_dir, tmp_path_factory):
    """One step with tau exactly the float32 confidence max(q_b) of one unlabeled image, the middle one of the
    first step of "one_on" (same seed, batches and forward: tau changes neither). A float32 value is exact as a
    Python float, and its repr survives argparse's float() and the cast back to float32 in the comparison."""
    confidence = runs["one_on"]["logits"][8:16].detach().softmax(1).max(1).values  # B = mu B = 8: the weak rows
    tau = confidence.sort().values[len(confidence) // 2].item()
    args = [*FAST, "--data-dir", data_dir, "--total-steps", 1, "--threshold", tau]
    return run_keeping_step("dst.py", *args, "--run-dir", tmp_path_factory.mktemp("tie")), tau


def cross_entropy_by_hand(logits, target):
    return -logits.double().log_softmax(1).gather(1, target[:, None]).squeeze(1)


def worst_case_by_hand(logits_l, worst_l, logits_u, worst_u, eta_prime):
    """(3) as the docstring writes it, in float64 with the naive log(1 - p) (finite away from p = 1): eta' times
    the mean CE of h_w against h's predictions y' on the labeled rows, plus the mean -log(1 - p_w(q^)) on the
    unlabeled rows."""
    labeled = cross_entropy_by_hand(worst_l, logits_l.argmax(1)).mean()
    p_u = worst_u.double().softmax(1).gather(1, logits_u.argmax(1, keepdim=True)).squeeze(1)
    return eta_prime * labeled - (1 - p_u).log().mean()


def test_pseudo_and_worst_losses_of_a_step_by_hand(tie):
    """(2): the mask is strict, max(q_b) > tau (the image at tau is out), q^ is h's argmax on the weak view, h_p
    learns it on the strong view, and the sum is divided by all mu B images; (3) takes h's predictions as targets
    on the weak views (not the labels); (4) is their sum with lambda 1, eta 0.3. Rows: [alpha(x), alpha(u), A(u)]."""
    g, tau = tie
    assert g["args"].threshold == tau  # the round trip through argparse
    logits, logits_pseudo, logits_worst = (g[k].detach() for k in ("logits", "logits_pseudo", "logits_worst"))
    assert len(logits) == 3 * 8 and logits.dtype == torch.float32  # B = mu B = 8
    weak, pseudo_weak, pseudo_strong = logits[8:16], logits_pseudo[8:16], logits_pseudo[16:]
    confidence, label = weak.softmax(1).max(1)
    assert (confidence == tau).sum() == 1  # the premise: one image ties with tau in float32
    mask = (confidence > tau).double()
    assert 0 < mask.sum() < 7  # others pass, others do not: a wrong mask shows
    assert torch.equal(g["mask"], mask.float()) and not torch.equal(g["mask"], (confidence >= tau).float())

    per_image = cross_entropy_by_hand(pseudo_strong, label)
    expected = (per_image * mask).sum() / 8
    assert g["loss_p"].item() == pytest.approx(expected.item(), rel=1e-5)
    wrong = {
        "mean over the kept images": (per_image * mask).sum() / mask.sum(),
        "max(q) >= tau": (per_image * (confidence >= tau)).sum() / 8,
        "h_p on the weak view": (cross_entropy_by_hand(pseudo_weak, label) * mask).sum() / 8,
        "h_p's own pseudo label": (cross_entropy_by_hand(pseudo_strong, pseudo_weak.argmax(1)) * mask).sum() / 8,
    }
    for name, value in wrong.items():
        assert g["loss_p"].item() != pytest.approx(value.item(), rel=1e-3), name

    eta_prime = g["args"].eta_prime
    assert eta_prime == 2.0  # the recipe (fashion_mnist takes the default one)
    worst_l, worst_u, worst_s = logits_worst[:8], logits_worst[8:16], logits_worst[16:]
    expected_w = worst_case_by_hand(logits[:8], worst_l, weak, worst_u, eta_prime)
    assert g["loss_w"].item() == pytest.approx(expected_w.item(), rel=1e-5)
    labels = F.one_hot(g["y_l"], 10).float()  # as logits, their argmax is the label
    assert not torch.equal(labels.argmax(1), logits[:8].argmax(1))  # h's predictions are not the labels
    wrong = {
        "the labels as targets": worst_case_by_hand(labels, worst_l, weak, worst_u, eta_prime),
        "h_w on the strong view": worst_case_by_hand(logits[:8], worst_l, weak, worst_s, eta_prime),
    }
    for name, value in wrong.items():
        assert g["loss_w"].item() != pytest.approx(value.item(), rel=1e-3), name

    loss_x = cross_entropy_by_hand(logits[:8], g["y_l"]).mean()
    assert g["loss"].item() == pytest.approx((loss_x + expected + 0.3 * expected_w).item(), rel=1e-5)


RECIPE_FLAGS = ("threshold", "worst_weight", "eta_prime", "grl_warmup")


def test_the_recipe_is_that_of_the_commands_behind_the_published_numbers(runs):
    """tllib bb3e9af, dst.sh: tau 0.9, eta 0.3, eta' 2 and N = 100k of 1M steps on CIFAR-10, CIFAR-100 and SVHN;
    STL-10's own tau 0.95, eta 0.1, eta' 1, N = 300k (not the argparse defaults there, tau 0.95, which every command
    overrides). A flag given wins; the values are written to args.json, so a resumed run keeps them."""

    def recipe(*flags):
        args = dst.set_recipe(dst.parse_args(["--run-dir", "unused", *flags]))
        return {k: getattr(args, k) for k in RECIPE_FLAGS}

    for dataset in ("cifar10", "cifar100", "svhn", "mnist"):
        assert recipe("--dataset", dataset) == dict(threshold=0.9, worst_weight=0.3, eta_prime=2.0, grl_warmup=0.1)
    assert recipe("--dataset", "stl10") == dict(threshold=0.95, worst_weight=0.1, eta_prime=1.0, grl_warmup=0.3)
    assert dst.parse_args(["--run-dir", "unused"]).total_steps == 1_000_000  # tllib's --train-iterations
    given = recipe("--dataset", "stl10", "--threshold", "0.8", "--grl-warmup", "0")
    assert given == dict(threshold=0.8, worst_weight=0.1, eta_prime=1.0, grl_warmup=0.0)
    saved = json.loads((Path(runs["two_on"]["run_dir"]) / "args.json").read_text())
    assert {k: saved[k] for k in RECIPE_FLAGS} == dict(threshold=0.9, worst_weight=0.3, eta_prime=2.0, grl_warmup=0.1)


def test_heads_are_those_of_the_code_behind_the_published_numbers():
    """Default heads (tllib dev-ssl bb3e9af): pseudo head with one hidden layer and dropout, worst head
    Linear-BN-ReLU-Linear-BN-ReLU-Linear without dropout; --heads first-release: the older two-layer MLPs."""
    kinds = lambda head: [type(m).__name__ for m in head]
    net = tiny_net()
    assert kinds(net.pseudo_head) == ["Linear", "ReLU", "Dropout", "Linear"]
    assert kinds(net.worst_head) == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert net.worst_head[0].in_features == net.num_features and net.worst_head[0].out_features == 32
    first = dst.DSTNet(10, depth=10, width=1, in_channels=1, bn_momentum=0.1, head_width=32, heads="first-release")
    old = ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert kinds(first.pseudo_head) == old and kinds(first.worst_head) == old
    args = dst.parse_args(["--run-dir", "unused"])
    assert args.heads == "published"
    # the worst head normalises its hidden layers with the batch's statistics: a shift of its input's
    # first-layer output by a constant vector does not change its output in train mode
    net.train()
    f = torch.randn(16, net.num_features)
    out = net.worst_head(f)
    with torch.no_grad():
        net.worst_head[0].bias += 3.0
    assert torch.allclose(net.worst_head(f), out, atol=1e-4)
