"""A run report: one PNG of what the runs' metrics.csv hold, several runs overlaid for comparison (one colour per run).
Every training script writes out_dir/report.png at its end; on demand, for any runs:

    python -m report out/pretrain/stdlib --out report.png
    python -m report out/finetune/full out/finetune/lora --out compare.png

Panels follow the columns present: loss (train solid, validation dashed with dots) against tokens (against step
where a run has no tokens column), learning rate, tokens/s, MFU, then each stage's own metrics (distill.py's CE and
KD losses, align.py's rewards and log-probs, any other numeric column in a panel of its own). Empty cells (validation
runs every N steps) are skipped, not drawn as zeros; text columns (`sample`) are ignored. Needs matplotlib, imported
only when a report is drawn."""

import csv
import json
import math
import sys
from argparse import ArgumentError
from pathlib import Path

from jsonargparse import CLI

from model import InputError

# (panel title, the columns it overlays: the first solid, then dashed, dotted); each panel is drawn when a run has
# any of its columns
PANELS = [
    ("loss", ["train_loss", "val_loss"]),
    ("learning rate", ["lr"]),
    ("tokens/s", ["tokens_per_sec"]),
    ("MFU", ["mfu"]),
    ("distillation losses", ["ce_loss", "kd_loss", "val_kd"]),
    ("rewards", ["rewards/chosen", "rewards/rejected"]),
    ("reward margin", ["rewards/margins", "val_rewards/margins"]),
    ("preference accuracy", ["rewards/accuracies", "val_rewards/accuracies"]),
    ("log-probs", ["logps/chosen", "logps/rejected"]),
    ("reward", ["reward", "val_reward", "reward_std"]),
    ("completion length", ["completions/mean_length", "completions/mean_terminated_length", "completions/max_length"]),
    ("clipped ratio", ["clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"]),
    ("seconds per step", ["rollout_s", "update_s"]),
    ("KL", ["kl"]),
]
X_COLUMNS = ["step", "tokens", "epoch"]  # what the runs are drawn against, never panels of their own
STYLES = ["-", "--", ":", "-."]


def read_metrics(run_dir: Path) -> dict[str, list[str]]:
    """metrics.csv as columns of cells (strings; "" where a step left a metric out)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        raise InputError(f"{run_dir}: no metrics.csv there (is it a training run's out_dir?)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames or []
    if "step" not in columns:
        raise InputError(f"{path}: no step column (found {', '.join(columns) or 'nothing'})")
    return {c: [r[c] or "" for r in rows] for c in columns}


def number(cell: str) -> float | None:
    try:
        value = float(cell)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def plot_runs(run_dirs: list[Path], out: Path):
    """Draw the runs' metrics into the PNG `out` and return the matplotlib Figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter, PercentFormatter

    runs = {Path(d): read_metrics(Path(d)) for d in run_dirs}
    names = [d.name or str(d) for d in runs]
    if len(set(names)) < len(names):  # out/a/final and out/b/final: the whole paths tell them apart
        names = [str(d) for d in runs]
    x_key = "tokens" if all("tokens" in m for m in runs.values()) else "step"

    def numeric(metrics, column) -> bool:
        return any(number(c) is not None for c in metrics.get(column, []))

    panels = [(title, cols) for title, cols in PANELS if any(numeric(m, c) for m in runs.values() for c in cols)]
    known = X_COLUMNS + [c for _, cols in PANELS for c in cols]
    for metrics in runs.values():  # any other numeric column: a future stage's metric gets a panel of its own
        panels += [(c, [c]) for c in metrics if c not in known and numeric(metrics, c) and (c, [c]) not in panels]

    ncols = 1 if len(panels) < 2 else 2 if len(panels) in (2, 4) else 3
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows + 0.6), squeeze=False, layout="constrained")
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, cols) in zip(axes.flat, panels):
        drawn = []
        for i, metrics in enumerate(runs.values()):
            for style, col in zip(STYLES, cols):
                points = [(number(x), number(y)) for x, y in zip(metrics[x_key], metrics.get(col, []))]
                points = [(x, y) for x, y in points if x is not None and y is not None]  # empty cells skipped
                if not points:
                    continue
                xs, ys = zip(*points)
                sparse = len(points) < len(metrics[x_key]) / 2  # validation: a dot where it was measured
                ax.plot(xs, ys, style, color=colours[i % len(colours)], marker="o" if sparse else None, markersize=3)
                drawn += [col] if col not in drawn else []
        ax.set_title(title)
        ax.set_xlabel(x_key)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.2M tokens, not 1e6 in the corner
        ax.grid(alpha=0.3)
        if title == "MFU":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))  # a fraction of the peak
        if len(drawn) > 1:  # which line style is which column (the colours are the runs)
            ax.legend([Line2D([], [], color="grey", linestyle=STYLES[cols.index(c)]) for c in drawn], drawn,
                      fontsize="small")
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=colours[i % len(colours)], linewidth=2) for i in range(len(runs))]
    fig.legend(handles, names, loc="outside upper center", ncols=min(len(names), 4), frameon=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig


def write_run_report(out_dir: Path, enabled: bool) -> None:
    """The report every training script writes at its end, out_dir/report.png. A finished run never fails here: a
    missing matplotlib or any other trouble is one warning line."""
    if not enabled:
        return
    try:
        plot_runs([out_dir], Path(out_dir) / "report.png")
        print(f"report: {Path(out_dir) / 'report.png'}")
    except ImportError as e:
        print(f"warning: no report.png ({e}; pip install matplotlib)", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - the run has finished and saved; a drawing must not turn it into a failure
        print(f"warning: no report.png ({type(e).__name__}: {e})", file=sys.stderr)


def report(run_dirs: list[str], out: str = "report.png") -> None:
    """Draw one PNG of the metrics.csv of one or several training runs, overlaid.

    Args:
        run_dirs: the runs' out_dir (each holds metrics.csv).
        out: the PNG to write.
    """
    plot_runs(run_dirs, out)
    print(f"report: {out}")


if __name__ == "__main__":
    # jsonargparse takes a list as one JSON value: the run directories before the first flag become that list
    argv = sys.argv[1:]
    n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    try:
        CLI(report, args=([json.dumps(argv[:n])] if n else []) + argv[n:], as_positional=True, exit_on_error=False)
    except (InputError, ArgumentError) as e:  # bad input: one line, no traceback
        sys.exit(f"error: {e}")
