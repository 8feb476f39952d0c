"""The tables of summarize.py, each rendered as Markdown, CSV and LaTeX from one set of cells.

Every table keeps runs apart that differ in anything but the seed: its rows or columns carry
the shot count, and a dataset seen on two sets of data gets two columns (collect.py). Cells
whose runs used another text source than the rest of the table are marked †.
"""
from __future__ import annotations

import csv
import io
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import baselines
from datasets import BENCHMARK
from utils import harmonic_mean

from .stats import Spread, fmt, fmt_mean

# The paper's column order (the dataset table's); any other dataset follows alphabetically.
DATASET_ORDER = list(BENCHMARK)
SHIFT_ORDER = ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
RAFT = "raft"   # RAFT's own column beside the registered methods (baselines/)


def method_label(name: str) -> str:
    return "RAFT" if name == RAFT else baselines.label(name)


def published_number(method: str, backbone: str, shots: int) -> float | None:
    """The average a method's paper reports for a backbone (named as open_clip or OpenAI's
    package names it: ViT-B-16 or ViT-B/16) and shot count, if the registry records one."""
    for (name, at), value in baselines.published(method).items():
        if at == shots and name.replace("/", "-") == backbone.replace("/", "-"):
            return value
    return None


def method_order(names) -> list[str]:
    """RAFT, then the registered methods in the registry's order, then any other a results file
    holds (another version's, a method since removed), by name: shown under its key, never dropped."""
    known = [RAFT, *baselines.INSIDE, *baselines.METHODS]
    present = set(names)
    return [m for m in known if m in present] + sorted(present - set(known))
TEXT_MARK = "†"


def ordered(names, order: list[str]) -> list[str]:
    def key(d):
        base = d.split(" [")[0]
        return (order.index(base) if base in order else len(order), d)
    return sorted(set(names), key=key)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    csv_header: list[str] = field(default_factory=list)
    csv_rows: list[list] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines + ([""] + self.notes if self.notes else [])) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(self.csv_header)
        writer.writerows(self.csv_rows)
        return buf.getvalue()

    def latex(self) -> str:
        def tex(text: str) -> str:
            text = text.replace("\\", "\\textbackslash{}")
            for a, b in (("&", "\\&"), ("%", "\\%"), ("_", "\\_"), ("#", "\\#"), ("**", "")):
                text = text.replace(a, b)
            return (text.replace(" ± ", " $\\pm$ ").replace("–", "--").replace(TEXT_MARK, "$^\\dagger$")
                    .replace("‡", "$^\\ddagger$"))
        lines = [f"% {tex(self.title)}", "\\begin{tabular}{l" + "c" * (len(self.header) - 1) + "}", "\\toprule",
                 " & ".join(tex(h) for h in self.header) + " \\\\", "\\midrule"]
        lines += [" & ".join(tex(c) for c in row) + " \\\\" for row in self.rows]
        lines += ["\\bottomrule", "\\end{tabular}"] + [f"% {tex(n)}" for n in self.notes]
        return "\n".join(lines) + "\n"


def text_marks(rows: list[dict]) -> tuple[str, set]:
    """The table's most common text source, and the (dataset, shots) cells with another one."""
    common = Counter(r["text"] for r in rows).most_common(1)[0][0] if rows else ""
    return common, {(r["dataset"], r["shots"]) for r in rows if r["text"] != common}


def marked(text: str, odd: bool) -> str:
    return text + TEXT_MARK if odd else text


def oracle_note(rows: list[dict]) -> list[str]:
    """Runs whose alpha was chosen on their test labels (alpha_on: test) are said to be that."""
    oracles = sum(r.get("alpha_source") == "test" for r in rows)
    return [f"‡ {oracles} run{'s' if oracles != 1 else ''} chose alpha on the test labels (alpha_on: test, the "
            f"published ImageNet protocol): an oracle, for comparison with the published code only, not a result"] \
        if oracles else []


def text_source_note(common: str, odd: set) -> list[str]:
    return [f"{TEXT_MARK} text from another source than the rest of the table ({common}): the runs are not "
            f"comparable on the text side"] if odd else []


# --------------------------------------------------------------------------- few-shot
def fewshot_cells(rows: list[dict], spread: Spread) -> dict:
    datasets = ordered((r["dataset"] for r in rows), DATASET_ORDER)
    shots = sorted({r["shots"] for r in rows})
    by_cell, zero = defaultdict(list), defaultdict(list)
    for r in rows:
        by_cell[(r["shots"], r["dataset"])].append(r["acc"])
        zero[r["dataset"]].append(r["zero_shot"])
    cells = {k: spread.cell(v) for k, v in by_cell.items()}
    zero_cells = {d: spread.cell(v) for d, v in zero.items()}

    def average(values: dict) -> float | None:
        means = [values[d][0] for d in datasets if d in values]
        return statistics.fmean(means) if len(means) == len(datasets) else None

    return {"datasets": datasets, "shots": shots, "cells": cells, "zero": zero_cells,
            "averages": {s: average({d: cells[(s, d)] for d in datasets if (s, d) in cells}) for s in shots},
            "zero_average": average(zero_cells)}


def fewshot_table(rows: list[dict], group: str, spread: Spread, notes: list[str]) -> tuple[Table, dict]:
    t = fewshot_cells(rows, spread)
    ds = t["datasets"]
    common, odd = text_marks(rows)
    body = [["zero-shot", *(fmt(t["zero"].get(d)) for d in ds), fmt_mean(t["zero_average"])]]
    body += [[str(s), *(marked(fmt(t["cells"].get((s, d))), (d, s) in odd) for d in ds), fmt_mean(t["averages"][s])]
             for s in t["shots"]]
    csv_rows = []
    for d in ds:
        for s in t["shots"]:
            cell = t["cells"].get((s, d))
            if cell is not None:
                csv_rows.append([group, d, s, cell[2], f"{cell[0]:.4f}", "" if cell[1] is None else f"{cell[1]:.4f}",
                                 f"{t['zero'][d][0]:.4f}"])
    csv_rows += [[group, "average", s, "", f"{t['averages'][s]:.4f}", "",
                  "" if t["zero_average"] is None else f"{t['zero_average']:.4f}"]
                 for s in t["shots"] if t["averages"][s] is not None]
    oracle = " ‡ (alpha on test)" if any(r.get("alpha_source") == "test" for r in rows) else ""
    table = Table(f"RAFT, {group}: {len(rows)} run{'s' if len(rows) != 1 else ''}{oracle}", ["shots", *ds, "Average"],
                  body,
                  [f"Test top-1 accuracy (%), {spread.note()}; – : no run; the average only over a complete row.",
                   *text_source_note(common, odd), *oracle_note(rows), *notes],
                  ["group", "dataset", "shots", "runs", "mean", "std", "zero_shot_mean"], csv_rows)
    return table, t


def combined_table(tables: dict[str, dict], backbones: dict[str, str], spread: Spread) -> Table:
    """Every backbone and setting side by side: RAFT rows (and zero-shot)."""
    datasets = ordered((d for t in tables.values() for d in t["datasets"]), DATASET_ORDER)

    def average(cells: list) -> str:
        return fmt_mean(statistics.fmean(c[0] for c in cells) if len(cells) == len(datasets) else None)

    body, csv_rows = [], []
    for group, t in sorted(tables.items()):
        setting = group[len(backbones[group]):].lstrip("_") or "–"
        body.append([backbones[group], setting, "zero-shot", *(fmt(t["zero"].get(d)) for d in datasets),
                     average([t["zero"][d] for d in datasets if d in t["zero"]])])
        for shots in t["shots"]:
            body.append([backbones[group], setting, str(shots), *(fmt(t["cells"].get((shots, d))) for d in datasets),
                         average([t["cells"][(shots, d)] for d in datasets if (shots, d) in t["cells"]])])
        for (shots, dataset), (mean, std, n) in sorted(t["cells"].items(), key=lambda kv: (kv[0][1], kv[0][0])):
            csv_rows.append([backbones[group], group, dataset, shots, n, f"{mean:.4f}", "" if std is None else f"{std:.4f}"])
        for dataset, (mean, std, n) in sorted(t["zero"].items()):
            csv_rows.append([backbones[group], group, dataset, "zero-shot", n, f"{mean:.4f}",
                             "" if std is None else f"{std:.4f}"])
    return Table("RAFT across backbones and settings", ["backbone", "setting", "shots", *datasets, "Average"], body,
                 [f"Test top-1 accuracy (%), {spread.note()}; – : no run."],
                 ["backbone", "group", "dataset", "shots", "runs", "mean", "std"], csv_rows)


# --------------------------------------------------------------------------- domain shift
def shift_table(rows: list[dict], group: str, spread: Spread) -> Table | None:
    """ImageNet and its variants per shot count (and zero-shot CLIP), and the variants' average
    (only for a row with all of them)."""
    runs = [r for r in rows if r["shift"]]
    if not runs:
        return None
    variants = ordered((k for r in runs for k in r["shift"]), SHIFT_ORDER)
    columns = ["imagenet", *variants]
    body, csv_rows = [], []
    for label, chosen, zero in [("zero-shot", runs, True),
                                *((str(s), [r for r in runs if r["shots"] == s], False)
                                  for s in sorted({r["shots"] for r in runs}))]:
        cells = {"imagenet": spread.cell([r["zero_shot"] if zero else r["acc"] for r in chosen])}
        for v in variants:
            values = [r["shift"][v][1 if zero else 0] for r in chosen if v in r["shift"]]
            if values:
                cells[v] = spread.cell(values)
        means = [cells[v][0] for v in variants if v in cells]
        average = statistics.fmean(means) if len(means) == len(variants) else None
        body.append([label, *(fmt(cells.get(c)) for c in columns), fmt_mean(average)])
        csv_rows += [[group, label, c, cells[c][2], f"{cells[c][0]:.4f}", "" if cells[c][1] is None else
                      f"{cells[c][1]:.4f}"] for c in columns if c in cells]
        if average is not None:
            csv_rows.append([group, label, "variants_average", "", f"{average:.4f}", ""])
    return Table(f"RAFT, {group}: domain generalisation (ImageNet's variants)", ["shots", *columns, "variants average"],
                 body, ["Trained on ImageNet, tested on its variants with the ImageNet classifier (the 200-class "
                        f"variants restricted to their classes); top-1 accuracy (%), {spread.note()}."],
                 ["group", "shots", "test_set", "runs", "mean", "std"], csv_rows)


# --------------------------------------------------------------------------- base-to-new, transfer
def base2new_table(rows: list[dict], group: str, spread: Spread, notes: list[str]) -> Table:
    """Base / new / HM per dataset and shot count (RAFT and zero-shot CLIP); the 11-dataset
    average once all eleven are there (for a shot count)."""
    datasets = ordered((r["dataset"] for r in rows), DATASET_ORDER)
    common, odd = text_marks(rows)
    body, csv_rows = [], []
    for shots in sorted({r["shots"] for r in rows}):
        means = {}
        for d in datasets:
            runs = [r for r in rows if r["dataset"] == d and r["shots"] == shots]
            if not runs:
                continue
            cols = [[r["base"][0] for r in runs], [r["new"][0] for r in runs],
                    [harmonic_mean(r["base"][0], r["new"][0]) for r in runs],
                    [r["base"][1] for r in runs], [r["new"][1] for r in runs],
                    [harmonic_mean(r["base"][1], r["new"][1]) for r in runs]]
            means[d] = [statistics.fmean(c) for c in cols]
            body.append([d, str(shots), *(marked(fmt(spread.cell(c)), (d, shots) in odd and i == 2)
                                          for i, c in enumerate(cols))])
            csv_rows.append([group, d, shots, len(runs), *(f"{m:.4f}" for m in means[d])])
        if set(DATASET_ORDER) <= {d.split(" [")[0] for d in means}:
            avg = [statistics.fmean(means[d][i] for d in DATASET_ORDER if d in means) for i in range(6)]
            avg[2], avg[5] = harmonic_mean(avg[0], avg[1]), harmonic_mean(avg[3], avg[4])   # HM of the averages
            body.append(["**Average (11)**", str(shots), *(f"{a:.2f}" for a in avg)])
            csv_rows.append([group, "average", shots, "", *(f"{a:.4f}" for a in avg)])
    complete = any(row[0] == "**Average (11)**" for row in body)
    return Table(f"RAFT, {group}: base-to-new generalisation ({len(rows)} run{'s' if len(rows) != 1 else ''})",
                 ["dataset", "shots", "base", "new", "HM", "zero-shot base", "zero-shot new", "zero-shot HM"], body,
                 [f"Test top-1 accuracy (%), {spread.note()}; HM = harmonic mean of base and new (per run; the "
                  "average row takes the HM of the averaged base and new, as papers report). "
                  + ("" if complete else f"The 11-dataset average appears once all 11 datasets have runs "
                                         f"({len({d.split(' [')[0] for d in datasets} & set(DATASET_ORDER))} so far)."),
                  "Published averages (ViT-B/16, 16 shots), base / new / HM: CLIP 69.34 / 74.22 / 71.70 · "
                  "CoCoOp 80.47 / 71.69 / 75.83 · MaPLe 82.28 / 75.14 / 78.55 (doc/protocols.md).",
                  *text_source_note(common, odd), *notes],
                 ["group", "dataset", "shots", "runs", "base", "new", "hm", "zero_shot_base", "zero_shot_new",
                  "zero_shot_hm"], csv_rows)


def transfer_table(rows: list[dict], group: str, spread: Spread) -> Table:
    """Cross-dataset transfer: per source and shot count, the source's own accuracy, each
    target's, and the targets' average (when every run has every target)."""
    targets = ordered((r["target"] for r in rows), DATASET_ORDER)
    body, csv_rows = [], []
    for source in ordered((r["dataset"] for r in rows), DATASET_ORDER):
        for shots in sorted({r["shots"] for r in rows if r["dataset"] == source}):
            runs = [r for r in rows if r["dataset"] == source and r["shots"] == shots]
            seeds = sorted({r["seed"] for r in runs}, key=str)
            source_accs = [next(r["acc"] for r in runs if r["seed"] == s) for s in seeds]
            cells = {t: [r["target_acc"] for r in runs if r["target"] == t] for t in targets}
            per_seed = [[r["target_acc"] for r in runs if r["seed"] == s] for s in seeds]
            average = ([statistics.fmean(a) for a in per_seed]
                       if all(len(a) == len(targets) for a in per_seed) else [])
            body.append([source, str(shots), fmt(spread.cell(source_accs)),
                         *(fmt(spread.cell(cells[t])) if cells[t] else "–" for t in targets),
                         fmt(spread.cell(average)) if average else "–"])
            csv_rows += [[group, source, shots, source, len(source_accs), f"{statistics.fmean(source_accs):.4f}"]]
            csv_rows += [[group, source, shots, t, len(cells[t]), f"{statistics.fmean(cells[t]):.4f}"]
                         for t in targets if cells[t]]
            if average:
                csv_rows.append([group, source, shots, "target_average", len(average), f"{statistics.fmean(average):.4f}"])
    return Table(f"RAFT, {group}: cross-dataset transfer", ["source", "shots", "source test", *targets, "target average"],
                 body, [f"Test top-1 accuracy (%), {spread.note()} of the source runs; each target scored at the "
                        "source run's alpha. Published (ViT-B/16): MaPLe source 70.72, target average 66.30 "
                        "(doc/protocols.md)."],
                 ["group", "source", "shots", "test_set", "runs", "mean"], csv_rows)


# --------------------------------------------------------------------------- RAFT and the baselines
def methods_table(rows: list[dict], group: str, spread: Spread) -> tuple[Table, dict]:
    """RAFT and the baselines per dataset and shot count; an average row per shot count once
    every dataset has a number (and the curve the plot draws)."""
    methods = method_order({m for r in rows for m in (*r["accs"], *r.get("states", {}))})
    datasets = ordered((r["dataset"] for r in rows), DATASET_ORDER)
    shots = sorted({r["shots"] for r in rows})
    cells = {(d, s, m): [r["accs"][m] for r in rows if r["dataset"] == d and r["shots"] == s and m in r["accs"]]
             for d in datasets for s in shots for m in methods}
    states = {(d, s, m): [r["states"][m] for r in rows if r["dataset"] == d and r["shots"] == s
                          and m in r.get("states", {})] for d in datasets for s in shots for m in methods}

    def cell(key) -> str:   # mean ± spread over seeds; a run without a number says why
        values, missing = cells[key], states[key]
        if not values:
            return " / ".join(sorted(set(missing))) if missing else "–"
        return fmt(spread.cell(values)) + (f" ({len(missing)} {'/'.join(sorted(set(missing)))})" if missing else "")

    body, csv_rows, curve = [], [], {m: {} for m in methods}
    for d in datasets:
        for s in shots:
            if any(cells[(d, s, m)] or states[(d, s, m)] for m in methods):
                body.append([d, str(s), *(cell((d, s, m)) for m in methods)])
                csv_rows += [[group, d, s, m, len(cells[(d, s, m)]), f"{statistics.fmean(cells[(d, s, m)]):.4f}"]
                             for m in methods if cells[(d, s, m)]]
    for s in shots:
        for m in methods:
            means = [statistics.fmean(cells[(d, s, m)]) for d in datasets if cells[(d, s, m)]]
            if len(means) == len(datasets):
                curve[m][s] = statistics.fmean(means)
        if len(datasets) > 1:
            body.append(["**Average**", str(s), *(fmt_mean(curve[m].get(s)) for m in methods)])
            csv_rows += [[group, "average", s, m, "", f"{curve[m][s]:.4f}"] for m in methods if s in curve[m]]
    for backbone in sorted({r["backbone"] for r in rows}):
        for s in shots:
            papers = [published_number(m, backbone, s) for m in methods]
            if any(p is not None for p in papers):
                body.append([f"*published, {backbone}*", str(s), *("–" if p is None else f"*{p:.2f}*" for p in papers)])
    table = Table(f"{group}: RAFT and the baselines ({len(rows)} run{'s' if len(rows) != 1 else ''})",
                  ["dataset", "shots", *(method_label(m) for m in methods)], body,
                  [f"Test top-1 accuracy (%), {spread.note()}. Every method on the same few-shot images, the same "
                   "CLIP features and text, its hyper-parameters chosen on validation data (doc/baselines.md); "
                   "Tip-Adapter-F trains on 10 cached augmented views, not fresh ones. *published*: the 11-dataset "
                   "average each method's paper or repository reports at that backbone and shot count (sources in "
                   "doc/baselines.md).", *oracle_note(rows)],
                  ["group", "dataset", "shots", "method", "runs", "mean"], csv_rows)
    return table, curve
