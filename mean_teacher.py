"""Mean Teacher (Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017): the
student must agree with a teacher whose weights are the exponential moving average of its own.

Each step draws a labeled batch {(x_b, y_b)} of size B and an unlabeled batch {u_i} of size mu*B
(the unlabeled set is the whole training set). With a(.) and a'(.) two independent draws of the
weak augmentation, f(.; theta) the student and f(.; theta') the teacher (softmax outputs):
    L = 1/B sum_b CE(y_b, f(a(x_b); theta))                                       (supervised)
      + w(t) * 1/(C mu B) sum_i || f(a(u_i); theta) - f(a'(u_i); theta') ||^2    paper Eq. (1)
    theta'_t = alpha_t theta'_{t-1} + (1 - alpha_t) theta_t                       paper Eq. (2)
    alpha_t = min((1 + t) / (10 + t), ema_decay)    (follows the recent weights early on)
    w(t) = w_max * exp(-5 (1 - T)^2),  T = min(t / (ramp_up * K), 1)   (the paper's sigmoid ramp-up)
The teacher's side is a target: no gradient flows into it; it changes only through Eq. (2).

Recipe: the classic CV protocol of supervised.py (METHODS.md section 0), mu 1, w_max 50 (TorchSSL).

Choices, where the references differ or are silent:
    - The teacher IS the EMA model that every script evaluates: no second average is kept.
    - alpha_t: the template's (1 + t) / (10 + t) warm-up, capped at 0.999. The paper's
      1 - 1/(t + 1) makes the teacher the plain average of every weight since init, which early in
      a run lags the student by half the steps taken so far; its TF code uses 0.99 during the
      ramp-up and 0.999 after, and (1 + t) / (10 + t) passes 0.99 at t = 890 and 0.999 at t = 8990.
    - Under torchrun the teacher's parameters follow the synchronised student, so they agree on every
      rank; its BatchNorm running statistics are per rank (unused in training; rank 0's are evaluated).
    - Teacher BatchNorm: the teacher forwards its own view of the unlabeled batch in TRAIN mode (no
      gradient), so it normalises with the statistics of its own activations and its running
      statistics track them, as in the paper's code; Eq. (2) averages parameters only. Copying
      the student's running statistics instead (TorchSSL's EMA) pairs averaged weights with
      statistics of other weights, which early in a run are far off.
    - Weight 50 on the mean over classes and unlabeled samples (TorchSSL, whose batches are
      separate as ours); the paper's 100 averages over a mixed labeled + unlabeled batch.
    - Ramp: the paper's sigmoid shape over 40 % of the run (TorchSSL's length; its shape is
      linear), scaled with --total-steps so that short runs switch the consistency on too.
    - The student forwards the concatenated [labeled, unlabeled] batch once (shared batch
      statistics), as the paper's code forwards its mixed batches; the teacher forwards the
      unlabeled batch alone, which has the same distribution. TorchSSL forwards the labeled batch
      alone and the unlabeled one with BatchNorm's running statistics frozen; on digits (50 labels,
      500 steps, seed 0) that gave 84.2 % against 84.8 % for the joint forward: no gain to adopt.
    - Batches are drawn uniformly with replacement from the device-resident set each step
      (common.sample_batch), not by epochs: no host sync, and resuming needs only the RNG state.
    - Mixed precision: bf16 autocast by default on CUDA (no GradScaler needed), fp16 with a
      GradScaler on request, fp32 on CPU by default. Losses are computed in fp32.
    - A run is resumable from any kill: checkpoints are written atomically, the log rows written
      after the last checkpoint are dropped on resume, and the RNG states travel in the checkpoint.
    - Under torchrun (README, Multi-GPU): DDP averages the gradients, --batch-size is per process, every
      rank draws its own batches (seed + rank), log rows average all ranks, rank 0 alone writes.

Usage:
    python mean_teacher.py --dataset cifar10 --num-labels 4000
    python mean_teacher.py --resume runs/<run dir>      # continue exactly where it stopped
    torchrun --nproc_per_node=4 mean_teacher.py --batch-size 16  # 4 GPUs, global labeled batch 4 x 16 = 64
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
    p.add_argument("--mu", type=int, default=1, help="unlabeled batch = mu * B")
    p.add_argument("--lr", type=float, default=0.03, help="initial learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4, 1e-3 on cifar100")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (nesterov) momentum")
    p.add_argument("--ema-decay", type=float, default=0.999, help="decay of the EMA model, here the teacher")
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
    p.add_argument("--unsup-weight", type=float, default=50.0, help="w_max, the consistency weight after ramp-up")
    p.add_argument("--ramp-up", type=float, default=0.4, help="ramp-up length as a fraction of --total-steps")
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


def sigmoid_rampup(step, length):
    """exp(-5 (1 - T)^2) with T = step / length clipped to [0, 1]: the sigmoid ramp-up."""
    t = min(step / length, 1.0) if length > 0 else 1.0
    return math.exp(-5.0 * (1.0 - t) ** 2)


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """ema = decay * ema + (1 - decay) * model for parameters: paper Eq. (2). The teacher's BatchNorm
    buffers are its own, kept by its train-mode forwards."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)


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
    ema_model = copy.deepcopy(model).requires_grad_(False)  # the teacher, and the evaluated model (train mode: own BN statistics)
    train_model = torch.compile(model) if args.compile else model
    train_model = torch.nn.parallel.DistributedDataParallel(train_model) if world > 1 else train_model  # DISTRIBUTED: averages gradients
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=args.momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: math.cos(7 * math.pi * k / (16 * args.total_steps)))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")

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
        # ALGO LOGIC: student on [labeled, unlabeled], teacher on its own view of the unlabeled batch
        _, x_l, y_l = common.sample_batch(args.batch_size, data.x_labeled, data.y_labeled)
        _, x_u = common.sample_batch(args.mu * args.batch_size, data.x_unlabeled)
        with autocast:
            logits = train_model(prep(common.weak_augment(torch.cat([x_l, x_u]), flip=info.flip))).float()
            with torch.no_grad():  # the target: no gradient into the teacher
                logits_u_teacher = ema_model(prep(common.weak_augment(x_u, flip=info.flip))).float()
        logits_l, logits_u = logits.split([len(x_l), len(x_u)])
        loss_x = F.cross_entropy(logits_l, y_l)  # supervised term
        loss_u = F.mse_loss(logits_u.softmax(1), logits_u_teacher.softmax(1))  # paper Eq. (1)
        w = args.unsup_weight * sigmoid_rampup(step, args.ramp_up * args.total_steps)  # sigmoid ramp-up
        loss = loss_x + w * loss_u
        stats = {"losses/total": loss, "losses/sup": loss_x, "losses/unsup": loss_u, "train/unsup_weight": torch.full_like(loss, w)}

        # TRY NOT TO MODIFY: optimizer step, EMA, device-side metric sums (no host sync)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ema_update(ema_model, model, min(args.ema_decay, (1 + step) / (10 + step)))  # paper Eq. (2)
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
