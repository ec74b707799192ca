"""UDA (Xie, Dai, Hovy, Luong and Le, "Unsupervised Data Augmentation for Consistency Training", NeurIPS 2020): the
prediction on a strongly augmented view must match the sharpened prediction on a weak view.

Each step draws a labeled batch {(x_b, y_b)} of size B and an unlabeled batch {u_i} of size mu B (the unlabeled set
is the whole training set). With a(.) the weak augmentation (crop, flip), A(.) the strong one (weak + RandAugment +
Cutout), z(.) the logits and p(.) = softmax(z(.)), the paper's objective (Eq. (1), with its confidence-based masking
and prediction sharpening) is
    L = 1/B sum_b CE(y_b, p(a(x_b)))                                          (1) supervised term
      + lambda 1/(mu B) sum_i m_i CE(q_i, p(A(u_i)))                          (1) consistency term
    q_i = softmax(z(a(u_i)) / T)            the sharpened target, a constant: no gradient flows into it
    m_i = 1[max_c p_c(a(u_i)) >= beta]      the confidence mask, on the unsharpened probabilities
With Training Signal Annealing (TSA, optional; C classes, t the step of K) the supervised term keeps the labeled
examples whose probability of the true class is at most eta_t:
    eta_t = alpha_t (1 - 1/C) + 1/C,   alpha_t = t/K (linear), 1 - exp(-5 t/K) (log), exp(5 (t/K - 1)) (exp)
    L_sup = 1/Z sum_b 1[p_{y_b}(a(x_b)) <= eta_t] CE(y_b, p(a(x_b))),   Z = max(1, examples kept)

Recipe: supervised.py's, with mu 7, lambda 1, T 0.4, beta 0.8 and no TSA (TorchSSL's CIFAR / SVHN / STL-10 configs,
the official CIFAR-10 GPU script). One forward of [weak labeled, weak unlabeled, strong unlabeled] (BatchNorm).

Differs from the references:
    - consistency is CE(q, p(A(u))) (the paper, TorchSSL), not the official code's KL: the same gradient.
    - the mask keeps max p >= beta (TorchSSL), not > beta (the official code): they differ on exact ties only.
    - TSA thresholds the true class's probability, the mean over the kept (the paper); TorchSSL: the top one, over B.
    - T sharpens the target only; tllib divides the strong-view logits by T instead, which is another loss.

Every choice and its reasons: docs/uda.md.

Usage:
    python uda.py --dataset cifar10 --num-labels 4000
    python uda.py --dataset cifar10 --num-labels 4000 --tsa linear   # with training signal annealing
"""

import argparse
import copy
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import common

METHOD = Path(__file__).stem


# ALGO LOGIC: Training Signal Annealing
def tsa_threshold(schedule, step, total_steps, num_classes):
    """eta_t = alpha_t (1 - 1/C) + 1/C: labeled examples whose true-class probability exceeds it leave the supervised
    term. 1 (nothing left out) without TSA."""
    if schedule == "none":
        return 1.0
    r = min(step / total_steps, 1.0)
    alpha = {"linear": r, "log": 1 - math.exp(-5 * r), "exp": math.exp(5 * (r - 1))}[schedule]
    return alpha * (1 - 1 / num_classes) + 1 / num_classes


# TRY NOT TO MODIFY: the arguments (generic, then the method's), resume, checks
def leave(code):
    """Exit with `code`; under torchrun straight out after a flush (os._exit), skipping interpreter teardown, where
    the threads of the process group (DDP holds it) aborted a rank now and then (SIGABRT in place of `code`)."""
    if dist.is_available() and dist.is_initialized():  # DISTRIBUTED
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def fail(message):
    """Bad input: one line on stderr, exit code 2."""
    print(f"{METHOD}.py: error: {message}", file=sys.stderr)
    leave(2)


def memory_shortfall(e):
    """None unless e is the device's or the host's memory running out; then how much more it asked for, as
    " (it asked for 2.00 GiB more)" (CUDA's "Tried to allocate 2.00 GiB", the CPU's), or "" where the error says not."""
    memory = re.search("out of memory|can't allocate memory", str(e))  # a CUDA library's error, the CPU allocator's
    if not (memory or isinstance(e, (torch.OutOfMemoryError, MemoryError))):
        return None
    asked = re.search(r"ried to allocate ([\d.]+ \w+)", str(e))
    return f" (it asked for {asked[1]} more)" if asked else ""


def checked(kind, ok, rule):
    """An argparse type: kind(text) if ok(value), else one line saying the rule."""

    def parse(text):
        value = kind(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid float value"
    return parse


positive = checked(int, lambda v: v > 0, "positive")
FLOAT32_MAX = torch.finfo(torch.float32).max  # the rates and weights become float32 tensors: a value must fit one
nonnegative = checked(float, lambda v: 0 <= v <= FLOAT32_MAX, ">= 0 and at most 3.4e38 (float32)")
unit = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]")
open_unit = checked(float, lambda v: 0 < v <= 1, "in (0, 1]")
wrn_depth = checked(int, lambda v: v >= 10 and v % 6 == 4 or v >= 13 and v % 8 == 5, "6n+4 (28) or 8n+5 (37)")
int64 = checked(int, lambda v: -(2**63) <= v < 2**63, "in [-2^63, 2^63)")  # torch.manual_seed takes it, and seed + rank


def path(text):
    """An argparse type: a path, never empty (`--resume "$RUN"` with RUN unset would start a new default run)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty (an unset shell variable?): give a path")
    return text


def parse_args(argv=None):
    title = __doc__.split("\n\n")[0]
    p = argparse.ArgumentParser(description=title, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail  # one line, without argparse's usage block
    p.add_argument("--dataset", default="cifar10", choices=[*common.DATASETS, common.FOLDER], help="folder: README")
    p.add_argument("--data-dir", type=path, default="./data", help="where torchvision finds or downloads the data")
    p.add_argument("--svhn-extra", action=argparse.BooleanOptionalAction, default=True, help="svhn: train + extra")
    p.add_argument("--num-labels", type=positive, default=4000, help="labeled examples, class-balanced")
    p.add_argument("--seed", type=int64, default=0, help="seeds everything; the labeled split follows from it")
    p.add_argument("--labeled-indices", type=path, help="a JSON list of the training images to label, not drawn")
    p.add_argument("--total-steps", type=positive, default=2**20, help="optimizer steps K")
    p.add_argument("--eval-every", type=positive, default=5000, help="evaluate every this many steps")
    p.add_argument("--log-every", type=positive, default=100, help="log a row every this many steps (and at a save)")
    p.add_argument("--save-every", type=positive, default=5000, help="checkpoint every this many steps and at the end")
    p.add_argument("--batch-size", type=positive, default=64, help="labeled batch size B")
    p.add_argument("--mu", type=positive, default=7, help="unlabeled batch = mu * B (scripts without one ignore it)")
    lr = checked(float, lambda v: 0 < v <= FLOAT32_MAX, "positive and at most 3.4e38 (float32)")
    p.add_argument("--lr", type=lr, default=0.03, help="peak lr")
    p.add_argument("--weight-decay", type=nonnegative, default=None, help="default 5e-4, 1e-3 on cifar100")
    p.add_argument("--momentum", type=checked(float, lambda v: 0 < v < 1, "in (0, 1)"), default=0.9, help="nesterov")
    p.add_argument("--ema-decay", type=unit, default=0.999, help="decay of the evaluated EMA model")
    p.add_argument("--depth", type=wrn_depth, default=None, help="WideResNet depth, default 28, 37 on stl10")
    p.add_argument("--width", type=positive, default=None, help="WideResNet width, default 2, 8 on cifar100")
    p.add_argument("--bn-momentum", type=open_unit, default=0.001, help="BatchNorm momentum (short runs need ~0.1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda, cuda:N or cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="default bf16 on cuda, none on cpu")
    # switches: --no-X turns off one that a resumed run's args.json turned on (a GPU run evaluated on a CPU)
    switch = dict(action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", **switch, help="wrap the trained model in torch.compile")
    p.add_argument("--compile-augment", **switch, help="cuda: compile the augmentations (torch.compile)")
    p.add_argument("--cuda-graph", **switch, help="capture the training step in a CUDA graph, replay it")
    p.add_argument("--sync-bn", **switch, help="under torchrun: BatchNorm statistics over all processes")
    p.add_argument("--run-dir", type=path, help="default runs/<dataset>_<method>_<labels>_<seed>_<time>_<pid>")
    p.add_argument("--resume", type=path, help="a run dir to continue exactly, with its args.json")
    p.add_argument("--eval-only", action="store_true", help="with --resume: evaluate its checkpoint, write nothing")
    p.add_argument("--tensorboard", **switch, help="also log to TensorBoard")
    # ALGO LOGIC: algorithm specific
    p.add_argument("--unsup-weight", type=nonnegative, default=1.0, help="lambda, the weight of the consistency term")
    temperature = checked(float, lambda v: 0 < v < math.inf, "positive")
    p.add_argument("--temperature", type=temperature, default=0.4, help="T: the target is softmax(weak logits / T)")
    p.add_argument("--threshold", type=unit, default=0.8, help="beta: a sample counts if max p(weak view) >= beta")
    p.add_argument("--tsa", choices=["none", "linear", "log", "exp"], default="none", help="TSA schedule (sup. term)")
    # TRY NOT TO MODIFY: on --resume the saved arguments are the defaults (flags given now override them)
    args, saved = p.parse_args(argv), {}
    if args.resume:
        run_dir = Path(args.resume).parent if Path(args.resume).is_file() else Path(args.resume)
        try:
            saved = json.loads((run_dir / "args.json").read_text())
        except FileNotFoundError:
            fail(f"--resume {args.resume}: no args.json there, so it is not a run dir")
        except ValueError:
            fail(f"--resume {args.resume}: its args.json is not valid JSON")
        if not isinstance(saved, dict):
            fail(f"--resume {args.resume}: its args.json is not a JSON object of arguments")
        if saved.get("script", METHOD) != METHOD:
            fail(f"--resume {run_dir}: that run was made by {saved['script']}.py, not {METHOD}.py: resume it with that")
        # the values that come from args.json meet a typed flag's checks (a file edited by hand, or by an older script):
        # the flags given now passed them above, so what fails from here on is the file's
        declared = {a.dest: a.default for a in p._actions}
        p.error = lambda message: fail(f"--resume {run_dir}: its args.json: {message}")
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        for a in (a for a in p._actions if a.option_strings and a.dest in saved):
            value = getattr(args, a.dest)
            if a.nargs == 0 and not isinstance(value, bool):  # a switch (--compile, --svhn-extra)
                p.error(f"argument {a.option_strings[0]}: {json.dumps(value)} is not true or false")
            elif a.nargs != 0 and (value is not None or declared[a.dest] is not None):
                p.parse_args([f"{a.option_strings[0]}={value}"])
        p.error = fail
        args.run_dir = args.resume = str(run_dir)
    args.script = METHOD
    if args.weight_decay is None:
        args.weight_decay = 1e-3 if args.dataset == "cifar100" else 5e-4
    args.width = args.width or (8 if args.dataset == "cifar100" else 2)
    args.depth = args.depth or (37 if args.dataset == "stl10" else 28)
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    args.data_dir = os.path.abspath(args.data_dir)  # as args.json records it: a resume from another folder finds it
    args.labeled_indices = args.labeled_indices and os.path.abspath(args.labeled_indices)  # the same
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"  # runs started in one second (a sweep): a dir each
    args.run_dir = args.run_dir or f"runs/{args.dataset}_{METHOD}_{args.num_labels}_{args.seed}_{stamp}"
    try:
        kind = torch.device(args.device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda"):  # torch has more (meta, mps, ...): the scripts are written and tested for these
        fail(f"--device {args.device} is not a device these scripts run on: use cpu, cuda or cuda:N")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda, but CUDA is not available here: use --device cpu")
    if args.sync_bn and not args.device.startswith("cuda"):  # DISTRIBUTED: SyncBatchNorm has no CPU kernel
        why = "needs --device cuda (torch's SyncBatchNorm runs on GPUs only)"
        fail(f"--sync-bn {why}: drop it (--no-sync-bn on a resume)")
    if args.cuda_graph and (not args.device.startswith("cuda") or args.amp == "fp16"):  # CUDA GRAPH
        why = "needs --device cuda and --amp bf16 or none (fp16's loss scaling syncs with the host)"
        fail(f"--cuda-graph {why}: drop it (--no-cuda-graph on a resume)")
    if args.compile_augment and not args.device.startswith("cuda"):
        why = "is for --device cuda (on the CPU the eager augmentations are the faster)"
        fail(f"--compile-augment {why}: drop it (--no-compile-augment on a resume)")
    if args.eval_only and not args.resume:
        fail("--eval-only needs --resume RUN_DIR: the run whose checkpoint to evaluate")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        fail("--tensorboard: tensorboard is not installed (pip install tensorboard)")
    now = vars(args)
    changed = [k for k in ("dataset", "num_labels", "seed", "depth", "width") if saved.get(k, now[k]) != now[k]]
    if changed:  # the same run dir on other data, another split or another network would mix two runs
        was = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in changed)
        fail(f"--resume {args.resume}: that run was made with {was}: start a new run for these")
    return args


# TRY NOT TO MODIFY: EMA, evaluation, run dir and checkpoints
@torch.no_grad()
def ema_update(ema_model, model, weight):
    """ema += weight (model - ema) for the parameters, weight = 1 - decay a device tensor; the BatchNorm statistics
    copied. Foreach calls that CUDA runs as a few fused kernels each: _foreach_lerp_ would take the tensor weight only
    in a list of weights, and go tensor by tensor (one kernel per parameter)."""
    ema = list(ema_model.parameters())
    delta = torch._foreach_sub(list(model.parameters()), ema)
    torch._foreach_mul_(delta, weight)
    torch._foreach_add_(ema, delta)
    copy_buffers(list(ema_model.buffers()), list(model.buffers()))


@torch.no_grad()
def copy_buffers(dst, src):
    """dst[i].copy_(src[i]) for two lists of tensors, one _foreach_copy_ per dtype: CUDA copies a list that mixes
    dtypes (BatchNorm's float statistics and int64 batch counts) tensor by tensor."""
    for dtype in dict.fromkeys(s.dtype for s in src):
        pick = [i for i, s in enumerate(src) if s.dtype == dtype]
        torch._foreach_copy_([dst[i] for i in pick], [src[i] for i in pick])


def cuda_graph(step_fn, warmup=3):
    """step_fn, replayed from a CUDA graph: its first `warmup` calls run eagerly on a side stream (real steps that
    also warm up cuDNN, torch.compile and lazy state), the next captures it once, and every call replays it. Replays
    run the captured kernels with the tensors captured: what changes between steps must be device tensors updated in
    place, and Python code inside step_fn runs only at capture."""
    graph, stream, calls = torch.cuda.CUDAGraph(), torch.cuda.Stream(), 0

    def run():
        nonlocal calls
        if calls < warmup:
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                step_fn()
            torch.cuda.current_stream().wait_stream(stream)
        elif calls == warmup:
            with torch.cuda.graph(graph):
                step_fn()
        if calls >= warmup:
            graph.replay()
        calls += 1

    return run


@torch.no_grad()
def evaluate(ema_model, model, x_test, y_test, info, autocast, batch_size=1024):
    """Top-1 accuracy (%) and mean cross-entropy of the EMA model, and the raw model's accuracy, in eval mode."""
    sums = torch.zeros(3, device=x_test.device)  # correct (EMA), cross-entropy (EMA), correct (raw)
    for m in (ema_model, model):
        m.eval()
    for i in range(0, len(x_test), batch_size):
        x, y = common.normalize(x_test[i : i + batch_size], info), y_test[i : i + batch_size]
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = ema_model(x).float()
            logits_raw = logits if model is ema_model else model(x).float()  # one model given twice runs once
        loss = F.cross_entropy(logits, y, reduction="sum")
        sums += torch.stack([(logits.argmax(1) == y).sum(), loss, (logits_raw.argmax(1) == y).sum()])
    model.train()
    acc, loss, acc_raw = (sums / len(x_test)).tolist()
    return 100 * acc, loss, 100 * acc_raw


def holds_a_run(run_dir):
    """A run's files are there: a start killed in its first write (kill -9, power loss) left only .tmp files, which
    are no run (a new start writes those names again and renames them)."""
    return run_dir.is_dir() and any(p.suffix != ".tmp" for p in run_dir.iterdir())


def check_run_dir(run_dir, resume):
    """Before the data loads: the run dir can be written, and a new run does not overwrite an old one."""
    folder = next(d for d in (run_dir, *run_dir.parents) if d.exists())
    if not folder.is_dir():
        fail(f"--run-dir {run_dir}: {folder} is a file, not a folder")
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        fail(f"--run-dir {run_dir}: cannot write in {folder} ({e.strerror})")
    if not resume and holds_a_run(run_dir):
        ckpt = (run_dir / "checkpoint.pt").is_file()  # none: it stopped before its first (diverged, interrupted)
        go_on = f"continue it with --resume {run_dir}" if ckpt else "it has no checkpoint, so delete it"
        fail(f"--run-dir {run_dir} already holds a run: {go_on}, or pick another")


def hold_run_dir(run_dir, resume):
    """Rank 0 holds the run dir from its first write to its end (an flock, which the system drops at any exit, kill -9
    too), so that a second process on it (a resume while the run still goes on, say) is refused before it writes.
    Returns why it cannot hold it, or "". Where there is no flock (Windows, some network file systems), none is held."""
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl

        fcntl.flock(os.open(run_dir, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)  # held until the process ends
    except BlockingIOError:
        return f"--run-dir {run_dir}: another process is running it now: let it end (or stop it), then --resume"
    except (ImportError, OSError):
        pass
    if not resume and holds_a_run(run_dir):  # none at check_run_dir: a run began there since (and has ended)
        return f"--run-dir {run_dir}: another run began there while this one started: pick another"
    return ""


def load_checkpoint(run_dir, args, world, device):
    """The checkpoint to resume from, or one line saying why there is none (exit 2; 0 for a finished run)."""
    path = run_dir / "checkpoint.pt"
    if not path.is_file():  # the run stopped before its first save
        fail(f"--resume {run_dir}: no checkpoint.pt there, so nothing to resume: delete it and start again")
    try:
        with warnings.catch_warnings():  # torch warns about some foreign files before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)  # never runs code from the file
    except Exception as e:
        if (why := memory_shortfall(e)) is not None:  # no fault of the file: memory another process holds, say
            fail(f"--resume {run_dir}: out of memory on {device} reading checkpoint.pt{why}: free memory and run again")
        fail(f"--resume {run_dir}: checkpoint.pt cannot be read ({type(e).__name__}): damaged or not a checkpoint")
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        fail(f"--resume {run_dir}: checkpoint.pt is not a checkpoint of these scripts")
    if ckpt.get("script", METHOD) != METHOD:
        fail(f"--resume {run_dir}: its checkpoint was written by {ckpt['script']}.py, not {METHOD}.py")
    if not args.eval_only and len(ckpt["rng_cpu"]) != world:  # DISTRIBUTED: the RNG state of each rank
        fail(f"--resume {run_dir}: its checkpoint was written by {len(ckpt['rng_cpu'])} process(es): use as many")
    if not args.eval_only and ckpt["step"] > args.total_steps:
        fail(f"--resume {run_dir}: --total-steps {args.total_steps} is below the checkpoint's step {ckpt['step']}")
    if not args.eval_only and ckpt["step"] == args.total_steps:
        print(f"{run_dir}: already finished at step {ckpt['step']}; a larger --total-steps continues it")
        leave(0)
    return ckpt


def save_checkpoint(files):
    """Files ({path: object}) written in that order, each atomically: a kill at any moment leaves each file whole, the
    previous one or the new one; a failed write (a full disk) leaves no temp file and ends the run with one line. A
    Ctrl-C or SIGTERM during the writes is held until the last file is whole (raised in torch.save's write callback,
    it would break the file and read as a failed write)."""
    held = []
    handlers = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for path, obj in files.items():
            tmp = path.with_name(path.name + ".tmp")
            try:
                with open(tmp, "wb") as f:
                    torch.save(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException as e:
                tmp.unlink(missing_ok=True)
                if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
                    why = " ".join(str(e).split())[:100]
                    fail(f"cannot write {path} ({why}): the previous one is kept; free space")
                raise
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    for s in held[:1]:  # now to the run's own handler
        signal.raise_signal(s)


def write_whole(files):
    """Text files ({path: text}), all whole or none: each is written to a temp file, then all are renamed (a rename
    takes no space). A full disk (one line) leaves every file as it was and no temp file; so does a Ctrl-C, but under
    torchrun, where leave() ends the process at once."""
    tmps = {path: path.with_name(path.name + ".tmp") for path in files}
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmps[path], "w") as f:
                f.write(text)
    except BaseException as e:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            fail(f"cannot write {path} ({e.strerror}): no file was changed; free space and run again")
        raise
    for path, tmp in tmps.items():
        os.replace(tmp, path)


def inference_model(ema_model, args, info, step):
    """model.pt: the evaluated weights and what rebuilds the plain WideResNet (README: Evaluate and load a model)."""
    arch = dict(num_classes=ema_model.fc.out_features, depth=args.depth, width=args.width, in_channels=info.channels)
    with torch.device("meta"):
        keys = common.WideResNet(**arch).state_dict().keys()  # the heads only a method uses are left out
    weights = {k: v.cpu().contiguous() for k, v in ema_model.state_dict().items() if k in keys}
    out = dict(arch=arch, weights=weights, size=info.size, mean=info.mean, std=info.std, classes=list(info.classes))
    return {**out, "script": METHOD, "step": step}


def hms(seconds):
    """A duration as H:MM:SS, past 24 hours too (a default run on a CPU takes days)."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def check_finite(step, values, run_dir):
    """Divergence: stop before a non-finite value is logged or saved; one line, exit code 3."""
    for k, v in values.items():
        if not math.isfinite(v):
            kept = "keeps the last checkpoint" if (run_dir / "checkpoint.pt").is_file() else "holds no checkpoint yet"
            why = f"diverged by step {step}: {k} is {v}; nothing of it was saved, {run_dir} {kept}"
            print(f"{METHOD}.py: error: {why} (a new run with a lower --lr may not diverge)", file=sys.stderr)
            leave(3)


if __name__ == "__main__":
    t_start, args = time.perf_counter(), parse_args()
    # DISTRIBUTED: under torchrun one process per device (NCCL on CUDA, gloo on CPU); a plain run is rank 0 of 1
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and args.cuda_graph:  # DISTRIBUTED: not captured (DDP's all-reduces would be in the graph)
        fail("--cuda-graph runs on one GPU: drop it under torchrun")
    device = torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist.broadcast_object_list(shared := [args.run_dir])  # the default run dir holds the time: rank 0's
        args.run_dir = shared[0]
        sys.stdout = sys.stdout if rank == 0 else open(os.devnull, "w")  # rank 0 alone prints
    run_dir = Path(args.run_dir)
    if not args.eval_only:
        check_run_dir(run_dir, args.resume)
    ckpt = load_checkpoint(run_dir, args, world, device) if args.resume else None

    def where_it_stands():
        """The step the run is at (before its first step: the checkpoint's) and how to go on from what is on disk."""
        at, how = globals().get("step", ckpt["step"] if ckpt else 0), "no checkpoint yet, nothing to resume"
        if (run_dir / "checkpoint.pt").is_file():  # DISTRIBUTED: under torchrun, resumed by as many processes
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # DISTRIBUTED: on several machines, as many of them
            nodes = f" --nnodes={world // local} <your rendezvous flags>" if world > local else ""
            launch = f"torchrun{nodes} --nproc_per_node={local}" if world > 1 else "python"
            started = shlex.quote(sys.argv[0])  # the script as it was started: the command runs where it did
            how = f"continue with: {launch} {started} --resume {shlex.quote(str(run_dir))}"
        elif holds_a_run(run_dir):  # a run's files, no checkpoint: neither the same command nor --resume goes on
            how += f": delete {run_dir} to start it again"
        return at, how

    def interrupted(signum, frame):  # Ctrl-C, SIGTERM: one line on how to go on (the checkpoint on disk is whole)
        if rank == 0:  # DISTRIBUTED: every rank gets the signal, rank 0 alone says it
            at, how = where_it_stands()
            print(f"{METHOD}.py: interrupted at step {at}; {how}", file=sys.stderr)
        leave(130)

    def out_of_memory(kind, e, traceback):  # an error no code caught: the device's or the host's memory, one line
        if (why := memory_shortfall(e)) is None:
            return sys.__excepthook__(kind, e, traceback)  # any other error: its traceback
        at, how = where_it_stands()
        fail(f"out of memory on {device} at step {at}{why}: a smaller --batch-size or --mu needs less; {how}")

    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    sys.excepthook = out_of_memory

    # TRY NOT TO MODIFY: seeding, data
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    if rank > 0:  # DISTRIBUTED: rank 0 downloads or unpacks the data first; the others then read it from disk
        dist.barrier()
    try:
        data = common.load_ssl_data(
            args.dataset, args.data_dir, args.num_labels, args.seed, device, args.svhn_extra, args.labeled_indices
        )
    except (ValueError, FileNotFoundError) as e:
        data = e  # said below, past the barrier: leave() skips a `finally`, and the other ranks would wait in vain
    finally:
        if world > 1 and rank == 0:  # DISTRIBUTED: on disk now (or not: each rank then fails with the same line)
            dist.barrier()
    if isinstance(data, Exception):
        fail(data)
    info = data.info
    sizes = [len(data.x_unlabeled), len(data.x_test), info.num_classes]  # the data a resume must find again
    if ckpt is not None and ckpt.get("data", sizes) != sizes:
        found = f"now {sizes} in {args.data_dir}"
        fail(f"--resume {run_dir}: that run had other data ({ckpt['data']} unlabeled/test images/classes, {found})")
    split = run_dir / "labeled_indices.json"  # and the same labeled images
    try:
        saved_split = json.loads(split.read_text()) if ckpt is not None and split.is_file() else None
    except ValueError:  # not JSON (not UTF-8 either)
        saved_split = {}  # damaged, as JSON that is not a list of indices is
    if saved_split is not None and not (isinstance(saved_split, list) and all(type(i) is int for i in saved_split)):
        fail(f"--resume {run_dir}: its {split.name} is damaged: delete it, and the run writes its split again")
    if saved_split is not None and saved_split != data.labeled_idx.tolist():
        fail(f"--resume {run_dir}: that run had other labeled images ({split.name}): start a new run for these")
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else torch.float16
    # CUDA GRAPH: no autocast cache (a cached cast would outlive a capture)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=args.amp != "none", cache_enabled=False)
    prep = lambda x: common.normalize(x, info).contiguous(memory_format=torch.channels_last)  # uint8 -> network input

    # ALGO LOGIC: the network
    model = common.WideResNet(info.num_classes, args.depth, args.width, info.channels, args.bn_momentum)
    # TRY NOT TO MODIFY: EMA, optimizer (no weight decay on BatchNorm and biases), schedule; what a checkpoint holds
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn else model  # DISTRIBUTED
    model = model.to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # the evaluated model
    train_model = torch.compile(model) if args.compile else model
    if args.compile_augment:
        common.compile_augment()
    train_model = torch.nn.parallel.DistributedDataParallel(train_model) if world > 1 else train_model  # DISTRIBUTED
    decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for g in groups:  # CUDA GRAPH: the lr a device tensor (a replay reads it), the schedule's base a float (no sync)
        g.update(lr=torch.tensor(args.lr, device=device), initial_lr=args.lr)
    optimizer = torch.optim.SGD(groups, momentum=args.momentum, nesterov=True, fused=device.type == "cuda")
    cosine = lambda k: math.cos(7 * math.pi * k / (16 * args.total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    state = dict(model=model, ema_model=ema_model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)

    # ALGO LOGIC: TSA's threshold eta_t, a device tensor the step reads (filled before each step; 1 without TSA)
    tsa_eta = torch.zeros((), device=device)

    # TRY NOT TO MODIFY: resume, run dir, logging
    torch.manual_seed(args.seed + rank)  # DISTRIBUTED: the same weights on every rank above, each its own batches below
    start_step, best_acc = 0, 0.0
    if ckpt is not None:
        try:  # modules, optimizers, schedulers and scalers load their state dict; the method's tensors are copied
            for k, v in state.items():
                v.load_state_dict(ckpt[k]) if hasattr(v, "load_state_dict") else v.copy_(ckpt[k])
            for g in (g for v in state.values() if isinstance(v, torch.optim.Optimizer) for g in v.param_groups):
                g["lr"] = torch.as_tensor(g["lr"], device=device)  # CUDA GRAPH: older checkpoints hold a float
            start_step, best_acc = ckpt["step"], ckpt["best_acc"]
            if not args.eval_only:  # DISTRIBUTED: each rank's draws go on (an evaluation draws none: any process count)
                torch.set_rng_state(ckpt["rng_cpu"][rank].cpu())
                if device.type == "cuda":
                    torch.cuda.set_rng_state(ckpt["rng_cuda"][rank].cpu(), device)
        except (KeyError, ValueError, RuntimeError) as e:  # another method's or network's state
            fail(f"--resume {run_dir}: its checkpoint does not fit this run ({' '.join(str(e).split())[:120]})")
    if args.eval_only:  # the checkpoint's models on the test set: one line, nothing written
        acc, loss_eval, acc_raw = evaluate(ema_model, model, data.x_test, data.y_test, info, autocast)
        text = f"eval acc {acc:.2f} (raw model {acc_raw:.2f}) | loss {loss_eval:.4f}"
        print(f"{METHOD} | {run_dir} | step {start_step} | {text}")
        leave(0)
    metrics, writer, last_acc = run_dir / "metrics.jsonl", None, []  # last_acc: eval/acc of the last 20 evaluations
    refused = [hold_run_dir(run_dir, args.resume) if rank == 0 else ""]
    if rank == 0 and not refused[0]:
        try:  # rows logged after the checkpoint go, and so does a row a kill cut short (it does not end in "}")
            lines = metrics.read_text().splitlines() if metrics.exists() else []
            kept = [r for r in lines if r.endswith("}") and json.loads(r)["step"] <= start_step]
            last_acc = [float(row["eval/acc"]) for row in map(json.loads, kept) if "eval/acc" in row][-20:]
        except (ValueError, KeyError, TypeError):  # not text, not JSON, no number under "step" (or "eval/acc")
            refused[0] = f"--resume {run_dir}: a line of its {metrics.name} is not a metrics row: mend or delete it"
    if world > 1:  # DISTRIBUTED: rank 0 alone holds the run dir and reads it; when it cannot, every rank says so
        dist.broadcast_object_list(refused)
    if refused[0]:
        fail(refused[0])
    if rank == 0:  # DISTRIBUTED: rank 0 alone writes
        args_json, split_json = json.dumps(vars(args), indent=2), json.dumps(data.labeled_idx.tolist())
        write_whole({run_dir / "args.json": args_json, split: split_json, metrics: "".join(f"{r}\n" for r in kept)})
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(run_dir, purge_step=start_step + 1)

    def log(row):
        """A row of metrics.jsonl (and TensorBoard), by rank 0 alone; JSON has no NaN or inf: those are written null."""
        row = {k: v if math.isfinite(v) else None for k, v in row.items()}
        try:
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:
            fail(f"cannot write {metrics} ({e.strerror}): free space and --resume")
        for k, v in row.items():
            if writer and k != "step" and v is not None:
                writer.add_scalar(k, v, row["step"])

    # TRY NOT TO MODIFY: what changes from step to step is in device tensors that the step reads (--cuda-graph)
    ema_weight, running = torch.zeros((), device=device), {}  # 1 - this step's EMA decay; metric sums (zeroed at rows)

    def train_step():
        """One training step, from the batch draw to the metric sums: what --cuda-graph captures and replays."""
        # ALGO LOGIC: one training step: one forward of [weak labeled, weak unlabeled, strong unlabeled], the update
        _, x_l, y_l = common.sample_batch(args.batch_size, data.x_labeled, data.y_labeled)
        _, x_u, y_u = common.sample_batch(args.mu * args.batch_size, data.x_unlabeled, data.y_unlabeled)  # y_u: logs
        x_weak = common.weak_augment(torch.cat([x_l, x_u]), flip=info.flip)
        x = torch.cat([x_weak, common.strong_augment(x_u, flip=info.flip)])
        with autocast:
            logits = train_model(prep(x)).float()  # (B + 2 mu B, C)
        logits_l, logits_weak, logits_strong = logits.split([len(x_l), len(x_u), len(x_u)])
        kept = (logits_l.detach().softmax(1).gather(1, y_l[:, None]).squeeze(1) <= tsa_eta).float()  # (B,), TSA
        loss_x = (F.cross_entropy(logits_l, y_l, reduction="none") * kept).sum() / kept.sum().clamp(min=1)  # Eq. (1)
        probs_weak = logits_weak.detach().softmax(1)  # unsharpened: decides the mask
        confidence, pseudo_label = probs_weak.max(1)
        mask = (confidence >= args.threshold).float()  # (mu B,)
        target = (logits_weak.detach() / args.temperature).softmax(1)  # sharpened, a constant
        loss_u = (F.cross_entropy(logits_strong, target, reduction="none") * mask).mean()  # Eq. (1): over all mu B
        loss = loss_x + args.unsup_weight * loss_u
        known = mask * (y_u >= 0)  # masked samples whose label is known
        stats = {"losses/total": loss, "losses/sup": loss_x, "losses/unsup": loss_u}
        stats |= {"train/mask_ratio": mask.mean(), "train/pseudo_acc": ((pseudo_label == y_u) * known).sum()}
        stats["n/train/pseudo_acc"] = known.sum()  # a row's pseudo_acc: the right ones over this sum
        if args.tsa != "none":
            stats |= {"train/tsa_threshold": tsa_eta, "train/tsa_kept": kept.mean()}
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        # TRY NOT TO MODIFY: EMA, metric sums on the device (no host sync)
        ema_update(ema_model, model, ema_weight)
        stats["n"] = loss.new_ones(())
        running.update({k: torch.zeros((), device=device) for k in stats if k not in running})  # at the first step
        torch._foreach_add_([running[k] for k in stats], [v.detach().float() for v in stats.values()])

    # TRY NOT TO MODIFY: the loop: this step's numbers, the step (eager, or replayed from its CUDA graph), the schedules
    train_step = cuda_graph(train_step) if args.cuda_graph else train_step  # CUDA GRAPH
    params = sum(p.numel() for p in model.parameters())
    wrn = f"WRN-{args.depth}-{args.width} {params:,} params"
    print(f"{METHOD} | {args.dataset} {args.num_labels} labels | {wrn} | {device} amp={args.amp} | {run_dir}")
    model.train()
    t_last, step_last = time.perf_counter(), start_step
    for step in range(start_step + 1, args.total_steps + 1):
        ema_weight.fill_(1 - min(args.ema_decay, (1 + step) / (10 + step)))  # a fill: no host-to-device copy
        # ALGO LOGIC: TSA's eta_t, filled before the step (the step reads only device tensors)
        tsa_eta.fill_(tsa_threshold(args.tsa, step, args.total_steps, info.num_classes))
        # TRY NOT TO MODIFY: the step, then the schedules (outside the graph: LambdaLR fills the lr tensors)
        train_step()
        scheduler.step()

        # TRY NOT TO MODIFY: log (at every save too: a checkpoint holds no metric sums), evaluate, checkpoint
        save = step % args.save_every == 0 or step == args.total_steps
        if step % args.log_every == 0 or save:
            sums = torch.stack(list(running.values()))
            if world > 1:  # DISTRIBUTED: a row is the mean over every rank's steps
                dist.all_reduce(sums)
            sums = dict(zip(running, sums.tolist(), strict=True))  # syncs at log rows only: here, the weights, the lr
            # a row's mean: a sum over its steps (n), or over a count the step sums as n/<key> (a count of 0: left out)
            counts = {k: sums.get(f"n/{k}", sums["n"]) for k in sums if k.split("/")[0] != "n"}
            means = {k: sums[k] / c for k, c in counts.items() if c > 0}
            weights = float(torch.stack([p.detach().sum() for p in model.parameters()]).sum())
            check_finite(step, {**means, "the sum of the weights": weights}, run_dir)
            its, lr = (step - step_last) / (time.perf_counter() - t_last), float(scheduler.get_last_lr()[0])
            torch._foreach_zero_(list(running.values()))  # CUDA GRAPH: in place, the graph adds into these tensors
            if rank == 0:  # DISTRIBUTED
                log({"step": step, **means, "train/lr": lr, "train/it_per_sec": its})
            text = " ".join(f"{k.split('/')[1]} {v:.4g}" for k, v in means.items())  # .4g: a value near 0 shows
            eta = hms((args.total_steps - step) / its)
            print(f"step {step:>7}/{args.total_steps} | {text} | lr {lr:.4g} | {its:.1f} it/s | eta {eta}", flush=True)
        if (step % args.eval_every == 0 or step == args.total_steps) and rank == 0:  # DISTRIBUTED: rank 0 alone
            acc, loss_eval, acc_raw = evaluate(ema_model, model, data.x_test, data.y_test, info, autocast)
            best_acc, last_acc = max(best_acc, acc), [*last_acc, acc][-20:]
            row = {"step": step, "eval/acc": acc, "eval/loss": loss_eval, "eval/acc_raw": acc_raw}
            log({**row, "eval/best_acc": best_acc, "eval/median_acc": statistics.median(last_acc)})
            text = f"eval acc {acc:.2f} (best {best_acc:.2f}, raw model {acc_raw:.2f})"
            print(f"step {step:>7} | {text} | loss {loss_eval:.4f}", flush=True)
        if save:
            rng = [(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)]
            if world > 1:  # DISTRIBUTED: every rank's RNG states, for an exact resume
                dist.all_gather_object(gathered := [None] * world, rng[0])
                rng = gathered
            if rank == 0:
                ckpt = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
                ckpt.update(step=step, args=vars(args), best_acc=best_acc, script=METHOD, data=sizes)
                ckpt.update(rng_cpu=[r[0] for r in rng], rng_cuda=[r[1] for r in rng])
                inference = inference_model(ema_model, args, info, step)
                # model.pt first: a checkpoint of the last step finds it there (a kill between the two redoes both)
                save_checkpoint({run_dir / "model.pt": inference, run_dir / "checkpoint.pt": ckpt})
        if step % args.log_every == 0 or step % args.eval_every == 0 or save:
            t_last, step_last = time.perf_counter(), step  # it/s leaves out evaluation and saving
    if writer:
        writer.close()
    if rank == 0:
        elapsed, median = hms(time.perf_counter() - t_start), statistics.median(last_acc)
        text = f"eval acc {acc:.2f} (best {best_acc:.2f}, median of the last {len(last_acc)} {median:.2f})"
        print(f"done: step {step} | {text} | {elapsed} | {run_dir}", flush=True)
    if world > 1:  # DISTRIBUTED: every rank done (rank 0 may still be saving) before the group goes
        dist.barrier()
        del train_model  # DDP holds the group: gone, its threads end now, not in interpreter teardown
        # TRY NOT TO MODIFY: no DDP wrapper is left: the group and its threads end here
        dist.destroy_process_group()
