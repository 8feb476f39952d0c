"""The plots of summarize.py: accuracy vs shots (per dataset, and RAFT beside the baselines) and
the training curves. Every line is in the legend, titles wrap, colours are strong enough to
read on white (tab10, with line styles once ten are used)."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

from utils import atomic_write

from .tables import method_label

STYLES = ("-", "--", ":", "-.")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def colours(n: int):
    plt = pyplot()
    palette = plt.get_cmap("tab10").colors
    return [(palette[i % 10], STYLES[(i // 10) % len(STYLES)]) for i in range(n)]


def finish(fig, ax, title: str, path: Path, outside: bool = False) -> None:
    """Title wrapped, grid, every line in the legend (beside the axes when there are many)."""
    ax.set_title(textwrap.fill(title, 70), fontsize=10)
    ax.grid(alpha=0.3)
    if outside:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    pyplot().close(fig)


def shots_axis(ax, shots: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")


def plot(table: dict, title: str, path: Path) -> None:
    """Accuracy vs shots: a line per dataset (error bars: the spread over seeds), the average
    in black, zero-shot CLIP as a dashed line of the dataset's colour (in the legend too)."""
    plt = pyplot()
    shots = table["shots"]
    many = len(table["datasets"]) > 1
    fig, ax = plt.subplots(figsize=(10.5 if many else 8, 5.2))
    for (colour, style), d in zip(colours(len(table["datasets"])), table["datasets"]):
        cells = [table["cells"].get((s, d)) for s in shots]
        means = [c[0] if c else math.nan for c in cells]  # NaN: a gap in the line, never a zero
        errs = [c[1] if c and c[1] is not None else 0.0 for c in cells]
        ax.errorbar(shots, means, yerr=errs, marker="o", ms=4, lw=1.8, ls=style, capsize=2, color=colour, label=d)
        ax.axhline(table["zero"][d][0], ls=(0, (4, 3)), lw=1.2, color=colour,
                   label=f"{d}: zero-shot CLIP" if many else "zero-shot CLIP")
    avg = [table["averages"][s] if table["averages"][s] is not None else math.nan for s in shots]
    if many and any(not math.isnan(a) for a in avg):
        ax.plot(shots, avg, marker="s", lw=3, color="black", label="average")
        if table["zero_average"] is not None:
            ax.axhline(table["zero_average"], ls=(0, (4, 3)), lw=2, color="black", label="average: zero-shot CLIP")
    shots_axis(ax, shots)
    finish(fig, ax, title, path, outside=many)


def plot_methods(curve: dict, title: str, path: Path) -> None:
    """Accuracy vs shots, one line per method (the datasets' average)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for (colour, style), (method, points) in zip(colours(len(curve)), curve.items()):
        if points:
            shots = sorted(points)
            ax.plot(shots, [points[s] for s in shots], marker="o", lw=3 if method == "raft" else 1.6, ls=style,
                    color="black" if method == "raft" else colour, label=method_label(method))
    shots_axis(ax, sorted({s for points in curve.values() for s in points}))
    finish(fig, ax, title, path)


def plot_curves(runs: list[dict], title: str, path: Path) -> None:
    """Training curves: the loss and train accuracy per epoch of each run (its history), the
    learning rate on a second axis of the loss panel."""
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(13, 4.8))
    lr_ax = loss_ax.twinx()
    for (colour, style), r in zip(colours(len(runs)), runs):
        epochs = [row["epoch"] for row in r["history"]]
        label = f"{r['dataset']} {r['shots']}-shot seed {r['seed']}"
        loss_ax.plot(epochs, [row["loss"] for row in r["history"]], color=colour, ls=style, label=label)
        acc_ax.plot(epochs, [row["train_acc"] for row in r["history"]], color=colour, ls=style, label=label)
        lr_ax.plot(epochs, [row["lr"] for row in r["history"]], color="grey", lw=0.8, alpha=0.7)
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    lr_ax.set_ylabel("learning rate (grey)")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("train accuracy (%)")
    loss_ax.grid(alpha=0.3)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(textwrap.fill(title, 110), fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)
