"""The graph-ready step (issue 15), checked on the CPU: CI has no GPU, so the CUDA graph itself is checked by
bench/gpu_check.py on a GPU. What a graph needs and a CPU can show: the step reads what changes between steps from
device tensors (a graph replays one call's kernels, so a Python number read inside the step would stay at its
capture-time value), it has no host sync, and the graph-ready template step is the eager recipe it replaced."""

import ast
import copy
import math
import shutil
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from scriptrun import ROOT, TINY, checkpoint, rows, run_frozen_replay, run_inprocess, same_run
from scripts import SCRIPTS

import common

STEPS = ["--total-steps", 8, "--log-every", 3, "--eval-every", 8, "--save-every", 8]  # 3 warm-up calls, 5 replays


REPLAYED = [(script, (), ["train_step"]) for script in SCRIPTS]
REPLAYED.append(("mpl.py", ("--finetune-steps", 4), ["train_step", "finetune_step"]))  # a graph for each phase


@pytest.mark.parametrize("script, extra, steps", REPLAYED)
def test_replaying_the_step_with_frozen_python_values_changes_nothing(script, extra, steps, data_dir, tmp_path):
    """A replay emulated on the CPU (the step's Python globals frozen after 3 eager calls) equals the eager run:
    nothing the step reads from Python changes between steps. And the call a graph would capture runs no op that
    syncs on CUDA (a read-back value or a value-dependent size), builds no tensor from host data, and makes no
    foreach call that CUDA would run one kernel per tensor."""
    args = [*TINY, *STEPS, *extra, "--data-dir", data_dir]
    run_inprocess(script, *args, "--run-dir", tmp_path / "eager")
    g = run_frozen_replay(script, *args, "--run-dir", tmp_path / "replay")
    assert same_run(tmp_path / "eager", tmp_path / "replay")
    assert g["captured"] == {step: [] for step in steps}


def test_the_emulation_catches_a_step_that_reads_the_step_number(data_dir, tmp_path):
    """The check above can fail: the EMA weight computed from `step` inside the step (the pre-issue-15 code) is
    frozen at its capture value by a replay, and the runs differ."""
    source = (ROOT / "supervised.py").read_text()
    fill = "        ema_weight.fill_(1 - min(args.ema_decay, (1 + step) / (10 + step)))"
    call = "        ema_update(ema_model, model, ema_weight)\n"
    assert fill in source and call in source
    source = source.replace(fill, "        pass").replace(call, fill + "\n" + call)
    (tmp_path / "reads_step.py").write_text(source)
    args = [*TINY, *STEPS, "--data-dir", data_dir]
    run_inprocess(tmp_path / "reads_step.py", *args, "--run-dir", tmp_path / "eager")
    run_frozen_replay(tmp_path / "reads_step.py", *args, "--run-dir", tmp_path / "replay")
    assert not same_run(tmp_path / "eager", tmp_path / "replay")


def test_the_emulation_catches_a_step_that_syncs(data_dir, tmp_path):
    """The hazard check above can fail: a boolean mask (nonzero on CUDA), a Python number read from a tensor, a
    tensor made from host data and a one_hot that reads its number of classes from the labels, put in supervised.py's
    step, are each found at their line; a one_hot given its number of classes (no read on CUDA) is not. So are the
    EMA's foreach calls as first written, which CUDA runs one kernel per tensor: _foreach_lerp_ with a list of 0-dim
    weights beside the parameters, and _foreach_copy_ of the float and the int64 buffers in one list."""
    source = (ROOT / "supervised.py").read_text()
    call = "        ema_update(ema_model, model, ema_weight)\n"
    assert call in source
    hazards = "        _ = y_l[y_l > 0], float(y_l.sum()), torch.tensor([1.0]), F.one_hot(y_l), F.one_hot(y_l, 10)\n"
    ema, params, buffers = "list(ema_model.parameters())", "list(model.parameters())", "list(model.buffers())"
    lerp = f"        torch._foreach_lerp_({ema}, {params}, [ema_weight] * len({params}))\n"
    copy = f"        torch._foreach_copy_(list(ema_model.buffers()), {buffers})\n"
    source = source.replace(call, hazards + lerp + copy + call)
    line = source.splitlines().index(hazards.rstrip("\n")) + 1
    (tmp_path / "syncs.py").write_text(source)
    args = [*TINY, *STEPS, "--data-dir", data_dir, "--total-steps", 4]
    g = run_frozen_replay(tmp_path / "syncs.py", *args, "--run-dir", tmp_path / "replay")
    found = ["index", "_local_scalar_dense", "lift_fresh", "_local_scalar_dense", "_local_scalar_dense"]
    found = [f"syncs.py:{line} {op}" for op in found]
    found += [
        f"syncs.py:{line + 1} _foreach_lerp_ per tensor: shapes or strides differ",
        f"syncs.py:{line + 2} _foreach_copy_ per tensor: dtypes or devices mixed",
    ]
    assert g["captured"] == {"train_step": found}


def step_functions(script):
    """The functions a script defines in its main block (the steps a CUDA graph captures)."""
    tree = ast.parse((ROOT / script).read_text())
    main = next(n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))
    return [n for n in ast.walk(main) if isinstance(n, ast.FunctionDef) and n.name.endswith("_step")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_step_has_no_host_sync_and_no_python_schedule(script):
    """No call inside a step reads a tensor to the host (.item, .tolist, float(t)), runs a schedule's Python (a
    scheduler's step or get_last_lr) or draws from a host RNG: under a graph those would sync, or run once at capture
    only (a replay draws from torch's CUDA generator alone)."""
    steps = step_functions(script)
    assert steps, f"{script}: no train_step"
    for fn in steps:
        for node in ast.walk(fn):
            if isinstance(node, ast.Call):
                call = ast.unparse(node.func)
                assert call not in ("float", "int", "bool"), (script, call)  # a tensor to a Python number
                assert call.split(".")[-1] not in ("item", "tolist", "cpu", "numpy", "get_last_lr"), (script, call)
                assert not call.startswith(("random.", "np.random", "numpy.random")), (script, call)  # host RNG
                assert not (call.endswith(".step") and "scheduler" in call), (script, call)


def test_the_graph_ready_template_step_is_the_eager_recipe(data_dir, tmp_path):
    """supervised.py's step (tensor lr filled by LambdaLR, EMA weight a device tensor, sums in place) against the
    recipe written the plain way here (float lr, a Python EMA decay, sums rebuilt each step): the same weights, EMA,
    momentum and logged losses after 7 steps, bit for bit."""
    run_inprocess("supervised.py", *TINY, "--data-dir", data_dir, "--total-steps", 7, "--run-dir", tmp_path / "r")
    ckpt, logged = checkpoint(tmp_path / "r"), rows(tmp_path / "r")

    torch.manual_seed(0)
    data = common.load_ssl_data("fashion_mnist", data_dir, 20, 0, torch.device("cpu"))
    model = common.WideResNet(data.info.num_classes, 10, 1, data.info.channels, 0.1)
    model, ema = model.to(memory_format=torch.channels_last), copy.deepcopy(model)
    decay, no_decay = [p for p in model.parameters() if p.ndim > 1], [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=0.03, momentum=0.9, nesterov=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: math.cos(7 * math.pi * k / (16 * 7)))
    torch.manual_seed(0)
    sums, train_rows = {}, {r["step"]: r for r in logged if "losses/sup" in r}
    assert sorted(train_rows) == [4, 5, 7]  # --log-every 4, --save-every 5, the end
    for step in range(1, 8):
        _, x, y = common.sample_batch(8, data.x_labeled, data.y_labeled)
        x = common.normalize(common.weak_augment(x, flip=data.info.flip), data.info)
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            weight = 1 - min(0.999, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), model.parameters()):  # ema += weight (model - ema)
                e += weight * (p - e)
            for e, b in zip(ema.buffers(), model.buffers()):
                e.copy_(b)
        sums = {k: sums.get(k, 0) + v for k, v in {"loss": loss.detach(), "n": 1}.items()}
        if step in train_rows:
            assert train_rows[step]["losses/sup"] == sums["loss"].item() / sums["n"]
            sums = {}
    for ours, theirs in [(ckpt["model"], model.state_dict()), (ckpt["ema_model"], ema.state_dict())]:
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    saved = ckpt["optimizer"]["state"]
    momentum = [optimizer.state[p]["momentum_buffer"] for g in groups for p in g["params"]]
    assert len(saved) == len(momentum) and all(
        torch.equal(saved[i]["momentum_buffer"], m) for i, m in enumerate(momentum)
    )


def test_a_checkpoint_with_float_lrs_resumes_with_tensor_lrs(data_dir, tmp_path):
    """Checkpoints older than the tensor lr hold floats in the optimizer's groups (a graph would capture a float as a
    constant): a resume makes them device tensors again and continues as from a new checkpoint, bit for bit."""
    args = [*TINY, "--data-dir", data_dir]
    run_inprocess("supervised.py", *args, "--total-steps", 5, "--run-dir", tmp_path / "new")
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    ckpt = torch.load(tmp_path / "old" / "checkpoint.pt", weights_only=True)
    for g in ckpt["optimizer"]["param_groups"]:
        g["lr"] = g["lr"].item()
    torch.save(ckpt, tmp_path / "old" / "checkpoint.pt")
    run_inprocess("supervised.py", "--resume", tmp_path / "new", "--total-steps", 8)
    g = run_inprocess("supervised.py", "--resume", tmp_path / "old", "--total-steps", 8)
    assert all(isinstance(group["lr"], torch.Tensor) for group in g["optimizer"].param_groups)
    assert same_run(tmp_path / "new", tmp_path / "old")


def test_the_compiled_strong_augment_is_one_graph_and_the_eager_images():
    """compile_augment's function traces as one graph (fullgraph: no host sync, no data-dependent shape; the CPU's
    own path reads op codes, so a trace takes the GPU's sync-free one) and, given the same draws, gives the eager
    images. The aot_eager backend runs the traced graph with torch's own kernels, so no C++ compiler is needed."""
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    torch.manual_seed(1)
    eager = common.strong_augment(x)
    compiled = torch.compile(common._strong_ops, fullgraph=True, dynamic=False, backend="aot_eager")
    with mock.patch.object(common, "_apply_strong", compiled):
        torch.manual_seed(1)
        assert torch.equal(common.strong_augment(x), eager)
