"""Collect every results.json under a folder into the paper-style table and an accuracy plot.

    python summarize.py output/                  # writes output/summary.{md,csv,png}
    python summarize.py output/ --out tables/

Rows are shot counts (and zero-shot CLIP), columns the datasets and their average; cells
are mean ± std (sample std) over seeds. Missing runs are gaps, never zeros; the average is
given only for rows where every dataset of the table has a number. Runs of different
backbones or settings (``train_views``, a run-folder tag such as ``lr=0.0002``) get separate
tables, suffixed with their name (and side by side in summary_all.md). The protocols of
doc/protocols.md add their tables: base-to-new (base / new / HM per dataset), cross-dataset
transfer (transfer_<dataset>.json beside a source run) and domain generalisation (ImageNet
runs tested on its variants, from results.json or results_eval.json). Each table is also a
CSV file.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from evaluation import harmonic_mean
from utils import RaftError, ToolParser, atomic_write, run_main

# The paper's column order; any other dataset follows alphabetically.
DATASET_ORDER = ["imagenet", "caltech101", "dtd", "eurosat", "fgvc", "food101", "oxford_flowers", "oxford_pets",
                 "stanford_cars", "sun397", "ucf101"]
SHIFT_ORDER = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
METHODS = {"raft": "RAFT", "zero_shot": "zero-shot CLIP", "linear_probe": "linear probe",
           "tip_adapter": "Tip-Adapter", "tip_adapter_f": "Tip-Adapter-F"}


def group_of(run_dir: Path) -> str:
    """The run folder's name without shots and seed: backbone and settings (RN50_views10_lr=0.0002)."""
    return re.sub(r"_\d+shots_seed\d+", "", run_dir.name)


def read_results(path: Path) -> dict | None:
    try:
        r = json.loads(path.read_text())
        float(r["test_acc"]), float(r["zero_shot_acc"]), int(r["shots"]), r["dataset"], r["backbone"]
        return r
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        print(f"skipping {path}: not a RAFT results file ({type(exc).__name__})", file=sys.stderr)
        return None


def shift_of(r: dict) -> dict:
    return {k: (float(v["test_acc"]), float(v["zero_shot_acc"])) for k, v in (r.get("shift") or {}).items()}


def collect(root: Path) -> dict[str, dict[str, list[dict]]]:
    """results.json files under ``root`` (and beside them the domain-shift evaluations in
    results_eval.json and the transfers in transfer_<dataset>.json), grouped by backbone and
    settings, then by protocol."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"fewshot": [], "base2new": [], "transfer": [],
                                                                     "methods": []})
    for path in sorted(root.rglob("baselines.json")):   # baselines/run.py, where RAFT has not run (yet)
        if not (path.parent / "results.json").is_file():
            try:
                b = json.loads(path.read_text())
                if b.get("protocol", "fewshot") == "fewshot":
                    groups[group_of(path.parent)]["methods"].append(method_row(b, None))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
                print(f"skipping {path}: not a baselines file", file=sys.stderr)
    for path in sorted(root.rglob("results.json")):
        r = read_results(path)
        if r is None:
            continue
        row = {"dataset": r["dataset"], "shots": int(r["shots"]), "seed": r["seed"], "acc": float(r["test_acc"]),
               "zero_shot": float(r["zero_shot_acc"]), "backbone": r["backbone"], "shift": shift_of(r)}
        group = groups[group_of(path.parent)]
        if r.get("protocol") == "base2new":
            parts = r["base2new"]
            group["base2new"].append(row | {part: (float(parts[part]["test_acc"]), float(parts[part]["zero_shot_acc"]))
                                            for part in ("base", "new")})
            continue
        for name in ("results_shift.json", "results_eval.json"):   # scripts/domain_generalization.sh (and
            evaluated = path.parent / name                             # versions that wrote results_eval.json)
            if not row["shift"] and evaluated.is_file() and (again := read_results(evaluated)) is not None:
                row["shift"] = shift_of(again)
        group["fewshot"].append(row)
        if r.get("baselines"):
            group["methods"].append(method_row(r, row["acc"]))
        for transfer in sorted(path.parent.glob("transfer_*.json")):
            t = read_results(transfer)
            if t is not None:
                group["transfer"].append(row | {"target": t["dataset"], "target_acc": float(t["test_acc"]),
                                                "target_zero_shot": float(t["zero_shot_acc"])})
    return groups


def method_row(r: dict, raft: float | None) -> dict:
    """Each method's test accuracy in one run (RAFT's too when it ran)."""
    accs = {name: float(m["test_acc"]) for name, m in r["baselines"].items()}
    if raft is not None:
        accs["raft"] = raft
    return {"dataset": r["dataset"], "shots": int(r["shots"]), "seed": r["seed"], "accs": accs}


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None), len(values)


def ordered(names, order: list[str]) -> list[str]:
    return sorted(set(names), key=lambda d: (order.index(d) if d in order else len(order), d))


def build_table(rows: list[dict]) -> dict:
    datasets = ordered((r["dataset"] for r in rows), DATASET_ORDER)
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


def fmt_mean(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def markdown(table: dict, title: str) -> str:
    ds = table["datasets"]
    lines = [f"### {title}", "", "| shots | " + " | ".join(ds) + " | Average |",
             "|---|" + "---|" * (len(ds) + 1)]
    lines.append("| zero-shot | " + " | ".join(fmt(table["zero"].get(d)) for d in ds) + " | "
                 + fmt_mean(table["zero_average"]) + " |")
    for s in table["shots"]:
        lines.append(f"| {s} | " + " | ".join(fmt(table["cells"].get((s, d))) for d in ds) + " | "
                     + fmt_mean(table["averages"][s]) + " |")
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


def combined_markdown(tables: dict[str, dict], backbones: dict[str, str]) -> str:
    """One table for every backbone and setting: RAFT rows (and zero-shot) side by side."""
    datasets = ordered((d for t in tables.values() for d in t["datasets"]), DATASET_ORDER)
    lines = ["### RAFT across backbones and settings", "",
             "| backbone | setting | shots | " + " | ".join(datasets) + " | Average |",
             "|---|---|---|" + "---|" * (len(datasets) + 1)]

    def average(cells: list) -> str:  # only over a complete row
        return fmt_mean(statistics.fmean(c[0] for c in cells) if len(cells) == len(datasets) else None)

    for group, t in sorted(tables.items()):
        setting = group[len(backbones[group]):].lstrip("_") or "–"
        zero = [t["zero"][d] for d in datasets if d in t["zero"]]
        lines.append(f"| {backbones[group]} | {setting} | zero-shot | "
                     + " | ".join(fmt(t["zero"].get(d)) for d in datasets) + f" | {average(zero)} |")
        for shots in t["shots"]:
            cells = [t["cells"][(shots, d)] for d in datasets if (shots, d) in t["cells"]]
            lines.append(f"| {backbones[group]} | {setting} | {shots} | "
                         + " | ".join(fmt(t["cells"].get((shots, d))) for d in datasets) + f" | {average(cells)} |")
    lines += ["", "Test top-1 accuracy (%), mean ± std over seeds; – : no run."]
    return "\n".join(lines) + "\n"


def combined_csv(tables: dict[str, dict], backbones: dict[str, str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["backbone", "group", "dataset", "shots", "runs", "mean", "std"])
    for group, t in sorted(tables.items()):
        for (shots, dataset), (mean, std, n) in sorted(t["cells"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
            writer.writerow([backbones[group], group, dataset, shots, n, f"{mean:.4f}",
                             "" if std is None else f"{std:.4f}"])
        for dataset, (mean, std, n) in sorted(t["zero"].items()):
            writer.writerow([backbones[group], group, dataset, "zero-shot", n, f"{mean:.4f}",
                             "" if std is None else f"{std:.4f}"])
    return buf.getvalue()


def shift_table(rows: list[dict]) -> dict | None:
    """ImageNet and its shift sets per shot count (and zero-shot CLIP), mean ± std over seeds,
    and the average over the variants (given only when a row has all of them)."""
    runs = [r for r in rows if r["shift"]]
    if not runs:
        return None
    variants = ordered((k for r in runs for k in r["shift"]), SHIFT_ORDER)

    def cells_of(chosen: list[dict], zero: bool) -> dict:
        cells = {"imagenet": mean_std([r["zero_shot"] if zero else r["acc"] for r in chosen])}
        for v in variants:
            values = [r["shift"][v][1 if zero else 0] for r in chosen if v in r["shift"]]
            if values:
                cells[v] = mean_std(values)
        means = [cells[v][0] for v in variants if v in cells]
        cells["average"] = statistics.fmean(means) if len(means) == len(variants) else None
        return cells

    table = {"zero-shot": cells_of(runs, zero=True)}
    for shots in sorted({r["shots"] for r in runs}):
        table[str(shots)] = cells_of([r for r in runs if r["shots"] == shots], zero=False)
    return {"columns": ["imagenet", *variants], "rows": table}


def shift_markdown(table: dict, title: str) -> str:
    cols = table["columns"]
    lines = [f"### {title}", "", "| shots | " + " | ".join(cols) + " | variants average |",
             "|---|" + "---|" * (len(cols) + 1)]
    for label, cells in table["rows"].items():
        lines.append(f"| {label} | " + " | ".join(fmt(cells.get(c)) for c in cols) + " | "
                     + fmt_mean(cells["average"]) + " |")
    lines += ["", "Trained on ImageNet, tested on its variants with the ImageNet classifier (the 200-class "
                  "variants restricted to their classes); top-1 accuracy (%), mean ± std over seeds."]
    return "\n".join(lines) + "\n"


def shift_csv(table: dict, group: str) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["group", "shots", "test_set", "runs", "mean", "std"])
    for label, cells in table["rows"].items():
        for col in table["columns"]:
            if col in cells:
                mean, std, n = cells[col]
                writer.writerow([group, label, col, n, f"{mean:.4f}", "" if std is None else f"{std:.4f}"])
        if cells["average"] is not None:
            writer.writerow([group, label, "variants_average", "", f"{cells['average']:.4f}", ""])
    return buf.getvalue()


def cell_text(values: list[float]) -> str:
    return fmt(mean_std(values)) if values else "–"


def csv_rows(header: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def base2new_tables(rows: list[dict], group: str) -> tuple[str, str]:
    """Base / new / HM per dataset (RAFT and zero-shot CLIP), mean ± std over seeds, and the
    average over the eleven datasets once all of them are there."""
    datasets = ordered((r["dataset"] for r in rows), DATASET_ORDER)
    per = {d: [r for r in rows if r["dataset"] == d] for d in datasets}
    lines = [f"### RAFT, {group}: base-to-new generalisation ({len(rows)} runs)", "",
             "| dataset | base | new | HM | zero-shot base | zero-shot new | zero-shot HM |",
             "|---|---|---|---|---|---|---|"]
    table, means = [], {}
    for d in datasets:
        runs = per[d]
        cols = [[r["base"][0] for r in runs], [r["new"][0] for r in runs],
                [harmonic_mean(r["base"][0], r["new"][0]) for r in runs],
                [r["base"][1] for r in runs], [r["new"][1] for r in runs],
                [harmonic_mean(r["base"][1], r["new"][1]) for r in runs]]
        means[d] = [statistics.fmean(c) for c in cols]
        lines.append(f"| {d} | " + " | ".join(cell_text(c) for c in cols) + " |")
        table.append([group, d, len(runs), *(f"{m:.4f}" for m in means[d])])
    complete = set(DATASET_ORDER) <= set(datasets)
    if complete:
        avg = [statistics.fmean(means[d][i] for d in DATASET_ORDER) for i in range(6)]
        avg[2], avg[5] = harmonic_mean(avg[0], avg[1]), harmonic_mean(avg[3], avg[4])   # HM of the averages
        lines.append("| **Average (11)** | " + " | ".join(f"{a:.2f}" for a in avg) + " |")
        table.append([group, "average", "", *(f"{a:.4f}" for a in avg)])
    lines += ["", "Test top-1 accuracy (%), mean ± std over seeds; HM = harmonic mean of base and new "
                  "(per run; the average row takes the HM of the averaged base and new, as papers report). "
                  + ("" if complete else f"The 11-dataset average appears once all 11 datasets have runs "
                                         f"({len(set(datasets) & set(DATASET_ORDER))} so far)."),
              "Published averages (ViT-B/16, 16 shots), base / new / HM: CLIP 69.34 / 74.22 / 71.70 · "
              "CoCoOp 80.47 / 71.69 / 75.83 · MaPLe 82.28 / 75.14 / 78.55 (doc/protocols.md)."]
    header = ["group", "dataset", "runs", "base", "new", "hm", "zero_shot_base", "zero_shot_new", "zero_shot_hm"]
    return "\n".join(lines) + "\n", csv_rows(header, table)


def transfer_tables(rows: list[dict], group: str) -> tuple[str, str]:
    """Cross-dataset transfer: the source's own accuracy, each target's, and the targets'
    average (given when every run has every target)."""
    sources = ordered((r["dataset"] for r in rows), DATASET_ORDER)
    lines, table = [], []
    for source in sources:
        runs = [r for r in rows if r["dataset"] == source]
        targets = ordered((r["target"] for r in runs), DATASET_ORDER)
        seeds = sorted({r["seed"] for r in runs}, key=str)
        source_accs = [next(r["acc"] for r in runs if r["seed"] == s) for s in seeds]
        cells = {t: [r["target_acc"] for r in runs if r["target"] == t] for t in targets}
        per_seed = [[r["target_acc"] for r in runs if r["seed"] == s] for s in seeds]
        full = all(len(accs) == len(targets) for accs in per_seed)
        average = [statistics.fmean(accs) for accs in per_seed] if full else []
        lines += [f"### RAFT, {group}: cross-dataset transfer from {source} ({len(seeds)} source run(s))", "",
                  f"| source: {source} | " + " | ".join(targets) + " | target average |",
                  "|---|" + "---|" * (len(targets) + 1),
                  f"| {cell_text(source_accs)} | " + " | ".join(cell_text(cells[t]) for t in targets)
                  + f" | {cell_text(average)} |", ""]
        table += [[group, source, source, len(source_accs), f"{statistics.fmean(source_accs):.4f}"]]
        table += [[group, source, t, len(cells[t]), f"{statistics.fmean(cells[t]):.4f}"] for t in targets]
        if average:
            table.append([group, source, "target_average", len(average), f"{statistics.fmean(average):.4f}"])
    lines += ["Test top-1 accuracy (%), mean ± std over source seeds; each target scored at the source run's "
              "alpha. Published (ViT-B/16): MaPLe source 70.72, target average 66.30 (doc/protocols.md)."]
    return "\n".join(lines) + "\n", csv_rows(["group", "source", "test_set", "runs", "mean"], table)


def methods_tables(rows: list[dict], group: str) -> tuple[str, str, dict]:
    """RAFT and the baselines side by side: per dataset and shot count, mean ± std over seeds;
    an average row per shot count once every dataset has a number."""
    methods = [m for m in METHODS if any(m in r["accs"] for r in rows)]
    datasets = ordered((r["dataset"] for r in rows), DATASET_ORDER)
    shots = sorted({r["shots"] for r in rows})
    cells = {(d, s, m): [r["accs"][m] for r in rows if r["dataset"] == d and r["shots"] == s and m in r["accs"]]
             for d in datasets for s in shots for m in methods}
    lines = [f"### {group}: RAFT and the baselines ({len(rows)} runs)", "",
             "| dataset | shots | " + " | ".join(METHODS[m] for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    table, curve = [], {m: {} for m in methods}
    for d in datasets:
        for s in shots:
            if any(cells[(d, s, m)] for m in methods):
                lines.append(f"| {d} | {s} | " + " | ".join(cell_text(cells[(d, s, m)]) for m in methods) + " |")
                table += [[group, d, s, m, len(cells[(d, s, m)]), f"{statistics.fmean(cells[(d, s, m)]):.4f}"]
                          for m in methods if cells[(d, s, m)]]
    for s in shots:
        for m in methods:
            means = [statistics.fmean(cells[(d, s, m)]) for d in datasets if cells[(d, s, m)]]
            if len(means) == len(datasets):
                curve[m][s] = statistics.fmean(means)
        if len(datasets) > 1:
            lines.append(f"| **Average** | {s} | " + " | ".join(fmt_mean(curve[m].get(s)) for m in methods) + " |")
            table += [[group, "average", s, m, "", f"{curve[m][s]:.4f}"] for m in methods if s in curve[m]]
    lines += ["", "Test top-1 accuracy (%), mean ± std over seeds. Every method on the same few-shot images, the "
                  "same CLIP features and text, its hyper-parameters chosen on validation data (doc/baselines.md); "
                  "Tip-Adapter-F trains on 10 cached augmented views, not fresh ones."]
    return "\n".join(lines) + "\n", csv_rows(["group", "dataset", "shots", "method", "runs", "mean"], table), curve


def plot_methods(curve: dict, title: str, path: Path) -> None:
    """Accuracy vs shots, one line per method (the datasets' average)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for method, points in curve.items():
        if points:
            shots = sorted(points)
            ax.plot(shots, [points[s] for s in shots], marker="o", lw=3 if method == "raft" else 1.5,
                    label=METHODS[method])
    ax.set_xscale("log", base=2)
    ticks = sorted({s for points in curve.values() for s in points})
    ax.set_xticks(ticks, [str(s) for s in ticks])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=110))
    plt.close(fig)


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


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text), mode="w")


def main(argv: list[str] | None = None):
    parser = ToolParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    fewshot = {group: rows["fewshot"] for group, rows in groups.items() if rows["fewshot"]}
    tables = {group: build_table(rows) for group, rows in fewshot.items()}
    if len(fewshot) > 1:  # backbones (and settings) side by side, the backbone as a column
        backbones = {group: rows[0]["backbone"] for group, rows in fewshot.items()}
        md = combined_markdown(tables, backbones)
        write_text(out / "summary_all.md", md)
        write_text(out / "summary_all.csv", combined_csv(tables, backbones))
        print(md)
        print(f"written to {out}: summary_all.md, summary_all.csv\n")
    for group, protocols in sorted(groups.items()):
        suffix = "" if len(groups) == 1 else f"_{group}"
        md, written = "", []
        rows = protocols["fewshot"]
        if rows:
            md += markdown(tables[group], f"RAFT, {group}: {len(rows)} runs")
            write_text(out / f"summary{suffix}.csv", csv_text(tables[group], group))
            written.append(f"summary{suffix}.csv")
            shifts = shift_table(rows)
            if shifts is not None:
                md += "\n" + shift_markdown(shifts, f"RAFT, {group}: domain generalisation (ImageNet's variants)")
                write_text(out / f"summary{suffix}_shift.csv", shift_csv(shifts, group))
                written.append(f"summary{suffix}_shift.csv")
            if not args.no_plot:
                plot(tables[group], f"RAFT, {group}", out / f"summary{suffix}.png")
                written.append(f"summary{suffix}.png")
        if protocols["methods"]:
            text, table, curve = methods_tables(protocols["methods"], group)
            md += ("\n" if md else "") + text
            name = f"summary{suffix}_methods.csv"
            write_text(out / name, table)
            written.append(name)
            if not args.no_plot:
                plot_methods(curve, f"{group}: RAFT and the baselines", out / f"summary{suffix}_methods.png")
                written.append(f"summary{suffix}_methods.png")
        for protocol, tabulate in (("base2new", base2new_tables), ("transfer", transfer_tables)):
            if protocols[protocol]:
                text, table = tabulate(protocols[protocol], group)
                md += ("\n" if md else "") + text
                name = f"summary{suffix}_{protocol}.csv" if rows else f"summary{suffix}.csv"  # a group's own table
                write_text(out / name, table)
                written.append(name)
        write_text(out / f"summary{suffix}.md", md)
        print(md)
        print(f"written to {out}: {', '.join([f'summary{suffix}.md', *written])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
