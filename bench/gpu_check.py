"""GPU check of --cuda-graph and --compile-augment: is the replayed step the eager one, and how fast is each script.

One prepared run for a lent GPU (under 8 minutes on one H100 or H200 at the defaults):

    python bench/gpu_check.py                                  # every script
    python bench/gpu_check.py --scripts supervised.py uda.py --steps 40

Writes bench/results/gpu_check_<GPU>.md (and .json) with the GPU, driver, versions and command, and prints it; exit
code 1 if a check failed (the table says which). Every script runs for real, in this process (runpy), on a fake
CIFAR-10 of random images read through torchvision's loader (bench/fakedata.py, as bench/throughput.py).

Checks, small (WRN-10-2, B 16, mu 2, 16 steps, a row per step), with deterministic algorithms:
- graph = eager: each script eager and with --cuda-graph, one after the other in this process (cuDNN's autotuner
  has then picked the kernels for both). Compared: every tensor of the final checkpoint (weights, EMA, optimizer,
  method state), every logged number, and the CUDA RNG state, which must be equal: a replay advances the generator
  as the eager step does, so replays draw fresh numbers. Reported: bitwise or not, and the largest relative
  difference of a tensor (||a - b|| / ||a||) and of a logged loss; either above --tolerance fails. Over 16 steps the
  cosine lr falls to 0.28 of its peak, so a value frozen at the capture (an lr, a ramp) shows.
- No host sync in the step: the capture fails on one (a sync is not allowed while a stream captures).
- Resume: with --cuda-graph, 16 steps straight against the run's own step-8 checkpoint resumed to 16 (the first
  3 steps after a resume run eagerly, then the step is captured again): the same final checkpoint. Supervised,
  FixMatch and MPL, whose last 4 steps finetune (its second step function, captured at the switch; the resumed
  run crosses it).
Speed, at each script's defaults (WRN-28-2, B 64, its mu, bf16), --steps steps timed in intervals of --log-every
(bench/throughput.py's measure_script: steps/s is the median interval after the first): eager, --cuda-graph, and
--cuda-graph --compile-augment where the script has a strong view; GFLOP/step (FlopCounterMode, eager run) and MFU
against the dense bf16 peak. And strong_augment alone on 448 images, eager and compiled (images/s). The speed runs
go in the order of the issue's targets: supervised, UDA and FlexMatch in every variant, strong_augment alone, then
the other scripts, so that a --budget stop leaves out the rest, not the targets. strong_augment alone also compares
each RandAugment op alone, eager on the GPU against the CPU and against the compiled ops.
--layers: then WRN-28-2's convolutions and BatchNorms one at a time on 960 images (layer_speed), forward and
backward, in bf16 channels_last (the scripts' choice), bf16 NCHW, fp16 channels_last and fp32 NCHW: whether another
layout or dtype would make the 960-image step's kernels cheaper.
--profile SCRIPT...: last, where an eager step's device time goes at the defaults and with --compile
--compile-augment (torch.profiler; per aten op and per kernel; see profile_step), to be set beside the graph's rate:
replayed, a step costs at least its kernels' time.

    python bench/gpu_check.py --no-checks --no-speed --profile uda.py    # strong_augment alone, then the profile
    python bench/gpu_check.py --no-checks --no-speed --layers            # strong_augment alone, then the layers
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: set before CUDA starts

import contextlib
import copy
import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import torch
from scripts import ROOT, SCRIPTS, check_scripts, check_writable, fail, flat, parser, path, positive
from throughput import _median_seconds, machine_lines, measure_script, run_script

sys.path.insert(0, str(ROOT))
from fakedata import make_fake_dataset  # noqa: E402

import common  # noqa: E402

SMALL = ["--depth", 10, "--width", 2, "--batch-size", 16, "--mu", 2, "--total-steps", 16, "--log-every", 1]
SMALL += ["--eval-every", 16, "--save-every", 8]
STRONG = {"uda.py", "fixmatch.py", "flexmatch.py", "dst.py", "mpl.py"}  # scripts with a strong_augment view
RESUMED = ["supervised.py", "fixmatch.py", "mpl.py"]
CHECK_FLAGS = {"mpl.py": ["--finetune-steps", 4]}  # steps 13-16 finetune: the second graph, a resume across it
TARGETS = ["supervised.py", "uda.py", "flexmatch.py"]  # issue 15's speed targets (400 and 200 it/s)
STEP_FUNCTIONS = ("train_step", "finetune_step")  # what --cuda-graph captures (mpl.py has two)
VARIANTS = {  # speed runs: name -> (flags, scripts it applies to; None: every script)
    "eager": ([], None),
    "graph": (["--cuda-graph"], None),
    "graph_aug": (["--cuda-graph", "--compile-augment"], STRONG),
    "graph_compiled": (["--cuda-graph", "--compile-augment", "--compile"], set(TARGETS)),
}
LAYER_TYPES = (torch.nn.Conv2d, torch.nn.BatchNorm2d)
LAYER_VARIANTS = {  # --layers: name -> (memory format, autocast dtype; None: fp32). The scripts run the first.
    "bf16 channels_last": (torch.channels_last, torch.bfloat16),
    "bf16 NCHW": (torch.contiguous_format, torch.bfloat16),
    "fp16 channels_last": (torch.channels_last, torch.float16),
    "fp32 NCHW": (torch.contiguous_format, None),
}
PROFILE_STEPS = (10, 30)  # --profile: two runs; their difference is 20 steady steps (start, autotuning and eval cancel)


def one_line(e, length=300):
    """An exception as one line for the table: its type and the start of its message."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:length]}"


def load(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def logged(run_dir):
    """{(step, key): value} of metrics.jsonl, without the wall-clock fields."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], k): v for r in rows for k, v in r.items() if k not in ("step", "train/it_per_sec")}


def compare(a, b):
    """How far run dir b is from run dir a: bitwise equal or not, the largest relative difference of a checkpoint
    tensor and of a logged number, the CUDA RNG states equal, and the keys where they differ most."""
    ca, cb = ({k: v for k, v in flat(load(d)).items() if not k.startswith("args.")} for d in (a, b))  # run dirs
    la, lb = logged(a), logged(b)
    tensor_diff, worst = 0.0, None
    for k, v in ca.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point() or torch.equal(v, cb[k]):
            continue
        d = ((v.double() - cb[k].double()).norm() / v.double().norm().clamp(min=1e-12)).item()
        tensor_diff, worst = max((tensor_diff, worst), (d, k))
    row_diff = max(
        (abs(la[k] - lb.get(k, float("nan"))) / max(abs(la[k]), 1e-12) for k in la if la[k] is not None), default=0.0
    )
    equal = lambda v, w: torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w  # noqa: E731
    bitwise = set(ca) == set(cb) and all(equal(v, cb[k]) for k, v in ca.items())
    rng = all(equal(ca[k], cb[k]) for k in ca if k.startswith("rng_cuda"))
    return {"bitwise": bitwise, "tensor_diff": tensor_diff, "worst": worst, "row_diff": row_diff, "rng_equal": rng}


def snapshot_at_first_save(run_dir, copy_to):
    """A patch of os.replace that copies run_dir to copy_to right after its first checkpoint.pt is written."""
    real = os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst) == Path(run_dir) / "checkpoint.pt" and not Path(copy_to).exists():
            shutil.copytree(run_dir, copy_to)

    return mock.patch.object(os, "replace", replace)


@contextlib.contextmanager
def syncs_in_step(found):
    """CUDA sync-debug mode: appends to `found` the source line of each host sync made while a step function runs."""

    def show(message, category, filename, lineno, file=None, line=None):
        frame = sys._getframe()
        while frame and frame.f_code.co_name not in STEP_FUNCTIONS:
            frame = frame.f_back
        if frame and "synchroniz" in str(message):
            found.append(f"{Path(filename).name}:{lineno}")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show  # catch_warnings puts the original back
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(0)


def check(script, data_dir, root, tolerance, device="cuda", graph=("--cuda-graph",)):
    """graph = eager for one script (and the resume check for RESUMED); a dict for the table. (device and graph
    let the machinery run on a CPU, eager against eager.)"""
    base = ["--dataset", "cifar10", "--data-dir", data_dir, "--num-labels", 40, "--device", device, *SMALL]
    base += CHECK_FLAGS.get(script, [])
    out = {"script": script, "step_syncs": []}
    try:
        with syncs_in_step(out["step_syncs"]) if device == "cuda" else contextlib.nullcontext():
            run_script(script, [*base, "--run-dir", root / "eager"])
        graphed = root / "graph"
        try:
            run_script(script, [*base, *graph, "--run-dir", graphed])
        except Exception as e:  # a deterministic kernel that cannot be captured? Once more with the default ones
            if not torch.are_deterministic_algorithms_enabled():
                raise
            out["deterministic_capture_error"] = one_line(e, 200)
            torch.use_deterministic_algorithms(False)
            try:
                graphed = root / "graph_default_kernels"
                run_script(script, [*base, *graph, "--run-dir", graphed])
            finally:
                torch.use_deterministic_algorithms(True, warn_only=True)
        out.update(compare(root / "eager", graphed))
        out["ok"] = out["rng_equal"] and out["tensor_diff"] <= tolerance and out["row_diff"] <= tolerance
        if script in RESUMED:
            with snapshot_at_first_save(root / "straight", root / "at8"):
                run_script(script, [*base, *graph, "--run-dir", root / "straight"])
            run_script(script, ["--resume", root / "at8"])
            out["resume"] = compare(root / "straight", root / "at8")
            out["ok"] = out["ok"] and out["resume"]["rng_equal"] and out["resume"]["tensor_diff"] <= tolerance
    except Exception as e:  # a failed capture, say: reported, and the other scripts still run
        out.update(ok=False, error=one_line(e))
    return out


def augment_speed(repeats=20):
    """strong_augment on 448 random CIFAR-sized images on the GPU, eager and compiled, called from Python and
    replayed from a CUDA graph (as inside a --cuda-graph step): images/s; and whether the compiled images equal the
    eager ones for the same draws."""
    x = torch.randint(0, 256, (448, 3, 32, 32), dtype=torch.uint8, device="cuda")
    out = {"eager": 448 / _median_seconds(lambda: common.strong_augment(x), repeats, x.device)}
    out["eager_graph"] = replayed_speed(lambda: common.strong_augment(x), 448, repeats)
    torch.manual_seed(0)
    ref = common.strong_augment(x)
    start = time.perf_counter()
    common.compile_augment()
    out["compiled"] = 448 / _median_seconds(lambda: common.strong_augment(x), repeats, x.device)
    out["compile_s"] = time.perf_counter() - start
    out["compiled_graph"] = replayed_speed(lambda: common.strong_augment(x), 448, repeats)
    torch.manual_seed(0)
    diff = (common.strong_augment(x).int() - ref.int()).abs()
    out["per_op"] = augment_op_diffs(x, common._apply_strong)
    common._apply_strong = common._strong_ops  # back to eager for what follows
    out.update(max_level_diff=diff.max().item(), values_differing=diff.count_nonzero().item(), values=diff.numel())
    return out


def replayed_seconds(fn, repeats, replays=10):
    """Seconds per call of fn() replayed from a CUDA graph (captured after warm-up calls on a side stream; timed
    in runs of `replays` replays): the device's time alone, without Python's and the launches'."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    replay = lambda: [graph.replay() for _ in range(replays)]  # noqa: E731
    return _median_seconds(replay, repeats, torch.device("cuda")) / replays


def replayed_speed(fn, images, repeats, replays=10):
    """Images/s of fn() replayed from a CUDA graph (replayed_seconds); a failed capture gives its error instead."""
    try:
        return images / replayed_seconds(fn, repeats, replays)
    except Exception as e:  # reported; the other measurements still go
        return f"capture failed ({type(e).__name__})"


def augment_op_diffs(x, compiled):
    """Each RandAugment op alone (slot 1 draws it for every image, slots 2 and 3 identity; no Cutout), eager on the
    device against eager on the CPU (the path tested against PIL) and against `compiled`, for the same draws: per op,
    how many values differ and by how many grey levels at most."""
    n = x.shape[0]
    identity = torch.full((2, n), common._OP["identity"], device=x.device)
    box = [torch.rand(n, 1, 1, device=x.device) for _ in range(3)]
    rows = []
    for name, code in common._OP.items():
        ops = torch.cat([torch.full((1, n), code, device=x.device), identity])
        low, high = common._RA_OPS[name]
        magnitudes = low + (high - low) * torch.rand(3, n, device=x.device)
        eager = common._strong_ops(x, ops, magnitudes, box, 0.0).int()
        cpu = common._strong_ops(*(t.cpu() for t in (x, ops, magnitudes)), [t.cpu() for t in box], 0.0).int()
        other = compiled(x, ops, magnitudes, box, 0.0).int()
        row = {"op": name}
        for key, ref in (("cpu", cpu.to(x.device)), ("compiled", other)):
            d = (eager - ref).abs()
            row[key] = [d.count_nonzero().item(), d.max().item()]
        rows.append(row)
    return rows


def layer_speed(images=960, repeats=20, device="cuda", variants=LAYER_VARIANTS):
    """WRN-28-2's convolutions and BatchNorms one at a time on `images` images (960: the one forward of a UDA or
    FixMatch step), forward and backward as in a training step (the stem's input has no gradient), in each memory
    format and dtype of `variants` (autocast dtype; None: fp32, TF32 allowed), cuDNN's autotuner on as in the
    scripts: ms per call, replayed from a CUDA graph (the device's time; on a CPU, plain calls). A row per distinct
    layer, with its calls per forward of the network and its GFLOP per call forward and backward (2 x MACs; x3 with
    the input's gradient, x2 without). Whether another layout or dtype than the scripts' bf16 channels_last would
    make the step's convolutions or BatchNorms cheaper on this GPU."""
    device = torch.device(device)
    model = common.WideResNet(10, depth=28, width=2).to(device)
    layers = {}

    def seen(module, inputs, output):
        x = inputs[0]
        if isinstance(module, torch.nn.Conv2d):
            k, stride = module.kernel_size[0], module.stride[0]
            key = f"conv {k}x{k}/{stride} {module.in_channels}->{module.out_channels} at {x.shape[-1]}px"
            gflop = 2 * images * output[0].numel() * module.in_channels * k * k / 1e9 * (3 if x.requires_grad else 2)
        else:
            key, gflop = f"BatchNorm {module.num_features} at {x.shape[-1]}px", None
        row = {"layer": key, "calls": 0, "gflop": gflop, "module": module, "shape": x.shape, "grad": x.requires_grad}
        layers.setdefault(key, row)["calls"] += 1

    hooks = [m.register_forward_hook(seen) for m in model.modules() if isinstance(m, LAYER_TYPES)]
    model(torch.zeros(1, 3, 32, 32, device=device))
    for h in hooks:
        h.remove()
    if device.type == "cuda":
        seconds = functools.partial(replayed_seconds, repeats=repeats)
    else:
        seconds = functools.partial(_median_seconds, repeats=repeats, device=device)
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    try:
        rows = []
        for row in layers.values():
            module, shape, grad = row.pop("module"), (images, *row.pop("shape")[1:]), row.pop("grad")
            row["ms"] = {}
            for name, (memory_format, dtype) in variants.items():
                m = copy.deepcopy(module).to(memory_format=memory_format)
                x = torch.randn(shape, device=device, dtype=dtype or torch.float32).to(memory_format=memory_format)
                x.requires_grad_(grad)
                autocast = torch.autocast(device.type, dtype) if dtype else contextlib.nullcontext()  # reusable
                with autocast:
                    dy = torch.randn_like(m(x))

                def step(m=m, x=x, dy=dy, autocast=autocast):
                    with autocast:
                        y = m(x)
                    y.backward(dy)

                try:
                    row["ms"][name] = 1e3 * seconds(step)
                except Exception as e:  # reported in its cell; the other variants still run
                    row["ms"][name] = one_line(e, 60)
            rows.append(row)
        return rows
    finally:
        torch.backends.cudnn.benchmark = benchmark


def profile_step(script, data_dir, run_root, device="cuda", extra=()):
    """Where one eager training step of `script` at its defaults spends the device's time: after one unprofiled
    run (cuDNN's autotuning and the compilers' caches warm), torch.profiler over runs of PROFILE_STEPS steps, per
    op the difference of the two over the steps between them (starting, the evaluation and the checkpoint cost the
    same in both). Returns the device time of a step (every kernel, copy and memset; the profiler's spans of
    annotated regions on the device left out, they would count their kernels twice) and, per aten op, its calls
    and its own device time per step, and the same per kernel."""
    base = ["--dataset", "cifar10", "--data-dir", data_dir, "--num-labels", 250, "--device", device, *extra]
    name = "_".join([Path(script).stem, *(f.strip("-") for f in map(str, extra))])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    totals = []
    for n, profiled in ((PROFILE_STEPS[0], False), *((n, True) for n in PROFILE_STEPS)):
        flags = ["--total-steps", n, "--log-every", n, "--eval-every", n, "--save-every", n]
        run_dir = Path(run_root) / f"{name}_{n}{'' if profiled else '_warm'}"
        with torch.profiler.profile(activities=activities) if profiled else contextlib.nullcontext() as prof:
            run_script(script, [*base, *flags, "--run-dir", run_dir])
        if profiled:
            events = [e for e in prof.key_averages() if not getattr(e, "is_user_annotation", False)]
            totals.append({(e.key, e.device_type != torch.autograd.DeviceType.CPU): e for e in events})
    steps = PROFILE_STEPS[1] - PROFILE_STEPS[0]
    less = lambda key, attr: getattr(totals[0][key], attr) if key in totals[0] else 0  # noqa: E731
    per_step = {
        key: ((e.count - less(key, "count")) / steps, (e.self_device_time_total - less(key, "self_device_time_total")))
        for key, e in totals[1].items()
    }
    ms = lambda us: us / steps / 1e3  # noqa: E731  (the profiler's times are microseconds over all steps)
    ops = sorted(((k[0], calls, ms(us)) for k, (calls, us) in per_step.items() if not k[1]), key=lambda r: -r[2])
    kernels = sorted(((k[0], calls, ms(us)) for k, (calls, us) in per_step.items() if k[1]), key=lambda r: -r[2])
    device_ms = sum(r[2] for r in kernels)
    return {"script": script, "flags": list(map(str, extra)), "device_ms": device_ms, "ops": ops, "kernels": kernels}


def gpu_lines():
    name = torch.cuda.get_device_name()
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        driver = "unknown"
    return name, [f"- driver {driver}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"]


def report(args, checks, speed, aug, name, extra_lines, profiles=(), layers=None):
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = [f"# GPU check of --cuda-graph and --compile-augment: {name}", "", *machine_lines(torch.device("cuda"))]
    lines += extra_lines
    if checks:
        lines += ["", "## graph = eager (WRN-10-2, B 16, mu 2, 16 steps, deterministic algorithms)", ""]
        lines += [
            "| script | ok | bitwise | max tensor diff (where) | max logged diff | CUDA RNG equal | resume: max diff "
            "| host syncs in the eager step |",
            "| --- | --- | --- | ---: | ---: | --- | --- | --- |",
        ]
        for c in checks:
            syncs = {k: c["step_syncs"].count(k) for k in dict.fromkeys(c["step_syncs"])}
            syncs = ", ".join(f"{k} x{n}" for k, n in syncs.items()) or "none"
            if "error" in c:
                lines.append(f"| `{c['script']}` | FAILED: {c['error']} | | | | | | {syncs} |")
                continue
            if "deterministic_capture_error" in c:
                syncs += f"; with deterministic kernels the capture failed ({c['deterministic_capture_error']})"
            r = c.get("resume")
            resume = "-" if r is None else f"{r['tensor_diff']:.2g}{' (bitwise)' if r['bitwise'] else ''}"
            lines.append(
                f"| `{c['script']}` | {'yes' if c['ok'] else 'FAILED'} | {'yes' if c['bitwise'] else 'no'} | "
                f"{c['tensor_diff']:.2g} ({c['worst'] or '-'}) | {c['row_diff']:.2g} | "
                f"{'yes' if c['rng_equal'] else 'NO'} | {resume} | {syncs} |"
            )
    if speed:
        lines += [
            "",
            f"## Speed (defaults: WRN-28-2, B 64, each script's mu, bf16; {args.steps} steps, intervals of "
            f"{args.log_every}, median after the first)",
            "",
            "steps/s of: eager; `--cuda-graph`; `--cuda-graph --compile-augment`; `--cuda-graph --compile-augment "
            "--compile`. MFU: GFLOP/step (FlopCounterMode, eager) x steps/s over the dense bf16 peak, for the fastest.",
            "",
            "| script | eager | graph | graph + compiled aug | graph + compiled aug + model | best / eager "
            "| GFLOP/step | MFU eager | MFU best |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for script, rows in speed.items():
            e = rows["eager"] if isinstance(rows.get("eager"), dict) else None  # "skipped", "failed (...)"
            rates = [rows[k]["steps_per_s"] if isinstance(rows.get(k), dict) else None for k in VARIANTS]
            best = max((r for r in rates if r), default=None)
            cells = [f(r, ".1f") if r or not isinstance(rows.get(k), str) else rows[k] for r, k in zip(rates, VARIANTS)]
            gain = best / e["steps_per_s"] if e and best else None
            mfu_best = e["mfu"] * gain if e and e["mfu"] and gain else None  # MFU scales with steps/s
            lines.append(
                f"| `{script}` | {' | '.join(cells)} | {f(gain, '.2f')} | {f(e and e['gflop_per_step'], '.1f')} "
                f"| {f(e and e['mfu'], '.1%')} | {f(mfu_best, '.1%')} |"
            )
    rate = lambda v: f"{v:,.0f} images/s" if isinstance(v, float) else v or "-"  # noqa: E731  (or an error)
    if aug and "error" in aug:
        lines += ["", "## strong_augment alone (448 images)", "", f"FAILED: {aug['error']}"]
    elif aug:
        lines += [
            "",
            "## strong_augment alone (448 images)",
            "",
            f"eager {aug['eager']:,.0f} images/s, compiled {aug['compiled']:,.0f} images/s (compiling and timing took "
            f"{aug['compile_s']:.0f} s); replayed from a CUDA graph: eager {rate(aug.get('eager_graph'))}, compiled "
            f"{rate(aug.get('compiled_graph'))}. Compiled vs eager for the same draws: {aug['values_differing']} of "
            f"{aug['values']} values differ, by at most {aug['max_level_diff']} grey level(s).",
        ]
        if aug.get("per_op"):
            lines += [
                "",
                "Each op alone on the same images (slot 1 draws it for every image, slots 2-3 "
                "identity, no Cutout): values of the device's eager output that differ from the CPU's and from the "
                "compiled output's, and by how many grey levels at most.",
                "",
                "| op | CUDA vs CPU: values differing | max | compiled vs eager: values differing | max |",
                "| --- | ---: | ---: | ---: | ---: |",
            ]
            lines += [
                f"| {r['op']} | {r['cpu'][0]} | {r['cpu'][1]} | {r['compiled'][0]} | {r['compiled'][1]} |"
                for r in aug["per_op"]
            ]
    if layers:
        lines += ["", f"## WRN-28-2's layers one at a time ({layers['images']} images, forward and backward)", ""]
    if layers and "error" in layers:
        lines.append(f"FAILED: {layers['error']}")
    elif layers:
        names = list(layers["rows"][0]["ms"])
        ms = lambda v: f"{v:.3f}" if isinstance(v, float) else v  # noqa: E731  (or its error)
        total = lambda rows, k: sum(r["calls"] * r["ms"][k] for r in rows if isinstance(r["ms"][k], float))  # noqa: E731
        lines += [
            "ms per call of each layer, forward and backward (the stem without its input's gradient), replayed from "
            "a CUDA graph, cuDNN's autotuner on; per forward of the network: its calls times that. The scripts run "
            f"{names[0]}. TFLOP/s: of {names[0]}.",
            "",
            f"| layer | calls | GFLOP/call | {' | '.join(names)} | TFLOP/s |",
            f"| --- | ---: | ---: | {' | '.join('---:' for _ in names)} | ---: |",
        ]
        for r in layers["rows"]:
            first = r["ms"][names[0]]
            rate = r["gflop"] / first if r["gflop"] and isinstance(first, float) and first else None
            lines.append(
                f"| {r['layer']} | {r['calls']} | {f(r['gflop'], '.1f')} | {' | '.join(ms(r['ms'][k]) for k in names)} "
                f"| {f(rate, '.0f')} |"
            )
        for kind in ("conv", "BatchNorm"):
            rows = [r for r in layers["rows"] if r["layer"].startswith(kind)]
            flop = sum(r["calls"] * r["gflop"] for r in rows if r["gflop"])
            lines.append(
                f"| all {kind} layers, per forward of the network | {sum(r['calls'] for r in rows)} | "
                f"{f(flop or None, '.1f')} | {' | '.join(f'{total(rows, k):.3f}' for k in names)} | |"
            )
    for prof in profiles:
        flags = " ".join(prof["flags"])
        lines += [
            "",
            f"## Where the eager step's device time goes: `{prof['script']}{' ' + flags if flags else ''}`",
            "",
        ]
        if "error" in prof:
            lines.append(f"FAILED: {prof['error']}")
            continue
        lines += [
            f"Defaults (WRN-28-2, B 64, its mu, bf16), torch.profiler, steps {PROFILE_STEPS[0] + 1}-{PROFILE_STEPS[1]} "
            f"(a {PROFILE_STEPS[1]}-step run less a {PROFILE_STEPS[0]}-step one): {prof['device_ms']:.2f} ms of "
            "kernels, copies and memsets per step. The aten ops with the most device time of their own (their "
            "kernels), then the kernels themselves:",
            "",
            "| aten op | calls/step | ms/step | share |",
            "| --- | ---: | ---: | ---: |",
        ]
        share = lambda v, total=prof["device_ms"]: f"{v / total:.1%}" if total else "-"  # noqa: E731
        lines += [f"| `{k}` | {c:g} | {v:.3f} | {share(v)} |" for k, c, v in prof["ops"][:25]]
        lines += ["", "| kernel | calls/step | ms/step | share |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| `{k[:110]}` | {c:g} | {v:.3f} | {share(v)} |" for k, c, v in prof["kernels"][:15]]
    return "\n".join(lines) + "\n"


def main():
    p = parser(__doc__)
    p.add_argument("--scripts", nargs="+", default=SCRIPTS, help="scripts to check and time")
    p.add_argument("--steps", type=positive, default=60, help="timed steps per speed run")
    p.add_argument("--log-every", type=positive, default=20, help="steps per timed interval")
    p.add_argument("--tolerance", type=float, default=1e-2, help="largest relative difference graph vs eager")
    p.add_argument("--budget", type=positive, default=420, help="seconds: no new run starts after this (skipped)")
    p.add_argument("--no-checks", action="store_true", help="skip graph = eager and resume")
    p.add_argument("--no-speed", action="store_true", help="skip the speed runs")
    p.add_argument(
        "--no-augment",
        action="store_true",
        help="skip strong_augment alone (after the targets, or first with --no-speed)",
    )
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP-counting runs (no MFU)")
    p.add_argument(
        "--layers",
        action="store_true",
        help="before the profiles: WRN-28-2's convolutions and BatchNorms alone (960 images), in each layout and dtype",
    )
    p.add_argument(
        "--profile",
        nargs="+",
        default=[],
        metavar="SCRIPT",
        help="last: where an eager step's device time goes (torch.profiler), at the defaults and compiled",
    )
    p.add_argument("--out", type=path, help="markdown file, default bench/results/gpu_check_<GPU>.md")
    args = p.parse_args()
    if not torch.cuda.is_available():
        fail("needs CUDA: this checks CUDA graphs on a GPU")
    check_scripts(args.scripts, SCRIPTS)
    check_scripts(args.profile, SCRIPTS, flag="--profile")
    if args.steps < 2 * args.log_every:
        fail(f"--steps {args.steps} must be at least 2 x --log-every {args.log_every}: the first interval is warm-up")
    name, extra = gpu_lines()
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu_check_{name.split()[-1] if ' ' in name else name}.md")
    check_writable("--out", out)
    t0, checks, speed, aug, profiles, layers = time.perf_counter(), [], {}, None, [], None
    left = lambda: time.perf_counter() - t0 < args.budget  # noqa: E731

    def write():  # after every script: a run stopped by a time limit still leaves its table
        lines = [*extra, f"- wall time of this check: {time.perf_counter() - t0:.0f} s"]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report(args, checks, speed, aug, name, lines, profiles, layers))
        data = {"checks": checks, "speed": speed, "augment": aug, "profiles": profiles, "layers": layers}
        data["command"] = " ".join(sys.argv)
        out.with_suffix(".json").write_text(json.dumps(data, indent=1, default=str) + "\n")

    def augment():
        try:
            return augment_speed()
        except Exception as e:  # a compile that fails, say: reported, the other runs still go
            print(f"strong_augment: {e}", file=sys.stderr, flush=True)
            return {"error": one_line(e)}

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = str(Path(tmp) / "data")
        make_fake_dataset("cifar10", data_dir, n_train=2000, n_test=200)
        if not args.no_checks:
            torch.use_deterministic_algorithms(True, warn_only=True)
            for script in args.scripts:
                if not left():
                    checks.append({"script": script, "step_syncs": [], "ok": False, "error": "skipped (--budget)"})
                    continue
                checks.append(check(script, data_dir, Path(tmp) / "check" / script, args.tolerance))
                print(f"check {script}: {checks[-1]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
                write()
            torch.use_deterministic_algorithms(False)
        if not args.no_speed:
            cfg = dict(batch_size=None, mu=None, depth=28, width=2, steps=args.steps, log_every=args.log_every)
            cfg.update(amp=None, compile=False, num_labels=250)
            # the target scripts in every variant, then strong_augment alone, then the other scripts (a --budget
            # stop leaves out what comes last)
            groups = [s for s in args.scripts if s in TARGETS], [s for s in args.scripts if s not in TARGETS]
            for group in groups:
                for variant, script in [(v, s) for v in VARIANTS for s in group]:
                    flags, only = VARIANTS[variant]
                    if only is not None and script not in only:
                        continue
                    if not left():
                        speed.setdefault(script, {})[variant] = "skipped"
                        continue
                    try:
                        row = measure_script(
                            script,
                            cfg,
                            data_dir,
                            Path(tmp) / "speed",
                            torch.device("cuda"),
                            extra=flags,
                            count_flops=variant == "eager" and not args.no_flops,
                        )
                    except Exception as e:  # reported in the table; the other runs still go
                        row = f"failed ({type(e).__name__})"
                        print(f"speed {script} {variant}: {e}", file=sys.stderr, flush=True)
                    common._apply_strong = common._strong_ops  # --compile-augment changed it for this process
                    speed.setdefault(script, {})[variant] = row
                    rate = row["steps_per_s"] if isinstance(row, dict) else row
                    print(f"speed {script} {variant}: {rate} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
                    write()
                if aug is None and left() and not args.no_augment:
                    aug = augment()
        if aug is None and left() and not args.no_augment:  # --no-speed
            aug = augment()
        if args.layers and left():
            layers = {"images": 960}
            try:
                layers["rows"] = layer_speed(layers["images"])
            except Exception as e:  # reported; the profiles still run
                print(f"layers: {e}", file=sys.stderr, flush=True)
                layers["error"] = one_line(e)
            print(f"layers ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            write()
        for script, flags in [(s, f) for s in args.profile for f in ((), ("--compile", "--compile-augment"))]:
            if not left():
                break
            try:
                profiles.append(profile_step(script, data_dir, Path(tmp) / "profile", extra=flags))
            except Exception as e:  # reported; the other profiles still run
                profiles.append({"script": script, "flags": list(flags), "error": one_line(e)})
            common._apply_strong = common._strong_ops
            print(
                f"profile {script} {flags}: {profiles[-1].get('device_ms')} ms ({time.perf_counter() - t0:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
            write()
    write()
    print(out.read_text())
    sys.exit(0 if checks and all(c.get("ok") for c in checks) or args.no_checks else 1)


if __name__ == "__main__":
    main()
