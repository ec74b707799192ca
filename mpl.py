"""Meta Pseudo Labels (Pham, Dai, Xie, Luong & Le, "Meta Pseudo Labels", CVPR 2021): a teacher makes
the student's pseudo labels and learns from how much they helped the student on labeled data.

Each step draws a labeled batch {(x_b, y_b)} of size B and an unlabeled batch {u_i} of size mu*B
(the unlabeled set is the whole training set). a(.) is the weak augmentation (crop, flip), A(.) the
strong one (weak + RandAugment + Cutout); T and S are two WideResNets, the teacher and the student,
z_T, z_S their logits; CE_e is the cross-entropy against labels smoothed by e (e = 0.15), CE the plain
one. The equation numbers are this file's (the paper's numbering was not checked). The teacher, on ONE forward of [a(x), a(u), A(u)]:
    L_T_sup = 1/B sum_b CE_e(y_b, z_T(a(x_b)))                                         (1)
    q_i = softmax(z_T(a(u_i)) / tau) a constant,  m_i = 1[max_c q_ic >= beta]
    L_T_uda = 1/(mu B) sum_i m_i CE(q_i, softmax(z_T(A(u_i))))                         (2)
    yhat_i = argmax_c z_T(a(u_i)) = argmax_c q_i  (hard, no gradient)                 (3)
The student, on ONE forward of [a(x), A(u)], takes one optimizer step theta_S -> theta_S' on
    L_S = 1/(mu B) sum_i CE_e(yhat_i, z_S(A(u_i)))     (no labeled term)               (4)
and is measured on the labeled batch before and after that step (the same augmented images):
    CE_old = CE(y, z_S(a(x); theta_S)),  CE_new = CE(y, z_S(a(x); theta_S'))           (5)
    h_raw = CE_old - CE_new,  b <- d b + (1 - d) h_raw  (b_0 = 0),  h = h_raw - b       (6)
    L_T_mpl = h * 1/(mu B) sum_i CE(yhat_i, z_T(a(u_i)))   h a constant                (7)
    L_T = L_T_sup + w_k L_T_uda + L_T_mpl,  w_k = lambda_u min(1, k / K_uda)           (8)
Why (6)-(7), and why this sign. The teacher should minimise E_{yhat ~ T}[CE_l(theta_S'(yhat))], the
student's labeled loss after learning from yhat. By the score function, for any c that does not
depend on yhat, grad_T E[CE_l(theta_S')] = E[(CE_l(theta_S') - c) grad_T log p_T(yhat)]; with
c = CE_old and grad_T log p_T(yhat) = -grad_T CE(yhat, z_T) this is E[(CE_old - CE_new) grad_T
CE(yhat, z_T)] = E[h grad_T CE(yhat, z_T)]. To first order (Taylor around theta_S), CE_new =
CE_old - eta_S grad CE_l . grad L_S, so h = eta_S grad CE_l . grad L_S: the paper's dot product.
Descending h * CE(yhat, z_T) therefore descends the teacher's objective: h > 0 (the pseudo labels
lowered the student's labeled loss) makes them MORE likely, h < 0 less. The moving baseline b (the
official code's) is a second control variate, meant to lower the variance; with it, h > 0 means
"helped more than lately". yhat is the argmax, not a sample of p_T (see the choices below).

Recipe (kekmodel/MPL-pytorch's CIFAR-10-4K command, 96.01 % without finetuning, 96.08 % with, 96.11 %
in the paper): WRN-28-2 teacher and student with dropout 0.2 before the classifier, SGD momentum 0.9
nesterov, lr 0.05 for both, weight decay 5e-4, B = 128, mu = 7, K = 300k steps, e = 0.15,
tau = 0.7, beta = 0.6, lambda_u = 8, K_uda = 5000, d = 0.99, EMA of the student 0.995 (evaluated).
Learning rates: linear warm-up over 5000 steps, then cosine 0.5 (1 + cos(pi p)) down to 0 over the
remaining steps (p from 0 to 1); the student waits 3000 steps at lr 0 before its warm-up. Optional
finetuning afterwards (kekmodel; C10-4K: 625 epochs of batch 512 at lr 3e-5 = 5000 steps of 4000
labels): --finetune-steps N adds steps K+1..K+N in which the student starts from the EMA student's
weights and learns CE_e(y, z_S(a(x))) on labeled batches of --finetune-batch-size with a fresh SGD
(nesterov, momentum 0.9, weight decay 0, constant --finetune-lr, dropout off); the teacher is idle.
Short runs (a few thousand steps): lambda_u 8 over a ramp much shorter than 5000 steps is live before
the teacher has learned from its labels, and it then learns to agree with its own guesses (digits, 500
steps: labeled CE at chance, student 13 %); use --uda-weight 1 (the script prints a note otherwise).

Choices, where the references differ or are silent (kekmodel = kekmodel/MPL-pytorch, the official
code = google-research/google-research meta_pseudo_labels):
    - Sign of h: CE_old - CE_new, as derived above. kekmodel uses CE_new - CE_old (its own comment
      calls old - new the "theoretically correct formula", kekmodel issue #6). The official code
      computes new - old too, but its MPL term is CE(stop_gradient(softmax(z)), z) of the SAME
      logits z, whose gradient is zero (google-research issues #534, #541): there the teacher never
      learns from the student at all.
    - One pseudo label yhat for the student's loss (4) and the MPL term (7), as the derivation
      needs, and (7) scores it on the logits that produced it. yhat is the argmax of the teacher's
      WEAK-view prediction q (kekmodel's student label): measured on digits (bench, 50 labels), the
      strong-view argmax was right 67 % of the time where the weak-view one was right 88 %, and
      students trained on the strong-view labels learned far less. kekmodel's MPL term scores
      the argmax of the strong-view logits instead: a second label. The official code trains the
      student on the soft softmax of the strong-view logits; we keep the paper's hard label, the
      argmax rather than a sample. Consequence for (7): its gradient reaches the teacher through
      the weak view, the strong view through the UDA term (2).
    - The mask m_i is taken on the SHARPENED target q, as both MPL codes do (uda.py and UDA's own
      code take it on the unsharpened probabilities); averaged over all mu*B samples.
    - Label smoothing e in (1) and in the student's loss (4), as both references; not in CE_old and
      CE_new (the labeled loss the teacher targets), nor in (7), the score of the label drawn.
    - CE_new comes from a no-grad forward of the same augmented labeled images through the updated
      student in train mode, as both references: its BatchNorm batch is the B labeled images alone
      (CE_old's is [a(x), A(u)]) and its dropout mask is another, so h has a systematic offset and
      extra noise; the moving baseline absorbs the offset. This forward also moves the student's
      BatchNorm running statistics, as in both references.
    - Baseline as the official code (moving_dot_product): decay 0.99, starting at 0, updated
      before it is subtracted; --baseline-decay 1 turns it off (kekmodel has it commented out).
    - Schedules: kekmodel's cosine (num_cycles 0.5), not the template's cos(7 pi k / 16 K). The
      student's warm-up rises from 0 after the wait, lr (k - wait + 1) / warmup at 0-based step k,
      as the official code; kekmodel's k / (wait + warmup) jumps from 0 to 3/8 of the lr when the
      wait ends. The UDA weight ramps with the 1-based step k (kekmodel's step + 1; the official
      code uses the 0-based step).
    - Weight decay on conv/linear weights only for both networks (kekmodel excludes only names
      containing "bn", so its biases decay); 1e-3 on CIFAR-100 as the template (kekmodel's CIFAR-100
      command uses 5e-4). No gradient clipping (kekmodel's default bound 1e9 never clips). The
      strong view is common.strong_augment (3 ops, random magnitudes, Cutout), not RandAugment(2, 16).
    - Finetuning starts from the EMA student at the end of the MPL phase; kekmodel starts from the
      best EMA checkpoint, chosen on the test set, and reads the labeled set in order, unshuffled;
      we draw batches with replacement. During finetuning the evaluated model is the finetuned
      student itself (as kekmodel): ema_model is kept equal to it (decay 0), so eval/acc equals
      eval/acc_raw there. Under fp16 it shares the student's GradScaler.
    - train/lr is the student's lr of the MPL phase (train/lr_teacher the teacher's); finetuning
      rows log train/lr_finetune. Evaluation rows add eval/acc_teacher. The MPL phase's last step
      always logs and evaluates, so no log row mixes the two phases.
    - Batches are drawn uniformly with replacement from the device-resident set each step
      (common.sample_batch), not by epochs: no host sync, and resuming needs only the RNG state.
    - EMA decay min(ema_decay, (1 + k) / (10 + k)) at step k (TensorFlow's ExponentialMovingAverage
      with num_updates, as the official MPL code): early on the EMA averages about the last 10 % of
      the steps, so a short run evaluates a model as good as its recent weights; the decay reaches
      0.99 at k = 890 and 0.999 at k = 8990. TorchSSL's constant 0.999 stays near the random init
      for thousands of steps; the plain average since init (1 - 1/(k+1)) lags just as far, and its
      weights no longer match the BatchNorm statistics copied from the trained model. Parameters
      are averaged, BatchNorm running statistics copied (an EMA whose BN stays at init is broken).
    - Mixed precision: bf16 autocast by default on CUDA (no GradScaler needed), fp16 with a
      GradScaler on request (one per network), fp32 on CPU by default. Losses are computed in fp32.
    - A run is resumable from any kill: checkpoints are written atomically, the log rows written
      after the last checkpoint are dropped on resume, and the RNG states travel in the checkpoint.
    - Under torchrun (README, Multi-GPU): DDP averages the gradients, --batch-size is per process, every
      rank draws its own batches (seed + rank), log rows average all ranks, rank 0 alone writes.
      MPL: teacher and student are both DDP-wrapped; CE_old and CE_new are averaged over the ranks
      before Eq. (6), so h and the baseline are one number on every rank and the averaged teacher
      gradient is h times the gradient of the MPL term over the global batch.

Usage:
    python mpl.py --dataset cifar10 --num-labels 4000
    python mpl.py --dataset cifar10 --num-labels 4000 --finetune-steps 5000  # then finetune the student
    python mpl.py --resume runs/<run dir>                                     # continue exactly where it stopped
    torchrun --nproc_per_node=4 mpl.py --batch-size 16                        # 4 GPUs, global labeled batch 4 x 16 = 64
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
    p.add_argument("--total-steps", type=int, default=300000, help="optimizer steps K of the MPL phase (finetuning steps come after)")
    p.add_argument("--eval-every", type=int, default=5000, help="evaluate every this many steps")
    p.add_argument("--log-every", type=int, default=100, help="log training metrics every this many steps")
    p.add_argument("--save-every", type=int, default=5000, help="checkpoint every this many steps (the last step always saves)")
    p.add_argument("--batch-size", type=int, default=128, help="labeled batch size B")
    p.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * B")
    p.add_argument("--lr", type=float, default=0.05, help="the student's peak learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4, 1e-3 on cifar100")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD (nesterov) momentum")
    p.add_argument("--ema-decay", type=float, default=0.995, help="decay of the evaluated EMA model (of the student)")
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
    p.add_argument("--teacher-lr", type=float, default=0.05, help="the teacher's peak learning rate")
    p.add_argument("--dropout", type=float, default=0.2, help="dropout before the classifier of both networks")
    p.add_argument("--label-smoothing", type=float, default=0.15, help="e: label smoothing of the teacher's labeled CE, the student's loss and finetuning")
    p.add_argument("--temperature", type=float, default=0.7, help="tau: the teacher's UDA target is softmax(weak-view logits / tau)")
    p.add_argument("--threshold", type=float, default=0.6, help="beta: UDA keeps samples whose sharpened target has max prob >= beta")
    p.add_argument("--uda-weight", type=float, default=8.0,
                   help="lambda_u, the weight of the teacher's UDA term after its ramp; 8 (the reference) suits runs of "
                        "100k+ steps: with a ramp much shorter than 5000 steps use 1")
    p.add_argument("--uda-steps", type=int, default=5000, help="K_uda: steps over which the UDA weight ramps up linearly")
    p.add_argument("--warmup-steps", type=int, default=5000, help="linear lr warm-up of both networks, in steps")
    p.add_argument("--student-wait-steps", type=int, default=3000, help="steps at lr 0 for the student before its warm-up")
    p.add_argument("--baseline-decay", type=float, default=0.99, help="d: decay of the moving baseline subtracted from h (1 = no baseline)")
    p.add_argument("--finetune-steps", type=int, default=0, help="finetuning steps of the student on labeled data after the MPL phase (0 = none)")
    p.add_argument("--finetune-batch-size", type=int, default=512, help="labeled batch size while finetuning")
    p.add_argument("--finetune-lr", type=float, default=3e-5, help="constant learning rate while finetuning")
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
    for name in ("uda_steps", "warmup_steps", "student_wait_steps", "finetune_steps", "teacher_lr", "uda_weight", "finetune_lr"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be non-negative, got {getattr(args, name)}")
    for name in ("label_smoothing", "threshold", "baseline_decay", "ema_decay"):
        if not 0 <= getattr(args, name) <= 1:
            fail(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    if not 0 <= args.dropout < 1:
        fail(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.temperature <= 0:
        fail(f"--temperature must be positive, got {args.temperature}")
    if args.finetune_batch_size <= 0:
        fail(f"--finetune-batch-size must be positive, got {args.finetune_batch_size}")
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


def warmup_cosine(k, total_steps, warmup_steps, wait_steps=0):
    """lr multiplier at 0-based step k: 0 for the first wait_steps steps, then a linear warm-up to 1
    over warmup_steps, then 0.5 (1 + cos(pi p)) with p going from 0 to 1 over the remaining steps."""
    k = k - wait_steps
    if k < 0:
        return 0.0
    if k < warmup_steps:
        return (k + 1) / warmup_steps
    p = (k - warmup_steps) / max(1, total_steps - wait_steps - warmup_steps)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * p)))


def mpl_signal(ce_old, ce_new, baseline, decay):
    """Eq. (6): h_raw = CE_old - CE_new (> 0 when the pseudo labels lowered the student's labeled
    loss), the baseline updated first, b' = decay b + (1 - decay) h_raw, then h = h_raw - b'. Tensors
    in, tensors out (no host sync); h is a constant for the teacher. Returns (h, b')."""
    h_raw = (ce_old - ce_new).detach()
    baseline = decay * baseline + (1 - decay) * h_raw
    return h_raw - baseline, baseline


def mpl_term(h, teacher_logits, pseudo_label):
    """Eq. (7): h * CE(yhat, z_T). Its gradient h * grad CE makes yhat more likely for the teacher
    when h > 0 and less likely when h < 0."""
    return h.detach() * F.cross_entropy(teacher_logits, pseudo_label)


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
    if ckpt is not None and not args.eval_only and ckpt["step"] > args.total_steps + args.finetune_steps:
        fail(f"--resume {run_dir}: --total-steps {args.total_steps} plus --finetune-steps {args.finetune_steps} is below "
             f"the checkpoint's step {ckpt['step']}")
    if ckpt is not None and not args.eval_only and ckpt["step"] == args.total_steps + args.finetune_steps:
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
    model = common.WideResNet(info.num_classes, args.depth, args.width, info.channels, args.bn_momentum, fc_dropout=args.dropout)  # the student
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if args.sync_bn else model  # DISTRIBUTED: BatchNorm over all ranks
    model = model.to(device, memory_format=torch.channels_last)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()  # the evaluated model
    train_model = torch.compile(model) if args.compile else model
    train_model = torch.nn.parallel.DistributedDataParallel(train_model) if world > 1 else train_model  # DISTRIBUTED: averages gradients
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=args.lr, momentum=args.momentum, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: warmup_cosine(k, args.total_steps, args.warmup_steps, args.student_wait_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    # the teacher: its own network, optimizer, schedule (no wait) and scaler; the finetuning optimizer; the baseline b
    teacher = common.WideResNet(info.num_classes, args.depth, args.width, info.channels, args.bn_momentum, fc_dropout=args.dropout)
    teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher) if args.sync_bn else teacher  # DISTRIBUTED
    teacher = teacher.to(device, memory_format=torch.channels_last).train()
    train_teacher = torch.compile(teacher) if args.compile else teacher
    train_teacher = torch.nn.parallel.DistributedDataParallel(train_teacher) if world > 1 else train_teacher  # DISTRIBUTED: averages its gradients
    teacher_optimizer = torch.optim.SGD([{"params": [p for p in teacher.parameters() if p.ndim > 1], "weight_decay": args.weight_decay},
                                         {"params": [p for p in teacher.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                                        lr=args.teacher_lr, momentum=args.momentum, nesterov=True)
    teacher_scheduler = torch.optim.lr_scheduler.LambdaLR(teacher_optimizer, lambda k: warmup_cosine(k, args.total_steps, args.warmup_steps))
    teacher_scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
    finetune_optimizer = torch.optim.SGD(model.parameters(), lr=args.finetune_lr, momentum=args.momentum, nesterov=True, weight_decay=0.0)
    mpl_baseline = torch.zeros((), device=device)  # b of Eq. (6)

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
            teacher.load_state_dict(ckpt["teacher"])
            teacher_optimizer.load_state_dict(ckpt["teacher_optimizer"])
            teacher_scheduler.load_state_dict(ckpt["teacher_scheduler"])
            teacher_scaler.load_state_dict(ckpt["teacher_scaler"])
            finetune_optimizer.load_state_dict(ckpt["finetune_optimizer"])
            mpl_baseline = ckpt["mpl_baseline"].to(device)
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
    if args.uda_weight > 1 and args.uda_steps < 5000:  # the reference's weight 8 assumes a teacher that already learned
        print(f"note: the teacher's UDA weight reaches {args.uda_weight:g} after {args.uda_steps} steps (the reference: "
              "8 after 5000 of 300k); before the teacher has learned from its labels, a weight above 1 trains it "
              "to agree with its own guesses: short runs need --uda-weight 1 (README)")
    model.train()
    t_last, step_last = time.perf_counter(), start_step
    end = args.total_steps + args.finetune_steps  # the MPL phase, then the finetuning phase
    for step in range(start_step + 1, end + 1):
        # ALGO LOGIC: the teacher labels, the student learns, the teacher learns from the student's change (or finetuning)
        finetuning = step > args.total_steps
        _, x_l, y_l = common.sample_batch(args.finetune_batch_size if finetuning else args.batch_size, data.x_labeled, data.y_labeled)
        if finetuning:  # the student alone on labeled data, from the EMA student's weights, with a fresh optimizer
            if step == args.total_steps + 1:
                model.load_state_dict(ema_model.state_dict())
            model.fc_dropout = 0.0  # as kekmodel's finetuning
            with autocast:
                logits_l = train_model(prep(common.weak_augment(x_l, flip=info.flip))).float()
            loss = F.cross_entropy(logits_l, y_l, label_smoothing=args.label_smoothing)
            finetune_optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(finetune_optimizer)
            scaler.update()
            stats = {"losses/total": loss, "losses/finetune": loss, "train/lr_finetune": torch.full_like(loss, args.finetune_lr)}
        else:
            _, x_u, y_u = common.sample_batch(args.mu * args.batch_size, data.x_unlabeled, data.y_unlabeled)  # y_u: logging only
            x_lw, x_uw = common.weak_augment(torch.cat([x_l, x_u]), flip=info.flip).split([len(x_l), len(x_u)])
            x_us = common.strong_augment(x_u, flip=info.flip)
            # the teacher: one forward of [a(x), a(u), A(u)]
            with autocast:
                t_logits = train_teacher(prep(torch.cat([x_lw, x_uw, x_us]))).float()  # (B + 2 mu B, C)
            t_logits_l, t_logits_uw, t_logits_us = t_logits.split([len(x_l), len(x_u), len(x_u)])
            loss_t_sup = F.cross_entropy(t_logits_l, y_l, label_smoothing=args.label_smoothing)  # Eq. (1)
            q = (t_logits_uw.detach() / args.temperature).softmax(1)  # sharpened target, a constant
            mask = (q.max(1).values >= args.threshold).float()  # on the sharpened target, as both MPL codes
            loss_t_uda = (F.cross_entropy(t_logits_us, q, reduction="none") * mask).mean()  # Eq. (2): over all mu B
            w_u = args.uda_weight * (min(1.0, step / args.uda_steps) if args.uda_steps > 0 else 1.0)
            y_hat = t_logits_uw.detach().argmax(1)  # Eq. (3): the one pseudo label of the student and of the MPL term
            # the student: one forward of [a(x), A(u)], one step on the pseudo labels alone
            with autocast:
                s_logits = train_model(prep(torch.cat([x_lw, x_us]))).float()  # (B + mu B, C)
            s_logits_l, s_logits_us = s_logits.split([len(x_l), len(x_u)])
            ce_old = F.cross_entropy(s_logits_l.detach(), y_l)  # Eq. (5), before the step
            loss_s = F.cross_entropy(s_logits_us, y_hat, label_smoothing=args.label_smoothing)  # Eq. (4)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss_s).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            with torch.no_grad(), autocast:  # the same labeled images through the updated student, in train mode
                s_logits_l_new = train_model(prep(x_lw)).float()
            ce_new = F.cross_entropy(s_logits_l_new, y_l)  # Eq. (5), after the step
            if world > 1:  # DISTRIBUTED: CE_old, CE_new over every rank's labeled batch: one h and one baseline on all ranks
                dist.all_reduce(ce := torch.stack([ce_old, ce_new]))
                ce_old, ce_new = ce / world
            # the teacher's step: its own losses plus the student's feedback h
            h, mpl_baseline = mpl_signal(ce_old, ce_new, mpl_baseline, args.baseline_decay)  # Eq. (6)
            loss_t_mpl = mpl_term(h, t_logits_uw, y_hat)  # Eq. (7): the label's score on the logits that produced it
            loss_t = loss_t_sup + w_u * loss_t_uda + loss_t_mpl  # Eq. (8)
            teacher_optimizer.zero_grad(set_to_none=True)
            teacher_scaler.scale(loss_t).backward()
            teacher_scaler.step(teacher_optimizer)
            teacher_scaler.update()
            teacher_scheduler.step()
            loss = loss_s
            known = (y_u >= 0).float()  # unlabeled samples whose label is known (for logging only)
            stats = {"losses/total": loss, "losses/student": loss_s, "losses/teacher": loss_t, "losses/teacher_sup": loss_t_sup,
                     "losses/teacher_uda": loss_t_uda, "losses/teacher_mpl": loss_t_mpl, "train/mpl_h": h,
                     "train/mpl_baseline": mpl_baseline, "train/ce_old": ce_old, "train/ce_new": ce_new, "train/mask_ratio": mask.mean(),
                     "train/pseudo_acc": ((y_hat == y_u) * known).sum() / known.sum().clamp(min=1),
                     "train/uda_weight": torch.full_like(loss, w_u), "train/lr_teacher": torch.full_like(loss, teacher_scheduler.get_last_lr()[0])}

        # TRY NOT TO MODIFY: EMA (the finetuned student itself while finetuning), device-side metric sums (no host sync)
        ema_update(ema_model, model, min(args.ema_decay, (1 + step) / (10 + step)) if not finetuning else 0.0)
        for k, v in stats.items():
            running[k] = running.get(k, 0) + v.detach().float()
        n_running += 1

        # TRY NOT TO MODIFY: log, evaluate, checkpoint
        last = step == end
        phase_end = step == args.total_steps  # the MPL phase's result, before any finetuning
        if step % args.log_every == 0 or last or phase_end:
            sums = torch.stack(list(running.values()))
            if world > 1:  # DISTRIBUTED: sums over all ranks, so a row is the mean over every rank's steps
                dist.all_reduce(sums)
            means = dict(zip(running, (sums / (world * n_running)).tolist()))  # the one host sync per log interval
            check_finite(step, means, run_dir)
            its = (step - step_last) / (time.perf_counter() - t_last)
            lr = scheduler.get_last_lr()[0]
            log({"step": step, **means, "train/lr": lr, "train/it_per_sec": its})
            running, n_running = {}, 0
            eta = time.strftime("%H:%M:%S", time.gmtime((end - step) / its))
            print(f"step {step:>7}/{end} | " + " ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in means.items())
                  + f" | lr {lr:.4g} | {its:.1f} it/s | eta {eta}", flush=True)
        if (step % args.eval_every == 0 or last or phase_end) and rank == 0:  # DISTRIBUTED: rank 0 evaluates, the others wait in the next collective
            acc, loss_eval = evaluate(ema_model, data.x_test, data.y_test, info, autocast)
            acc_raw, _ = evaluate(model, data.x_test, data.y_test, info, autocast)
            acc_teacher, _ = evaluate(teacher, data.x_test, data.y_test, info, autocast)
            best_acc = max(best_acc, acc)
            log({"step": step, "eval/acc": acc, "eval/loss": loss_eval, "eval/acc_raw": acc_raw, "eval/acc_teacher": acc_teacher,
                 "eval/best_acc": best_acc})
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
                                 "teacher": teacher.state_dict(), "teacher_optimizer": teacher_optimizer.state_dict(),
                                 "teacher_scheduler": teacher_scheduler.state_dict(), "teacher_scaler": teacher_scaler.state_dict(),
                                 "finetune_optimizer": finetune_optimizer.state_dict(), "mpl_baseline": mpl_baseline,
                                 "best_acc": best_acc, "running": running_ranks, "n_running": n_running, "rng_cpu": rng_cpu,
                                 "rng_cuda": rng_cuda, "script": METHOD, "data": sizes}, run_dir / "checkpoint.pt")
                save_checkpoint(inference_model(ema_model, args, info, step), run_dir / "model.pt")
        if step % args.log_every == 0 or step % args.eval_every == 0 or step % args.save_every == 0 or phase_end:
            t_last, step_last = time.perf_counter(), step  # it/s excludes evaluation and saving
    if writer:
        writer.close()
    if rank == 0:
        print(f"done: step {step} | eval acc {acc:.2f} (best {best_acc:.2f}) | "
              f"{time.strftime('%H:%M:%S', time.gmtime(time.perf_counter() - t_start))} | {run_dir}", flush=True)
    if world > 1:  # DISTRIBUTED: every rank done (rank 0 may still be saving) before the group goes
        dist.barrier()
        dist.destroy_process_group()
