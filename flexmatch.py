"""FlexMatch (Zhang et al., "FlexMatch: Boosting Semi-Supervised Learning with Curriculum Pseudo
Labeling", NeurIPS 2021): FixMatch with a per-class confidence threshold that follows how well
each class is learned (Curriculum Pseudo Labeling).

Each step draws a labeled batch {(x_b, y_b)} of size B and an unlabeled batch {u_b} of size mu*B
of DISTINCT rows n of the unlabeled set (the whole training set). With w(.) the weak and W(.) the
strong augmentation, q_b = p(y | w(u_b)) the weak-view prediction and c_b = argmax q_b its hard
pseudo label, every row n carries a mark u^_n (-1 = unused, Algorithm 1 line 2):
    L = 1/B sum_b CE(y_b, p(y | w(x_b)))                                         (10) supervised term
      + lambda_u * 1/(mu B) sum_b [max q_b >= T(c_b)] CE(c_b, p(y | W(u_b)))      (8), (9)
    sigma(c) = #{n : u^_n = c}                          learning effect (5), counted over the marks
    beta(c) = sigma(c) / max(max_c sigma, #{n : u^_n = -1})     (11) threshold warm-up
            = sigma(c) / max_c sigma                             (6) without it (0 where 0/0)
    T(c) = tau * M(beta(c)),  M(x) = x / (2 - x)                (12) convex mapping; (7) is M(x) = x
    u^_b <- c_b  for the batch rows with max q_b >= tau         Algorithm 1 lines 13-17, FIXED tau
The thresholds come from the marks BEFORE this step's update (Algorithm 1 computes T(c) in lines
4-12, then marks in lines 13-17, as TorchSSL does). At the start every mark is -1, so beta = 0, the
threshold is 0 and every unlabeled sample is in the loss: by design. Pseudo labels are not
differentiated.

Recipe: the classic CV protocol of supervised.py (METHODS.md section 0), mu 7, tau 0.95,
lambda_u 1, convex mapping, threshold warm-up on (paper section 4 and TorchSSL).

Choices, where the references differ or are silent:
    - Confidence gates with ">=" (TorchSSL) where the paper writes ">": the same up to ties.
    - --mapping concave is M(x) = ln(x + 1) / ln 2, the concave form tllib's FlexMatch module lists
      (the paper's section 3.3 gives only the convex x / (2 - x); TorchSSL keeps a different
      concave form, commented out). Convex is the default and the paper's choice; linear is Eq. (7).
    - Counts by a scatter-add into C + 1 bins (bin 0 = unused) on the device: torch.bincount on
      CUDA reads the input's min and max to the host, and TorchSSL's Counter(tensor.tolist())
      copies all N marks every step. The marks live on the device and travel in the checkpoint
      (TorchSSL saves none, so its resumed runs restart the curriculum); resume is exact.
    - One edge case differs from TorchSSL: when ALL N marks are one class, TorchSSL keeps the
      previous thresholds, here that class gets tau and the others 0 (the formula as written).
    - The unlabeled batch is drawn WITHOUT replacement (common.sample_batch(replace=False)), so no
      row is marked twice in one step; the labeled batch, as everywhere, with replacement.
    - Under torchrun each rank draws its unlabeled rows from its own shard rank::world (ranks never
      share a row) and every rank applies every rank's marks: selected_label stays identical.
    - BatchNorm: ONE forward of the concatenated [labeled weak, unlabeled weak, unlabeled strong]
      batch, as TorchSSL.
    - EMA decay min(ema_decay, (1 + k) / (10 + k)) at step k (TensorFlow's ExponentialMovingAverage
      with num_updates, as the official MPL code): early on the EMA averages about the last 10 % of
      the steps, so a short run evaluates a model as good as its recent weights; the decay reaches
      0.99 at k = 890 and 0.999 at k = 8990. TorchSSL's constant 0.999 stays near the random init
      for thousands of steps; the plain average since init (1 - 1/(k+1)) lags just as far, and its
      weights no longer match the BatchNorm statistics copied from the trained model. Parameters
      are averaged, BatchNorm running statistics copied (an EMA whose BN stays at init is broken).
    - Mixed precision: bf16 autocast by default on CUDA (no GradScaler needed), fp16 with a
      GradScaler on request, fp32 on CPU by default. Losses are computed in fp32.
    - A run is resumable from any kill: checkpoints are written atomically, the log rows written
      after the last checkpoint are dropped on resume, and the RNG states travel in the checkpoint.
    - Under torchrun (README, Multi-GPU): DDP averages the gradients, --batch-size is per process, every
      rank draws its own batches (seed + rank), log rows average all ranks, rank 0 alone writes.

Usage:
    python flexmatch.py --dataset cifar10 --num-labels 40
    python flexmatch.py --resume runs/<run dir>         # continue exactly where it stopped
    torchrun --nproc_per_node=4 flexmatch.py --batch-size 16  # 4 GPUs, global labeled batch 4 x 16 = 64
"""

import argparse
import copy
import json
import math
import os
import signal
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


def fail(message):
    """Bad input: one line on stderr, exit code 2, nothing written."""
    print(f"{METHOD}.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],  # the whole title paragraph
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.error = fail  # argparse would print the usage block too: keep errors to one line
    # generic: data, budget, optimisation, network, hardware, output
    p.add_argument("--dataset", default="cifar10", choices=[*common.DATASETS, common.FOLDER],
                   help="dataset; folder: your own images in --data-dir (README, Your own images)")
    p.add_argument("--data-dir", default="./data", help="where torchvision finds or downloads the data")
    p.add_argument("--svhn-extra", action=argparse.BooleanOptionalAction, default=True,
                   help="svhn: its 531k extra images join the unlabeled stream, as TorchSSL and USB")
    p.add_argument("--num-labels", type=int, default=4000, help="labeled examples, class-balanced")
    p.add_argument("--seed", type=int, default=0, help="seeds everything; the labeled split follows from it")
    p.add_argument("--total-steps", type=int, default=2**20, help="optimizer steps K")
    p.add_argument("--eval-every", type=int, default=5000, help="evaluate every this many steps")
    p.add_argument("--log-every", type=int, default=100, help="log training metrics every this many steps")
    p.add_argument("--save-every", type=int, default=5000, help="checkpoint every this many steps (the last step always saves)")
    p.add_argument("--batch-size", type=int, default=64, help="labeled batch size B")
    p.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * B")
    p.add_argument("--lr", type=float, default=0.03, help="initial learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4, 1e-3 on cifar100")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (nesterov) momentum")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the evaluated EMA model")
    p.add_argument("--depth", type=int, default=28, help="WideResNet depth (6n+4)")
    p.add_argument("--width", type=int, default=None, help="WideResNet width, default 2, 8 on cifar100")
    p.add_argument("--bn-momentum", type=float, default=0.001, help="BatchNorm momentum (short runs need ~0.1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--amp", choices=["bf16", "fp16", "none"], default=None, help="autocast dtype, default bf16 on cuda, none on cpu")
    p.add_argument("--compile", action="store_true", help="wrap the trained model in torch.compile")
    p.add_argument("--sync-bn", action="store_true", help="under torchrun: BatchNorm batch statistics over all processes (CUDA only)")
    p.add_argument("--run-dir", default=None, help="output folder, default runs/<dataset>_<method>_<labels>_<seed>_<time>")
    p.add_argument("--resume", default=None, help="run dir (or its checkpoint.pt) to continue exactly; its args.json supplies the arguments")
    p.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    # algorithm specific
    p.add_argument("--threshold", type=float, default=0.95, help="tau: marks a confident sample; the flexible thresholds' ceiling")
    p.add_argument("--unsup-weight", type=float, default=1.0, help="lambda_u, the weight of the unlabeled loss")
    p.add_argument("--mapping", choices=list(MAPPINGS), default="convex", help="M in T(c) = tau * M(beta(c)): x/(2-x), x, ln(1+x)/ln 2")
    p.add_argument("--threshold-warmup", action=argparse.BooleanOptionalAction, default=True,
                   help="count the unused samples in the normaliser of beta (Eq. 11); --no-threshold-warmup uses Eq. (6)")
    p.add_argument("--eval-only", action="store_true",
                   help="with --resume: evaluate its checkpoint, print one line, write nothing")
    args = p.parse_args(argv)
    saved = {}
    if args.resume:  # the saved arguments become the defaults; flags given now still override them
        run_dir = Path(args.resume).parent if Path(args.resume).is_file() else Path(args.resume)
        if not (run_dir / "args.json").is_file():
            fail(f"--resume {args.resume}: no args.json there, so it is not a run dir")
        try:
            saved = json.loads((run_dir / "args.json").read_text())
        except ValueError:
            fail(f"--resume {args.resume}: its args.json is not valid JSON")
        if saved.get("script", METHOD) != METHOD:  # a run made before scripts were recorded is allowed
            fail(f"--resume {run_dir}: that run was made by {saved['script']}.py, not {METHOD}.py: resume it with that")
        p.set_defaults(**saved)
        args = p.parse_args(argv)
        args.run_dir, args.resume = str(run_dir), str(run_dir)
    args.script = METHOD  # in args.json and the checkpoint: a run resumes only with the script that made it
    # values derived at run time (written to args.json resolved)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else 1e-3 if args.dataset == "cifar100" else 5e-4
    args.width = args.width or (8 if args.dataset == "cifar100" else 2)
    args.amp = args.amp or ("bf16" if args.device.startswith("cuda") else "none")
    args.run_dir = args.run_dir or f"runs/{args.dataset}_{METHOD}_{args.num_labels}_{args.seed}_{time.strftime('%Y%m%d-%H%M%S')}"
    for name in ("num_labels", "total_steps", "eval_every", "log_every", "save_every", "batch_size", "mu"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if (args.depth - 4) % 6:
        fail(f"--depth must be 6n+4 (10, 16, 22, 28, ...), got {args.depth}")
    if not 0 <= args.threshold <= 1:
        fail(f"--threshold is a probability, in [0, 1], got {args.threshold}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        fail("--device cuda, but CUDA is not available here: use --device cpu")
    if args.sync_bn and not args.device.startswith("cuda"):  # DISTRIBUTED: torch's SyncBatchNorm has no CPU kernel
        fail("--sync-bn needs --device cuda (torch's SyncBatchNorm runs on GPUs only): drop --sync-bn")
    try:
        torch.device(args.device)
    except RuntimeError:
        fail(f"--device {args.device} is not a device: use cpu, cuda or cuda:N")
    for flag, value, ok, rule in (("--lr", args.lr, 0 < args.lr < math.inf, "positive"),
                                  ("--weight-decay", args.weight_decay, 0 <= args.weight_decay < math.inf, ">= 0"),
                                  ("--momentum", args.momentum, 0 <= args.momentum < 1, "in [0, 1)"),
                                  ("--ema-decay", args.ema_decay, 0 <= args.ema_decay <= 1, "in [0, 1]"),
                                  ("--bn-momentum", args.bn_momentum, 0 < args.bn_momentum <= 1, "in (0, 1]")):
        if not ok:
            fail(f"{flag} must be {rule}, got {value}")
    if args.eval_only and not args.resume:
        fail("--eval-only needs --resume RUN_DIR: the run whose checkpoint to evaluate")
    if args.resume:  # what makes a run: resuming it on other data, another split or another network would mix two runs
        changed = [f"--{k.replace('_', '-')} {saved[k]} (now {getattr(args, k)})" for k in ("dataset", "num_labels", "seed",
                   "depth", "width") if k in saved and saved[k] != getattr(args, k)]
        if changed:
            fail(f"--resume {args.resume}: that run was made with {', '.join(changed)}: start a new run for these")
    return args


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * model for parameters; BatchNorm buffers copied."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    for ema_buffer, buffer in zip(ema_model.buffers(), model.buffers()):
        ema_buffer.copy_(buffer)


@torch.no_grad()
def evaluate(model, x_test, y_test, info, autocast, batch_size=1024):
    """Top-1 accuracy (%) and mean cross-entropy on the test set, in eval mode."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), device=x_test.device)
    loss = torch.zeros((), device=x_test.device)
    for i in range(0, len(x_test), batch_size):
        x = common.normalize(x_test[i : i + batch_size], info).contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x).float()
        loss += F.cross_entropy(logits, y_test[i : i + batch_size], reduction="sum")
        correct += (logits.argmax(1) == y_test[i : i + batch_size]).sum()
    model.train(was_training)
    acc, loss = (torch.stack([correct, loss]) / len(x_test)).tolist()
    return 100 * acc, loss


MAPPINGS = {  # M: [0, 1] -> [0, 1], increasing, M(0) = 0, M(1) = 1
    "convex": lambda x: x / (2 - x),  # Eq. (12), the paper's choice
    "linear": lambda x: x,  # Eq. (7)
    "concave": lambda x: torch.log1p(x) / math.log(2),  # tllib's concave form
}


@torch.no_grad()
def class_thresholds(selected_label, num_classes, tau, mapping="convex", warmup=True):
    """Flexible thresholds T(c) = tau * M(beta(c)), shape (C,), from the marks selected_label (N,)
    (a class, or -1 for unused): sigma(c) counts the marks equal to c (Eq. 5), beta(c) = sigma(c) /
    max(max_c sigma, unused) with warm-up (Eq. 11), sigma(c) / max_c sigma without (Eq. 6), and 0
    where that is 0 / 0 (no mark yet: every threshold is 0). No host sync."""
    counts = torch.zeros(num_classes + 1, dtype=torch.long, device=selected_label.device)
    counts.scatter_add_(0, selected_label + 1, torch.ones_like(selected_label))  # [unused, sigma(0), ..., sigma(C-1)]
    sigma = counts[1:]
    beta = sigma.float() / (counts.max() if warmup else sigma.max()).clamp(min=1)
    return tau * MAPPINGS[mapping](beta)


@torch.no_grad()
def mark_confident(selected_label, idx, max_probs, pseudo_label, tau):
    """Algorithm 1 lines 13-17: the distinct rows idx whose weak-view confidence reaches the FIXED
    tau are marked with their predicted class; the other marks stay. In place, no host sync."""
    selected_label[idx] = torch.where(max_probs >= tau, pseudo_label, selected_label[idx])


def all_ranks(x, world):
    """DISTRIBUTED: x (n, ...) of every rank, concatenated in rank order, (world n, ...); x itself in a
    single process. Every rank receives the same tensor (an all-gather on the device: no host sync)."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def save_checkpoint(state, path):
    """Atomic: a crash at any moment leaves the previous checkpoint whole; a failed write (a full disk) leaves no temp
    file and ends the run with one line."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):  # torch.save reports a full disk as a RuntimeError
            reason = " ".join(str(e).split())[:100]  # one line
            fail(f"cannot write {path} ({reason}): the previous one is kept; free space and --resume")
        raise


def load_checkpoint(path):
    """The checkpoint to resume from, or one line on stderr (exit code 2) saying why there is none."""
    if not path.is_file():
        fail(f"--resume {path.parent}: no {path.name} there (the run stopped before its first save), so nothing "
             f"to resume: delete {path.parent} and start again")
    try:
        with warnings.catch_warnings():  # torch warns about some foreign files before refusing them
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a checkpoint, or holding objects that weights_only refuses to load
        fail(f"--resume {path.parent}: {path.name} cannot be read ({type(e).__name__}): damaged or not a checkpoint")
    if not isinstance(ckpt, dict) or "step" not in ckpt:
        fail(f"--resume {path.parent}: {path.name} is not a checkpoint of these scripts")
    if ckpt.get("script", METHOD) != METHOD:
        fail(f"--resume {path.parent}: its checkpoint was written by {ckpt['script']}.py, not {METHOD}.py")
    return ckpt


def check_writable(run_dir):
    """Fail before the data loads if the run dir cannot be written (a file in its path, a read-only disk).
    Leaves nothing behind."""
    folder = run_dir
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        fail(f"--run-dir {run_dir}: {folder} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        fail(f"--run-dir {run_dir}: cannot write in {folder} ({e.strerror})")


def check_finite(step, values, run_dir):
    """Divergence: stop before a non-finite value is logged or saved. One line, exit code 3, the last checkpoint kept."""
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        print(f"{METHOD}.py: error: diverged by step {step}: {bad[0]} is {values[bad[0]]}; nothing of it was saved, "
              f"{run_dir} keeps the last good checkpoint (a new run with a lower --lr may not diverge)",
              file=sys.stderr)
        sys.exit(3)


def inference_model(ema_model, args, info, step):
    """model.pt: the evaluated weights and what rebuilds the plain WideResNet (README: Evaluate and load a model)."""
    arch = {"num_classes": ema_model.fc.out_features, "depth": args.depth, "width": args.width,
            "in_channels": info.channels}
    with torch.device("meta"):
        keys = common.WideResNet(**arch).state_dict().keys()  # heads only the method uses are left out
    weights = {k: v.cpu().contiguous() for k, v in ema_model.state_dict().items() if k in keys}  # loads without a GPU
    return {"arch": arch, "weights": weights, "size": info.size, "mean": info.mean, "std": info.std,
            "classes": list(info.classes), "script": METHOD, "step": step}


if __name__ == "__main__":
    t_start = time.perf_counter()
    args = parse_args()
    # DISTRIBUTED: under torchrun (WORLD_SIZE > 1) one process per device, NCCL on CUDA, gloo on CPU; a plain run is rank 0 of 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if world > 1 and args.device.startswith("cuda") else torch.device(args.device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        dist.broadcast_object_list(shared := [args.run_dir])  # the default run dir holds the time: rank 0's for every rank
        args.run_dir = shared[0]
        if rank > 0:
            sys.stdout = open(os.devnull, "w")  # only rank 0 prints
    run_dir = Path(args.run_dir)
    if not args.eval_only:
        check_writable(run_dir)
    if not args.resume and run_dir.exists() and any(run_dir.iterdir()):
        fail(f"--run-dir {run_dir} already holds a run: continue it with --resume {run_dir}, or pick another")
    ckpt = load_checkpoint(run_dir / "checkpoint.pt") if args.resume else None
    if ckpt is not None and not args.eval_only and len(ckpt["rng_cpu"]) != world:  # DISTRIBUTED: state per rank
        fail(f"--resume {run_dir}: its checkpoint was written by {len(ckpt['rng_cpu'])} process(es); resume it with as many")
    if ckpt is not None and not args.eval_only and ckpt["step"] > args.total_steps:
        fail(f"--resume {run_dir}: --total-steps {args.total_steps} is below the checkpoint's step {ckpt['step']}")
    if ckpt is not None and not args.eval_only and ckpt["step"] == args.total_steps:
        print(f"{run_dir}: already finished at step {ckpt['step']}; a larger --total-steps continues it")
        sys.exit(0)

    def interrupted(signum, frame):  # Ctrl-C, SIGTERM: one line on how to go on (the checkpoint on disk is whole)
        at = f"at step {step}" if "step" in globals() else "before the first step"
        how = "no checkpoint yet, nothing to resume"
        if (run_dir / "checkpoint.pt").is_file():
            how = f"continue with: python {METHOD}.py --resume {run_dir}"
        if rank == 0:
            print(f"{METHOD}.py: interrupted {at}; {how}", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)

    # TRY NOT TO MODIFY: seeding, device, data
    torch.manual_seed(args.seed)
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    try:
        data = common.load_ssl_data(args.dataset, args.data_dir, args.num_labels, args.seed, device, args.svhn_extra)
    except (ValueError, FileNotFoundError) as e:
        fail(e)
    info = data.info
    sizes = [len(data.x_unlabeled), len(data.x_test), info.num_classes]  # the data a resume must find again
    if ckpt is not None and ckpt.get("data", sizes) != sizes:
        fail(f"--resume {run_dir}: that run had other data ({ckpt['data']} unlabeled/test images/classes, "
             f"now {sizes}): give its --dataset and --data-dir")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16, enabled=args.amp != "none")
    prep = lambda x: common.normalize(x, info).contiguous(memory_format=torch.channels_last)  # uint8 -> network input

    # TRY NOT TO MODIFY: model, EMA, optimizer (no weight decay on BatchNorm and biases), schedule
    model = common.WideResNet(info.num_classes, args.depth, args.width, info.channels, args.bn_momentum)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn else model  # DISTRIBUTED: BatchNorm over all ranks
    model = model.to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # the evaluated model
    train_model = torch.compile(model) if args.compile else model
    train_model = torch.nn.parallel.DistributedDataParallel(train_model) if world > 1 else train_model  # DISTRIBUTED: averages gradients
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=args.momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: math.cos(7 * math.pi * k / (16 * args.total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    selected_label = torch.full((len(data.x_unlabeled),), -1, dtype=torch.long, device=device)  # marks u^_n, -1 = unused

    # DISTRIBUTED: every rank built the same weights from --seed above; from here on each rank draws its own batches
    torch.manual_seed(args.seed + rank)

    # TRY NOT TO MODIFY: run dir, resume, logging
    start_step, best_acc, running, n_running = 0, 0.0, {}, 0
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            ema_model.load_state_dict(ckpt["ema_model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            selected_label.copy_(ckpt["selected_label"])
            start_step, best_acc, n_running = ckpt["step"], ckpt["best_acc"], ckpt["n_running"]
            running = {k: v.to(device) for k, v in ckpt["running"][rank].items()}
            torch.set_rng_state(ckpt["rng_cpu"][rank])
            if device.type == "cuda":
                torch.cuda.set_rng_state(ckpt["rng_cuda"][rank], device)
        except (KeyError, ValueError, RuntimeError) as e:  # another method's or network's state
            fail(f"--resume {run_dir}: its checkpoint does not fit this run ({' '.join(str(e).split())[:120]})")
    if args.eval_only:  # the checkpoint's models on the test set: one line, nothing written
        acc, loss_eval = evaluate(ema_model, data.x_test, data.y_test, info, autocast)
        acc_raw, _ = evaluate(model, data.x_test, data.y_test, info, autocast)
        print(f"{METHOD} | {run_dir} | step {start_step} | eval acc {acc:.2f} (raw model {acc_raw:.2f}) | "
              f"loss {loss_eval:.4f}")
        sys.exit(0)
    metrics_path = run_dir / "metrics.jsonl"
    if rank == 0:  # DISTRIBUTED: only rank 0 writes (every rank checked the run dir before DDP's first collective)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        (run_dir / "labeled_indices.json").write_text(json.dumps(data.labeled_idx.tolist()))
        if metrics_path.exists():  # drop rows logged after the checkpoint we resume from (or all, if none)
            rows = []
            for line in metrics_path.read_text().splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a kill
                    pass
            metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= start_step))
    writer = None
    if args.tensorboard and rank == 0:  # DISTRIBUTED: only rank 0 writes
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(run_dir, purge_step=start_step + 1)
        except ImportError:
            print("tensorboard is not installed: logging to metrics.jsonl only", file=sys.stderr)

    def log(row):
        if rank > 0:  # DISTRIBUTED: only rank 0 writes
            return
        row = {k: v if math.isfinite(v) else None for k, v in row.items()}  # JSON has no NaN or inf: null
        try:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        except OSError as e:  # a full disk: the checkpoint on disk is whole
            fail(f"cannot write {metrics_path} ({e.strerror}): free space and --resume")
        if writer:
            for k, v in row.items():
                if k != "step" and v is not None:
                    writer.add_scalar(k, v, row["step"])

    print(f"{METHOD} | {args.dataset} {args.num_labels} labels | WRN-{args.depth}-{args.width} "
          f"{sum(p.numel() for p in model.parameters()):,} params | {device} amp={args.amp} | {run_dir}")
    model.train()
    t_last, step_last = time.perf_counter(), start_step
    for step in range(start_step + 1, args.total_steps + 1):
        # ALGO LOGIC: thresholds from the marks so far; one forward of [labeled weak, unlabeled weak, unlabeled strong]; marks
        _, x_l, y_l = common.sample_batch(args.batch_size, data.x_labeled, data.y_labeled)
        idx_u, x_u, y_u = common.sample_batch(args.mu * args.batch_size, data.x_unlabeled[rank::world], data.y_unlabeled[rank::world], replace=False)
        idx_u = rank + world * idx_u  # DISTRIBUTED: rows of this rank's shard rank::world, as indices into selected_label
        thresholds = class_thresholds(selected_label, info.num_classes, args.threshold, args.mapping, args.threshold_warmup)  # (C,)
        x = torch.cat([common.weak_augment(torch.cat([x_l, x_u]), flip=info.flip), common.strong_augment(x_u, flip=info.flip)])
        with autocast:
            logits = train_model(prep(x)).float()
        logits_l, logits_w, logits_s = logits.split([len(x_l), len(x_u), len(x_u)])
        loss_x = F.cross_entropy(logits_l, y_l)  # Eq. (10)
        max_probs, pseudo_label = logits_w.detach().softmax(1).max(1)  # hard pseudo labels from the weak view
        mask = (max_probs >= thresholds[pseudo_label]).float()  # the flexible threshold of the predicted class
        loss_u = (F.cross_entropy(logits_s, pseudo_label, reduction="none") * mask).mean()  # Eq. (8): mean over all mu B
        loss = loss_x + args.unsup_weight * loss_u  # Eq. (9)
        mark_confident(selected_label, all_ranks(idx_u, world), all_ranks(max_probs, world), all_ranks(pseudo_label, world),
                       args.threshold)  # after the thresholds: Algorithm 1; DISTRIBUTED: every rank's marks on every rank
        known = mask * (y_u >= 0)  # masked samples whose label is known (for logging only)
        stats = {"losses/total": loss, "losses/sup": loss_x, "losses/unsup": loss_u, "train/mask_ratio": mask.mean(),
                 "train/pseudo_acc": (known * (pseudo_label == y_u)).sum() / known.sum().clamp(min=1),
                 "train/threshold_mean": thresholds.mean(), "train/unused_ratio": (selected_label < 0).float().mean()}

        # TRY NOT TO MODIFY: optimizer step, EMA, device-side metric sums (no host sync)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ema_update(ema_model, model, min(args.ema_decay, (1 + step) / (10 + step)))
        for k, v in stats.items():
            running[k] = running.get(k, 0) + v.detach().float()
        n_running += 1

        # TRY NOT TO MODIFY: log, evaluate, checkpoint
        last = step == args.total_steps
        if step % args.log_every == 0 or last:
            sums = torch.stack(list(running.values()))
            if world > 1:  # DISTRIBUTED: sums over all ranks, so a row is the mean over every rank's steps
                dist.all_reduce(sums)
            means = dict(zip(running, (sums / (world * n_running)).tolist()))  # the one host sync per log interval
            check_finite(step, means, run_dir)
            its = (step - step_last) / (time.perf_counter() - t_last)
            lr = scheduler.get_last_lr()[0]
            log({"step": step, **means, "train/lr": lr, "train/it_per_sec": its})
            running, n_running = {}, 0
            eta = time.strftime("%H:%M:%S", time.gmtime((args.total_steps - step) / its))
            print(f"step {step:>7}/{args.total_steps} | " + " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in means.items())
                  + f" | lr {lr:.4g} | {its:.1f} it/s | eta {eta}", flush=True)
        if (step % args.eval_every == 0 or last) and rank == 0:  # DISTRIBUTED: rank 0 evaluates, the others wait in the next collective
            acc, loss_eval = evaluate(ema_model, data.x_test, data.y_test, info, autocast)
            acc_raw, _ = evaluate(model, data.x_test, data.y_test, info, autocast)
            best_acc = max(best_acc, acc)
            log({"step": step, "eval/acc": acc, "eval/loss": loss_eval, "eval/acc_raw": acc_raw, "eval/best_acc": best_acc})
            print(f"step {step:>7} | eval acc {acc:.2f} (best {best_acc:.2f}, raw model {acc_raw:.2f}) | loss {loss_eval:.4f}", flush=True)
        if step % args.save_every == 0 or last:
            ranks = [({k: v.cpu() for k, v in running.items()}, torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)]
            if world > 1:  # DISTRIBUTED: every rank's metric sums and RNG states, for an exact resume
                dist.all_gather_object(gathered := [None] * world, ranks[0])
                ranks = gathered
            running_ranks, rng_cpu, rng_cuda = (list(t) for t in zip(*ranks))  # lists indexed by rank
            unlogged = {k: float(v.sum()) for r in running_ranks for k, v in r.items()}  # since the last log row
            check_finite(step, {**unlogged, "model weights": float(sum(p.detach().sum() for p in model.parameters()))}, run_dir)
            if rank == 0:  # DISTRIBUTED: only rank 0 writes
                save_checkpoint({"step": step, "args": vars(args), "model": model.state_dict(), "ema_model": ema_model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                 "selected_label": selected_label,
                                 "best_acc": best_acc, "running": running_ranks, "n_running": n_running, "rng_cpu": rng_cpu,
                                 "rng_cuda": rng_cuda, "script": METHOD, "data": sizes}, run_dir / "checkpoint.pt")
                save_checkpoint(inference_model(ema_model, args, info, step), run_dir / "model.pt")
        if step % args.log_every == 0 or step % args.eval_every == 0 or step % args.save_every == 0:
            t_last, step_last = time.perf_counter(), step  # it/s excludes evaluation and saving
    if writer:
        writer.close()
    if rank == 0:
        print(f"done: step {step} | eval acc {acc:.2f} (best {best_acc:.2f}) | "
              f"{time.strftime('%H:%M:%S', time.gmtime(time.perf_counter() - t_start))} | {run_dir}", flush=True)
    if world > 1:  # DISTRIBUTED: every rank done (rank 0 may still be saving) before the group goes
        dist.barrier()
        dist.destroy_process_group()
