"""Collect every results.json under a folder into the paper-style table and an accuracy plot.

    python summarize.py output/                  # writes output/summary.{md,csv,png}
    python summarize.py output/ --out tables/

Rows are shot counts (and zero-shot CLIP), columns the datasets and their average; cells
are mean ± std (sample std) over seeds. Missing runs are gaps, never zeros; the average is
given only for rows where every dataset of the table has a number. Runs of different
backbones or protocols (``train_views``) get separate tables, suffixed with their name.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from utils import RaftError, atomic_write, run_main

# The paper's column order; any other dataset follows alphabetically.
DATASET_ORDER = ["imagenet", "caltech101", "dtd", "eurosat", "fgvc", "food101", "oxford_flowers", "oxford_pets",
                 "stanford_cars", "sun397", "ucf101"]


def collect(root: Path) -> dict[str, list[dict]]:
    """results.json files under ``root``, grouped by (backbone, protocol)."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for path in sorted(root.rglob("results.json")):
        try:
            r = json.loads(path.read_text())
            row = {"dataset": r["dataset"], "shots": int(r["shots"]), "seed": r["seed"],
                   "acc": float(r["test_acc"]), "zero_shot": float(r["zero_shot_acc"]),
                   "backbone": r["backbone"]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            print(f"skipping {path}: not a RAFT results file ({type(exc).__name__})", file=sys.stderr)
            continue
        views = path.parent.name.rsplit("_views", 1)
        group = r["backbone"] + (f"_views{views[1]}" if len(views) == 2 else "")
        groups[group].append(row)
    return groups


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def build_table(rows: list[dict]) -> dict:
    datasets = sorted({r["dataset"] for r in rows},
                      key=lambda d: (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d))
    shots = sorted({r["shots"] for r in rows})
    by_cell = defaultdict(list)
    zero = defaultdict(list)
    for r in rows:
        by_cell[(r["shots"], r["dataset"])].append(r["acc"])
        zero[r["dataset"]].append(r["zero_shot"])
    cells = {key: mean_std(v) for key, v in by_cell.items()}
    zero_cells = {d: mean_std(v) for d, v in zero.items()}

    def average(values: dict) -> float | None:
        means = [values[d][0] for d in datasets if d in values]
        return statistics.fmean(means) if len(means) == len(datasets) else None

    averages = {s: average({d: cells[(s, d)] for d in datasets if (s, d) in cells}) for s in shots}
    return {"datasets": datasets, "shots": shots, "cells": cells, "zero": zero_cells,
            "averages": averages, "zero_average": average(zero_cells)}


def fmt(cell) -> str:
    if cell is None:
        return "–"
    mean, std, _ = cell
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def markdown(table: dict, title: str) -> str:
    ds = table["datasets"]
    lines = [f"### {title}", "", "| shots | " + " | ".join(ds) + " | Average |",
             "|---|" + "---|" * (len(ds) + 1)]
    zero_avg = table["zero_average"]
    lines.append("| zero-shot | " + " | ".join(fmt(table["zero"].get(d)) for d in ds) + " | "
                 + ("–" if zero_avg is None else f"{zero_avg:.2f}") + " |")
    for s in table["shots"]:
        avg = table["averages"][s]
        lines.append(f"| {s} | " + " | ".join(fmt(table["cells"].get((s, d))) for d in ds) + " | "
                     + ("–" if avg is None else f"{avg:.2f}") + " |")
    lines += ["", "Test top-1 accuracy (%), mean ± std over seeds; – : no run."]
    return "\n".join(lines) + "\n"


def csv_text(table: dict, group: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "dataset", "shots", "runs", "mean", "std", "zero_shot_mean"])
    for d in table["datasets"]:
        z = table["zero"][d][0]
        for s in table["shots"]:
            cell = table["cells"].get((s, d))
            if cell is not None:
                writer.writerow([group, d, s, cell[2], f"{cell[0]:.4f}", "" if cell[1] is None else f"{cell[1]:.4f}",
                                 f"{z:.4f}"])
    for s in table["shots"]:
        if table["averages"][s] is not None:
            writer.writerow([group, "average", s, "", f"{table['averages'][s]:.4f}", "",
                             "" if table["zero_average"] is None else f"{table['zero_average']:.4f}"])
    return buf.getvalue()


def plot(table: dict, title: str, path: Path) -> None:
    """Accuracy vs shots: a line per dataset (error bars: std over seeds), the average in
    black, zero-shot CLIP as a dashed line of the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shots = table["shots"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    colours = plt.get_cmap("tab20")(range(len(table["datasets"])))
    for colour, d in zip(colours, table["datasets"]):
        cells = [table["cells"].get((s, d)) for s in shots]
        means = [c[0] if c else math.nan for c in cells]  # NaN: a gap in the line, never a zero
        errs = [c[1] if c and c[1] is not None else 0.0 for c in cells]
        ax.errorbar(shots, means, yerr=errs, marker="o", ms=4, lw=1.5, capsize=2, color=colour, label=d)
        ax.axhline(table["zero"][d][0], ls="--", lw=1, color=colour, alpha=0.8)
    avg = [table["averages"][s] if table["averages"][s] is not None else math.nan for s in shots]
    if len(table["datasets"]) > 1 and any(not math.isnan(a) for a in avg):
        ax.plot(shots, avg, marker="s", lw=3, color="black", label="average")
        if table["zero_average"] is not None:
            ax.axhline(table["zero_average"], ls="--", lw=2, color="black")
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(s) for s in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title} (dashed: zero-shot CLIP)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder searched recursively for results.json (e.g. output/)")
    parser.add_argument("--out", help="where to write summary.md/.csv/.png (default: ROOT)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise RaftError(f"{root} is not a folder")
    groups = collect(root)
    if not groups:
        raise RaftError(f"no results.json under {root}")
    out = Path(args.out) if args.out else root
    out.mkdir(parents=True, exist_ok=True)
    for group, rows in sorted(groups.items()):
        suffix = "" if len(groups) == 1 else f"_{group}"
        table = build_table(rows)
        md = markdown(table, f"RAFT, {group}: {len(rows)} runs")
        atomic_write(out / f"summary{suffix}.md", lambda fh: fh.write(md), mode="w")
        text = csv_text(table, group)
        atomic_write(out / f"summary{suffix}.csv", lambda fh: fh.write(text), mode="w")
        print(md)
        written = [f"summary{suffix}.md", f"summary{suffix}.csv"]
        if not args.no_plot:
            plot(table, f"RAFT, {group}", out / f"summary{suffix}.png")
            written.append(f"summary{suffix}.png")
        print(f"written to {out}: {', '.join(written)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
