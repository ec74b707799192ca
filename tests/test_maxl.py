"""maxl.py: the mask softmax, the focal loss, the entropy regulariser, the second-order meta gradient
(against finite differences), the meta loss against its equations written out by hand, BatchNorm
buffers left alone by the meta step, the Single baseline, the CIFAR-100 superclasses, one real step
recomputed from its inputs, and the generator's lr schedule."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakedata import make_fake_dataset
from scriptrun import TINY, checkpoint, rows, run_inprocess, run_keeping_step
from torch.optim.optimizer import register_optimizer_step_pre_hook

import common
import maxl


def tiny_nets(num_classes=3, psi=2, dtype=torch.float64, seed=0):
    """Multi-task net and generator, WRN-10-1 on 1-channel 28x28 images, in train mode."""
    torch.manual_seed(seed)
    model = maxl.MAXLNet(num_classes, psi, 10, 1, 1, 0.1).to(dtype).train()
    generator = common.WideResNet(num_classes * psi, 10, 1, 1, 0.1).to(dtype).train()
    return model, generator


def np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def np_focal(logits, target, gamma):
    """-sum_k t_k (1 - p_k)^gamma log p_k, batch mean, from explicit probabilities (float64)."""
    p = np_softmax(np.asarray(logits, dtype=np.float64))
    return float(np.mean(-(np.asarray(target, dtype=np.float64) * (1 - p) ** gamma * np.log(p)).sum(1)))


def np_neg_entropy(y_aux):
    pbar = np.asarray(y_aux, dtype=np.float64).mean(0)
    pbar = pbar[pbar > 0]
    return float((pbar * np.log(pbar)).sum())


def focal_by_hand(logits, target, gamma):
    """Eq. (2) written out: 1/N sum_n -sum_k t_nk (1 - p_nk)^gamma log p_nk, p = exp(z) / sum_k exp(z_k)."""
    e = logits.exp()
    p = e / e.sum(1, keepdim=True)
    return -(target * (1 - p) ** gamma * p.log()).sum(1).mean()


def meta_loss_by_hand(model, generator, x, y, psi, alpha, aux_weight, entropy_weight, gamma):
    """Eqs. (1)-(5) written out apart from maxl.meta_loss: y_aux normalised over the psi slots of each sample's class,
    L_1 (3) by a forward of a copy of the multi-task net (train mode: batch statistics; the copy's buffers move, not
    the model's), the look-ahead theta_1+ = theta_1 - alpha grad L_1 (4) as fast weights, forwarded by
    torch.func.functional_call, and (5) with sum pbar log pbar over the slots with pbar > 0. The graph reaches the
    generator (create_graph). Returns (L_2, primary focal loss at theta_1+, regulariser)."""
    net = copy.deepcopy(model)
    num_classes = net.fc.out_features
    own = torch.arange(num_classes * psi)[None, :] // psi == y[:, None]  # (B, C psi): the slots of class y_b
    e = torch.where(own, generator(x).exp(), 0)
    y_aux = e / e.sum(1, keepdim=True)  # (1)
    one_hot = (torch.arange(num_classes)[None, :] == y[:, None]).to(x.dtype)
    pri, aux = net(x, aux=True)
    loss_1 = focal_by_hand(pri, one_hot, gamma) + aux_weight * focal_by_hand(aux, y_aux, gamma)  # (3)
    names, params = zip(*net.named_parameters())
    grads = torch.autograd.grad(loss_1, params, create_graph=True)
    fast = {name: p - alpha * g for name, p, g in zip(names, params, grads)}  # (4)
    pri_plus = focal_by_hand(torch.func.functional_call(net, fast, (x,)), one_hot, gamma)
    pbar = y_aux.mean(0)
    pbar = pbar[pbar > 0]
    reg = (pbar * pbar.log()).sum()
    return pri_plus + entropy_weight * reg, pri_plus, reg  # (5)


# ---------------------------------------------------------------------------------------------
# Mask softmax, focal loss, entropy regulariser
# ---------------------------------------------------------------------------------------------


def test_slot_mask_layout():
    slots = maxl.slot_mask(4, 3)
    expected = torch.zeros(4, 12, dtype=torch.bool)
    for c in range(4):
        expected[c, 3 * c : 3 * c + 3] = True
    assert torch.equal(slots, expected)


def test_mask_softmax_only_on_the_class_slots():
    torch.manual_seed(0)
    slots = maxl.slot_mask(4, 3)
    logits = 3 * torch.randn(6, 12)
    y = torch.tensor([0, 1, 2, 3, 1, 0])
    q = maxl.mask_softmax(logits, y, slots)
    for n, c in enumerate(y.tolist()):
        live = slice(3 * c, 3 * c + 3)
        assert q[n].sum().item() == pytest.approx(1.0, abs=1e-6)
        off = torch.ones(12, dtype=torch.bool)
        off[live] = False
        assert torch.equal(q[n, off], torch.zeros(9))  # exactly zero mass outside
        e = np.exp(logits[n, live].double().numpy())
        assert np.allclose(q[n, live].numpy(), e / e.sum(), atol=1e-6)


def test_mask_softmax_finite_for_huge_logits_where_the_reference_overflows():
    slots = maxl.slot_mask(2, 3)
    logits = torch.tensor([[1e4, 1e4 + 1, 1e4 - 1, 2e4, 0.0, 0.0], [5e4, 0.0, 0.0, 1e4, 1e4, 1e4]])
    y = torch.tensor([0, 1])
    q = maxl.mask_softmax(logits, y, slots)
    assert torch.isfinite(q).all()
    e = np.exp(np.array([0.0, 1.0, -1.0]))
    assert np.allclose(q[0, :3].numpy(), e / e.sum(), atol=1e-6) and torch.equal(q[0, 3:], torch.zeros(3))
    assert np.allclose(q[1, 3:].numpy(), 1 / 3, atol=1e-6) and torch.equal(q[1, :3], torch.zeros(3))
    # the reference's exp(x) * mask / sum(exp(x) * mask), mask 1 on the class's slots and 1e-8 elsewhere
    mask = (slots.float() + 1e-8 * (~slots).float())[y]
    naive = torch.exp(logits) * mask / torch.sum(torch.exp(logits) * mask, dim=1, keepdim=True)
    assert torch.isnan(naive).any()


def test_focal_loss_equals_its_formula():
    torch.manual_seed(1)
    logits = 2 * torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    one_hot = F.one_hot(y, 4).float()
    soft = torch.rand(5, 4).softmax(1)
    for gamma in (2.0, 0.5, 0.0):
        for target in (one_hot, soft):
            got = maxl.focal_loss(logits, target, gamma).item()
            assert got == pytest.approx(np_focal(logits.numpy(), target.numpy(), gamma), rel=1e-5)
    # gamma 0 is the cross-entropy, hard and soft
    assert maxl.focal_loss(logits, one_hot, 0.0).item() == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert maxl.focal_loss(logits, soft, 0.0).item() == pytest.approx(F.cross_entropy(logits, soft).item(), rel=1e-6)
    # gamma 2 down-weights the examples already fitted: strictly below the cross-entropy
    assert maxl.focal_loss(logits, one_hot, 2.0).item() < F.cross_entropy(logits, y).item()


def test_entropy_regulariser_value_and_a_step_raises_the_entropy():
    torch.manual_seed(2)
    slots = maxl.slot_mask(2, 3)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0])
    logits = torch.randn(8, 6)
    logits[:, [0, 3]] += 3  # most mass on one slot per class: a collapsing generator
    logits.requires_grad_(True)
    q = maxl.mask_softmax(logits, y, slots)
    reg = maxl.entropy_reg(q)
    assert reg.item() == pytest.approx(np_neg_entropy(q.detach().numpy()), rel=1e-6)
    (grad,) = torch.autograd.grad(reg, logits)
    with torch.no_grad():
        q_after = maxl.mask_softmax(logits - 0.5 * grad, y, slots)  # one small descent step on the regulariser alone
    h_before, h_after = -np_neg_entropy(q.detach().numpy()), -np_neg_entropy(q_after.numpy())
    assert h_after > h_before + 1e-3
    assert h_after <= math.log(6) + 1e-6


def test_entropy_regulariser_finite_when_a_class_is_absent():
    """All samples of class 0: pbar is exactly 0 on class 1's slots. 0 log 0 = 0 with a finite
    gradient; a bare log gives NaN gradients there."""
    slots = maxl.slot_mask(2, 3)
    y = torch.zeros(4, dtype=torch.long)
    logits = torch.randn(4, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    reg = maxl.entropy_reg(maxl.mask_softmax(logits, y, slots))
    (grad,) = torch.autograd.grad(reg, logits)
    assert torch.isfinite(reg) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    pbar = maxl.mask_softmax(logits, y, slots).mean(0)
    (naive_grad,) = torch.autograd.grad((pbar * pbar.log()).nan_to_num().sum(), logits)
    assert torch.isnan(naive_grad).any()


# ---------------------------------------------------------------------------------------------
# The meta step
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("entropy_weight", [0.0, 0.2])
def test_meta_gradient_matches_finite_differences_and_is_second_order(entropy_weight):
    """Directional derivative of L_2(theta_2) along a random unit direction v: autograd (second order) against
    central differences of meta_loss, float64, WRN-10-1 on six 12x12 images. The first-order approximation (the
    inner gradient taken as a constant) keeps only the entropy term's gradient: 0 when lambda = 0."""
    model, generator = tiny_nets()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(
        6, 1, 12, 12, dtype=torch.float64, generator=gen
    )  # small images: fast, and no LeakyReLU kink within eps here
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    slots = maxl.slot_mask(3, 2)
    alpha = 0.5  # a large look-ahead step makes the second-order term large

    def loss_fn():
        return maxl.meta_loss(model, generator, x, y, slots, alpha, 1.0, entropy_weight, 2.0)

    params = list(generator.parameters())
    v = [torch.randn(p.shape, dtype=p.dtype, generator=gen) for p in params]
    norm = math.sqrt(sum((d * d).sum().item() for d in v))
    v = [d / norm for d in v]
    loss, _, reg = loss_fn()
    grads = torch.autograd.grad(loss, params, retain_graph=True)
    analytic = sum((g * d).sum() for g, d in zip(grads, v)).item()
    first_order = sum(
        (g * d).sum()
        for g, d in zip(torch.autograd.grad(entropy_weight * reg, params, allow_unused=True, materialize_grads=True), v)
    ).item()
    eps = 1e-5
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, d in zip(params, v):
                p.add_(sign * eps * d)
        values.append(loss_fn()[0].item())
        with torch.no_grad():
            for p, d in zip(params, v):
                p.sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(numeric) > 1e-6, "the direction gives no signal: the test proves nothing"
    assert analytic == pytest.approx(numeric, rel=1e-5)
    assert abs(first_order - numeric) > 0.05 * abs(numeric)  # the first-order approximation is off
    if entropy_weight == 0:
        assert first_order == 0.0


def test_meta_loss_equals_the_equations_by_hand():
    """maxl.meta_loss against meta_loss_by_hand, float64, WRN-10-1 on six 12x12 images: L_2, the primary focal loss
    at theta_1+, the regulariser and the generator's (second-order) gradient. w_aux 0.7 and a large alpha, so that
    w_aux's place in (3) and the look-ahead step (4) show: w_aux 1, or theta_1 + alpha grad, gives another loss."""
    model, generator = tiny_nets()
    x = torch.randn(6, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    alpha, aux_weight, entropy_weight, gamma = 0.5, 0.7, 0.2, 2.0
    got = maxl.meta_loss(model, generator, x, y, maxl.slot_mask(3, 2), alpha, aux_weight, entropy_weight, gamma)
    want = meta_loss_by_hand(model, generator, x, y, 2, alpha, aux_weight, entropy_weight, gamma)
    assert [t.item() for t in got] == pytest.approx([t.item() for t in want], rel=1e-10)
    params = list(generator.parameters())
    for a, b in zip(torch.autograd.grad(got[0], params), torch.autograd.grad(want[0], params)):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-12)
    for wrong in (
        meta_loss_by_hand(model, generator, x, y, 2, alpha, 1.0, entropy_weight, gamma),
        meta_loss_by_hand(model, generator, x, y, 2, -alpha, aux_weight, entropy_weight, gamma),
    ):
        assert got[1].item() != pytest.approx(wrong[1].item(), rel=1e-6)


def test_meta_step_leaves_the_running_buffers_alone_step_one_moves_them():
    model, generator = tiny_nets()
    x = torch.randn(6, 1, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    before = {k: b.clone() for k, b in model.named_buffers()}
    assert any("running_mean" in k for k in before) and any("num_batches_tracked" in k for k in before)
    loss, _, _ = maxl.meta_loss(model, generator, x, y, maxl.slot_mask(3, 2), 0.1, 1.0, 0.2, 2.0)
    loss.backward(inputs=list(generator.parameters()))
    assert all(torch.equal(b, before[k]) for k, b in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())  # the generator's step leaves theta_1 alone
    # the functional forward is the module's own train-mode forward (batch statistics) ...
    with torch.no_grad():
        functional = maxl.functional_forward(model, dict(model.named_parameters()), x, True)
        assert all(torch.equal(b, before[k]) for k, b in model.named_buffers())
        direct = model(x, aux=True)  # ... and the module's forward (step 1) moves every running buffer
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(functional, direct))
    changed = {k for k, b in model.named_buffers() if not torch.equal(b, before[k])}
    assert changed == set(before)


# ---------------------------------------------------------------------------------------------
# CIFAR-100 superclasses
# ---------------------------------------------------------------------------------------------

# The CIFAR-100 page's superclass table, with the class names of the dataset's meta file (fine label
# ids are these names in alphabetical order).
SUPERCLASSES = [
    ("aquatic_mammals", "beaver dolphin otter seal whale"),
    ("fish", "aquarium_fish flatfish ray shark trout"),
    ("flowers", "orchid poppy rose sunflower tulip"),
    ("food_containers", "bottle bowl can cup plate"),
    ("fruit_and_vegetables", "apple mushroom orange pear sweet_pepper"),
    ("household_electrical_devices", "clock keyboard lamp telephone television"),
    ("household_furniture", "bed chair couch table wardrobe"),
    ("insects", "bee beetle butterfly caterpillar cockroach"),
    ("large_carnivores", "bear leopard lion tiger wolf"),
    ("large_man-made_outdoor_things", "bridge castle house road skyscraper"),
    ("large_natural_outdoor_scenes", "cloud forest mountain plain sea"),
    ("large_omnivores_and_herbivores", "camel cattle chimpanzee elephant kangaroo"),
    ("medium_mammals", "fox porcupine possum raccoon skunk"),
    ("non-insect_invertebrates", "crab lobster snail spider worm"),
    ("people", "baby boy girl man woman"),
    ("reptiles", "crocodile dinosaur lizard snake turtle"),
    ("small_mammals", "hamster mouse rabbit shrew squirrel"),
    ("trees", "maple_tree oak_tree palm_tree pine_tree willow_tree"),
    ("vehicles_1", "bicycle bus motorcycle pickup_truck train"),
    ("vehicles_2", "lawn_mower rocket streetcar tank tractor"),
]


def test_cifar100_coarse_table():
    fine_names = sorted(name for _, members in SUPERCLASSES for name in members.split())
    assert len(fine_names) == 100 == len(set(fine_names))
    expected = [None] * 100
    for coarse, (_, members) in enumerate(SUPERCLASSES):
        for name in members.split():
            expected[fine_names.index(name)] = coarse
    assert maxl.CIFAR100_COARSE == expected
    assert np.bincount(maxl.CIFAR100_COARSE).tolist() == [5] * 20
    assert maxl.CIFAR100_COARSE[0] == 4  # apple -> fruit_and_vegetables
    assert maxl.CIFAR100_COARSE[fine_names.index("whale")] == 0  # -> aquatic_mammals
    assert maxl.CIFAR100_COARSE[fine_names.index("tractor")] == 19  # -> vehicles_2


def test_cifar100_trains_and_evaluates_on_superclasses(patched_integrity, tmp_path):
    truth = make_fake_dataset("cifar100", tmp_path / "data", n_train=300, n_test=50)
    args = [
        "--dataset",
        "cifar100",
        "--data-dir",
        tmp_path / "data",
        "--depth",
        "10",
        "--width",
        "1",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--total-steps",
        1,
        "--run-dir",
        tmp_path / "run",
    ]
    g = run_inprocess("maxl.py", *args)
    coarse = torch.tensor(maxl.CIFAR100_COARSE)
    assert g["args"].primary == "coarse" and g["args"].num_labels is None and g["num_classes"] == 20
    assert torch.equal(g["data"].y_labeled, coarse[torch.from_numpy(truth["train_y"])])  # all 300, mapped
    assert torch.equal(g["data"].y_test, coarse[torch.from_numpy(truth["test_y"])])
    assert g["model"].fc.out_features == 20 and g["model"].aux_head.out_features == 100
    assert g["generator"].fc.out_features == 100
    with torch.no_grad():
        logits = g["ema_model"].eval()(common.normalize(g["data"].x_test, g["info"]))
    acc = 100 * (logits.argmax(1) == g["data"].y_test).float().mean().item()
    assert [r["eval/acc"] for r in rows(tmp_path / "run") if "eval/acc" in r] == [pytest.approx(acc, abs=1e-4)]


# ---------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------


def initial_nets(num_classes=10, psi=5):
    """The script's nets at step 0: seed 0, then the multi-task net, then the generator (channels_last
    as in the script, so that the convolutions sum in the same order)."""
    torch.manual_seed(0)
    model = maxl.MAXLNet(num_classes, psi, 10, 1, 1, 0.1).to(memory_format=torch.channels_last).train()
    generator = common.WideResNet(num_classes * psi, 10, 1, 1, 0.1).to(memory_format=torch.channels_last).train()
    return model, generator


def test_one_step_recomputed(data_dir, tmp_path):
    """Step 1 of a real run, from its batches and the initial weights: the logged losses, the
    generator's update (plain SGD on the second-order gradient of (5), by hand) and the multi-task net's
    update (nesterov SGD on (3) alone, the generated labels constant); the meta step does not touch the
    running buffers (they move by step 1's forward alone). --aux-weight 0.5: its place in (3) shows."""
    w_aux = 0.5
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 1, "--log-every", 1, "--aux-weight", w_aux]
    args += ["--run-dir", tmp_path]
    g = run_keeping_step("maxl.py", *args)
    row = rows(tmp_path)[0]
    model0, gen0 = initial_nets()
    x_l, y_l, x_m, y_m = g["x_l"], g["y_l"], g["x_m"], g["y_m"]
    slots = maxl.slot_mask(10, 5)
    assert g["at_return"]["alpha"].item() == torch.tensor(0.03).item()  # lr at step 1, in float32
    assert g["alpha"] is g["optimizer"].param_groups[0]["lr"]  # the tensor LambdaLR fills (graphs)
    # the meta step by hand, at the initial theta_1 and theta_2
    loss, pri_plus, reg = meta_loss_by_hand(model0, gen0, x_m, y_m, 5, 0.03, w_aux, 0.2, 2.0)
    assert row["losses/meta"] == pytest.approx(pri_plus.item(), rel=1e-5)
    assert row["losses/entropy_reg"] == pytest.approx(reg.item(), rel=1e-5)
    assert row["train/aux_entropy"] == pytest.approx(-reg.item(), rel=1e-5)
    with torch.no_grad():
        y_aux_m = maxl.mask_softmax(copy.deepcopy(gen0)(x_m), y_m, slots)
    assert row["train/aux_entropy"] == pytest.approx(-np_neg_entropy(y_aux_m.numpy()), rel=1e-5)
    assert loss.item() == pytest.approx(pri_plus.item() + 0.2 * reg.item(), rel=1e-6)
    assert g["gen_optimizer"].param_groups[0]["momentum"] == 0
    gen_params = list(gen0.parameters())
    grads = torch.autograd.grad(pri_plus + 0.2 * reg, gen_params)  # Eq. (5), lambda 0.2: minimise -entropy
    for (name, p1), p0, gr in zip(g["generator"].named_parameters(), gen_params, grads):
        expected = p0 - 1e-3 * (gr + 5e-4 * p0)  # SGD lr 1e-3, weight decay 5e-4 on all, no momentum
        assert torch.allclose(p1, expected, atol=1e-7, rtol=1e-5), name
    # step 1 with the updated generator's labels
    with torch.no_grad():
        y_aux = maxl.mask_softmax(copy.deepcopy(g["generator"])(x_l), y_l, slots)
    assert torch.allclose(g["y_aux"], y_aux, atol=1e-6)
    logits_l, logits_aux = model0(x_l, aux=True)  # train mode: moves model0's running buffers once
    assert torch.allclose(logits_l, g["logits_l"], atol=1e-5) and torch.allclose(logits_aux, g["logits_aux"], atol=1e-5)
    primary = np_focal(logits_l.detach().numpy(), F.one_hot(y_l, 10).numpy(), 2.0)
    aux = np_focal(logits_aux.detach().numpy(), y_aux.numpy(), 2.0)
    assert row["losses/primary"] == pytest.approx(primary, rel=1e-5)
    assert row["losses/aux"] == pytest.approx(aux, rel=1e-5)
    assert row["losses/total"] == pytest.approx(primary + w_aux * aux, rel=1e-5)
    one_hot = F.one_hot(y_l, 10).float()
    loss_1 = maxl.focal_loss(logits_l, one_hot, 2.0) + w_aux * maxl.focal_loss(logits_aux, y_aux, 2.0)
    params = list(model0.parameters())
    for (name, p1), p0, gr in zip(g["model"].named_parameters(), params, torch.autograd.grad(loss_1, params)):
        d = gr + (5e-4 * p0 if p0.ndim > 1 else 0)  # no weight decay on BatchNorm and biases
        expected = p0 - 0.03 * 1.9 * d  # nesterov's first step: buf = d, update d + 0.9 buf
        assert torch.allclose(p1, expected, atol=1e-6, rtol=1e-4), name
    for (name, b1), b0 in zip(g["model"].named_buffers(), model0.buffers()):
        assert torch.allclose(b1.float(), b0.float(), atol=1e-6), name  # one forward's worth: the meta step left them


def test_generator_lr_follows_the_cosine_of_the_multi_task_net(data_dir, tmp_path):
    """K = 3 steps: the lr with which each optimizer step runs is lr cos(7 pi k / (16 K)), k = 0, 1, 2 the steps
    already taken (the schedulers step after each step), for the generator (1e-3) as for the multi-task net (0.03);
    after the run, k = 3. A constant factor for the generator fails from k = 1 on."""
    used = []
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append((opt, opt.param_groups[0]["lr"].item()))
    )
    try:
        g = run_inprocess("maxl.py", *TINY, "--data-dir", data_dir, "--total-steps", 3, "--run-dir", tmp_path)
    finally:
        hook.remove()
    factor = [math.cos(7 * math.pi * k / (16 * 3)) for k in range(4)]
    generator, net = g["gen_optimizer"], g["optimizer"]
    assert [lr for opt, lr in used if opt is generator] == pytest.approx([1e-3 * f for f in factor[:3]], rel=1e-6)
    assert [lr for opt, lr in used if opt is net] == pytest.approx([0.03 * f for f in factor[:3]], rel=1e-6)
    assert generator.param_groups[0]["lr"].item() == pytest.approx(1e-3 * factor[3], rel=1e-6)


def test_single_baseline_has_no_generator(data_dir, tmp_path):
    g = run_keeping_step(
        "maxl.py",
        *TINY,
        "--data-dir",
        data_dir,
        "--total-steps",
        3,
        "--log-every",
        1,
        "--aux-weight",
        0,
        "--run-dir",
        tmp_path,
    )
    assert g["generator"] is None and set(g["state"]) == {"model", "ema_model", "optimizer", "scheduler", "scaler"}
    ckpt = checkpoint(tmp_path)
    assert not any(k.startswith("gen") for k in ckpt)
    model0, _ = initial_nets()
    head0 = model0.aux_head.state_dict()
    assert all(torch.equal(ckpt["model"][f"aux_head.{k}"], v) for k, v in head0.items())  # no auxiliary loss ever
    assert not torch.equal(ckpt["model"]["fc.weight"], model0.fc.weight.detach())  # the primary head trains
    train = [r for r in rows(tmp_path) if "losses/total" in r]
    assert len(train) == 3
    for r in train:
        assert set(r) == {"step", "losses/total", "losses/primary", "train/lr"}
        assert r["losses/total"] == r["losses/primary"]
    primary = np_focal(g["logits_l"].detach().numpy(), F.one_hot(g["y_l"], 10).numpy(), 2.0)
    assert train[-1]["losses/primary"] == pytest.approx(primary, rel=1e-5)
