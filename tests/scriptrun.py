"""Running the method scripts in tests: as a subprocess (as a user runs them) or in-process (to look at
the trained objects afterwards), on a tiny network and fake Fashion-MNIST (no md5 to patch)."""

import builtins
import contextlib
import errno
import json
import os
import runpy
import signal
import subprocess
import sys
import time
import traceback
import types
from fcntl import LOCK_EX, LOCK_NB, flock  # unpatched: held()'s lock is not one that as_its_own_process lets go
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from scripts import (
    as_its_own_process,
    flat,  # noqa: F401  (the tests import it from here)
)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import common

ROOT = Path(__file__).resolve().parent.parent
TINY = (  # a tiny network on fake Fashion-MNIST, on the CPU
    "--dataset fashion_mnist --num-labels 20 --depth 10 --width 1 --batch-size 8 --bn-momentum 0.1 "
    "--device cpu --log-every 4 --eval-every 6 --save-every 5"
).split()
OFFLINE = {**os.environ, "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # downloads fail fast


def run(script, *args, check=True):
    """The script in a fresh interpreter; returns the CompletedProcess."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=OFFLINE,
        timeout=300,
    )
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_killed(script, *args):
    """The script in a fresh interpreter, killed with SIGKILL as soon as its first checkpoint.pt
    appears in --run-dir (args must contain it); returns the step that checkpoint holds."""
    run_dir = Path(args[list(args).index("--run-dir") + 1])
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / script), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
        env=OFFLINE,
    )
    while not (run_dir / "checkpoint.pt").exists() and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return checkpoint(run_dir)["step"]


@contextlib.contextmanager
def held(run_dir):
    """The run dir held as a running run holds it (an flock on the dir), here by this process until the block ends."""
    fd = os.open(run_dir, os.O_RDONLY)
    try:
        flock(fd, LOCK_EX | LOCK_NB)
        yield
    finally:
        os.close(fd)


def run_inprocess(script, *args, exit_ok=False):
    """The script as __main__ in this process; returns its globals (model, ema_model, ...). With exit_ok, a script
    that stops with exit code 0 (--eval-only, a finished run) returns its globals too. The signal handlers the
    script installs (Ctrl-C, SIGTERM) are put back afterwards, and the run dir it holds is let go."""
    path = ROOT / script
    scope = {"__name__": "__main__", "__file__": str(path)}
    try:
        with mock.patch.object(sys, "argv", [script, *map(str, args)]), as_its_own_process():
            if not exit_ok:
                return runpy.run_path(str(path), run_name="__main__")
            exec(compile(path.read_text(), str(path), "exec"), scope)  # runpy would drop the globals on SystemExit
    except SystemExit as e:
        if not exit_ok or e.code not in (0, None):
            raise
    return scope


def refused(capsys, script, *args, code=2):
    """Run the script in-process, expecting exit `code` with one line on stderr; returns that line."""
    with pytest.raises(SystemExit) as e:
        run_inprocess(script, *args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def run_keeping_step(script, *args):
    """run_inprocess(script, ...)'s globals and, over them, the locals of its last step call (train_step, or MPL's
    finetune_step: the step is a function, its tensors are not globals); copies of its tensors as they were when
    that call returned are under "at_return" (the loop fills some after the step: an lr)."""
    step = {}

    def profile(frame, event, arg):
        if event == "return" and frame.f_code.co_name in ("train_step", "finetune_step"):
            step.clear()
            step.update(frame.f_locals)
            step["at_return"] = {k: v.detach().clone() for k, v in frame.f_locals.items() if torch.is_tensor(v)}

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        g = run_inprocess(script, *args)
    finally:
        sys.setprofile(previous)
    return {**g, **step}


def run_keeping_graph(script, *args):
    """run_keeping_step, with the step's autograd graph kept after its backward (retain_graph): a test can then take
    the gradient of the script's own loss_u."""
    backward = torch.Tensor.backward
    keep = lambda self, *a, **k: backward(self, *a, **{**k, "retain_graph": True})
    with mock.patch.object(torch.Tensor, "backward", keep):
        return run_keeping_step(script, *args)


aten = torch.ops.aten
# aten ops that make the host wait for the GPU on CUDA (a value, or an output size that depends on values, is read
# back): inside a stream capture they fail it. Boolean-mask indexing (nonzero inside) is checked apart.
CUDA_SYNC_OPS = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.is_nonzero, aten.equal}
CUDA_SYNC_OPS |= {aten.bincount, aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.argwhere}
HOST_DATA_OPS = {aten.lift_fresh, aten.lift_fresh_copy}  # torch.tensor(data): a constant frozen at the capture
INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
TORCH_DIR = str(Path(torch.__file__).parent)
SGD_FILE = str(Path("torch", "optim", "sgd.py"))


def cpu_only_read(func, args, kwargs):
    """F.one_hot with num_classes given checks the range of its input with min().item() and max().item() on the
    CPU, with a device-side assert on CUDA."""
    return func is F.one_hot and (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) >= 0


def per_tensor_foreach(args):
    """Why CUDA would run a torch._foreach_* call with these arguments one kernel per tensor ("" if it would not):
    its fused path (ATen's can_use_fast_route in ForeachUtils.h, and the check of the ops that take a tensor scalar)
    wants every tensor of its lists on one device with one dtype, the i-th tensors of its lists of one shape and
    strides (but in dims of size 1, pytorch#134546), each dense, and a tensor scalar of 0 dims on that device with that
    dtype."""
    lists = [a for a in args if isinstance(a, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in a)]
    tensors, scalars = [t for a in lists for t in a], [a for a in args if isinstance(a, torch.Tensor)]
    layout = lambda t: (t.shape, [s for s, n in zip(t.stride(), t.shape) if n != 1])
    if len({(t.device, t.dtype) for t in tensors + scalars}) > 1:
        return "dtypes or devices mixed"
    if any(any(layout(t) != layout(column[0]) for t in column) for column in zip(*lists)):
        return "shapes or strides differ"
    if not all(t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
        return "a tensor not dense"
    return "a tensor scalar of more than 0 dims" if any(s.dim() for s in scalars) else ""


def _running_line(stack):
    """ "file:line" of the innermost frame outside torch (and this file) in a traceback.extract_stack() list."""
    line = [f for f in stack if not f.filename.startswith(TORCH_DIR) and f.filename != __file__][-1]
    return f"{Path(line.filename).name}:{line.lineno}"


class CaptureHazards(TorchFunctionMode):
    """While active, `found` collects "file:line op" for each aten op that would sync with the host on CUDA or bake
    host data into a CUDA graph, with the innermost line outside torch (and this file) that ran it; and "file:line
    op per tensor: why" for each foreach call that CUDA would run one kernel per tensor (per_tensor_foreach). Left
    out, as the CPU alone makes them: cpu_only_read's calls, and torch/optim/sgd.py's (on the CPU the foreach SGD
    reads its tensor lr to the host; on CUDA the scripts take the fused SGD, whose kernel takes the tensor)."""

    def __init__(self):
        super().__init__()
        self.found, self.exempt, self.ops = [], 0, _HazardOps(self)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "").startswith("_foreach_") and (why := per_tensor_foreach(args)):
            stack = traceback.extract_stack()[:-1]
            if not any(f.filename.endswith(SGD_FILE) for f in stack):
                self.found.append(f"{_running_line(stack)} {func.__name__} per tensor: {why}")
        exempt = cpu_only_read(func, args, kwargs)
        self.exempt += exempt
        try:
            return func(*args, **kwargs)
        finally:
            self.exempt -= exempt

    def __enter__(self):
        self.ops.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.ops.__exit__(*exc)


class _HazardOps(TorchDispatchMode):
    def __init__(self, hazards):
        super().__init__()
        self.hazards = hazards

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        hazard = op in CUDA_SYNC_OPS or op in HOST_DATA_OPS
        hazard |= (
            op is aten.repeat_interleave
            and func is not aten.repeat_interleave.self_int
            and not kwargs.get("output_size")
        )
        if op in INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            hazard |= any(i is not None and i.dtype == torch.bool for i in indices)
        if hazard and not self.hazards.exempt:
            stack = traceback.extract_stack()[:-1]
            if not any(f.filename.endswith(SGD_FILE) for f in stack):
                self.hazards.found.append(f"{_running_line(stack)} {op.__name__}")
        return func(*args, **kwargs)


def frozen_replay(step_fn, captured, warmup=3):
    """A CPU stand-in for the scripts' cuda_graph(): after `warmup` eager calls, step_fn runs with its Python globals
    frozen as they were at that call, as a CUDA graph replays one call's kernels. Tensors and modules are the same
    objects (in-place updates show), but a Python number read inside the step keeps its capture-time value. The
    call a graph would capture runs under CaptureHazards: captured[step_fn's name] = what it found."""
    calls, frozen = 0, None

    def run():
        nonlocal calls, frozen
        if calls == warmup:
            code, names = step_fn.__code__, dict(step_fn.__globals__)
            frozen = types.FunctionType(code, names, step_fn.__name__, step_fn.__defaults__, step_fn.__closure__)
            with CaptureHazards() as hazards:
                frozen()
            captured[step_fn.__name__] = hazards.found
        else:
            (frozen or step_fn)()
        calls += 1

    return run


def run_frozen_replay(script, *args):
    """The script in this process with --cuda-graph emulated on the CPU by frozen_replay; returns its globals. The
    source is edited (each edit checked): the CUDA-only check of --cuda-graph off, the flag on, cuda_graph replaced.
    The strong augmentation takes the GPU's colour-op path (the same bytes; the CPU's reads op codes to the host).
    Under "captured": {name of each step function captured: the hazards found in its capture call}."""
    path = ROOT / script
    source = path.read_text()
    for old, new in [
        ("if args.cuda_graph and (", "if False and ("),
        ("args.cuda_graph", "True"),
        ("def cuda_graph(step_fn", "def _cuda_graph(step_fn"),
    ]:
        assert old in source, f"{script}: no {old!r}"
        source = source.replace(old, new)
    captured = {}
    scope = {"__name__": "__main__", "__file__": str(path), "cuda_graph": lambda fn: frozen_replay(fn, captured)}
    with mock.patch.object(sys, "argv", [script, *map(str, args)]), as_its_own_process():
        with mock.patch.object(common, "_colour_op", common._colour_op_no_sync):
            exec(compile(source, str(path), "exec"), scope)
    return {**scope, "captured": captured}


class HalfWritten:
    """A file that a full disk cuts short: its write puts down the first half of the text, then raises ENOSPC (or,
    with ctrl_c, a Ctrl-C arrives there: SIGINT, which the script's handler takes)."""

    def __init__(self, f, ctrl_c=False):
        self.f, self.ctrl_c = f, ctrl_c

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        if self.ctrl_c:
            signal.raise_signal(signal.SIGINT)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def full_disk_open(n, name="metrics.jsonl", how="a", ctrl_c=False):
    """An open() for builtins.open whose n-th opening of a file called `name` in mode `how` gives a HalfWritten."""
    real_open, count = builtins.open, [0]

    def opener(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if mode == how and not isinstance(file, int) and Path(file).name == name:
            count[0] += 1
            return HalfWritten(f, ctrl_c) if count[0] == n else f
        return f

    return opener


def rows(run_dir):
    """metrics.jsonl without wall-clock fields."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "train/it_per_sec"} for line in lines]


def checkpoint(run_dir):
    return torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)


def same(a, b):
    return type(a) is type(b) and (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b)


def same_run(a, b):
    """Two run dirs hold checkpoints with the same keys and the same tensors (bit for bit), and the same metric rows."""
    ca, cb = flat(checkpoint(a)), flat(checkpoint(b))
    differ = [k for k, v in ca.items() if isinstance(v, torch.Tensor) and not torch.equal(v, cb[k])]
    return ca.keys() == cb.keys() and differ == [] and rows(a) == rows(b)


def assert_tie_kept(logits, mask, tied):
    """A >= gate at a tie: exactly one image's max-softmax confidence equals the threshold `tied` (a float32 value
    passed as text: the tie survives float -> text -> float -> float32), a strict gate would drop it, the mask keeps
    it, and the mask is the >= mask of the whole batch, cutting it."""
    confidence = logits.detach().softmax(1).max(1).values
    at = (confidence == tied).nonzero().flatten()
    assert len(at) == 1 and confidence[at].item() == tied
    assert not (confidence > tied)[at]
    assert mask[at] == 1
    assert torch.equal(mask, (confidence >= tied).float()) and 0 < mask.sum() < len(mask)


def middle_threshold(logits):
    """A confidence threshold halfway between the two middle max-softmax values of these logits: about half of
    the batch passes it, so a test can tell a right mask from a wrong one."""
    confidence = logits.detach().softmax(1).max(1).values.sort().values
    mid = len(confidence) // 2
    return (confidence[mid - 1] + confidence[mid]).item() / 2
