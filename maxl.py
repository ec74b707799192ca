"""MAXL (Liu, Davison & Johns, "Self-Supervised Generalisation with Meta Auxiliary Learning", NeurIPS
2019): a label-generation network learns auxiliary labels for an auxiliary head, chosen so that
training on them makes the next step better on the primary task.

MAXL is NOT semi-supervised: it trains on labeled data only, by default on ALL training labels
(--num-labels unset). A --num-labels N restricts training to a class-balanced subset of N examples
(common.labeled_split, as in every script) and only those are used: the unlabeled stream is ignored.

Two networks. The multi-task network theta_1 (MAXLNet: the WideResNet trunk, its primary head fc
with C classes and an auxiliary head with C psi classes) and the label-generation network theta_2
(its own WideResNet, C psi outputs g(x)). Primary class c owns the psi auxiliary slots
c psi .. (c+1) psi - 1 (contiguous, as the reference lays them out). With a(.) the weak
augmentation, p = softmax(z) of logits z, and a labeled batch {(x_b, y_b)} of size B:
    y_aux(x, y) = softmax(g(x) + log M_y),  M_y,k = 1 if slot k belongs to class y, else 0       (1) mask softmax
    L(z, t) = 1/B sum_b - sum_k t_b,k (1 - p_b,k)^gamma log p_b,k                              (2) focal loss
          (t one-hot of y for the primary head, t = y_aux for the auxiliary head)
    L_1(theta_1) = L(f_pri(a(x); theta_1), y) + w_aux L(f_aux(a(x); theta_1), y_aux)           (3) multi-task net
    theta_1+ = theta_1 - alpha grad_theta_1 L_1(theta_1, theta_2)                               (4) look-ahead step
    L_2(theta_2) = L(f_pri(a(x); theta_1+), y) + lambda sum_k pbar_k log pbar_k,                (5) generator
          pbar = 1/B sum_b y_aux(x_b, y_b)  (the batch mean of the generated labels)
Step 1 minimises (3) over theta_1 with y_aux a constant. Step 2 minimises (5) over theta_2: its
first term depends on theta_2 only through the gradient in (4), so its gradient is second order
(autograd through grad(..., create_graph=True)). The second term is minus the entropy of pbar: it
keeps the generator from giving every sample of a class the same slot. train/aux_entropy logs
-sum_k pbar_k log pbar_k; its maximum is log(C psi) (log 100 = 4.61 for the CIFAR-100 superclasses
with psi 5, log 50 = 3.91 for 10 classes): a collapse shows as it falling well below.
The equation numbers are this file's (the paper's numbering was not checked); the formulas are those
of the paper's method section and of the authors' code (lorenmt/maxl, model_vgg_maxl.py).

Recipe:
    - Multi-task net: the template's recipe (supervised.py, METHODS.md section 0): WRN-28-2
      (WRN-28-8 on CIFAR-100), SGD nesterov momentum 0.9, lr 0.03, weight decay 5e-4 (1e-3 on
      CIFAR-100) without decay on BatchNorm and biases, cosine 7 pi / 16 over K = 2^20 steps, batch
      64, EMA 0.999 evaluated. The reference's VGG-16 recipe (SGD lr 0.01 without momentum or weight
      decay, halved every 50 epochs, batch 100, 200 epochs) does not carry over to a WideResNet.
    - Generator: a WideResNet of the same depth and width; SGD lr 1e-3, weight decay 5e-4 on every
      parameter, no momentum (the reference's gen_optimizer). Its lr follows the same cosine factor
      as the multi-task net's (the reference halves both lrs together every 50 epochs).
    - psi 5, gamma 2, w_aux 1, lambda 0.2 (reference); alpha = the multi-task optimizer's current lr
      (the reference's vgg_lr follows its schedule too).
    - CIFAR-100: the primary task is the 20 superclasses (the paper's setting): the fine labels of
      the training AND test sets are mapped with the standard fine-to-coarse table, so eval/acc is
      20-class top-1 accuracy. --primary fine trains on the 100 classes. --num-labels still draws
      per fine class (a multiple of 100), which is balanced over the superclasses too.

Choices, where the references differ or are silent:
    - Schedule: each optimizer step k does the meta step (5) on one batch, then step (3) on a
      freshly drawn batch (the template's update). The reference runs one pass of (3) over the
      epoch, then one pass of (5). Since the meta step comes first, alpha is exactly the lr with
      which step (3) of the same iteration moves theta_1.
    - y_aux in step (3) is computed without gradient. The reference's step-1 backward reaches the
      generator too, but it zeroes those gradients before the generator's update: the same update.
    - The generator always runs in train mode (batch statistics), as in the reference; it is never
      evaluated.
    - The meta step's forwards of theta_1 and theta_1+ use torch.func.functional_call with the
      parameters (or fast weights) and CLONES of the BatchNorm buffers, in train mode: batch
      statistics, and the model's running statistics are left as they were (the reference calls
      F.batch_norm with fresh zeros/ones as running statistics, the same effect).
    - (4) is a plain gradient step on every parameter of theta_1 (no momentum, no weight decay), as
      in the paper and the reference, although step (3) itself uses nesterov momentum and weight decay.
    - The exact second-order gradient by double backward, with the entropy term. The reference's
      other variant (model_vgg_maxl_firstorder.py) approximates the Hessian-vector product by finite
      differences (DARTS-style) and sets the generator's gradient to that product alone, which
      silently drops the entropy term; there is no such option here.
    - (1) is masked_fill(-inf) then softmax, in fp32: exactly zero mass outside the class's slots
      and finite for any logits. The reference's exp(x) * mask / sum(exp(x) * mask) overflows for
      logits above ~88 in fp32 and gives the other slots a weight of 1e-8.
    - (2) takes log p from log_softmax in fp32 (the reference: log(softmax + 1e-20)).
    - In (5), 0 log 0 = 0 with a finite gradient: the slots of a class absent from the batch have
      pbar exactly 0 (the reference adds 1e-20 inside the log; a bare log would give NaN gradients).
    - --aux-weight 0 is the "Single" baseline the paper compares with: no generator and no meta
      step at all (the checkpoint holds no generator), only the primary focal loss; the auxiliary
      head stays at its initial weights.
    - Mixed precision: forwards under autocast; (1), (2) and (5) in fp32. Under fp16 each optimizer
      has its own GradScaler; the inner gradient of (4) is taken of L_1 times the generator scaler's
      scale and divided back, so that its fp16 backward does not underflow; an overflow there makes
      the generator's gradient inf, and the scaler skips that step as usual.
    - --compile compiles the multi-task net's step-(3) forward; the meta step runs eagerly (double
      backward through functional_call).
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
      GradScaler on request, fp32 on CPU by default. Losses are computed in fp32.
    - A run is resumable from any kill: checkpoints are written atomically, the log rows written
      after the last checkpoint are dropped on resume, and the RNG states travel in the checkpoint.
    - Under torchrun (README, Multi-GPU): DDP averages the gradients, --batch-size is per process, every
      rank draws its own batches (seed + rank), log rows average all ranks, rank 0 alone writes.
      MAXL: both networks are DDP-wrapped; the look-ahead step (4) runs functional_call on the
      unwrapped, synchronised theta_1 with each rank's own inner gradient (its local batch), and
      DDP averages the generator's second-order gradients over the ranks.

Usage:
    python maxl.py --dataset cifar100                   # 20 superclasses, all training labels
    python maxl.py --dataset cifar100 --aux-weight 0    # the "Single" baseline
    python maxl.py --resume runs/<run dir>              # continue exactly where it stopped
    torchrun --nproc_per_node=4 maxl.py --batch-size 16  # 4 GPUs, global labeled batch 4 x 16 = 64
"""

import argparse
import contextlib
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
import torch.nn as nn
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
    p.add_argument("--num-labels", type=int, default=None, help="labeled examples, class-balanced; default: the whole training set")
    p.add_argument("--seed", type=int, default=0, help="seeds everything; the labeled split follows from it")
    p.add_argument("--total-steps", type=int, default=2**20, help="optimizer steps K")
    p.add_argument("--eval-every", type=int, default=5000, help="evaluate every this many steps")
    p.add_argument("--log-every", type=int, default=100, help="log training metrics every this many steps")
    p.add_argument("--save-every", type=int, default=5000, help="checkpoint every this many steps (the last step always saves)")
    p.add_argument("--batch-size", type=int, default=64, help="labeled batch size B")
    p.add_argument("--mu", type=int, default=7, help="unlabeled batch = mu * B (kept for a uniform CLI; unused here)")
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
    p.add_argument("--primary", choices=["coarse", "fine"], default=None, help="cifar100's primary task: the 20 superclasses (default) or the 100 classes")
    p.add_argument("--psi", type=int, default=5, help="psi: auxiliary classes per primary class")
    p.add_argument("--aux-weight", type=float, default=1.0, help="w_aux, the weight of the auxiliary loss; 0 = the Single baseline (no generator)")
    p.add_argument("--entropy-weight", type=float, default=0.2, help="lambda, the weight of the generator's entropy regulariser")
    p.add_argument("--focal-gamma", type=float, default=2.0, help="gamma, the focusing parameter of the focal loss (0: cross-entropy)")
    p.add_argument("--gen-lr", type=float, default=1e-3, help="label-generation network's learning rate (plain SGD, same cosine factor)")
    p.add_argument("--gen-weight-decay", type=float, default=5e-4, help="label-generation network's weight decay")
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
    args.primary = args.primary or ("coarse" if args.dataset == "cifar100" else "fine")
    for name in ("num_labels", "total_steps", "eval_every", "log_every", "save_every", "batch_size", "mu", "psi"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.primary == "coarse" and args.dataset != "cifar100":
        fail(f"--primary coarse needs --dataset cifar100 (its superclasses), got {args.dataset}")
    for name in ("aux_weight", "entropy_weight", "focal_gamma", "gen_lr", "gen_weight_decay"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
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


# CIFAR-100 fine class -> superclass (coarse label), the dataset's own table (its train/test files
# carry both labels; torchvision reads only the fine ones). Fine ids are the alphabetical class names.
CIFAR100_COARSE = [4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11,
                   6, 11, 5, 10, 7, 6, 13, 15, 3, 15, 0, 11, 1, 10, 12, 14, 16, 9, 11, 5,
                   5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
                   10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13,
                   16, 19, 2, 4, 6, 19, 5, 5, 8, 19, 18, 1, 2, 15, 6, 0, 17, 8, 14, 13]


class MAXLNet(common.WideResNet):
    """The multi-task network theta_1: the WideResNet (primary head fc) plus a linear auxiliary head on
    the pooled features. model(x) gives the primary logits (evaluation, EMA); model(x, aux=True) gives
    (primary, auxiliary) logits, so torch.func.functional_call reaches both."""

    def __init__(self, num_classes, psi, depth, width, in_channels, bn_momentum):
        super().__init__(num_classes, depth, width, in_channels, bn_momentum)
        self.aux_head = nn.Linear(self.num_features, num_classes * psi)
        nn.init.xavier_normal_(self.aux_head.weight)  # as the WideResNet's fc
        nn.init.zeros_(self.aux_head.bias)

    def forward(self, x, aux=False):
        f = self.features(x)  # (N, num_features)
        return (self.fc(f), self.aux_head(f)) if aux else self.fc(f)


def fp32(t):
    """t in at least fp32 (float64 stays float64): the exp/log math of the losses never runs in 16 bits."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def slot_mask(num_classes, psi):
    """(C, C psi) bool: row c is True on class c's psi auxiliary slots c psi .. (c+1) psi - 1."""
    return torch.arange(num_classes * psi).div(psi, rounding_mode="floor") == torch.arange(num_classes)[:, None]


def mask_softmax(logits, y, slots):
    """Eq. (1): the generated auxiliary distribution, softmax over the slots of each sample's primary
    class y only, in fp32: exactly 0 elsewhere, finite for any finite logits."""
    return fp32(logits).masked_fill(~slots[y], float("-inf")).softmax(1)  # (N, C psi)


def focal_loss(logits, target, gamma):
    """Eq. (2): 1/N sum_n -sum_k t_nk (1 - p_nk)^gamma log p_nk, p = softmax(logits), in fp32; target
    is a distribution per row (one-hot or generated). gamma = 0 gives the cross-entropy."""
    log_p = fp32(logits).log_softmax(1)
    return -(target * (1 - log_p.exp()).pow(gamma) * log_p).sum(1).mean()


def entropy_reg(y_aux):
    """The regulariser of Eq. (5): sum_k pbar_k log pbar_k (minus the entropy of the batch-mean
    distribution pbar), with 0 log 0 = 0 and a finite gradient where pbar_k = 0."""
    pbar = y_aux.mean(0)  # (C psi,)
    return (pbar * pbar.clamp(min=torch.finfo(pbar.dtype).tiny).log()).sum()


def functional_forward(model, params, x, aux):
    """model(x, aux) with `params` in place of its parameters and clones of its buffers: train-mode
    BatchNorm normalises with batch statistics and updates the clones, never the model's buffers."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    return torch.func.functional_call(model, {**params, **buffers}, (x,), {"aux": aux})


def meta_loss(model, generator, x, y, slots, alpha, aux_weight, entropy_weight, gamma,
              autocast=contextlib.nullcontext(), scale=1.0):
    """Eq. (5) on the batch (x, y) (x already augmented and normalised) at the current theta_1:
    returns (L_2, primary focal loss at theta_1+, entropy regulariser). The graph reaches the
    generator through y_aux and through the inner gradient (create_graph): backward on L_2 gives the
    second-order gradient. `scale` multiplies L_1 for its gradient and is divided back (fp16)."""
    params = dict(model.named_parameters())
    with autocast:
        y_aux = mask_softmax(generator(x), y, slots)  # Eq. (1), with gradient into theta_2
        pri, aux = functional_forward(model, params, x, True)
    target = F.one_hot(y, pri.shape[1]).float()
    loss_1 = focal_loss(pri, target, gamma) + aux_weight * focal_loss(aux, y_aux, gamma)  # Eq. (3) at theta_1
    grads = torch.autograd.grad(loss_1 * scale, list(params.values()), create_graph=True)
    fast = {name: p - alpha * (g / scale) for (name, p), g in zip(params.items(), grads)}  # Eq. (4): theta_1+
    with autocast:
        pri_plus = functional_forward(model, fast, x, False)
    loss_pri_plus = focal_loss(pri_plus, target, gamma)  # Eq. (5), first term
    reg = entropy_reg(y_aux)  # Eq. (5), second term
    return loss_pri_plus + entropy_weight * reg, loss_pri_plus, reg


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
    num_classes = info.num_classes  # of the primary task
    if args.primary == "coarse":  # CIFAR-100's superclasses, for training and evaluation alike
        coarse = torch.tensor(CIFAR100_COARSE, device=device)
        data.y_labeled, data.y_test, num_classes = coarse[data.y_labeled], coarse[data.y_test], 20
    autocast = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16, enabled=args.amp != "none")
    prep = lambda x: common.normalize(x, info).contiguous(memory_format=torch.channels_last)  # uint8 -> network input

    # TRY NOT TO MODIFY: model, EMA, optimizer (no weight decay on BatchNorm and biases), schedule
    model = MAXLNet(num_classes, args.psi, args.depth, args.width, info.channels, args.bn_momentum)
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
    generator, meta_parts = None, {}  # --aux-weight 0 (Single): no generator and no meta step
    if args.aux_weight > 0:  # the label-generation network theta_2, its plain SGD, schedule and scaler
        generator = common.WideResNet(num_classes * args.psi, args.depth, args.width, info.channels, args.bn_momentum)
        generator = torch.nn.SyncBatchNorm.convert_sync_batchnorm(generator) if args.sync_bn else generator  # DISTRIBUTED
        generator = generator.to(device, memory_format=torch.channels_last).train()
        train_generator = torch.nn.parallel.DistributedDataParallel(generator) if world > 1 else generator  # DISTRIBUTED: averages its gradients
        gen_optimizer = torch.optim.SGD(generator.parameters(), lr=args.gen_lr, weight_decay=args.gen_weight_decay)
        gen_scheduler = torch.optim.lr_scheduler.LambdaLR(gen_optimizer, lambda k: math.cos(7 * math.pi * k / (16 * args.total_steps)))
        gen_scaler = torch.amp.GradScaler(device.type, enabled=args.amp == "fp16")
        meta_parts = {"generator": generator, "gen_optimizer": gen_optimizer, "gen_scheduler": gen_scheduler, "gen_scaler": gen_scaler}
    slots = slot_mask(num_classes, args.psi).to(device)  # (C, C psi), built once

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
            for name, part in meta_parts.items():
                part.load_state_dict(ckpt[name])
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
        # ALGO LOGIC: the generator's meta step (5) on one batch, then the multi-task loss (3) on another
        _, x_l, y_l = common.sample_batch(args.batch_size, data.x_labeled, data.y_labeled)
        x_l = prep(common.weak_augment(x_l, flip=info.flip))
        if generator is None:  # Single: the primary task alone
            with autocast:
                logits_l = train_model(x_l).float()
            loss = loss_pri = focal_loss(logits_l, F.one_hot(y_l, num_classes).float(), args.focal_gamma)  # Eq. (2)
            stats = {"losses/total": loss, "losses/primary": loss_pri}
        else:
            # the generator's meta step on a batch of its own, at the current theta_1
            _, x_m, y_m = common.sample_batch(args.batch_size, data.x_labeled, data.y_labeled)
            x_m = prep(common.weak_augment(x_m, flip=info.flip))
            alpha = scheduler.get_last_lr()[0]  # Eq. (4): the lr with which this step moves theta_1
            loss_meta, loss_pri_plus, reg = meta_loss(model, train_generator, x_m, y_m, slots, alpha, args.aux_weight, args.entropy_weight,
                                                      args.focal_gamma, autocast, gen_scaler.scale(torch.ones((), device=device)))  # Eq. (5)
            gen_optimizer.zero_grad(set_to_none=True)
            gen_scaler.scale(loss_meta).backward(inputs=list(generator.parameters()))  # second order; theta_1 gets no gradient
            gen_scaler.step(gen_optimizer)
            gen_scaler.update()
            gen_scheduler.step()
            # the multi-task loss, the updated generator's labels as constant targets
            with autocast:
                logits_l, logits_aux = (t.float() for t in train_model(x_l, aux=True))
                with torch.no_grad():
                    y_aux = mask_softmax(generator(x_l), y_l, slots)  # Eq. (1)
            loss_pri = focal_loss(logits_l, F.one_hot(y_l, num_classes).float(), args.focal_gamma)  # Eq. (2), primary
            loss_aux = focal_loss(logits_aux, y_aux, args.focal_gamma)  # Eq. (2), auxiliary
            loss = loss_pri + args.aux_weight * loss_aux  # Eq. (3)
            stats = {"losses/total": loss, "losses/primary": loss_pri, "losses/aux": loss_aux, "losses/meta": loss_pri_plus,
                     "losses/entropy_reg": reg, "train/aux_entropy": -reg}

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
                                 **{name: part.state_dict() for name, part in meta_parts.items()},
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
