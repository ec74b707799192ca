"""Every script under torchrun: two gloo processes on CPU (`python -m torch.distributed.run --standalone
--nproc_per_node=2`), a tiny network, fake Fashion-MNIST.

- each script runs, and rank 0 alone writes the run (one row per event, one header);
- two processes with per-rank batch B/2 train supervised.py exactly as one process with batch B;
- FlexMatch's marks and Temporal Ensembling's buffer stay identical on both ranks and hold both
  ranks' updates;
- a 2-process run killed at its first checkpoint (every process, or rank 1 alone) and resumed under torchrun
  ends as the uninterrupted 2-process run, bit for bit;
- a resume whose checkpoint does not load (checked after the DDP wrap) is one line and exit 2 on each rank;
- so is a run dir that another process holds (rank 0 alone holds it);
- a full disk on rank 0 in mid-run is its one line and exit 2, and torchrun --resume then loses nothing;
- Ctrl-C under torchrun is one line from rank 0 with the torchrun command that resumes, and that command does.

The tests that need to steer the data or read a rank's state afterwards launch a small driver (written
here) that patches `common` and runs the script with runpy, as torchrun would run it."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from scriptrun import OFFLINE, ROOT, TINY, checkpoint, flat, held, rows, run, same, same_run
from scripts import SCRIPTS

ENV = {**OFFLINE, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # 2 processes, 2 cores; a crash prints its stack


def torchrun_cmd(script, *args):
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        *map(str, args),
    ]


def torchrun(script, *args, env=None):
    """The script under torchrun with 2 processes; returns the CompletedProcess (exit 0 asserted)."""
    proc = subprocess.run(
        torchrun_cmd(script, *args), capture_output=True, text=True, cwd=ROOT, env={**ENV, **(env or {})}, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-6000:]
    return proc


def refused_by_every_rank(reason, *args):
    """supervised.py under torchrun with bad input: each rank says `reason` in one line and exits 2, or is ended by
    torchrun's SIGTERM once its peer has, silently (-15, or 130 from its handler: rank 0 alone says "interrupted");
    none aborts (SIGABRT: a group torn down in interpreter teardown) and none prints a traceback from the script (a
    rank left waiting in a collective by one that has gone)."""
    proc = subprocess.run(
        torchrun_cmd("supervised.py", *args), capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300
    )
    said = [line for line in proc.stderr.splitlines() if line.startswith("supervised.py: error:")]
    codes = [line.split(":")[1].split()[0] for line in proc.stderr.splitlines() if line.strip().startswith("exitcode")]
    assert proc.returncode != 0 and 1 <= len(said) <= 2 and reason in said[0], proc.stderr[-3000:]
    assert len(set(said)) == 1 and codes and set(codes) <= {"2", "-15", "130"} and "2" in codes, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr and 'File "' + str(ROOT / "supervised.py") not in proc.stderr


# A driver that runs the script as torchrun would, and records two things under the prefix $WATCH:
# whether rank 1 began loading the data after rank 0 had it (rank 0 takes a second longer than its load), and
# the names of the threads the process still has while the script's globals are alive (as in a plain run,
# until interpreter teardown).
WATCH_DRIVER = """
import os, runpy, sys, time
sys.path.insert(0, {root!r})
import common

rank, watch, load = os.environ["RANK"], os.environ["WATCH"], common.load_ssl_data

def load_in_turn(*args, **kwargs):
    if rank != "0":
        open(watch + "order", "w").write("after" if os.path.exists(watch + "loaded") else "during")
    data = load(*args, **kwargs)
    if rank == "0":
        time.sleep(1)
        open(watch + "loaded", "w").close()
    return data

common.load_ssl_data = load_in_turn
sys.argv = sys.argv[1:]
g = runpy.run_path(sys.argv[0], run_name="__main__")
names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
open(watch + "threads" + rank, "w").write(" ".join(sorted(names)))
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_processes_run_and_rank_0_alone_writes(script, data_dir, tmp_path):
    """Each script under torchrun; rank 0 alone writes. Rank 0 loads the data first (it downloads or
    unpacks it; the others then read it from disk). The group's gloo threads end when the script does:
    DDP holds the group, so threads left running into interpreter teardown (which SIGABRTed a rank now
    and then: "terminate called without an active exception") mean a DDP wrapper was kept."""
    driver, out, watch = tmp_path / "driver.py", tmp_path / "run", tmp_path / "watch_"
    driver.write_text(WATCH_DRIVER.format(root=str(ROOT)))
    args = (*TINY, "--data-dir", data_dir, "--total-steps", 12, "--run-dir", out)
    proc = torchrun(driver, script, *args, env={"WATCH": str(watch)})
    assert (tmp_path / "watch_order").read_text() == "after", "rank 1 loaded the data while rank 0 did"
    for r in (0, 1):
        names = (tmp_path / f"watch_threads{r}").read_text().split()
        assert names and not [n for n in names if "gloo" in n], f"rank {r} still runs {names}"
    assert sorted(p.name for p in out.iterdir()) == [
        "args.json",
        "checkpoint.pt",
        "labeled_indices.json",
        "metrics.jsonl",
        "model.pt",
    ]
    log = rows(out)
    assert [r["step"] for r in log if "losses/total" in r] == [4, 5, 8, 10, 12]  # once each: rank 1 wrote none
    assert [r["step"] for r in log if "eval/acc" in r] == [6, 12]
    assert proc.stdout.count(f"{Path(script).stem} | fashion_mnist") == 1 and proc.stdout.count("step      12/12") == 1
    ckpt = checkpoint(out)
    assert ckpt["step"] == 12 and "running" not in ckpt  # a row is logged at every save: no metric sums to keep
    assert len(ckpt["rng_cpu"]) == len(ckpt["rng_cuda"]) == 2  # one entry per rank
    assert not torch.equal(*ckpt["rng_cpu"]), "both ranks drew from the same random stream"
    assert json.loads((out / "args.json").read_text())["batch_size"] == 8  # per process, as given


# A driver that feeds chosen batches: every process draws the same indices from its own generator (same
# seed, same calls), and the images are not augmented. Rank r of 2 gets images X (rows a) with the
# labels of rows b_r; one process stands for both ranks and gets [X, X] with labels [b_0, b_1].
EQUAL_DRIVER = """
import os, runpy, sys
import torch
sys.path.insert(0, {root!r})
import common

ranks = [int(os.environ["RANK"])] if int(os.environ.get("WORLD_SIZE", 1)) > 1 else [0, 1]
g = torch.Generator().manual_seed(1234)

def sample_batch(batch_size, x, y, replace=True):
    per_rank = batch_size // len(ranks)
    a = torch.randint(len(x), (per_rank,), generator=g)  # the same images on every rank
    b = torch.randint(len(x), (2, per_rank), generator=g)  # each rank's labels
    return a.repeat(len(ranks)), x[a.repeat(len(ranks))], y[torch.cat([b[r] for r in ranks])]

common.sample_batch = sample_batch
common.weak_augment = lambda x, flip=True, pad=None: x
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_two_processes_of_half_the_batch_train_as_one(data_dir, tmp_path):
    """supervised.py: 2 processes with per-rank batch 4 vs 1 process with batch 8 on the same data.

    BatchNorm normalises each rank's batch with that rank's statistics, so the ranks get the same
    images (their batch statistics are then those of the single process's [X, X]) and differ in their
    labels, which the gradient sees but BatchNorm does not. The single-process gradient on [X, X] with
    labels [y_0, y_1] is the mean of the two ranks' gradients, which DDP's all-reduce computes: weights,
    momentum buffers and the EMA agree to float rounding, the logged losses too. A run without the
    all-reduce would follow y_0 alone and fail. BatchNorm running variances are updated with the
    unbiased variance, n / (n - 1) times the batch variance, with n twice as large in the single
    process: they agree only to about 1 / n (looser tolerance).

    Weights and momentum are compared as whole vectors. Eight steps amplify float rounding, and a
    small-norm tensor carries it relative to itself: on an AVX-512 CPU, one single-process run with
    oneDNN's convolutions and one without moved a BatchNorm bias by 4 % of its norm, the whole model
    by 3.5e-4. Without the all-reduce, the model moves by 1.3e-2, the momentum by 0.8, and the logged
    losses by up to 6e-2."""
    driver = tmp_path / "driver.py"
    driver.write_text(EQUAL_DRIVER.format(root=str(ROOT)))
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 8, "--log-every", 2]
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run(
        [sys.executable, str(driver), "supervised.py", *map(str, [*args, "--batch-size", 8, "--run-dir", one])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    torchrun(driver, "supervised.py", *args, "--batch-size", 4, "--run-dir", two)
    a, b = checkpoint(one), checkpoint(two)
    whole = lambda tensors: torch.cat([v.flatten() for v in tensors])
    close = lambda x, y, rel: (x - y).norm() <= rel * y.norm()  # relative to the vector's size
    for part in ("model", "ema_model"):
        floats = [k for k, v in a[part].items() if v.is_floating_point() and not k.endswith("running_var")]
        assert close(whole(b[part][k] for k in floats), whole(a[part][k] for k in floats), 1e-3), part
        for k, v in a[part].items():
            if k.endswith("running_var"):
                torch.testing.assert_close(b[part][k], v, rtol=1e-2, atol=0)
            elif not v.is_floating_point():
                assert torch.equal(b[part][k], v)  # num_batches_tracked
    momentum_a, momentum_b = (flat(c["optimizer"]["state"]) for c in (a, b))
    assert momentum_a.keys() == momentum_b.keys() and momentum_a
    assert close(whole(momentum_b.values()), whole(momentum_a.values()), 2e-2)
    ra, rb = rows(one), rows(two)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) > 4
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)


# A driver that records the unlabeled rows each rank drew (local indices into its shard) and saves the
# method state the rank holds once the script has finished.
STATE_DRIVER = """
import os, runpy, sys
import torch
sys.path.insert(0, {root!r})
import common

drawn, sample_batch = [], common.sample_batch

def recording(batch_size, *tensors, replace=True):
    out = sample_batch(batch_size, *tensors, replace=replace)
    if not replace:  # the unlabeled batch of FlexMatch and Temporal Ensembling
        drawn.append(out[0])
    return out

common.sample_batch = recording
sys.argv = sys.argv[1:]
g = runpy.run_path(sys.argv[0], run_name="__main__")
state = {{k: g[k].state_dict() if hasattr(g[k], "state_dict") else g[k] for k in os.environ["STATE"].split(",")}}
torch.save({{"drawn": drawn, **state}}, os.environ["DUMP"] + os.environ["RANK"] + ".pt")
"""


def run_and_dump(script, state, data_dir, tmp_path, *extra):
    driver = tmp_path / "driver.py"
    driver.write_text(STATE_DRIVER.format(root=str(ROOT)))
    out = tmp_path / "run"
    torchrun(
        driver,
        script,
        *TINY,
        "--data-dir",
        data_dir,
        "--total-steps",
        6,
        "--run-dir",
        out,
        *extra,
        env={"STATE": state, "DUMP": str(tmp_path / "rank")},
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    global_rows = [
        r + 2 * torch.stack(d["drawn"]) for r, d in enumerate(ranks) if d["drawn"]
    ]  # (steps, mu B): rows r, r + 2, ...
    return checkpoint(out), ranks, global_rows


def test_temporal_ensembling_buffer_agrees_across_ranks(data_dir, tmp_path):
    ckpt, ranks, rows_drawn = run_and_dump("temporal_ensembling.py", "Z,count", data_dir, tmp_path)
    for name, key in (("Z", "ensemble"), ("count", "ensemble_count")):
        assert torch.equal(ranks[0][name], ranks[1][name]) and torch.equal(ranks[0][name], ckpt[key])
    assert rows_drawn[0].shape == (6, 8)  # 6 steps of mu B = 8 distinct rows per rank
    assert not set(rows_drawn[0].flatten().tolist()) & set(rows_drawn[1].flatten().tolist())  # disjoint shards
    every = torch.cat([r.flatten() for r in rows_drawn])
    assert torch.equal(ranks[0]["count"], torch.bincount(every, minlength=200))  # both ranks' updates, on each rank
    assert (ranks[0]["Z"].sum(1) > 0).sum() == (ranks[0]["count"] > 0).sum()


def test_flexmatch_marks_agree_across_ranks(data_dir, tmp_path):
    """--threshold 0.05: every drawn row is marked (10 classes: the top probability is at least 0.1)."""
    ckpt, ranks, rows_drawn = run_and_dump("flexmatch.py", "selected_label", data_dir, tmp_path, "--threshold", 0.05)
    marks = ranks[0]["selected_label"]
    assert torch.equal(marks, ranks[1]["selected_label"]) and torch.equal(marks, ckpt["selected_label"])
    every = set(torch.cat([r.flatten() for r in rows_drawn]).tolist())
    assert set(torch.nonzero(marks >= 0).flatten().tolist()) == every  # both ranks' marks, on each rank
    assert not set(rows_drawn[0].flatten().tolist()) & set(rows_drawn[1].flatten().tolist())


@pytest.mark.parametrize(
    "script, state, extra",
    [
        ("maxl.py", {"model": "model", "generator": "generator"}, []),
        (
            "mpl.py",
            {"model": "model", "teacher": "teacher", "mpl_baseline": "mpl_baseline"},
            ["--student-wait-steps", 0, "--warmup-steps", 0],
        ),
    ],
)
def test_both_networks_agree_across_ranks(script, state, extra, data_dir, tmp_path):
    """The methods with two trained networks: each rank draws its own batches, yet after a few steps both
    ranks hold the same weights of BOTH networks (DDP averaged every gradient, the generator's second-order
    one and the teacher's included) and the same method state; rank 0's equal its checkpoint. BatchNorm
    running statistics are each rank's own since the last forward (DDP broadcasts rank 0's at each one)."""
    ckpt, ranks, _ = run_and_dump(script, ",".join(state), data_dir, tmp_path, *extra)
    for name, key in state.items():
        a, b, saved = (flat(x) if isinstance(x, dict) else {"": x} for x in (ranks[0][name], ranks[1][name], ckpt[key]))
        assert a.keys() == b.keys() == saved.keys()
        assert [k for k in a if not same(a[k], saved[k])] == [], name
        assert [k for k in a if not same(a[k], b[k]) and "running_" not in k and "num_batches" not in k] == [], name
    assert not torch.equal(*ckpt["rng_cpu"]), "both ranks drew from the same random stream"


def descendants(pid):
    """Process ids whose parent chain leads to pid (torchrun's workers start their own sessions)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def rank_1(pid):
    """The process of rank 1 among pid's descendants (torchrun's workers), from its environment."""
    for child in descendants(pid):
        with contextlib.suppress(OSError):
            if b"\0RANK=1\0" in b"\0" + Path(f"/proc/{child}/environ").read_bytes():
                return child
    raise AssertionError("no worker of rank 1")


@pytest.mark.parametrize("victims", ["every process", "rank 1"])
def test_two_process_kill_and_resume_is_exact(victims, data_dir, tmp_path):
    """Temporal Ensembling (method state, sharded rows, per-rank RNG streams): a 2-process run killed with
    SIGKILL (workers and torchrun, or the worker of rank 1 alone) as soon as its first checkpoint exists, then
    resumed with --resume RUN_DIR under torchrun, ends with the same checkpoint (every tensor, both ranks' RNG
    states and metric sums) and the same rows as the uninterrupted 2-process run of the same --total-steps. With
    rank 1 gone, rank 0 fails in its next all-reduce (gloo: "Connection reset by peer") and torchrun ends the run,
    exit 1: nothing waits for a peer that will not come back."""
    script = "temporal_ensembling.py"
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 40]
    torchrun(script, *args, "--run-dir", straight)
    proc = subprocess.Popen(
        torchrun_cmd(script, *args, "--run-dir", killed),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=ENV,
    )
    while not (killed / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.002)
    for pid in [*descendants(proc.pid), proc.pid] if victims == "every process" else [rank_1(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.wait(timeout=120) != 0
    assert checkpoint(killed)["step"] < 40, "the run ended before it could be killed: the test proves nothing"
    torchrun(script, "--resume", killed)
    a, b = (flat({k: v for k, v in checkpoint(d).items() if k != "args"}) for d in (straight, killed))
    assert a.keys() == b.keys() and len(checkpoint(killed)["rng_cpu"]) == 2
    assert [k for k in a if not same(a[k], b[k])] == []
    assert rows(straight) == rows(killed)
    if victims == "rank 1":
        return
    # the checkpoint holds two ranks' state: a single process refuses it, in one line, writing nothing
    before = (killed / "metrics.jsonl").read_text()
    single = run(script, "--resume", killed, "--total-steps", 50, check=False)
    assert (
        single.returncode == 2
        and "written by 2 process(es)" in single.stderr
        and len(single.stderr.strip().splitlines()) == 1
    )
    assert (killed / "metrics.jsonl").read_text() == before


def test_sync_bn_without_cuda_is_one_line_and_exit_2(data_dir, tmp_path):
    proc = run("supervised.py", *TINY, "--data-dir", data_dir, "--sync-bn", "--run-dir", tmp_path / "r", check=False)
    assert (
        proc.returncode == 2
        and "--sync-bn needs --device cuda" in proc.stderr
        and len(proc.stderr.strip().splitlines()) == 1
    )
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def run_of_two(data_dir, tmp_path_factory):
    """A finished 5-step run of supervised.py by 2 processes, never modified: tests resume copies of it."""
    out = tmp_path_factory.mktemp("ddp") / "r"
    torchrun("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 5, "--run-dir", out)
    return out


def test_eval_only_under_torchrun_evaluates_a_run_of_another_process_count(data_dir, tmp_path):
    """--eval-only draws nothing, so any process count evaluates a run: 2 processes on a 1-process run print its one
    line (rank 1 restored the RNG state of a rank the run did not have: IndexError's traceback, torchrun exit 1)."""
    run_dir = tmp_path / "one"
    run("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 2, "--run-dir", run_dir)
    proc = torchrun("supervised.py", "--resume", run_dir, "--eval-only")
    assert proc.stdout.count(f"supervised | {run_dir} | step 2 | eval acc") == 1 and "Traceback" not in proc.stderr


def test_checkpoint_that_does_not_fit_under_torchrun_is_one_line_and_exit_2(run_of_two, tmp_path):
    """The one bad-input check a resume reaches after the DDP wrap (the checkpoint's state does not load):
    every rank says it in one line and exits 2 (or torchrun ends it with SIGTERM once its peer has), none
    aborts (SIGABRT: a group torn down in interpreter teardown) and none prints a traceback; the run is
    left as it was. 25 such resumes of supervised.py at 7fd5194: 46 ranks exited 2, 4 got SIGTERM."""
    out = shutil.copytree(run_of_two, tmp_path / "r")
    ckpt = checkpoint(out)
    del ckpt["model"]["conv1.weight"]
    torch.save(ckpt, out / "checkpoint.pt")
    before = (out / "metrics.jsonl").read_text()
    refused_by_every_rank("does not fit this run", "--resume", out, "--total-steps", 10)
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("fault", ["held", "a damaged metrics row"])
def test_a_run_dir_rank_0_refuses_under_torchrun_is_one_line_and_exit_2(fault, run_of_two, tmp_path):
    """Rank 0 alone holds the run dir and reads its metrics (it alone writes there). When another process holds it, or
    a line of metrics.jsonl is not a row, rank 0 tells the other ranks before any training collective and every rank
    says the one line; the run is left as it was. (Rank 0 alone saying it left rank 1 in its first all-reduce: gloo's
    traceback, in 3 of 3 such resumes.)"""
    out = shutil.copytree(run_of_two, tmp_path / "r")
    if fault == "a damaged metrics row":
        with open(out / "metrics.jsonl", "a") as f:
            f.write('{"losses/sup": 2.3}\n')
    before = (out / "metrics.jsonl").read_text()
    reason = {"held": f"{out}: another process is running it now", "a damaged metrics row": "is not a metrics row"}
    with held(out) if fault == "held" else contextlib.nullcontext():
        refused_by_every_rank(reason[fault], "--resume", out, "--total-steps", 10)
    assert (out / "metrics.jsonl").read_text() == before and checkpoint(out)["step"] == 5


@pytest.mark.parametrize(
    "bad, reason",
    [
        (["--num-labels", 7], "--num-labels 7 must be a positive multiple of the class count (10)"),
        (["--dataset", "cifar10"], "cifar10 is not in"),
    ],
)
def test_data_that_does_not_load_under_torchrun_is_one_line_and_exit_2(bad, reason, data_dir, tmp_path):
    """Rank 0 loads the data first while the others wait at a barrier. When it cannot (a ValueError, or no such
    dataset in --data-dir and no download), it still passes the barrier before it leaves: the others then find the
    same fault and say the same line, not gloo's traceback of a barrier whose peer is gone (each bad input below
    gave that traceback, from the script's barrier line, before this test came)."""
    refused_by_every_rank(reason, *TINY, "--data-dir", data_dir, *bad, "--run-dir", tmp_path / "r")
    assert not (tmp_path / "r").exists()


# A driver whose rank 0 finds the disk full halfway through its 4th metrics row (scriptrun.full_disk_open), and
# whose every rank leaves the file $WATCH<rank> if it goes through interpreter teardown (atexit runs there).
FULL_DISK_DRIVER = """
import atexit, builtins, os, runpy, sys
sys.path[:0] = {paths!r}  # as pytest.ini's pythonpath
from scriptrun import full_disk_open

rank = os.environ["RANK"]
atexit.register(lambda: open(os.environ["WATCH"] + rank, "w").close())
if rank == "0":
    builtins.open = full_disk_open(4)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_full_disk_on_rank_0_in_mid_run_is_its_one_line_and_resume_loses_nothing(data_dir, tmp_path):
    """Rank 0 alone writes: at step 6's eval row (the step 5 checkpoint on disk, rank 1 training on) its disk is
    full. Rank 0 says so in one line and exits 2 without interpreter teardown (leave(): DDP's threads met there
    aborted it, SIGABRT, in 2 of 45 such runs at 7acd43e), and torchrun's summary names it the root cause. Rank 1
    then stops on its broken collective (gloo's traceback) or on torchrun's SIGTERM (silently: rank 0 alone says
    the interrupted line): the peer's loss, not a second cause. torchrun --resume then ends as the uninterrupted
    2-process run: the same tensors, bit for bit, and the same rows."""
    straight, full, driver = tmp_path / "straight", tmp_path / "full", tmp_path / "driver.py"
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 10]
    torchrun("supervised.py", *args, "--run-dir", straight)
    driver.write_text(FULL_DISK_DRIVER.format(paths=[str(ROOT / d) for d in (".", "tests", "bench")]))
    proc = subprocess.run(
        torchrun_cmd(driver, ROOT / "supervised.py", *args, "--run-dir", full),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**ENV, "WATCH": str(tmp_path / "teardown")},
        timeout=300,
    )
    said = [line for line in proc.stderr.splitlines() if line.startswith("supervised.py: error:")]
    line = f"cannot write {full / 'metrics.jsonl'} (No space left on device): free space and --resume"
    assert proc.returncode != 0 and said == [f"supervised.py: error: {line}"], proc.stderr[-3000:]
    root_cause = proc.stderr.split("Root Cause (first observed failure):")[-1]
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\s+exitcode\s*: 2\b", root_cause), proc.stderr[-3000:]
    assert not (tmp_path / "teardown0").exists() and "terminate called" not in proc.stderr
    assert checkpoint(full)["step"] == 5
    torchrun("supervised.py", "--resume", full)
    assert same_run(straight, full) and len(checkpoint(full)["rng_cpu"]) == 2


def test_ctrl_c_under_torchrun_is_one_line_with_the_command_that_resumes(data_dir, tmp_path):
    """Ctrl-C reaches torchrun (its workers have their own sessions), which passes SIGINT to every rank: rank 0
    alone says where the run stopped and how to go on, and the command is torchrun's (a single process refuses a
    2-process checkpoint); no rank aborts in teardown. That command then finishes the run."""
    out = tmp_path / "r"
    cmd = torchrun_cmd("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 200, "--run-dir", out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    while not (out / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1]
    said = [line for line in err.splitlines() if "interrupted at step" in line]
    assert len(said) == 1 and said[0].endswith(
        f"; continue with: torchrun --nproc_per_node=2 supervised.py --resume {out}"
    ), err[-3000:]
    assert "terminate called" not in err and 'File "' + str(ROOT / "supervised.py") not in err, err[-3000:]
    step = checkpoint(out)["step"]
    assert 5 <= step < 200, "the run ended before the signal: the test proves nothing"
    torchrun("supervised.py", "--resume", out)
    assert checkpoint(out)["step"] == 200 and [r["step"] for r in rows(out)][-1] == 200


def two_nodes(*args):
    """supervised.py on two "nodes" of one process each: two torchrun agents on this machine that meet at a c10d
    rendezvous on a free port. Returns the two agents' Popen (stderr piped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}"]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *nodes,
        "--rdzv-id=two_nodes",
        "supervised.py",
        *map(str, args),
    ]
    return [
        subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        for _ in range(2)
    ]


def test_ctrl_c_on_two_nodes_names_the_node_count_in_the_command_that_resumes(data_dir, tmp_path):
    """On several machines the command that resumes names them: a run of 2 nodes x 1 process told to resume with
    `torchrun --nproc_per_node=1` alone would be refused (a 2-process checkpoint). Two nodes then finish the run."""
    out = tmp_path / "r"
    agents = two_nodes(*TINY, "--data-dir", data_dir, "--total-steps", 200, "--run-dir", out)
    while not (out / "checkpoint.pt").exists() and all(a.poll() is None for a in agents):
        time.sleep(0.01)
    for a in agents:
        a.send_signal(signal.SIGINT)
    err = "".join(a.communicate(timeout=120)[1] for a in agents)
    said = [line for line in err.splitlines() if "interrupted at step" in line]
    assert len(said) == 1 and said[0].endswith(
        f"; continue with: torchrun --nnodes=2 <your rendezvous flags> --nproc_per_node=1 supervised.py --resume {out}"
    ), err[-3000:]
    assert 5 <= checkpoint(out)["step"] < 200, "the run ended before the signal: the test proves nothing"
    agents = two_nodes("--resume", out)
    err = "".join(a.communicate(timeout=300)[1] for a in agents)
    assert [a.returncode for a in agents] == [0, 0], err[-3000:]
    assert checkpoint(out)["step"] == 200 and [r["step"] for r in rows(out)][-1] == 200
