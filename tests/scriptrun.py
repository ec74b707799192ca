"""Running the method scripts in tests: as a subprocess (as a user runs them) or in-process (to look at
the trained objects afterwards), on a tiny network and fake Fashion-MNIST (no md5 to patch)."""

import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = (  # a tiny network on fake Fashion-MNIST, on the CPU
    "--dataset fashion_mnist --num-labels 20 --depth 10 --width 1 --batch-size 8 --bn-momentum 0.1 "
    "--device cpu --log-every 4 --eval-every 6 --save-every 5"
).split()
OFFLINE = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # downloads fail fast


def run(script, *args, check=True):
    """The script in a fresh interpreter; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=OFFLINE,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_killed(script, *args):
    """The script in a fresh interpreter, killed with SIGKILL as soon as its first checkpoint.pt
    appears in --run-dir (args must contain it); returns the step that checkpoint holds."""
    run_dir = Path(args[list(args).index("--run-dir") + 1])
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=OFFLINE,
    )
    while not (run_dir / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return checkpoint(run_dir)["step"]


def run_inprocess(script, *args, exit_ok=False):
    """The script as __main__ in this process; returns its globals (model, ema_model, ...). With exit_ok, a script
    that stops with exit code 0 (--eval-only, a finished run) returns its globals too. The signal handlers the
    script installs (Ctrl-C, SIGTERM) are put back afterwards."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    path = ROOT / script
    scope = {"__name__": "__main__", "__file__": str(path)}
    try:
        with mock.patch.object(sys, "argv", [script, *map(str, args)]):
            if not exit_ok:
                return runpy.run_path(str(path), run_name="__main__")
            exec(compile(path.read_text(), str(path), "exec"), scope)  # runpy would drop the globals on SystemExit
    except SystemExit as e:
        if not exit_ok or e.code not in (0, None):
            raise
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return scope


def rows(run_dir):
    """metrics.jsonl without wall-clock fields."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train/it_per_sec"} for line in lines]


def checkpoint(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def flat(state, prefix=""):
    """Every leaf of a checkpoint (weights, optimizer, RNG, method state) as {dotted.key: value}."""
    if isinstance(state, dict):
        return {k: v for key, sub in state.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, sub in enumerate(state) for k, v in flat(sub, f"{prefix}{i}.").items()}
    return {prefix[:-1]: state}


def same(a, b):
    return type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)


def middle_threshold(logits):
    """A confidence threshold halfway between the two middle max-softmax values of these logits: about half of
    the batch passes it, so a test can tell a right mask from a wrong one."""
    confidence = logits.detach().softmax(1).max(1).values.sort().values
    mid = len(confidence) // 2
    return (confidence[mid - 1] + confidence[mid]).item() / 2
