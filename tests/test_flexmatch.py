"""flexmatch.py: the flexible thresholds against the formula computed by hand (with and without
warm-up, each mapping), every sample passing at the start, marks only over the fixed tau, the marks
in a real run, in its checkpoint and back on resume, the unlabeled term changing the weights; the
defaults (convex mapping, warm-up); two steps of a run by hand (the marks, step 2's thresholds, mask
and unlabeled loss) and a confidence equal to its threshold kept and marked (the gates are >=)."""

import math

import pytest
import torch
import torch.nn.functional as F
from scriptrun import TINY, checkpoint, rows, run_inprocess, run_keeping_step


def test_mapping_functions():
    from flexmatch import MAPPINGS

    x = torch.tensor([0.0, 0.5, 0.8, 1.0])
    expected = {
        "convex": [0.0, 1 / 3, 2 / 3, 1.0],  # x / (2 - x)
        "linear": [0.0, 0.5, 0.8, 1.0],
        "concave": [0.0, 0.5849625, 0.8479969, 1.0],
    }  # ln(1 + x) / ln 2
    assert set(MAPPINGS) == set(expected)
    for name, values in expected.items():
        assert torch.allclose(MAPPINGS[name](x), torch.tensor(values), atol=1e-6), name
    assert math.isclose(MAPPINGS["concave"](torch.tensor(0.25)).item(), math.log(1.25) / math.log(2), rel_tol=1e-6)


def test_thresholds_by_hand():
    from flexmatch import class_thresholds

    # 3 classes, 12 rows: class 0 marked 4 times, class 1 twice, class 2 never, 6 rows unused
    marks = torch.tensor([-1, 0, 1, -1, 0, -1, -1, 1, 0, -1, 0, -1])
    # warm-up: beta = sigma / max(4, 6) = [2/3, 1/3, 0]; convex M = [0.5, 0.2, 0]
    assert torch.allclose(class_thresholds(marks, 3, 0.95, "convex", True), torch.tensor([0.475, 0.19, 0.0]))
    # no warm-up: beta = sigma / 4 = [1, 0.5, 0]; convex M = [1, 1/3, 0]
    assert torch.allclose(class_thresholds(marks, 3, 0.95, "convex", False), torch.tensor([0.95, 0.95 / 3, 0.0]))
    assert torch.allclose(class_thresholds(marks, 3, 0.95, "linear", True), torch.tensor([0.95 * 2 / 3, 0.95 / 3, 0.0]))
    assert torch.allclose(class_thresholds(marks, 3, 0.8, "linear", False), torch.tensor([0.8, 0.4, 0.0]))
    # once the unused no longer dominate, warm-up changes nothing: beta = [5, 4] / 5, convex M(0.8) = 2/3
    marks = torch.tensor([1, 0, 0, -1, 1, 0, 1, 0, 1, 0])
    for warmup in (True, False):
        assert torch.allclose(class_thresholds(marks, 2, 0.9, "convex", warmup), torch.tensor([0.9, 0.6]))


def test_no_mark_gives_zero_thresholds():
    from flexmatch import MAPPINGS, class_thresholds

    marks = torch.full((50,), -1)
    for mapping in MAPPINGS:
        for warmup in (True, False):
            thresholds = class_thresholds(marks, 10, 0.95, mapping, warmup)
            assert torch.equal(thresholds, torch.zeros(10))  # beta = 0 (0 / 0 guarded), so T = 0, no NaN


def test_only_predictions_over_the_fixed_tau_mark():
    from flexmatch import mark_confident

    marks = torch.tensor([-1, -1, 3, 1, -1, -1, 2, -1])
    idx = torch.tensor([5, 2, 7, 0, 6])
    max_probs = torch.tensor([0.96, 0.50, 0.95, 0.9499, 0.99])
    pseudo_label = torch.tensor([1, 0, 0, 2, 4])
    mark_confident(marks, idx, max_probs, pseudo_label, 0.95)
    # row 5 marked 1, row 2 keeps 3 (0.5 < tau), row 7 marked 0 (= tau), row 0 stays unused, row 6 re-marked 4
    assert marks.tolist() == [-1, -1, 3, 1, -1, 1, 4, 0]


@pytest.fixture(scope="module")
def curriculum(data_dir, tmp_path_factory):
    """Two steps in which the flexible thresholds cut. Step 1 of any run has every threshold 0 (no mark yet), so
    tau changes nothing before step 2's thresholds: one (one step, every flag at its default) gives step 1's
    confidences and labels, probe (two steps) step 2's, and flex is probe with tau set to one of step 2's
    confidences, in the class step 1 predicts most: a tie at both gates of step 2. Without warm-up (Eq. 6) that
    class gets tau itself; at a tiny lr step 2 predicts several classes, as step 1 does."""
    one = run_keeping_step(
        "flexmatch.py", *TINY, "--data-dir", data_dir, "--total-steps", 1, "--run-dir", tmp_path_factory.mktemp("one")
    )
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 2, "--lr", 1e-4, "--no-threshold-warmup"]
    probe = run_keeping_step("flexmatch.py", *args, "--run-dir", tmp_path_factory.mktemp("probe"))
    top = one["pseudo_label"].bincount().argmax()
    confidence = probe["max_probs"][probe["pseudo_label"] == top].sort().values
    tau = confidence[len(confidence) * 3 // 10].item()  # low: step 1 marks some rows of other classes too
    flex = run_keeping_step("flexmatch.py", *args, "--threshold", tau, "--run-dir", tmp_path_factory.mktemp("flex"))
    return {"one": one, "probe": probe, "flex": flex, "tau": tau, "top": top}


def marks_by_hand(marks, step, tau):
    """Algorithm 1 lines 13-17 on a copy of marks, from a step's locals: its rows whose weak-view confidence reaches
    the fixed tau take their predicted class."""
    q = step["logits_w"].detach().softmax(1)
    confident = q.max(1).values >= tau
    marks = marks.clone()
    marks[step["idx_u"]] = torch.where(confident, q.argmax(1), marks[step["idx_u"]])
    return marks, confident


def test_defaults_convex_mapping_and_warm_up(curriculum):
    args = curriculum["one"]["args"]
    assert args.mapping == "convex" and args.threshold_warmup is True  # Eq. (12) and (11), the paper's section 4
    assert (args.threshold, args.mu, args.unsup_weight) == (0.95, 7, 1.0)


def test_at_the_start_every_sample_passes(curriculum):
    """Step 1: no mark yet, every threshold 0, the whole unlabeled batch in the loss, although a fixed tau (0.95)
    keeps none of it (and marks none)."""
    g = curriculum["one"]
    confidence = g["logits_w"].detach().softmax(1).max(1).values
    assert (confidence < 0.95).all()
    assert torch.equal(g["thresholds"], torch.zeros(10))
    assert torch.equal(g["mask"], torch.ones(7 * 8))
    assert (g["selected_label"] == -1).all()


def test_marks_take_the_fixed_tau(curriculum):
    """The marks of both steps are those of the fixed tau, not of the flexible thresholds (0 at step 1: every row of
    the batch would be marked)."""
    one, flex, tau = curriculum["one"], curriculum["flex"], curriculum["tau"]
    assert torch.equal(curriculum["probe"]["logits"], flex["logits"])  # the premise: tau changes nothing before
    after_1, confident_1 = marks_by_hand(torch.full((200,), -1), one, tau)
    assert 0 < confident_1.sum() < 7 * 8
    after_2, confident_2 = marks_by_hand(after_1, flex, tau)
    assert not torch.equal(confident_2, flex["mask"].bool())  # step 2's flexible thresholds would mark other rows
    assert torch.equal(flex["selected_label"], after_2)


def test_thresholds_of_step_2_by_hand(curriculum):
    """T(c) = tau M(beta(c)), convex M(x) = x / (2 - x), beta(c) = sigma(c) / max sigma without warm-up (Eq. 6), from
    the marks before step 2's update (those of step 1); the other mapping, warm-up and order give other thresholds."""
    one, flex, tau = curriculum["one"], curriculum["flex"], curriculum["tau"]
    before, _ = marks_by_hand(torch.full((200,), -1), one, tau)
    sigma = torch.stack([(before == c).sum() for c in range(10)]).double()
    beta = sigma / sigma.max()
    assert ((0 < beta) & (beta < 1)).any()  # a class where the mapping matters
    expected = tau * beta / (2 - beta)
    assert torch.allclose(flex["thresholds"].double(), expected, rtol=1e-6, atol=0)
    after, _ = marks_by_hand(before, flex, tau)
    sigma_after = torch.stack([(after == c).sum() for c in range(10)]).double()
    wrong = {
        "linear": tau * beta,
        "warm-up": tau * (b := sigma / max(sigma.max(), (before == -1).sum())) / (2 - b),
        "marks after the update": tau * (b := sigma_after / sigma_after.max()) / (2 - b),
    }
    for name, value in wrong.items():
        assert not torch.allclose(flex["thresholds"].double(), value, rtol=1e-3, atol=0), name


def test_thresholds_of_step_2_with_the_default_warm_up(curriculum, data_dir, tmp_path):
    """Warm-up in a run (Eq. 11, on by default): beta(c) = sigma(c) / max(max sigma, unused), the rows never marked
    counted as one more class. Here they outnumber every class, so each threshold is at most the one without warm-up,
    and below it where a class was marked."""
    one, flex, tau = curriculum["one"], curriculum["flex"], curriculum["tau"]
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 2, "--lr", 1e-4, "--threshold", tau]
    warm = run_keeping_step("flexmatch.py", *args, "--run-dir", tmp_path / "warm")
    before, _ = marks_by_hand(torch.full((200,), -1), one, tau)
    sigma = torch.stack([(before == c).sum() for c in range(10)]).double()
    unused = (before == -1).sum()
    assert unused > sigma.max() > 0
    beta = sigma / unused
    assert torch.allclose(warm["thresholds"].double(), tau * beta / (2 - beta), rtol=1e-6, atol=0)
    assert (warm["thresholds"] <= flex["thresholds"]).all() and (warm["thresholds"] < flex["thresholds"]).any()


def test_mask_and_loss_of_step_2_by_hand(curriculum):
    """mask = 1[max q >= T(argmax q)], the flexible threshold of the predicted class; the unlabeled term
    1/(mu B) sum mask CE(argmax q, p(y | A(u))) (Eq. 8), q from the weak view."""
    g = curriculum["flex"]
    weak, strong, thresholds = g["logits_w"].detach(), g["logits_s"].detach(), g["thresholds"]
    q = weak.softmax(1)
    confidence, label = q.max(1)
    mask = (confidence >= thresholds[label]).float()
    assert len(thresholds[label].unique()) > 1  # the thresholds of the predicted classes differ ...
    assert 0 < mask.sum() < len(mask)  # ... and cut the batch, otherwise than a fixed tau does
    assert not torch.equal(mask, (confidence >= curriculum["tau"]).float())
    assert torch.equal(g["mask"], mask)
    per_sample = F.cross_entropy(strong, label, reduction="none")
    expected = (per_sample * mask).sum() / (7 * 8)
    assert g["loss_u"].item() == pytest.approx(expected.item(), rel=1e-5)
    wrong = {
        "mean over the kept images": (per_sample * mask).sum() / mask.sum(),
        "the weak view trained": (F.cross_entropy(weak, label, reduction="none") * mask).mean(),
        "the fixed tau (FixMatch)": (per_sample * (confidence >= curriculum["tau"])).mean(),
    }
    for name, value in wrong.items():
        assert g["loss_u"].item() != pytest.approx(value.item(), rel=1e-3), name


def test_a_confidence_equal_to_its_threshold_passes_and_marks(curriculum):
    """Both gates are >= (TorchSSL): the step 2 image whose confidence is tau itself, in the class whose flexible
    threshold is tau, is in the loss and marked."""
    g, tau, top = curriculum["flex"], curriculum["tau"], curriculum["top"]
    confidence, label = g["logits_w"].detach().softmax(1).max(1)
    at = (confidence == tau).nonzero().flatten()
    assert len(at) == 1 and confidence[at].item() == tau and label[at] == top  # tau survived text and float32
    assert g["thresholds"][top] == confidence[at]  # tau M(1) = tau: a tie at the flexible gate too
    assert g["mask"][at] == 1
    assert g["selected_label"][g["idx_u"][at]] == top


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Two 6-step runs in this process, identical but for the unlabeled weight, with a tau low
    enough that a barely trained network marks samples."""
    out = {}
    for w in (0, 1):
        run_dir = tmp_path_factory.mktemp(f"flex{w}")
        args = [
            *TINY,
            "--data-dir",
            data_dir,
            "--total-steps",
            6,
            "--mu",
            2,
            "--threshold",
            0.2,
            "--log-every",
            1,
            "--run-dir",
            run_dir,
        ]
        out[w] = run_keeping_step("flexmatch.py", *args, "--unsup-weight", w), run_dir, args
    return out


def test_unsupervised_term_changes_the_weights(runs):
    (g0, _, _), (g1, _, _) = runs[0], runs[1]
    # same seed, same batches and augmentations: only the unlabeled term differs
    assert not torch.equal(g0["model"].conv1.weight, g1["model"].conv1.weight)
    assert g1["loss_u"] > 0


def test_marks_in_a_real_run_and_its_checkpoint(runs):
    g, run_dir, _ = runs[1]
    marks = checkpoint(run_dir)["selected_label"]
    assert marks.dtype == torch.long and marks.shape == (200,)  # one mark per unlabeled image
    assert torch.equal(marks, g["selected_label"])  # the last step saves
    assert ((marks >= -1) & (marks < 10)).all()
    marked = int((marks >= 0).sum())
    assert 0 < marked <= 6 * 16  # at most mu B = 16 new marks a step
    # the last step's batch: marked exactly where its weak-view confidence reached tau
    confident = g["max_probs"] >= 0.2
    assert torch.equal(marks[g["idx_u"]][confident], g["pseudo_label"][confident])
    assert len(g["idx_u"].unique()) == 16  # drawn without replacement
    train = [r for r in rows(run_dir) if "train/unused_ratio" in r]  # logged every step
    # up to and including the first step that marks, thresholds come from marks all -1: 0, every sample passes
    first = next(i for i, r in enumerate(train) if r["train/unused_ratio"] < 1)
    assert train[0]["step"] == 1 and first < len(train) - 1
    assert all(r["train/threshold_mean"] == 0 and r["train/mask_ratio"] == 1 for r in train[: first + 1])
    last = train[-1]
    assert last["step"] == 6 and math.isclose(last["train/unused_ratio"], 1 - marked / 200, abs_tol=1e-6)
    assert last["train/threshold_mean"] > 0  # the marks moved the thresholds off zero


def test_resume_restores_the_marks(runs):
    _, run_dir, args = runs[1]
    saved = checkpoint(run_dir)["selected_label"]
    assert (saved >= 0).any()  # not the fresh all -1 state
    g = run_inprocess("flexmatch.py", "--resume", run_dir, "--eval-only", exit_ok=True)  # loads the state, runs nothing
    assert torch.equal(g["selected_label"], saved)
