"""What every method script must do, end to end on CPU: a few steps on fake data with a tiny network, run as a user
runs it (a subprocess), or in this process where a test looks inside the run or where the interpreter's start would
be most of the test's time."""

import builtins
import functools
import importlib
import json
from unittest import mock

import numpy as np
import pytest
import torch
from fakedata import make_fake_dataset, write_mnist_idx
from scriptrun import (
    TINY,
    checkpoint,
    flat,
    full_disk_open,
    refused,
    rows,
    run,
    run_inprocess,
    run_killed,
    same,
    same_run,
)
from scripts import SCRIPTS
from torch._dynamo.testing import CompileCounterWithBackend


@pytest.fixture(scope="module")
def straight_run(data_dir, tmp_path_factory):
    """straight_run(script): the run dir of the script's 40-step run, run once (as a user runs it) for the tests
    that read it."""
    done = {}

    def get(script):
        if script not in done:
            done[script] = tmp_path_factory.mktemp("straight") / script
            run(script, *TINY, "--data-dir", data_dir, "--total-steps", 40, "--run-dir", done[script])
        return done[script]

    return get


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_and_writes_a_run(script, straight_run):
    out = straight_run(script)
    evals = [r for r in rows(out) if "eval/acc" in r]
    assert [r["step"] for r in evals] == [6, 12, 18, 24, 30, 36, 40] and all(0 <= r["eval/acc"] <= 100 for r in evals)
    train = [r for r in rows(out) if "losses/total" in r]
    logged = sorted({*range(4, 41, 4), *range(5, 41, 5)})  # every 4 steps, and at each save (every 5)
    assert [r["step"] for r in train] == logged and all(r["losses/total"] > 0 for r in train)
    ckpt = checkpoint(out)
    assert ckpt["step"] == 40 and set(ckpt) >= {"model", "ema_model", "optimizer", "scheduler", "scaler", "rng_cpu"}
    args = json.loads((out / "args.json").read_text())
    assert args["total_steps"] == 40 and args["weight_decay"] == 5e-4 and args["amp"] == "none"
    labeled = json.loads((out / "labeled_indices.json").read_text())
    assert len(labeled) == 20 and not (out / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_and_resume_is_exact(script, data_dir, tmp_path, straight_run):
    """kill -9 at whatever moment, then --resume RUN_DIR alone: the same checkpoint (weights, EMA,
    optimizer, RNG, method state) and the same metrics as a run never stopped."""
    straight, killed = straight_run(script), tmp_path / "killed"
    step = run_killed(script, *TINY, "--data-dir", data_dir, "--total-steps", 40, "--run-dir", killed)
    assert step < 40, "the run ended before it could be killed: the test proves nothing"
    run(script, "--resume", killed)
    a, b = (flat({k: v for k, v in checkpoint(d).items() if k != "args"}) for d in (straight, killed))
    assert a.keys() == b.keys()
    assert [k for k in a if not same(a[k], b[k])] == []
    assert rows(straight) == rows(killed)


def test_evaluations_log_the_median_of_the_last_20_and_a_resume_keeps_them(capsys, monkeypatch, tmp_path):
    """eval/median_acc: the median eval/acc of the last 20 evaluations (this one included), FixMatch's reported figure
    (np.median over the last 20, as its code computes it), and the run's last line says it. A run that stops with its
    checkpoint at step 15 (the disk fills at step 16's row) and resumes logs the rows of a run never stopped: the
    evaluations before the checkpoint come back from metrics.jsonl. The template's lines: supervised.py stands for
    every script (test_template)."""
    # data a few steps can learn (the fake data's labels are random: its accuracy stays at chance), so that the
    # accuracy moves: each class lights its own 7 x 7 block of the image
    t = make_fake_dataset("fashion_mnist", tmp_path / "data", n_train=200, n_test=40)
    for x, y in ((t["train_x"], t["train_y"]), (t["test_x"], t["test_y"])):
        x //= 4
        for i, c in enumerate(y):
            x[i, 0, c // 4 * 7 : c // 4 * 7 + 7, c % 4 * 7 : c % 4 * 7 + 7] = 255
    write_mnist_idx(tmp_path / "data", "FashionMNIST", t["train_x"], t["train_y"], t["test_x"], t["test_y"])
    flags = (*TINY, "--data-dir", tmp_path / "data", "--total-steps", 30, "--eval-every", 1, "--save-every", 15)
    flags = (*flags, "--log-every", 1000, "--ema-decay", 0)  # rows: an eval row a step, a training row at the saves
    run_inprocess("supervised.py", *flags, "--run-dir", tmp_path / "straight")
    last = capsys.readouterr().out.splitlines()[-1]
    evals = [r for r in rows(tmp_path / "straight") if "eval/acc" in r]
    acc = [r["eval/acc"] for r in evals]
    assert [r["step"] for r in evals] == list(range(1, 31))
    assert [r["eval/median_acc"] for r in evals] == [float(np.median(acc[max(0, i - 19) : i + 1])) for i in range(30)]
    assert f"(best {max(acc):.2f}, median of the last 20 {np.median(acc[-20:]):.2f}) |" in last
    # the figures tell the windows apart: a median over every evaluation so far, or over those since a resume at
    # step 15, differs at some step
    assert any(r["eval/median_acc"] != np.median(acc[: i + 1]) for i, r in enumerate(evals))
    assert any(r["eval/median_acc"] != np.median(acc[15 : i + 1]) for i, r in enumerate(evals) if i >= 15)

    monkeypatch.setattr(builtins, "open", full_disk_open(17))  # 14 eval rows, step 15's training and eval rows
    refused(capsys, "supervised.py", *flags, "--run-dir", tmp_path / "stopped")
    monkeypatch.undo()
    assert checkpoint(tmp_path / "stopped")["step"] == 15
    run_inprocess("supervised.py", "--resume", tmp_path / "stopped")
    assert rows(tmp_path / "stopped") == rows(tmp_path / "straight")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bf16_autocast_step(script, data_dir, tmp_path):
    """--amp bf16 on the CPU: every convolution and linear layer of the step (and of the evaluation) computes in
    bf16 under autocast, and the weights stay finite; --amp none, the same run otherwise, computes in fp32 and ends
    at other weights. In-process, to see the dtypes: a global forward hook records each layer's output dtype."""
    dtypes, weights = {}, {}
    for amp in ("bf16", "none"):
        seen = dtypes[amp] = set()

        def record(module, inputs, output, seen=seen):
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                seen.add((module.training, output.dtype))

        hook = torch.nn.modules.module.register_module_forward_hook(record)
        try:
            run_inprocess(
                script, *TINY, "--data-dir", data_dir, "--total-steps", 1, "--amp", amp, "--run-dir", tmp_path / amp
            )
        finally:
            hook.remove()
        assert json.loads((tmp_path / amp / "args.json").read_text())["amp"] == amp
        weights[amp] = flat(checkpoint(tmp_path / amp)["model"])
    assert dtypes["bf16"] == {(True, torch.bfloat16), (False, torch.bfloat16)}  # the step (train mode), the evaluation
    assert dtypes["none"] == {(True, torch.float32), (False, torch.float32)}  # the hook tells the two apart
    assert all(torch.isfinite(v).all() for v in weights["bf16"].values() if v.is_floating_point())
    assert any(not torch.equal(v, weights["none"][k]) for k, v in weights["bf16"].items() if v.is_floating_point())


@pytest.mark.parametrize("script", SCRIPTS)
def test_compile_wraps_the_trained_network_and_changes_nothing(script, data_dir, tmp_path):
    """--compile: dynamo traces the network the step calls (graphs reach the backend), the checkpoint holds the
    plain module's keys (no `_orig_mod.` prefix: it loads without --compile) and the run ends where the eager run
    does, every tensor and every logged number. The aot_eager backend runs the traced graphs with torch's own
    kernels, bit for bit; inductor needs a C++ compiler and minutes of CPU: a one-off ran it (docs/supervised.md)."""
    counter = CompileCounterWithBackend("aot_eager")
    compile_with_counter = functools.partial(torch.compile, backend=counter)
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 6]
    torch._dynamo.reset()  # dynamo recompiles a code object only so often: a fresh cache for this script's network
    try:
        run_inprocess(script, *args, "--run-dir", tmp_path / "eager")
        with mock.patch.object(torch, "compile", compile_with_counter):
            run_inprocess(script, *args, "--compile", "--run-dir", tmp_path / "compiled")
    finally:
        torch._dynamo.reset()
    assert counter.frame_count >= 1 and counter.op_count > 0
    assert not any("_orig_mod" in k for k in flat(checkpoint(tmp_path / "compiled")))
    assert same_run(tmp_path / "eager", tmp_path / "compiled")


BAD = {
    "labels not divisible": (["--num-labels", "15"], "multiple"),
    "labels too many": (["--num-labels", "1000"], "rarest class"),
    "unknown dataset": (["--dataset", "imagenet"], "invalid choice"),
    "zero steps": (["--total-steps", "0"], "argument --total-steps: must be positive"),
    "bad depth": (["--depth", "11"], "6n+4"),
    "not a float": (["--lr", "fast"], "invalid float"),
    "resume nothing": (["--resume", "/nonexistent/run"], "not a run dir"),
    "no data": (["--dataset", "mnist", "--data-dir", "{tmp}/empty"], "could not be loaded or downloaded"),
}


# supervised.py meets every case, each in a fresh interpreter as a user runs it: its exit status and all it prints,
# the interpreter's teardown included. The argument checks and the data loading are template lines, the same in every
# script (tests/test_template.py), so each method script meets two, in this process (an interpreter start is most of
# such a run's time): a bad value among its own flags' parser, and missing data (after which nothing may exist).
BAD_RUNS = [("supervised.py", case) for case in BAD] + [(s, c) for s in SCRIPTS[1:] for c in ("not a float", "no data")]


@pytest.mark.parametrize("script, case", BAD_RUNS)
def test_bad_input_is_one_line_and_exit_2(script, case, data_dir, tmp_path, capsys, offline):
    extra, message = BAD[case]
    args = [*TINY, "--data-dir", data_dir, "--run-dir", tmp_path / "r", *[a.format(tmp=tmp_path) for a in extra]]
    if script == "supervised.py":
        proc = run(script, *args, check=False)
        err = proc.stderr.strip()
        assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, proc.stderr
    else:
        err = refused(capsys, script, *args)
    assert message in err
    assert not (tmp_path / "r").exists(), "a failed start must not leave a run behind"
    assert not (tmp_path / "empty").exists(), "a failed load must not leave an empty data dir behind"


def test_damaged_data_is_one_line_at_the_start(tmp_path):
    """MNIST's files carry no checksum: a test set with fewer labels than images (each file whole) is refused before
    the run dir exists, not met at the first evaluation with a traceback."""
    t = make_fake_dataset("mnist", tmp_path / "data", n_train=200, n_test=40)
    write_mnist_idx(tmp_path / "data", "MNIST", t["train_x"], t["train_y"], t["test_x"], t["test_y"][:30])
    args = ("--dataset", "mnist", "--data-dir", tmp_path / "data", "--run-dir", tmp_path / "r")
    proc = run("supervised.py", *TINY, *args, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, proc.stderr
    assert "its test set has 40 images but 30 labels" in err and not (tmp_path / "r").exists()


def test_existing_run_dir_is_not_overwritten(data_dir, tmp_path):
    out = tmp_path / "r"
    run("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 2, "--run-dir", out)
    before = (out / "metrics.jsonl").read_text()
    proc = run("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 2, "--run-dir", out, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_but_absent(data_dir, tmp_path):
    proc = run(
        "supervised.py", *TINY, "--data-dir", data_dir, "--device", "cuda", "--run-dir", tmp_path / "r", check=False
    )
    assert proc.returncode == 2 and "use --device cpu" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_ema_decay_follows_the_recent_weights_early(script, data_dir, tmp_path):
    """The evaluated EMA's decay at step k is min(ema_decay, (1 + k) / (10 + k)) (TensorFlow's
    num_updates form): 0.18 at step 1, capped from step 8 on at --ema-decay 0.5. The plain average
    since init, 1 - 1/(k+1), and a constant decay both fail this."""
    weights, mul = [], torch._foreach_mul_

    def spy(tensors, other):  # ema_update's one call with a tensor per step: weight = 1 - decay, a 0-dim tensor
        if isinstance(other, torch.Tensor):
            assert other.dim() == 0
            weights.append(other.item())
        return mul(tensors, other)

    with mock.patch.object(torch, "_foreach_mul_", spy):
        run_inprocess(
            script, *TINY, "--data-dir", data_dir, "--total-steps", 10, "--ema-decay", 0.5, "--run-dir", tmp_path / "r"
        )
    assert weights == [torch.tensor(1 - min(0.5, (1 + k) / (10 + k))).item() for k in range(1, 11)]  # float32


def test_short_run_evaluates_a_model_as_good_as_the_raw_one(digits_dir, tmp_path):
    """Real digits, 250 steps at the default --ema-decay 0.999: the evaluated EMA model is not far below
    the trained weights (with the plain average since init it was 27 points below at 400 steps)."""
    out = tmp_path / "r"
    run(
        "supervised.py",
        "--dataset",
        "mnist",
        "--data-dir",
        digits_dir,
        "--num-labels",
        100,
        "--depth",
        10,
        "--width",
        1,
        "--batch-size",
        16,
        "--bn-momentum",
        0.1,
        "--device",
        "cpu",
        "--total-steps",
        250,
        "--eval-every",
        125,
        "--log-every",
        50,
        "--save-every",
        250,
        "--run-dir",
        out,
    )
    last = [r for r in rows(out) if "eval/acc" in r][-1]
    assert last["eval/acc_raw"] > 50, "the raw model did not learn: the test proves nothing"
    assert last["eval/acc"] >= last["eval/acc_raw"] - 5


def test_svhn_extra_flag_reaches_the_unlabeled_stream(tmp_path, patched_integrity):
    """--dataset svhn: train + extra is the training set by default (TorchSSL, USB), so it all feeds the unlabeled
    stream; --no-svhn-extra: train only."""
    from fakedata import make_fake_dataset

    make_fake_dataset("svhn", tmp_path / "d", n_train=100, n_unlabeled=30)
    args = [*TINY, "--dataset", "svhn", "--data-dir", tmp_path / "d", "--total-steps", 1]
    assert len(run_inprocess("supervised.py", *args, "--run-dir", tmp_path / "a")["data"].x_unlabeled) == 130
    assert (
        len(run_inprocess("supervised.py", *args, "--no-svhn-extra", "--run-dir", tmp_path / "b")["data"].x_unlabeled)
        == 100
    )


def test_the_network_follows_the_dataset_unless_given():
    """WRN-28-2, WRN-28-8 on CIFAR-100 and WRN-37-2 on STL-10 (TorchSSL's and USB's WideResNetVar), as the
    references; a --depth or --width given wins. The same template lines in every script."""
    import supervised

    def shape(*flags):
        args = supervised.parse_args(["--run-dir", "unused", *flags])
        return args.depth, args.width

    assert shape() == (28, 2) and shape("--dataset", "cifar100") == (28, 8) and shape("--dataset", "stl10") == (37, 2)
    assert shape("--dataset", "stl10", "--depth", "28") == (28, 2) and shape("--width", "1") == (28, 1)


# Each script's recipe as its page in docs/ states it (the flags a user leaves unset). DST's tau, eta, eta' and N
# follow --dataset and are pinned by tests/test_dst.py.
RECIPES = {
    "supervised.py": dict(lr=0.03, momentum=0.9, weight_decay=5e-4, total_steps=2**20, batch_size=64, mu=7),
    "pseudo_label.py": dict(threshold=0.95, unsup_weight=1.0, ramp_up=0.4, mu=1),
    "pi_model.py": dict(unsup_weight=100.0, ramp_up=0.4, mu=1),
    "mean_teacher.py": dict(unsup_weight=50.0, ramp_up=0.4, mu=1, ema_decay=0.999),
    "temporal_ensembling.py": dict(unsup_weight=30.0, ramp_up=0.4, mu=1, alpha=0.6),
    "uda.py": dict(threshold=0.8, temperature=0.4, unsup_weight=1.0, tsa="none", mu=7),
    "fixmatch.py": dict(threshold=0.95, unsup_weight=1.0, mu=7),
    "flexmatch.py": dict(threshold=0.95, unsup_weight=1.0, mapping="convex", threshold_warmup=True, mu=7),
    "dst.py": dict(
        pseudo_weight=1.0, grl_hi=0.1, grl_lo=0.0, grl_alpha=1.0, heads="published", mu=7, total_steps=10**6
    ),
    "mpl.py": dict(
        threshold=0.6,
        warmup_steps=5000,
        student_wait_steps=3000,
        temperature=0.7,
        label_smoothing=0.15,
        uda_weight=8.0,
        uda_steps=5000,
        baseline_decay=0.99,
        dropout=0.2,
        lr=0.05,
        teacher_lr=0.05,
        batch_size=128,
        total_steps=300_000,
        ema_decay=0.995,
        mu=7,
        finetune_batch_size=512,
        finetune_lr=3e-5,
    ),
    "maxl.py": dict(
        psi=5, focal_gamma=2.0, aux_weight=1.0, entropy_weight=0.2, gen_lr=1e-3, gen_weight_decay=5e-4, num_labels=None
    ),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_defaults_are_the_documented_recipe(script):
    """The script's own parse_args with no method flag (nothing trains): the defaults are the recipe of
    docs/<script>.md."""
    args = importlib.import_module(script.removesuffix(".py")).parse_args(["--run-dir", "unused"])
    assert {k: getattr(args, k) for k in RECIPES[script]} == RECIPES[script]
