"""Throughput of every script's training step, and of the augmentation pipeline against the per-image
PIL pipeline of the public SSL code.

    python bench/throughput.py --preset default --device cuda   # each script's own batch sizes, WRN-28-2
    python bench/throughput.py --preset cpu --device cpu        # a small size that runs anywhere

Writes a markdown table (and the same numbers as JSON) to bench/results/throughput_<device>_<preset>.md,
with the machine, the versions and the command, and prints it.

Training steps. Each script runs for real, in this process (runpy, as `python <script>.py` would), on a
synthetic CIFAR-10 of random images written in torchvision's on-disk format and read through the real
torchvision loader (its md5 check patched; bench/fakedata.py). In one run of --steps steps:
- steps/s: the scripts log `train/it_per_sec` every --log-every steps. Each interval ends at the log's
  host sync (`.tolist()`) and starts after the previous log, evaluation or checkpoint, so on CUDA it
  times exactly the steps in between. Reported: the median over the intervals, the first excluded
  (warm-up: cudnn autotuning, torch.compile, the augmentation's constant cache).
- images/step: the rows the script draws per step (labeled + unlabeled), counted by wrapping
  `common.sample_batch`. Views of the same image (weak, strong, a teacher's) are not counted again.
  images/s = images/step x steps/s.
- aug share: time inside `common.weak_augment` / `common.strong_augment` over the training time of the
  measured steps (the same steps as steps/s). On CUDA each call is bracketed by a pair of CUDA events
  (no host sync; the elapsed times are summed after one synchronize at the end: GPU stream time
  between the two events); on CPU by time.perf_counter.
- peak mem (CUDA): torch.cuda.max_memory_allocated over the whole run (data, model, evaluation).
- GFLOP/step: torch.utils.flop_counter.FlopCounterMode around two more runs of the script, of 1 and of
  2 steps (without --compile). Both also set up, evaluate and save once, so their difference is the
  FLOPs of one training step: every matmul and convolution, forward and backward, of every network the
  method runs (teachers, meta steps and second-order terms included).
- MFU (CUDA) = GFLOP/step x steps/s / the GPU's dense bf16 peak (PEAK_BF16 below; "-" where unknown).
The probes (events or perf_counter per augmentation call, a counter per draw) cost microseconds per
step; the FLOP runs are not timed.

Augmentation alone: images/s of weak_augment and strong_augment on a batch of random CIFAR-sized images
on --device, beside torchvision's per-image PIL pipeline (flip + padded crop, then RandAugment with 3
ops) in one process, as one DataLoader worker of the public code runs it: median of --repeats timed
batches after one warm-up batch.
"""

import contextlib
import gc
import io
import json
import math
import os
import platform
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from scripts import ROOT, SCRIPTS, as_its_own_process, check_scripts, check_writable, fail, parser, path, positive
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(ROOT))
from fakedata import fake_integrity, make_fake_dataset  # noqa: E402  (bench/ is this file's folder)

import common  # noqa: E402
from common import strong_augment, weak_augment  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak in FLOP/s, by a substring of torch.cuda.get_device_name, the
# first match wins. NVIDIA data sheets: H100 SXM and H200 989.4 TFLOP/s, H100 PCIe 756, A100 312.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12)]
# Step-benchmark sizes. default: what a GPU user runs (each script's own B and mu, WRN-28-2).
# cpu: WRN-28-2 at B 4, mu 2, so that the nine scripts take a few minutes on 2 CPU cores.
PRESETS = {
    "default": {"batch_size": None, "mu": None, "depth": 28, "width": 2, "steps": 300, "log_every": 50},
    "cpu": {"batch_size": 4, "mu": 2, "depth": 28, "width": 2, "steps": 24, "log_every": 4},
}


# ---------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------


class Probe:
    """While active, counts the rows drawn through common.sample_batch and times every call of
    common.weak_augment / common.strong_augment (strong_augment calls weak_augment inside: only the
    outermost call is timed). Each timed call remembers how many draws preceded it, which places it
    in its training step once the draws per step are known."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.draws, self.rows, self.depth, self.spans = 0, 0, 0, []  # spans: (draws so far, start, end)

    def _sample_batch(self, fn):
        def wrapper(batch_size, *tensors, **kwargs):
            self.draws += 1
            self.rows += batch_size
            return fn(batch_size, *tensors, **kwargs)

        return wrapper

    def _timed(self, fn):
        def wrapper(*args, **kwargs):
            if self.depth:  # nested inside an augmentation call already timed
                return fn(*args, **kwargs)
            if self.cuda:  # recorded on the stream, no host sync; read after one synchronize at the end
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            else:
                start = time.perf_counter()
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if self.cuda:
                end.record()
            else:
                end = time.perf_counter()
            self.spans.append((self.draws, start, end))
            return out

        return wrapper

    def __enter__(self):
        self._patches = [
            mock.patch.object(common, "sample_batch", self._sample_batch(common.sample_batch)),
            mock.patch.object(common, "weak_augment", self._timed(common.weak_augment)),
            mock.patch.object(common, "strong_augment", self._timed(common.strong_augment)),
        ]
        for p in self._patches:
            p.start()
        return self

    def __exit__(self, *exc):
        for p in reversed(self._patches):
            p.stop()

    def seconds(self):
        """[(draws before the call, seconds)] for every timed call."""
        if self.cuda:
            torch.cuda.synchronize()
            return [(d, start.elapsed_time(end) / 1000) for d, start, end in self.spans]
        return [(d, end - start) for d, start, end in self.spans]


def run_script(script, args, quiet=True):
    """`python <script> <args>` in this process, on the fake data (md5 check patched). Raises
    RuntimeError with the script's error line if it exits."""
    err = io.StringIO()
    out = io.StringIO() if quiet else sys.stdout
    try:
        with (
            mock.patch.object(sys, "argv", [script, *map(str, args)]),
            fake_integrity(),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
            as_its_own_process(),
        ):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        raise RuntimeError(f"{script} exited with {e.code}: {err.getvalue().strip()}") from None
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def log_intervals(metrics_path):
    """[(first step, last step, it/s)] of the logged training intervals, in order."""
    out, prev = [], 0
    for line in Path(metrics_path).read_text().splitlines():
        row = json.loads(line)
        if "train/it_per_sec" in row:
            out.append((prev + 1, row["step"], row["train/it_per_sec"]))
            prev = row["step"]
    return out


def peak_bf16(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16 if key in name), None)


def measure_script(script, cfg, data_dir, run_root, device, extra=(), count_flops=True):
    """One script's row: its batch sizes, images/step, steps/s, images/s, aug share, peak memory,
    GFLOP/step and MFU (None where not measured on this device, or without count_flops). `extra`: more flags
    for the timed run (--cuda-graph, say); the FLOP-counting runs do without them. Under --cuda-graph the replays
    run no Python, so the draws and augmentation calls are neither counted nor timed (None)."""
    base = [
        "--dataset",
        "cifar10",
        "--data-dir",
        data_dir,
        "--num-labels",
        cfg["num_labels"],
        "--seed",
        0,
        "--depth",
        cfg["depth"],
        "--width",
        cfg["width"],
        "--device",
        device.type,
    ]
    base += [
        x
        for flag in ("batch_size", "mu", "amp")
        if cfg[flag] is not None
        for x in (f"--{flag.replace('_', '-')}", cfg[flag])
    ]
    steps, log_every = cfg["steps"], cfg["log_every"]
    run_dir = Path(run_root) / "_".join([Path(script).stem, *(f.strip("-") for f in map(str, extra))])
    timed = [
        *base,
        "--total-steps",
        steps,
        "--log-every",
        log_every,
        "--eval-every",
        steps,
        "--save-every",
        steps,
        "--run-dir",
        run_dir,
        *(["--compile"] if cfg["compile"] else []),
        *extra,
    ]
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    graph = "--cuda-graph" in map(str, extra)
    with contextlib.nullcontext() if graph else Probe(device) as probe:
        run_script(script, timed)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    saved = json.loads((run_dir / "args.json").read_text())

    intervals = log_intervals(run_dir / "metrics.jsonl")
    measured = intervals[1:]  # the first interval is warm-up
    steps_per_s = statistics.median(its for _, _, its in measured)
    train_seconds = sum((last - first + 1) / its for first, last, its in measured)
    if probe and probe.draws % steps:
        raise RuntimeError(f"{script} drew batches {probe.draws} times in {steps} steps: not a fixed number per step")
    if probe:
        draws_per_step = probe.draws // steps
        first_measured = measured[0][0]
        aug_seconds = sum(s for d, s in probe.seconds() if math.ceil(d / draws_per_step) >= first_measured)

    flops = []
    for n in (1, 2) if count_flops else ():  # the difference is one training step
        untimed = [
            *base,
            "--total-steps",
            n,
            "--log-every",
            n,
            "--eval-every",
            n,
            "--save-every",
            n,
            "--run-dir",
            Path(run_root) / f"{Path(script).stem}_flops{n}",
        ]
        torch.manual_seed(0)
        with FlopCounterMode(display=False) as counter:
            run_script(script, untimed)
        flops.append(counter.get_total_flops())
    flop_per_step = flops[1] - flops[0] if count_flops else None
    peak = peak_bf16(device)
    images_per_step = probe.rows // steps if probe else None
    return {
        "script": script,
        "batch_size": saved["batch_size"],
        "mu": saved["mu"],
        "images_per_step": images_per_step,
        "steps_per_s": steps_per_s,
        "images_per_s": images_per_step * steps_per_s if probe else None,
        "aug_share": aug_seconds / train_seconds if probe else None,
        "peak_mem_bytes": peak_mem,
        "gflop_per_step": flop_per_step / 1e9 if count_flops else None,
        "mfu": flop_per_step * steps_per_s / peak if peak and count_flops else None,
        "log_intervals": intervals,
    }


def step_table(rows):
    def opt(v, fmt):
        return "-" if v is None else format(v, fmt)

    out = [
        "| script | B | mu | images/step | steps/s | images/s | aug share | peak mem (GiB) | GFLOP/step "
        "| MFU (bf16 peak) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**30
        out.append(
            f"| `{r['script']}` | {r['batch_size']} | {r['mu']} | {opt(r['images_per_step'], 'd')} | "
            f"{r['steps_per_s']:.2f} | {opt(r['images_per_s'], ',.0f')} | {opt(r['aug_share'], '.1%')} | "
            f"{opt(mem, '.2f')} | {opt(r['gflop_per_step'], '.4g')} | {opt(r['mfu'], '.2%')} |"
        )
    return out


# ---------------------------------------------------------------------------------------------
# Augmentation alone
# ---------------------------------------------------------------------------------------------


def _median_seconds(fn, repeats, device):
    """Median wall time of fn() over `repeats` calls, after one untimed warm-up call."""

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def augmentation_throughput(device, batch_size=448, repeats=10, seed=0):
    """Rows (pipeline, where it runs, images/s) for weak and strong augmentation of a batch of random
    uint8 CIFAR-sized images: batched on `device`, and per image with PIL (numpy array ->
    Image.fromarray -> transforms -> PILToTensor, then torch.stack as the collate step)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    x = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, device=device)
    arrays = list(x.cpu().permute(0, 2, 3, 1).numpy())  # HWC uint8, as the datasets store them
    weak_pil = [T.RandomHorizontalFlip(), T.RandomCrop(32, padding=4, padding_mode="reflect")]
    pipelines = {
        "PIL weak: flip + crop(pad 4, reflect)": T.Compose([*weak_pil, T.PILToTensor()]),
        "PIL strong: weak + RandAugment(num_ops=3)": T.Compose([*weak_pil, T.RandAugment(num_ops=3), T.PILToTensor()]),
    }

    def per_image(transform):
        return lambda: torch.stack([transform(Image.fromarray(a)) for a in arrays])

    batched = f"{device.type}, batched"
    rows = [
        ("weak_augment", batched, lambda: weak_augment(x), device),
        ("strong_augment", batched, lambda: strong_augment(x), device),
    ]
    rows += [(name, "cpu, per image, 1 process", per_image(t), torch.device("cpu")) for name, t in pipelines.items()]
    return [(name, runs_on, batch_size / _median_seconds(fn, repeats, dev)) for name, runs_on, fn, dev in rows]


def markdown_table(rows):
    out = ["| pipeline | runs on | images/s |", "| --- | --- | ---: |"]
    out += [f"| {name} | {where} | {rate:,.0f} |" for name, where, rate in rows]
    return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_lines(device):
    """Markdown lines describing the machine, the versions and the command."""
    device = torch.device(device)
    lines = [f"- machine: {_cpu_model()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"]
    if device.type == "cuda":
        lines.append(f"- GPU: {torch.cuda.get_device_name(device)}")
    lines.append(
        f"- torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}"
    )
    lines.append(f"- command: `python {' '.join(sys.argv)}`")
    return lines


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="step-benchmark sizes: default (each script's own B and mu, WRN-28-2) or cpu (WRN-28-2, B 4, mu 2); "
        "default: default on cuda, cpu on cpu",
    )
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, help="scripts to time")
    p.add_argument(
        "--batch-size", type=positive, default=None, help="labeled batch B for every script (overrides the preset)"
    )
    p.add_argument("--mu", type=positive, default=None, help="unlabeled ratio for every script (overrides the preset)")
    p.add_argument("--depth", type=positive, default=None, help="WideResNet depth (overrides the preset)")
    p.add_argument("--width", type=positive, default=None, help="WideResNet width (overrides the preset)")
    p.add_argument("--steps", type=positive, default=None, help="training steps per script (overrides the preset)")
    p.add_argument("--log-every", type=positive, default=None, help="steps per timed interval (overrides the preset)")
    p.add_argument(
        "--amp",
        choices=["bf16", "fp16", "none"],
        default=None,
        help="passed to the scripts (their default: bf16 on cuda)",
    )
    p.add_argument(
        "--compile", action="store_true", help="pass --compile to the scripts (not to the FLOP-counting runs)"
    )
    p.add_argument("--num-labels", type=positive, default=250, help="labeled examples of the fake CIFAR-10")
    p.add_argument("--train-size", type=positive, default=5000, help="images in the fake CIFAR-10 training set")
    p.add_argument("--test-size", type=positive, default=200, help="images in the fake CIFAR-10 test set")
    p.add_argument("--aug-batch-size", type=positive, default=448, help="images per timed augmentation batch")
    p.add_argument("--repeats", type=positive, default=10, help="timed augmentation batches (median reported)")
    p.add_argument("--no-steps", action="store_true", help="skip the training-step benchmark")
    p.add_argument("--no-augment", action="store_true", help="skip the augmentation benchmark")
    p.add_argument(
        "--out",
        type=path,
        default=None,
        help="markdown file, default bench/results/throughput_<device>_<preset>.md "
        "(the numbers also go to the same name with .json)",
    )
    p.add_argument(
        "--keep-runs",
        type=path,
        default=None,
        help="keep the scripts' run dirs in this new or empty folder (default: temporary)",
    )
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda, but CUDA is not available here: use --device cpu")
    args.preset = args.preset or ("default" if args.device.startswith("cuda") else "cpu")
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    check_scripts(args.scripts, SCRIPTS, files=not args.no_steps)
    if args.steps < 2 * args.log_every:
        fail(f"--steps {args.steps} must be at least 2 x --log-every {args.log_every}: the first interval is warm-up")
    if args.num_labels % 10 or args.num_labels // 10 > args.train_size // 10:
        fail(f"--num-labels {args.num_labels} must be a multiple of 10 and at most --train-size {args.train_size}")
    args.out = Path(args.out or ROOT / "bench" / "results" / f"throughput_{args.device.split(':')[0]}_{args.preset}.md")
    check_writable("--out", args.out)
    if args.keep_runs:  # the run dirs are named by script: an earlier call's would stop this one half-way
        if Path(args.keep_runs).is_dir() and any(Path(args.keep_runs).iterdir()):
            fail(f"--keep-runs {args.keep_runs}: not empty (an earlier call's run dirs?); name a new or empty folder")
        check_writable("--keep-runs", args.keep_runs, folder=True)
    return args


def main():
    args = parse_args()
    device = torch.device(args.device)
    lines = [f"# Throughput: {args.device}, preset {args.preset}", "", *machine_lines(device), ""]
    report = {"device": args.device, "preset": args.preset, "command": " ".join(sys.argv), "machine": lines[2:-1]}
    if not args.no_steps:
        cfg = {
            k: getattr(args, k)
            for k in ("batch_size", "mu", "depth", "width", "steps", "log_every", "amp", "compile", "num_labels")
        }
        size = (
            f"B {args.batch_size}, mu {args.mu}"
            if args.batch_size and args.mu
            else f"B {args.batch_size or 'each script default'}, mu {args.mu or 'each script default'}"
        )
        lines += [
            "## Training steps",
            "",
            f"WRN-{args.depth}-{args.width}, {size}, amp {args.amp or 'script default'}"
            f"{', --compile' if args.compile else ''}; fake CIFAR-10 ({args.train_size} train / {args.test_size} test "
            f"random images, {args.num_labels} labels); {args.steps} steps, timed in intervals of {args.log_every}: "
            "steps/s is the median of the intervals after the first; images/step counts the rows drawn "
            "(labeled + unlabeled); aug share is the time in weak/strong_augment over the measured steps' time; "
            "GFLOP/step from FlopCounterMode (a 2-step run minus a 1-step run); MFU against the GPU's dense bf16 peak. "
            "See the docstring of bench/throughput.py.",
            "",
        ]
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            data_dir = str(Path(tmp) / "data")
            make_fake_dataset("cifar10", data_dir, n_train=args.train_size, n_test=args.test_size)
            run_root = Path(args.keep_runs or Path(tmp) / "runs")
            for script in args.scripts:
                try:
                    rows.append(measure_script(script, cfg, data_dir, run_root, device))
                except RuntimeError as e:
                    fail(str(e))
                print(f"{script}: {rows[-1]['steps_per_s']:.2f} steps/s", file=sys.stderr, flush=True)
        lines += [*step_table(rows), ""]
        report["steps"] = rows
    if not args.no_augment:
        aug = augmentation_throughput(device, args.aug_batch_size, args.repeats)
        lines += [
            "## Augmentation alone",
            "",
            f"{args.aug_batch_size} random 32x32 RGB images per batch, median of {args.repeats} batches after a "
            "warm-up batch; the PIL rows run per image in one process, as one DataLoader worker.",
            "",
            *markdown_table(aug),
            "",
        ]
        report["augment"] = [{"pipeline": n, "runs_on": w, "images_per_s": r} for n, w, r in aug]
    text = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
