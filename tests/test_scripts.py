"""What every method script must do, end to end on CPU: a few steps on fake data with a tiny network,
run as a user runs it (a subprocess)."""

import json

import pytest
import torch

from scriptrun import TINY, checkpoint, flat, rows, run, run_killed, same

SCRIPTS = ["supervised.py", "pi_model.py", "mean_teacher.py", "temporal_ensembling.py", "uda.py", "flexmatch.py", "dst.py", "mpl.py",
           "maxl.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_and_writes_a_run(script, data_dir, tmp_path):
    out = tmp_path / "run"
    run(script, *TINY, "--data-dir", data_dir, "--total-steps", 12, "--run-dir", out)
    evals = [r for r in rows(out) if "eval/acc" in r]
    assert [r["step"] for r in evals] == [6, 12] and all(0 <= r["eval/acc"] <= 100 for r in evals)
    train = [r for r in rows(out) if "losses/total" in r]
    assert [r["step"] for r in train] == [4, 8, 12] and all(r["losses/total"] > 0 for r in train)
    ckpt = checkpoint(out)
    assert ckpt["step"] == 12 and set(ckpt) >= {"model", "ema_model", "optimizer", "scheduler", "scaler", "rng_cpu"}
    args = json.loads((out / "args.json").read_text())
    assert args["total_steps"] == 12 and args["weight_decay"] == 5e-4 and args["amp"] == "none"
    labeled = json.loads((out / "labeled_indices.json").read_text())
    assert len(labeled) == 20 and not (out / "checkpoint.pt.tmp").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_kill_and_resume_is_exact(script, data_dir, tmp_path):
    """kill -9 at whatever moment, then --resume RUN_DIR alone: the same checkpoint (weights, EMA,
    optimizer, RNG, method state) and the same metrics as a run never stopped."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 40]
    run(script, *args, "--run-dir", straight)
    step = run_killed(script, *args, "--run-dir", killed)
    assert step < 40, "the run ended before it could be killed: the test proves nothing"
    run(script, "--resume", killed)
    a, b = (flat({k: v for k, v in checkpoint(d).items() if k != "args"}) for d in (straight, killed))
    assert a.keys() == b.keys()
    assert [k for k in a if not same(a[k], b[k])] == []
    assert rows(straight) == rows(killed)


@pytest.mark.parametrize("script", SCRIPTS)
def test_bf16_autocast_step(script, data_dir, tmp_path):
    run(script, *TINY, "--data-dir", data_dir, "--total-steps", 1, "--amp", "bf16", "--run-dir", tmp_path / "r")
    weights = flat(checkpoint(tmp_path / "r")["model"])
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


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
    assert not (tmp_path / "empty").exists(), "a failed load must not leave an empty data dir behind"


def test_existing_run_dir_is_not_overwritten(data_dir, tmp_path):
    out = tmp_path / "r"
    run("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 2, "--run-dir", out)
    before = (out / "metrics.jsonl").read_text()
    proc = run("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 2, "--run-dir", out, check=False)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_asked_for_but_absent(data_dir, tmp_path):
    proc = run("supervised.py", *TINY, "--data-dir", data_dir, "--device", "cuda", "--run-dir", tmp_path / "r", check=False)
    assert proc.returncode == 2 and "use --device cpu" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
