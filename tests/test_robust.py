"""Nothing a user does loses or mixes a run: bad values refused before anything runs (typed, or in a resumed run's
args.json), resume guards (damaged, missing, foreign or finished checkpoints, a damaged split or metrics file, another
script, dataset, data or network), divergence, unwritable run dirs, a full disk, Ctrl-C and a second process on a
run, each ending in one line on stderr with the previous state intact.

Argument checks run in-process on every script; run-level cases on supervised.py and on mpl.py (two networks)."""

import builtins
import contextlib
import errno
import json
import os
import pickle
import re
import runpy
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from fakedata import make_fake_dataset
from scriptrun import OFFLINE, ROOT, TINY, checkpoint, full_disk_open, held, refused, run, run_inprocess, same_run
from scripts import SCRIPTS

import common

SMALL = [*TINY, "--total-steps", 6, "--mu", 1]  # checkpoints at steps 5 and 6


def parse(script, argv):
    """The script's parse_args(argv), without running the script."""
    return runpy.run_path(str(ROOT / script), run_name="parse_only")["parse_args"](list(map(str, argv)))


def files(run_dir):
    """Every file of a run dir with its bytes: a refused start must leave them as they were."""
    return {p.name: p.read_bytes() for p in sorted(Path(run_dir).iterdir())}


def strict_rows(run_dir):
    """metrics.jsonl read as strict JSON: a bare NaN or Infinity fails."""

    def refuse(constant):
        raise ValueError(f"{constant} in metrics.jsonl")

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A finished 6-step run of supervised.py and of mpl.py, never modified: tests work on copies."""
    root = tmp_path_factory.mktemp("runs")
    for script in ("supervised.py", "mpl.py"):
        run_inprocess(script, *SMALL, "--data-dir", data_dir, "--run-dir", root / script)
    return root


def copy(runs, script, tmp_path):
    return Path(shutil.copytree(runs / script, tmp_path / "run"))


PATH_FLAGS = ("--data-dir", "--run-dir", "--resume")
BAD_VALUES = {
    "--lr": (["-0.1", "0", "nan", "1e39"], "argument --lr: must be positive and at most 3.4e38 (float32)"),
    "--weight-decay": (["-1", "inf", "1e39"], "argument --weight-decay: must be >= 0 and at most 3.4e38 (float32)"),
    "--momentum": (["1", "0", "-0.5"], "argument --momentum: must be in (0, 1)"),  # 0: Nesterov SGD refuses it
    "--ema-decay": (["2", "-1"], "argument --ema-decay: must be in [0, 1]"),
    "--bn-momentum": (["5", "0"], "argument --bn-momentum: must be in (0, 1]"),
    "--device": (["cpux", "gpu", "meta"], "is not a device these scripts run on: use cpu, cuda or cuda:N"),
    "--seed": (["9223372036854775808", "-9223372036854775809"], "argument --seed: must be in [-2^63, 2^63)"),
    # an unset shell variable: `--resume ""` started a new run of every default (CIFAR-10, 2^20 steps)
    **{f: ([""], f"argument {f}: is empty (an unset shell variable?): give a path") for f in PATH_FLAGS},
}


# Each method flag's bad values: out of its range, not a number, or beyond float32 for the weights and rates that
# become float32 tensors (a traceback from the first step before: "value cannot be converted to type float").
METHOD_BAD_VALUES = {
    "pseudo_label.py": {"--threshold": ["1.5", "nan"], "--unsup-weight": ["-1", "1e39"], "--ramp-up": ["2"]},
    "pi_model.py": {"--unsup-weight": ["nan", "1e39"], "--ramp-up": ["-0.1"]},
    "mean_teacher.py": {"--unsup-weight": ["inf", "1e39"], "--ramp-up": ["1.5"]},
    "temporal_ensembling.py": {"--unsup-weight": ["-1", "1e39"], "--ramp-up": ["nan"], "--alpha": ["1", "-0.1"]},
    "uda.py": {"--unsup-weight": ["-1", "nan", "1e39"], "--temperature": ["0", "inf"], "--threshold": ["1.5", "-1"]},
    "fixmatch.py": {"--threshold": ["-0.1", "1.01"], "--unsup-weight": ["-1", "1e39"]},
    "flexmatch.py": {"--threshold": ["2", "nan"], "--unsup-weight": ["-0.5", "1e39"]},
    "dst.py": {
        **{f: ["-1", "nan"] for f in ("--pseudo-weight", "--worst-weight", "--eta-prime", "--grl-hi", "--grl-lo")},
        **{"--grl-alpha": ["-1", "1e39"], "--grl-warmup": ["inf"], "--threshold": ["2"], "--head-width": ["0"]},
    },
    "mpl.py": {
        **{"--teacher-lr": ["-1", "1e39"], "--dropout": ["1"], "--label-smoothing": ["-0.1"], "--temperature": ["0"]},
        **{"--threshold": ["1.5"], "--uda-weight": ["1e39"], "--uda-steps": ["-1"], "--warmup-steps": ["-1"]},
        **{"--student-wait-steps": ["-5"], "--baseline-decay": ["1.01"], "--finetune-steps": ["-1"]},
        **{"--finetune-batch-size": ["0"], "--finetune-lr": ["nan", "1e39"]},
    },
    "maxl.py": {
        **{"--psi": ["0"], "--aux-weight": ["-1"], "--entropy-weight": ["nan"], "--focal-gamma": ["-2"]},
        **{"--gen-lr": ["1e39"], "--gen-weight-decay": ["1e39"]},
    },
}


@pytest.mark.parametrize("script", SCRIPTS[1:])
def test_bad_method_flags_are_one_line_and_exit_2(script, capsys):
    """Every flag a method script adds to supervised.py's (the list is checked against the script's source) refuses
    its bad values with one line naming the flag, before anything runs."""
    added = re.compile(r'add_argument\("(--[a-z-]+)",[^\n]*type=')
    assert set(METHOD_BAD_VALUES[script]) == set(added.findall((ROOT / script).read_text())) - set(
        added.findall((ROOT / "supervised.py").read_text())
    )
    for flag, values in METHOD_BAD_VALUES[script].items():
        for value in values:
            with pytest.raises(SystemExit) as e:
                parse(script, [*TINY, flag, value])
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and err.count("\n") == 0 and f"argument {flag}: must be" in err, (flag, value)


@pytest.mark.parametrize("script", SCRIPTS)
def test_values_torch_rejects_are_refused_before_anything_runs(script, capsys, tmp_path):
    for flag, (values, message) in BAD_VALUES.items():
        for value in values:
            with pytest.raises(SystemExit) as e:
                parse(script, [*TINY, flag, value])
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, (flag, value, err)
    needs = {"--eval-only": "--eval-only needs --resume", "--cuda-graph": "--cuda-graph needs --device cuda"}
    needs["--compile-augment"] = "--compile-augment is for --device cuda"  # TINY runs on the CPU
    for flag, message in needs.items():
        with pytest.raises(SystemExit) as e:
            parse(script, [*TINY, flag])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1 and message in err, (flag, err)
    args = parse(script, TINY)
    assert args.script == script[:-3]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_has_the_whole_title_and_the_defaults(script, capsys):
    with pytest.raises(SystemExit) as e:
        parse(script, ["--help"])
    doc = runpy.run_path(str(ROOT / script), run_name="parse_only")["__doc__"]
    squeeze = lambda text: "".join(text.split())  # argparse re-wraps the text
    out = capsys.readouterr().out
    assert e.value.code == 0 and squeeze(doc.split("\n\n")[0]) in squeeze(out)
    assert "(default: 0.9)" in squeeze(out).replace("(default:", "(default: ")  # --momentum's default is shown


@pytest.mark.parametrize("script", SCRIPTS)
def test_resume_refuses_another_script_dataset_split_or_network(script, capsys, tmp_path):
    """Checked from args.json alone, before any data loads."""
    other = "pi_model" if script != "pi_model.py" else "supervised"
    saved = vars(parse(other + ".py", TINY))
    (tmp_path / "args.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit):
        parse(script, ["--resume", tmp_path])
    assert f"made by {other}.py" in capsys.readouterr().err
    (tmp_path / "args.json").write_text(json.dumps({**saved, "script": script[:-3]}))
    for flags, message in (
        (["--dataset", "mnist"], "--dataset fashion_mnist (now mnist)"),
        (["--width", "2"], "--width 1 (now 2)"),
        (["--seed", "3"], "--seed 0 (now 3)"),
    ):
        with pytest.raises(SystemExit):
            parse(script, ["--resume", tmp_path, *flags])
        assert message in capsys.readouterr().err
    (tmp_path / "args.json").write_text('{"dataset": "fashion')  # cut by a full disk, say
    with pytest.raises(SystemExit):
        parse(script, ["--resume", tmp_path])
    assert "args.json is not valid JSON" in capsys.readouterr().err


# A resumed run's arguments come from its args.json: each value there meets the check of the flag it stands for
# (a file edited by hand, or written by an older script: UDA's --threshold -1, before it had to be in [0, 1]).
# Before, a value there was taken as it stood: --lr -1 trained, --amp fp8 ran as fp16, a null seed gave a traceback.
BAD_SAVED = {
    "a list": ([], "its args.json is not a JSON object of arguments"),
    "negative lr": ({"lr": -1e-05}, "its args.json: argument --lr: must be positive and at most 3.4e38 (float32)"),
    "a fraction": ({"total_steps": 2.5}, "its args.json: argument --total-steps: invalid int value: '2.5'"),
    "no seed": ({"seed": None}, "its args.json: argument --seed: invalid int value: 'None'"),
    "not a choice": ({"amp": "fp8"}, "its args.json: argument --amp: invalid choice: 'fp8'"),
    "not a number": ({"lr": "fast"}, "its args.json: argument --lr: invalid float value: 'fast'"),
    "not a switch": ({"compile": "yes"}, 'its args.json: argument --compile: "yes" is not true or false'),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_resumed_runs_saved_arguments_meet_the_flags_checks(script, capsys, tmp_path):
    args_json = tmp_path / "args.json"
    for dataset in ("fashion_mnist", "cifar100", "stl10"):  # the values a script resolves pass (datasets' defaults)
        saved = vars(parse(script, ["--dataset", dataset, "--run-dir", tmp_path]))
        args_json.write_text(json.dumps(saved))
        assert vars(parse(script, ["--resume", tmp_path])) == {**saved, "resume": str(tmp_path)}
    saved = {**saved, "script": script[:-3]}
    flag, [text, *_] = next(iter(METHOD_BAD_VALUES.get(script, {"--lr": ["0"]}).items()))  # out of its range
    bad = {flag[2:].replace("-", "_"): int(text) if text.lstrip("-").isdigit() else float(text)}
    cases = {**BAD_SAVED, "a method flag": (bad, f"its args.json: argument {flag}: must be ")}
    for case, (change, message) in cases.items():
        args_json.write_text(json.dumps({**saved, **change} if isinstance(change, dict) else change))
        with pytest.raises(SystemExit):
            parse(script, ["--resume", tmp_path])
        err = capsys.readouterr().err
        assert f"error: --resume {tmp_path}: {message}" in err and len(err.splitlines()) == 1, case
    args_json.write_text(json.dumps({**saved, "lr": -1}))  # a flag given now replaces the file's value
    assert parse(script, ["--resume", tmp_path, "--lr", 0.05]).lr == 0.05
    unset = ["weight_decay", "amp"]  # flags whose default, None, the script resolves: a null is theirs to resolve
    args_json.write_text(json.dumps({**saved, **dict.fromkeys(unset)}))
    resolved = vars(parse(script, ["--resume", tmp_path]))
    assert [resolved[k] for k in unset] == [saved[k] for k in unset]


def malicious(path):
    class Boom:
        def __reduce__(self):
            return (print, ("this must never run",))

    path.write_bytes(pickle.dumps(Boom()))


CORRUPT = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "random bytes": lambda p: p.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()),
    "empty": lambda p: p.write_bytes(b""),
    "unsafe pickle": malicious,
    "not a checkpoint": lambda p: torch.save(torch.zeros(3), p),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_damaged_checkpoint_is_refused_in_one_line(case, runs, capsys, tmp_path):
    run_dir = copy(runs, "supervised.py", tmp_path)
    CORRUPT[case](run_dir / "checkpoint.pt")
    before = files(run_dir)
    err = refused(capsys, "supervised.py", "--resume", run_dir, "--total-steps", 20)
    assert "checkpoint" in err and "weights_only=False" not in err and "must never run" not in err
    assert files(run_dir) == before


@pytest.mark.parametrize("error", ["cuda", "host"])
def test_memory_running_out_while_reading_a_checkpoint_is_not_called_damage(error, runs, capsys, monkeypatch, tmp_path):
    """torch.load running out of memory (CUDA's OutOfMemoryError, raised here on the CPU; Python's MemoryError, with no
    size) says so in one line and leaves the run as it is. It read "damaged or not a checkpoint", which reads as: delete
    the run, whose checkpoint is whole."""
    run_dir, real = copy(runs, "supervised.py", tmp_path), torch.load
    raised = {
        "cuda": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ..."),
        "host": MemoryError(),
    }[error]

    def runs_out(path, *args, **kwargs):
        if Path(path).name == "checkpoint.pt":
            raise raised
        return real(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", runs_out)
    before = files(run_dir)
    asked = " (it asked for 2.00 GiB more)" if error == "cuda" else ""
    assert refused(capsys, "supervised.py", "--resume", run_dir, "--total-steps", 20) == (
        f"supervised.py: error: --resume {run_dir}: out of memory on cpu reading checkpoint.pt{asked}: free memory "
        "and run again"
    )
    assert files(run_dir) == before


# A run's other files, damaged by hand or by a tool: (file, its new bytes, what the one line says).
SPLIT, ROW = "its labeled_indices.json is damaged: delete it", "a line of its metrics.jsonl is not a metrics row"
DAMAGED_FILES = {
    "split not JSON": ("labeled_indices.json", b"[1, 2,", SPLIT),
    "split not text": ("labeled_indices.json", b"\xff\xfe[", SPLIT),
    "split not a list": ("labeled_indices.json", b'{"0": 3}', SPLIT),
    "split not of indices": ("labeled_indices.json", b"[3, 1.5]", SPLIT),
    "row not JSON": ("metrics.jsonl", b'{"step": 1, "losses/sup": }\n', ROW),
    "row without a step": ("metrics.jsonl", b'{"losses/sup": 2.3}\n', ROW),
    "a step not a number": ("metrics.jsonl", b'{"step": "1"}\n', ROW),
    "an accuracy not a number": ("metrics.jsonl", b'{"step": 1, "eval/acc": "high"}\n', ROW),
    "rows not text": ("metrics.jsonl", b'{"step": 1}\n\xff}\n', ROW),
}


@pytest.mark.parametrize("case", list(DAMAGED_FILES))
def test_a_runs_damaged_split_or_metrics_are_one_line_and_kept(case, runs, capsys, tmp_path):
    """Not a traceback on resume, and the files stay as they are (metrics.jsonl is rewritten only once all its rows
    read); the line says what to do. Deleting the split, as it says, resumes the run and writes the split again."""
    run_dir = copy(runs, "supervised.py", tmp_path)
    name, damaged, says = DAMAGED_FILES[case]
    (run_dir / name).write_bytes((run_dir / name).read_bytes() + damaged if name == "metrics.jsonl" else damaged)
    before = files(run_dir)
    assert says in refused(capsys, "supervised.py", "--resume", run_dir, "--total-steps", 7)
    assert files(run_dir) == before
    if name == "labeled_indices.json":
        (run_dir / name).unlink()
        run_inprocess("supervised.py", "--resume", run_dir, "--total-steps", 7)
        assert (run_dir / name).read_bytes() == (runs / "supervised.py" / name).read_bytes()


@pytest.mark.parametrize("script", ["flexmatch.py", "temporal_ensembling.py"])
def test_more_distinct_unlabeled_rows_a_step_than_there_are_is_one_line(script, data_dir, capsys, tmp_path):
    """FlexMatch and Temporal Ensembling draw mu B distinct unlabeled rows a step: no more than the set holds (200
    fake images). One line, nothing written; before, the batch was the 200 and the run trained on with less than it
    was asked, silently. mu B = 200 runs."""
    args = [*TINY, "--data-dir", data_dir, "--total-steps", 1]
    err = refused(capsys, script, *args, "--mu", 26, "--run-dir", tmp_path / "r")
    assert err.endswith("--mu x --batch-size = 208 distinct unlabeled images a step, but there are 200"), err
    assert not (tmp_path / "r").exists()
    run_inprocess(script, *args, "--mu", 25, "--run-dir", tmp_path / "ok")


def test_switches_a_resumed_run_turned_on_turn_off_next_to_resume(runs, capsys, tmp_path):
    """A run made on a GPU with --cuda-graph and --compile-augment (so its args.json says), evaluated on a CPU: each
    line names the way on, and --no-cuda-graph --no-compile-augment turn the saved switches off (a switch saved as
    true could not be turned off: --no-cuda-graph was an unrecognized argument)."""
    run_dir = copy(runs, "supervised.py", tmp_path)
    saved = json.loads((run_dir / "args.json").read_text())
    gpu = {"device": "cuda", "amp": "bf16", "cuda_graph": True, "compile_augment": True}
    (run_dir / "args.json").write_text(json.dumps({**saved, **gpu}))
    on_cpu = ["--resume", run_dir, "--eval-only", "--device", "cpu"]
    assert "use --device cpu" in refused(capsys, "supervised.py", *on_cpu[:3])
    assert "drop it (--no-cuda-graph on a resume)" in refused(capsys, "supervised.py", *on_cpu)
    assert "(--no-compile-augment on a resume)" in refused(capsys, "supervised.py", *on_cpu, "--no-cuda-graph")
    run_inprocess("supervised.py", *on_cpu, "--no-cuda-graph", "--no-compile-augment", "--amp", "none", exit_ok=True)
    assert f"supervised | {run_dir} | step 6 | eval acc" in capsys.readouterr().out


def test_durations_past_a_day_keep_their_hours():
    """The eta and the elapsed time: 25 hours read 25:00:00 (time.strftime's %H wrapped them to 01:00:00; a default
    run on a CPU takes days), and an eta of 1e18 s (a huge --total-steps) is a number (time.gmtime overflowed)."""
    import supervised

    hours = [supervised.hms(s) for s in (0, 59.9, 3661, 25 * 3600, 1e18)]
    assert hours == ["0:00:00", "0:00:59", "1:01:01", "25:00:00", f"{10**18 // 3600}:46:40"]


def test_ctrl_c_before_a_resumes_first_step_names_its_step_and_a_command_a_shell_runs(
    runs, capsys, monkeypatch, tmp_path
):
    """Ctrl-C while a resume loads its data: the line names the checkpoint's step (it said step 0), and its command,
    pasted into a shell, resumes a run dir whose name holds a space (the path was not quoted: two arguments)."""
    run_dir, load = Path(shutil.copytree(runs / "supervised.py", tmp_path / "my run")), common.load_ssl_data

    def ctrl_c(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return load(*args, **kwargs)

    monkeypatch.setattr(common, "load_ssl_data", ctrl_c)
    err = refused(capsys, "supervised.py", "--resume", run_dir, "--total-steps", 8, code=130)
    assert "interrupted at step 6; continue with: python " in err
    assert shlex.split(err.split("continue with: ")[1]) == [
        "python",
        str(ROOT / "supervised.py"),
        "--resume",
        str(run_dir),
    ]


def test_ctrl_c_before_the_first_checkpoint_says_to_delete_the_run_dir(data_dir, capsys, monkeypatch, tmp_path):
    """Stopped at its first step, a run leaves its start files and no checkpoint: neither --resume nor the same command
    goes on there (both refuse the dir), so the line says to delete it (it said "nothing to resume" alone)."""
    run_dir, real = tmp_path / "run", torch.nn.functional.cross_entropy

    def ctrl_c(*args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", ctrl_c)
    err = refused(capsys, "supervised.py", *SMALL, "--data-dir", data_dir, "--run-dir", run_dir, code=130)
    assert err.endswith(
        f"interrupted at step 1; no checkpoint yet, nothing to resume: delete {run_dir} to start it again"
    )
    assert (run_dir / "args.json").exists() and not (run_dir / "checkpoint.pt").exists()


def test_memory_that_runs_out_is_one_line_and_exit_2(data_dir, tmp_path):
    """A batch the host cannot hold: a real allocation failure (8e14 bytes of batch indices, more than any address
    space, whatever the overcommit policy). One line says what to change and what to do with the run dir its start
    left; it was torch's traceback, exit 1."""
    run_dir = tmp_path / "run"
    proc = run(
        "supervised.py", *SMALL, "--batch-size", 10**14, "--data-dir", data_dir, "--run-dir", run_dir, check=False
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (
        "supervised.py: error: out of memory on cpu at step 1 (it asked for 800000000000000 bytes more): a smaller "
        f"--batch-size or --mu needs less; no checkpoint yet, nothing to resume: delete {run_dir} to start it again\n"
    )


def test_a_gpus_memory_running_out_after_a_checkpoint_names_the_command_that_resumes(
    data_dir, capsys, monkeypatch, tmp_path
):
    """CUDA's OutOfMemoryError (raised here on the CPU) at step 7, after the checkpoint of step 5: the hook the script
    installs for errors no code caught says so in one line, exit 2, with the resume command; any other error goes on
    to Python's own hook (its traceback)."""
    run_dir, real, calls, excepthook = tmp_path / "run", torch.nn.functional.cross_entropy, [], sys.excepthook
    message = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which ..."

    def runs_out(*args, **kwargs):
        calls.append(torch.is_grad_enabled())  # a training step's (evaluation's are not counted)
        if sum(calls) == 7:
            raise torch.OutOfMemoryError(message)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", runs_out)
    with pytest.raises(torch.OutOfMemoryError) as e:
        run_inprocess("supervised.py", *TINY, "--data-dir", data_dir, "--run-dir", run_dir, "--total-steps", 10)
    frames = (frame for frame, _ in traceback.walk_tb(e.value.__traceback__))
    hook = next(f.f_globals["out_of_memory"] for f in frames if f.f_globals.get("METHOD") == "supervised")
    assert checkpoint(run_dir)["step"] == 5 and sys.excepthook is excepthook  # put back
    monkeypatch.setattr(sys, "argv", ["supervised.py"])  # as the script was started
    with pytest.raises(SystemExit) as code:
        hook(type(e.value), e.value, e.value.__traceback__)
    assert code.value.code == 2
    assert capsys.readouterr().err == (
        "supervised.py: error: out of memory on cpu at step 7 (it asked for 2.00 GiB more): a smaller --batch-size or "
        f"--mu needs less; continue with: python supervised.py --resume {run_dir}\n"
    )
    cublas = RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported ...")
    for error in (MemoryError(), cublas):  # Python's own (numpy's too), a CUDA library's: no size to give
        with pytest.raises(SystemExit) as code:
            hook(type(error), error, None)
        assert code.value.code == 2 and "error: out of memory on cpu at step 7: a smaller" in capsys.readouterr().err
    passed_on = []
    monkeypatch.setattr(sys, "__excepthook__", lambda *args: passed_on.append(args))
    bug = ValueError("a bug")
    hook(ValueError, bug, None)
    assert passed_on == [(ValueError, bug, None)] and capsys.readouterr().err == ""


def test_a_run_with_a_relative_data_dir_resumes_from_another_folder(data_dir, monkeypatch, tmp_path):
    """args.json records --data-dir as an absolute path, so a resume from another working directory finds the data
    (it looked for the relative path there: Debian's Fashion-MNIST unpacked into a new folder, then "other data")."""
    monkeypatch.chdir(Path(data_dir).parent)
    run_inprocess("supervised.py", *SMALL, "--data-dir", Path(data_dir).name, "--run-dir", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "args.json").read_text())["data_dir"] == str(data_dir)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_inprocess("supervised.py", "--resume", tmp_path / "run", "--total-steps", 8)
    assert checkpoint(tmp_path / "run")["step"] == 8 and list((tmp_path / "elsewhere").iterdir()) == []


def test_a_split_from_a_file_is_recorded_and_read_again_at_a_resume(data_dir, capsys, monkeypatch, tmp_path):
    """--labeled-indices, given relative: the run labels those images (written sorted to labeled_indices.json), and
    args.json records the file's absolute path, so a resume from another folder reads it again and goes on; a file
    changed since is refused (other labeled images), the run dir untouched."""
    monkeypatch.chdir(tmp_path)
    split, run_dir = tmp_path / "split.json", tmp_path / "run"
    split.write_text(json.dumps(list(range(30, 10, -1))))
    args = [*SMALL, "--data-dir", data_dir, "--run-dir", run_dir, "--labeled-indices", "split.json"]
    run_inprocess("supervised.py", *args)
    assert json.loads((run_dir / "args.json").read_text())["labeled_indices"] == str(split)
    assert json.loads((run_dir / "labeled_indices.json").read_text()) == list(range(11, 31))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    run_inprocess("supervised.py", "--resume", run_dir, "--total-steps", 8)
    assert checkpoint(run_dir)["step"] == 8
    split.write_text(json.dumps(list(range(10, 30))))
    before = files(run_dir)
    assert "other labeled images" in refused(capsys, "supervised.py", "--resume", run_dir, "--total-steps", 10)
    assert files(run_dir) == before


def test_a_run_given_its_own_split_is_the_same_run(runs, data_dir, tmp_path):
    """A run's labeled_indices.json passed back with --labeled-indices: the same images in the same order, and reading
    them draws nothing from the seed's RNG, so the run is the same bit for bit."""
    split = runs / "supervised.py" / "labeled_indices.json"
    args = [*SMALL, "--data-dir", data_dir, "--run-dir", tmp_path / "run", "--labeled-indices", split]
    run_inprocess("supervised.py", *args)
    assert same_run(runs / "supervised.py", tmp_path / "run")


def test_no_checkpoint_is_no_silent_restart(runs, capsys, tmp_path):
    run_dir = copy(runs, "supervised.py", tmp_path)
    (run_dir / "checkpoint.pt").unlink()
    before = files(run_dir)
    assert "nothing to resume" in refused(capsys, "supervised.py", "--resume", run_dir, "--total-steps", 20)
    assert files(run_dir) == before


@pytest.mark.parametrize("script", ["supervised.py", "mpl.py"])
def test_finished_and_shortened_runs(script, runs, capsys, tmp_path):
    run_dir = copy(runs, script, tmp_path)
    before = files(run_dir)
    with pytest.raises(SystemExit) as e:
        run_inprocess(script, "--resume", run_dir)
    assert e.value.code == 0 and "already finished at step 6" in capsys.readouterr().out
    assert "below the checkpoint's step 6" in refused(capsys, script, "--resume", run_dir, "--total-steps", 4)
    assert files(run_dir) == before


@pytest.mark.parametrize("script", ["supervised.py", "mpl.py"])
def test_another_scripts_checkpoint_and_other_data_are_refused(script, runs, capsys, tmp_path):
    run_dir = copy(runs, script, tmp_path)
    other = "mpl.py" if script == "supervised.py" else "supervised.py"
    before = files(run_dir)
    assert f"made by {script}" in refused(capsys, other, "--resume", run_dir, "--total-steps", 20)
    # a run from before scripts were recorded: the checkpoint's state does not fit the other script's
    args = json.loads((run_dir / "args.json").read_text())
    (run_dir / "args.json").write_text(json.dumps({k: v for k, v in args.items() if k != "script"}))
    ckpt = checkpoint(run_dir)
    torch.save({k: v for k, v in ckpt.items() if k != "script"}, run_dir / "checkpoint.pt")
    legacy = files(run_dir)
    other = "mpl.py" if script == "supervised.py" else "flexmatch.py"  # their state: a teacher, FlexMatch's marks
    assert "does not fit this run" in refused(capsys, other, "--resume", run_dir, "--total-steps", 20)
    # other data under the same dataset name: fewer training images
    other_data = tmp_path / "other_data"
    make_fake_dataset("fashion_mnist", other_data, n_train=120, n_test=40)
    err = refused(capsys, script, "--resume", run_dir, "--total-steps", 20, "--data-dir", other_data)
    assert "other data" in err and "[200, 40, 10]" in err
    assert files(run_dir) == legacy and before["metrics.jsonl"] == legacy["metrics.jsonl"]
    # the same data, but the run's labeled images are not those the split draws now (as when a dataset's pool of
    # labeled images changed: SVHN's grew from train to train + extra)
    split = run_dir / "labeled_indices.json"
    split.write_text(json.dumps(json.loads(split.read_text())[1:] + [0]))
    changed = files(run_dir)
    assert "other labeled images" in refused(capsys, script, "--resume", run_dir, "--total-steps", 20)
    assert files(run_dir) == changed


@pytest.mark.parametrize("where", ["log", "save"])
def test_divergence_stops_before_saving_and_logs_no_nan(where, data_dir, capsys, monkeypatch, tmp_path):
    """A forced NaN loss from the first step (so NaN weights after it). Caught at the log row (step 4) or, when the
    save comes first (step 3, log every 100), at the save; an evaluation in between logs null, never a bare NaN."""
    real = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    run_dir = tmp_path / "run"
    periods = ["--log-every", 4, "--save-every", 100] if where == "log" else ["--log-every", 100, "--save-every", 3]
    err = refused(
        capsys,
        "supervised.py",
        *TINY,
        "--data-dir",
        data_dir,
        "--run-dir",
        run_dir,
        "--total-steps",
        20,
        "--eval-every",
        2,
        *periods,
        code=3,
    )
    assert f"diverged by step {4 if where == 'log' else 3}: losses/total is nan" in err
    assert f"nothing of it was saved, {run_dir} holds no checkpoint yet" in err  # it said "keeps the last checkpoint"
    assert not (run_dir / "checkpoint.pt").exists() and not (run_dir / "model.pt").exists()
    evals = [r for r in strict_rows(run_dir) if "eval/acc" in r]
    assert [r["step"] for r in evals] == [2] and evals[0]["eval/loss"] is None
    monkeypatch.undo()  # the same command again: the dir is no run to resume (it said "continue it with --resume")
    again = refused(capsys, "supervised.py", *TINY, "--data-dir", data_dir, "--run-dir", run_dir)
    assert again.endswith(
        f"--run-dir {run_dir} already holds a run: it has no checkpoint, so delete it, or pick another"
    )


def test_a_full_disk_keeps_the_previous_checkpoint(data_dir, capsys, monkeypatch, tmp_path):
    run_dir = tmp_path / "run"
    real_save, calls = torch.save, []

    def save(obj, f, *a, **k):  # the fourth save (step 4's checkpoint, after its model.pt) finds the disk full
        calls.append(1)
        if len(calls) == 4:
            f.write(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    err = refused(
        capsys,
        "supervised.py",
        *TINY,
        "--data-dir",
        data_dir,
        "--run-dir",
        run_dir,
        "--total-steps",
        4,
        "--save-every",
        2,
    )
    assert "cannot write" in err and "checkpoint.pt" in err
    assert checkpoint(run_dir)["step"] == 2 and not list(run_dir.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    run_inprocess("supervised.py", "--resume", run_dir)  # and the run goes on from there
    assert checkpoint(run_dir)["step"] == 4


def test_an_os_error_while_saving_is_one_line_too(data_dir, capsys, monkeypatch, tmp_path):
    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fsync", fsync)
    err = refused(
        capsys,
        "mpl.py",
        *TINY,
        "--mu",
        1,
        "--data-dir",
        data_dir,
        "--run-dir",
        tmp_path / "run",
        "--total-steps",
        2,
        "--save-every",
        1,
    )
    assert "No space left on device" in err and not list((tmp_path / "run").glob("*.tmp"))


def test_a_full_disk_at_a_metrics_row_is_one_line_and_loses_nothing(runs, data_dir, capsys, monkeypatch, tmp_path):
    """The 4th row of the 6-step run (step 6's eval row: after step 6's train row, before the step 6 checkpoint)
    finds the disk full halfway through its write: one line, exit 2, the step 5 checkpoint kept. A --resume on a
    disk still full stops at its start files (it rewrites them all: args, split, the rows up to the checkpoint) with
    one line, and leaves every file as it was. --resume with room drops what was logged after that checkpoint (step
    6's train row and the half row) and ends as the uninterrupted run: the same tensors, bit for bit, and the same
    rows."""
    run_dir = tmp_path / "run"
    monkeypatch.setattr(builtins, "open", full_disk_open(4))
    err = refused(capsys, "supervised.py", *SMALL, "--data-dir", data_dir, "--run-dir", run_dir)
    assert f"cannot write {run_dir / 'metrics.jsonl'} (No space left on device): free space and --resume" in err
    before = files(run_dir)
    monkeypatch.setattr(builtins, "open", full_disk_open(1, "metrics.jsonl.tmp", "w"))
    err = refused(capsys, "supervised.py", "--resume", run_dir)
    assert f"cannot write {run_dir / 'metrics.jsonl'} (No space left on device): no file was changed" in err
    assert files(run_dir) == before
    monkeypatch.undo()  # the disk has room again
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines[:3]] == [4, 5, 6] and lines[3].startswith('{"step": 6, "eval')
    assert len(lines) == 4 and not lines[3].endswith("}") and checkpoint(run_dir)["step"] == 5
    run_inprocess("supervised.py", "--resume", run_dir)
    assert same_run(runs / "supervised.py", run_dir)


@pytest.mark.parametrize("ctrl_c", [False, True], ids=["full_disk", "ctrl_c"])
@pytest.mark.parametrize("name", ["args.json", "labeled_indices.json", "metrics.jsonl"])
def test_a_full_disk_at_a_new_runs_start_leaves_no_run(name, ctrl_c, runs, data_dir, capsys, monkeypatch, tmp_path):
    """A new run's first files (args, labeled split, an empty metrics.jsonl) are written whole or not at all: the disk
    full halfway through any of them is one line, exit 2, and a run dir without a file, so the same command runs
    once there is room (a half-written args.json made it "already holds a run", and --resume refused it). A Ctrl-C
    there is its one line, exit 130, and leaves no file either."""
    run_dir, tmp = tmp_path / "run", f"{name}.tmp"
    monkeypatch.setattr(builtins, "open", full_disk_open(1, tmp, "w", ctrl_c))
    err = refused(
        capsys, "supervised.py", *SMALL, "--data-dir", data_dir, "--run-dir", run_dir, code=130 if ctrl_c else 2
    )
    full = f"cannot write {run_dir / name} (No space left on device): no file was changed; free space and run again"
    assert err.endswith("interrupted at step 0; no checkpoint yet, nothing to resume" if ctrl_c else full)
    assert list(run_dir.iterdir()) == []
    monkeypatch.undo()
    run_inprocess("supervised.py", *SMALL, "--data-dir", data_dir, "--run-dir", run_dir)
    assert same_run(runs / "supervised.py", run_dir)


def test_unwritable_run_dirs_are_refused_before_the_data_loads(capsys, monkeypatch, tmp_path):
    """--data-dir does not exist: had the data loaded first, the error would be about the data."""
    a_file = tmp_path / "file"
    a_file.write_text("x")
    nowhere = ["--data-dir", tmp_path / "no_data", "--dataset", "mnist"]
    assert "is a file, not a folder" in refused(capsys, "supervised.py", *TINY, *nowhere, "--run-dir", a_file / "run")
    assert "is a file, not a folder" in refused(capsys, "supervised.py", *TINY, *nowhere, "--run-dir", a_file)

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("tempfile.TemporaryFile", read_only)
    err = refused(capsys, "supervised.py", *TINY, *nowhere, "--run-dir", tmp_path / "ro" / "run")
    assert "cannot write in" in err and "Read-only file system" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# A driver whose first torch.save gets the signal from inside its own writes: the moment a Ctrl-C during a save
# lands in the write callback of torch's zip writer.
SIGNAL_IN_SAVE_DRIVER = """
import os, runpy, signal, sys
import torch

save, sent = torch.save, []

class Tripwire:
    def __init__(self, f):
        self.f = f

    def __getattr__(self, name):
        return getattr(self.f, name)

    def write(self, data):
        if not sent:
            sent.append(os.kill(os.getpid(), int(os.environ["SIGNUM"])))
        return self.f.write(data)

torch.save = lambda obj, f, *args, **kwargs: save(obj, f if sent else Tripwire(f), *args, **kwargs)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as python script.py would
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_save_waits_for_the_file(signum, data_dir, tmp_path):
    """The signal arrives inside torch.save's writes of the first save (model.pt, then checkpoint.pt): both files are
    finished, then the run stops as on any Ctrl-C (exit 130, one line). Raised inside the write callback, it broke the
    file and read as a failed write ("cannot write ... free space", exit 2). Held over the checkpoint alone, it stopped
    the run before model.pt: at the last step, a run that --resume then found finished, without its model.pt."""
    driver, run_dir = tmp_path / "driver.py", tmp_path / "run"
    driver.write_text(SIGNAL_IN_SAVE_DRIVER)
    cmd = [sys.executable, driver, ROOT / "supervised.py", *TINY, "--data-dir", data_dir, "--run-dir", run_dir]
    proc = subprocess.run(
        list(map(str, [*cmd, "--total-steps", 6, "--save-every", 2])),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**OFFLINE, "SIGNUM": str(int(signum))},
        timeout=300,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 130 and len(err.splitlines()) == 1, err
    assert f"interrupted at step 2; continue with: python {ROOT / 'supervised.py'} --resume {run_dir}" in err
    assert checkpoint(run_dir)["step"] == 2 and not list(run_dir.glob("*.tmp"))
    assert torch.load(run_dir / "model.pt", weights_only=True)["step"] == 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # Ctrl-C; a scheduler or torchrun stopping the run
def test_ctrl_c_says_how_to_resume(signum, data_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        str(ROOT / "supervised.py"),
        *map(str, TINY),
        "--data-dir",
        data_dir,
        "--run-dir",
        run_dir,
        "--total-steps",
        100000,
        "--save-every",
        2,
    ]
    proc = subprocess.Popen(
        list(map(str, cmd)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=OFFLINE
    )
    while not (run_dir / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signum)
    err = proc.communicate(timeout=60)[1].strip()
    assert proc.returncode == 130 and len(err.splitlines()) == 1, err
    assert f"continue with: python {ROOT / 'supervised.py'} --resume {run_dir}" in err  # as started (not the bare
    assert checkpoint(run_dir)["step"] >= 2 and not list(run_dir.glob("*.tmp"))  # name, which runs only in ROOT)


HELD = "another process is running it now: let it end (or stop it), then --resume"  # a run dir held by a run


def stopped(proc):
    """SIGSTOP, and wait until the process is stopped: its files then hold still."""
    proc.send_signal(signal.SIGSTOP)
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.001)


def test_a_second_process_on_a_running_run_is_refused_and_writes_nothing(data_dir, tmp_path):
    """A run holds its dir while it runs: a --resume of it meanwhile (a job requeued while the first still runs, say)
    is one line, exit 2, and writes nothing; --eval-only, which writes nothing, still runs. Once the first is gone,
    even by kill -9, the dir is free again and the resume continues the run. Before the hold the second process
    resumed from the checkpoint, cut metrics.jsonl back to it and saved over the first's checkpoint."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, ROOT / "supervised.py", *TINY, "--data-dir", data_dir, "--run-dir", run_dir]
    first = subprocess.Popen(
        list(map(str, [*cmd, "--total-steps", 100000, "--save-every", 2])),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=OFFLINE,
    )
    try:
        while not (run_dir / "checkpoint.pt").exists() and first.poll() is None:
            time.sleep(0.01)
        stopped(first)
        before, step = files(run_dir), checkpoint(run_dir)["step"]
        second = run("supervised.py", "--resume", run_dir, "--total-steps", step + 2, check=False)
        said = f"supervised.py: error: --run-dir {run_dir}: {HELD}\n"
        assert second.returncode == 2 and second.stderr == said, second.stderr
        assert f"| step {step} | eval acc" in run("supervised.py", "--resume", run_dir, "--eval-only").stdout
        assert files(run_dir) == before
    finally:
        first.kill()
        first.wait()
    run_inprocess("supervised.py", "--resume", run_dir, "--total-steps", step + 2)
    assert checkpoint(run_dir)["step"] == step + 2


def test_a_start_killed_in_its_first_write_leaves_a_dir_a_new_run_takes(data_dir, monkeypatch, tmp_path):
    """Killed after its start files were written as .tmp and before their renames (as kill -9 or a power loss would
    leave them), a new run's dir holds only .tmp files: no run to resume (it said "continue it with --resume", and
    --resume then "not a run dir"). Started again, the run writes over them and ends as one never stopped."""
    args, run_dir, replace = [*SMALL, "--data-dir", data_dir], tmp_path / "run", os.replace

    class Killed(BaseException):
        pass

    def killed_at_the_first_rename(src, dst):
        raise Killed

    with monkeypatch.context() as m, pytest.raises(Killed):
        m.setattr(os, "replace", killed_at_the_first_rename)
        run_inprocess("supervised.py", *args, "--run-dir", run_dir)
    assert os.replace is replace
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "args.json.tmp",
        "labeled_indices.json.tmp",
        "metrics.jsonl.tmp",
    ]
    run_inprocess("supervised.py", *args, "--run-dir", run_dir)
    run_inprocess("supervised.py", *args, "--run-dir", tmp_path / "straight")
    assert same_run(tmp_path / "straight", run_dir) and not list(run_dir.glob("*.tmp"))


def test_runs_started_in_the_same_second_get_a_default_run_dir_each(data_dir, tmp_path):
    """Two runs of a sweep (another --lr) started together without --run-dir, their clocks on the same second: each
    finishes in its own default run dir. The default named the second alone, and one of the two was refused."""
    frozen = f"import runpy, sys, time; sys.path.insert(0, {str(ROOT)!r}); time.strftime = lambda *a: '20261205-000000'"
    start = lambda lr: subprocess.Popen(
        [sys.executable, "-c", f"{frozen}; runpy.run_path({str(ROOT / 'supervised.py')!r}, run_name='__main__')"]
        + list(map(str, [*SMALL, "--data-dir", data_dir, "--lr", lr])),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=OFFLINE,
    )
    procs = [start(lr) for lr in (0.03, 0.01)]
    assert [(p.wait(timeout=300), p.stderr.read()) for p in procs] == [(0, ""), (0, "")]
    run_dirs = sorted((tmp_path / "runs").iterdir())
    assert [json.loads((d / "args.json").read_text())["lr"] for d in run_dirs] in ([0.03, 0.01], [0.01, 0.03])
    assert all(d.name.startswith("fashion_mnist_supervised_20_0_20261205-000000") for d in run_dirs)
    assert all(checkpoint(d)["step"] == 6 for d in run_dirs)


@pytest.mark.parametrize("other", ["running", "finished"])
def test_two_new_runs_on_one_run_dir_at_once(other, runs, data_dir, capsys, monkeypatch, tmp_path):
    """Two new runs on one --run-dir, started together: both find it empty before their data loads. While this one
    loads, the other takes the dir (as a process would: an flock on it) and is still running, or has since run to its
    end. Either way this one stops at its first write, in one line, and the other's files stay as they were (without
    the check that follows the hold, it wrote its start files over the finished run's)."""
    run_dir, load, other_run = tmp_path / "run", common.load_ssl_data, contextlib.ExitStack()

    def other_run_meanwhile(*args, **kwargs):
        if other == "running":
            run_dir.mkdir()
            other_run.enter_context(held(run_dir))
        else:
            shutil.copytree(runs / "supervised.py", run_dir)
        return load(*args, **kwargs)

    monkeypatch.setattr(common, "load_ssl_data", other_run_meanwhile)
    with other_run:
        err = refused(capsys, "supervised.py", *SMALL, "--data-dir", data_dir, "--run-dir", run_dir)
    if other == "running":
        assert err.endswith(f"--run-dir {run_dir}: {HELD}")
        assert list(run_dir.iterdir()) == []
    else:
        assert err.endswith(f"--run-dir {run_dir}: another run began there while this one started: pick another")
        assert files(run_dir) == files(runs / "supervised.py")
