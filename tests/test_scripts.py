"""The method scripts end to end on CPU: a few steps on fake data with a tiny network.

Each script runs as a user runs it (a subprocess). Fake Fashion-MNIST needs no md5 patch, so the
real torchvision loader reads it in the child process too.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fakedata import make_fake_dataset

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ["supervised.py", "pi_model.py"]
TINY = ["--dataset", "fashion_mnist", "--num-labels", "20", "--depth", "10", "--width", "1", "--batch-size", "8",
        "--bn-momentum", "0.1", "--device", "cpu", "--log-every", "4", "--eval-every", "6", "--save-every", "5"]
OFFLINE = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # downloads fail fast


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_fake_dataset("fashion_mnist", root, n_train=200, n_test=40)
    return str(root)


def run(script, *args, check=True):
    proc = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=OFFLINE, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def rows(run_dir):
    """metrics.jsonl without wall-clock fields."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train/it_per_sec"} for line in lines]


def weights(run_dir):
    ckpt = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {f"{m}.{k}": v for m in ("model", "ema_model") for k, v in ckpt[m].items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_and_writes_a_run(script, data_dir, tmp_path):
    out = tmp_path / "run"
    run(script, *TINY, "--data-dir", data_dir, "--total-steps", 12, "--run-dir", out)
    evals = [r for r in rows(out) if "eval/acc" in r]
    assert [r["step"] for r in evals] == [6, 12] and all(0 <= r["eval/acc"] <= 100 for r in evals)
    train = [r for r in rows(out) if "losses/total" in r]
    assert [r["step"] for r in train] == [4, 8, 12] and all(r["losses/total"] > 0 for r in train)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 12 and set(ckpt) >= {"model", "ema_model", "optimizer", "scheduler", "scaler", "rng_cpu"}
    args = json.loads((out / "args.json").read_text())
    assert args["total_steps"] == 12 and args["weight_decay"] == 5e-4 and args["amp"] == "none"
    labeled = json.loads((out / "labeled_indices.json").read_text())
    assert len(labeled) == 20 and not (out / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_and_resume_is_exact(script, data_dir, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 40]
    run(script, *args, "--run-dir", straight)
    proc = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, args), "--run-dir", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=OFFLINE)
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)  # at whatever moment it is in
    proc.wait()
    step = torch.load(killed / "checkpoint.pt", weights_only=True)["step"]
    assert step < 40, "the run ended before it could be killed: the test proves nothing"
    run(script, "--resume", killed)  # everything else comes back from args.json
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rows(straight) == rows(killed)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bf16_autocast_step(script, data_dir, tmp_path):
    run(script, *TINY, "--data-dir", data_dir, "--total-steps", 1, "--amp", "bf16", "--run-dir", tmp_path / "r")
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "r").values() if v.is_floating_point())


BAD = {
    "labels not divisible": (["--num-labels", "15"], "multiple"),
    "labels too many": (["--num-labels", "1000"], "rarest class"),
    "unknown dataset": (["--dataset", "imagenet"], "invalid choice"),
    "zero steps": (["--total-steps", "0"], "--total-steps must be positive"),
    "bad depth": (["--depth", "11"], "6n+4"),
    "not a float": (["--lr", "fast"], "invalid float"),
    "resume nothing": (["--resume", "/nonexistent/run"], "not a run dir"),
    "no data": (["--dataset", "mnist", "--data-dir", "{tmp}/empty"], "could not be loaded or downloaded"),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_2(script, case, data_dir, tmp_path):
    extra, message = BAD[case]
    extra = [a.format(tmp=tmp_path) for a in extra]
    proc = run(script, *TINY, "--data-dir", data_dir, "--run-dir", tmp_path / "r", *extra, check=False)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "r").exists(), "a failed start must not leave a run behind"


def test_existing_run_dir_is_not_overwritten(data_dir, tmp_path):
    out = tmp_path / "r"
    run("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 2, "--run-dir", out)
    before = (out / "metrics.jsonl").read_text()
    proc = run("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 2, "--run-dir", out, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before


def test_pi_consistency_trains_the_student(data_dir, tmp_path):
    """The Pi term must send gradient into the network (USB's Mean Teacher compared a tensor with
    itself for years: zero gradient, silently supervised-only). Same seed, same batches: only the
    consistency term differs, so the weights must differ; likewise detaching one branch."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 3, "--ramp-up", 0]
    run("pi_model.py", *args, "--unsup-weight", 0, "--run-dir", tmp_path / "off")
    run("pi_model.py", *args, "--unsup-weight", 100, "--run-dir", tmp_path / "on")
    run("pi_model.py", *args, "--unsup-weight", 100, "--stop-grad", "--run-dir", tmp_path / "half")
    off, on, half = (weights(tmp_path / d) for d in ("off", "on", "half"))
    assert any(not torch.equal(off[k], on[k]) for k in off if k.endswith("conv1.weight"))
    assert any(not torch.equal(on[k], half[k]) for k in on if k.endswith("conv1.weight"))
    assert all(r["losses/unsup"] > 0 for r in rows(tmp_path / "on") if "losses/unsup" in r)


def test_pi_rampup_endpoints():
    import pi_model

    assert pi_model.sigmoid_rampup(0, 100) == pytest.approx(torch.tensor(-5.0).exp().item())
    assert pi_model.sigmoid_rampup(50, 100) == pytest.approx(torch.tensor(-1.25).exp().item())
    assert pi_model.sigmoid_rampup(100, 100) == 1.0 == pi_model.sigmoid_rampup(500, 100)
    assert pi_model.sigmoid_rampup(0, 0) == 1.0
