"""A picture of any run: eval/acc and the training losses against steps, from one or more run dirs' metrics.jsonl.

    pip install -r bench/requirements.txt      # matplotlib
    python bench/plot.py runs/<run dir> [runs/<another> ...] --out curves.png

Left: eval/acc (solid: the evaluated EMA model; dotted: the raw model) of every run. Right: every losses/... tag of
every run (log scale where all values are positive). A line cut by a kill is skipped; null values (see README) are gaps.
"""

import json
import math
from pathlib import Path

from scripts import fail, parser, path


def read_rows(run_dir):
    """The rows of run_dir/metrics.jsonl (a line cut by a kill is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        fail(f"{run_dir}: no metrics.jsonl there, so it is not a run dir")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return rows


def series(rows, tag):
    """(steps, values) of one tag, non-finite and null values as NaN (gaps in the plot)."""
    points = [(r["step"], r[tag]) for r in rows if tag in r]
    return [s for s, _ in points], [v if v is not None and math.isfinite(v) else math.nan for _, v in points]


def plot(run_dirs, out):
    import matplotlib  # bench-only dependency (bench/requirements.txt)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    positive = True
    for i, run_dir in enumerate(run_dirs):
        rows, color, name = read_rows(run_dir), f"C{i % 10}", Path(run_dir).name
        acc_ax.plot(*series(rows, "eval/acc"), color=color, marker=".", label=name)
        acc_ax.plot(*series(rows, "eval/acc_raw"), color=color, marker=".", linestyle=":")
        tags = sorted({k for r in rows for k in r if k.startswith("losses/")})
        for j, tag in enumerate(tags):
            steps, values = series(rows, tag)
            positive &= all(v > 0 for v in values if not math.isnan(v))
            style = ["-", "--", "-.", ":"][j % 4]
            loss_ax.plot(steps, values, color=color, linestyle=style, label=f"{name}: {tag[7:]}")
    acc_ax.set(xlabel="step", ylabel="eval/acc (%)", title="accuracy (dotted: raw model)")
    loss_ax.set(xlabel="step", ylabel="loss", title="training losses", yscale="log" if positive else "linear")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = parser(__doc__)
    p.add_argument("run_dirs", nargs="+", help="run dirs (each holding a metrics.jsonl)")
    p.add_argument("--out", type=path, default="curves.png", help="the image to write (.png, .pdf, .svg)")
    args = p.parse_args(argv)
    try:
        from matplotlib.backend_bases import FigureCanvasBase

        formats = FigureCanvasBase.get_supported_filetypes()  # by the name's ending; none: png
        if Path(args.out).suffix and Path(args.out).suffix[1:].lower() not in formats:
            fail(
                f"--out {args.out}: matplotlib writes none of that kind: end the name in .{', .'.join(sorted(formats))}"
            )
        plot(args.run_dirs, args.out)
    except ImportError:
        fail("matplotlib is not installed: pip install -r bench/requirements.txt")
    except OSError as e:
        fail(f"cannot write {args.out}: {e.strerror}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
