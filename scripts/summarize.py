"""Collect every results.json under a folder into the paper-style tables and plots.

    python scripts/summarize.py output/                  # writes output/summary*.{md,csv,tex,png}
    python scripts/summarize.py output/ --out tables/ --std sample --ci95 --curves

Rows are shot counts (and zero-shot CLIP), columns the datasets and their average; cells
are mean ± spread over seeds (the population standard deviation by default, as the field's
parse_test_res.py; --std sample, --ci95). Runs that differ in anything but the seed are never
averaged: groups are run-folder names without shots and seed (backbone, cached views,
protocol, tag), every table has its shots, a dataset on two sets of data gets two columns,
and a repeated seed is reported. Missing runs are gaps, never zeros; an average is given only
over a complete row. The protocols of doc/protocols.md add their tables: base-to-new,
cross-dataset transfer (transfer_<dataset>.json), domain generalisation (results_shift.json).
Each table is also a CSV and a LaTeX file.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.summary.collect import collect, repeated_seeds, tag_settings  # noqa: E402
from scripts.summary.plots import plot, plot_curves, plot_methods  # noqa: E402
from scripts.summary.stats import Spread  # noqa: E402
from scripts.summary.tables import (base2new_table, combined_table, fewshot_table, methods_table,  # noqa: E402
                                    shift_table, transfer_table)
from utils import RaftError, ToolParser, atomic_write, run_main  # noqa: E402


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def group_notes(group: str, rows: list[dict]) -> list[str]:
    """What a tag abbreviates, and every seed that appears twice in a cell."""
    notes = []
    if "more-" in group or "=" in group:
        settings = tag_settings(rows)
        if settings:
            notes.append(f"Tag settings of {group}: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".")
    for note in repeated_seeds(rows):
        notes.append(f"Repeated seed: {note}.")
        print(f"warning: {note}", file=sys.stderr)
    return notes


def main(argv: list[str] | None = None):
    parser = ToolParser(description=__doc__)
    parser.add_argument("root", help="folder searched recursively for results.json (e.g. output/)")
    parser.add_argument("--out", help="where to write the summary files (default: ROOT)")
    parser.add_argument("--std", choices=("population", "sample"), default="population",
                        help="the spread over seeds: numpy's population std, as the field's tables (default), or "
                             "the sample std")
    parser.add_argument("--ci95", action="store_true", help="show a 95%% confidence interval instead of the std")
    parser.add_argument("--curves", action="store_true", help="also plot each group's training curves "
                                                              "(summary_<group>_curves.png)")
    parser.add_argument("--no-plot", action="store_true", help="tables only (default: tables and plots)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        raise RaftError(f"{root} is not a folder")
    groups = collect(root)
    if not groups:
        raise RaftError(f"no results.json under {root}")
    spread = Spread(args.std, args.ci95)
    out = Path(args.out) if args.out else root
    out.mkdir(parents=True, exist_ok=True)
    fewshot = {group: rows["fewshot"] for group, rows in groups.items() if rows["fewshot"]}
    tables = {group: fewshot_table(rows, group, spread, [])[1] for group, rows in fewshot.items()}

    def emit(name: str, table) -> list[str]:
        write_text(out / f"{name}.csv", table.csv())
        write_text(out / f"{name}.tex", table.latex())
        return [f"{name}.csv", f"{name}.tex"]

    if len(fewshot) > 1:  # backbones (and settings) side by side, the backbone as a column
        combined = combined_table(tables, {group: rows[0]["backbone"] for group, rows in fewshot.items()}, spread)
        write_text(out / "summary_all.md", combined.markdown())
        written = emit("summary_all", combined)
        print(combined.markdown())
        print(f"written to {out}: summary_all.md, {', '.join(written)}\n")
    for group, protocols in sorted(groups.items()):
        suffix = "" if len(groups) == 1 else f"_{group}"
        md, written = "", []
        rows = protocols["fewshot"]
        notes = group_notes(group, [r for p in protocols.values() for r in p])
        if rows:
            table, cells = fewshot_table(rows, group, spread, notes)
            md += table.markdown()
            written += emit(f"summary{suffix}", table)
            shifts = shift_table(rows, group, spread)
            if shifts is not None:
                md += "\n" + shifts.markdown()
                written += emit(f"summary{suffix}_shift", shifts)
            if not args.no_plot:
                plot(cells, f"RAFT, {group}", out / f"summary{suffix}.png")
                written.append(f"summary{suffix}.png")
            curves = [r for r in rows if r.get("history")]
            if args.curves and curves and not args.no_plot:
                plot_curves(curves, f"RAFT, {group}: training curves", out / f"summary{suffix}_curves.png")
                written.append(f"summary{suffix}_curves.png")
        if protocols["methods"]:
            table, curve = methods_table(protocols["methods"], group, spread)
            md += ("\n" if md else "") + table.markdown()
            written += emit(f"summary{suffix}_methods", table)
            if not args.no_plot:
                plot_methods(curve, f"{group}: RAFT and the baselines", out / f"summary{suffix}_methods.png")
                written.append(f"summary{suffix}_methods.png")
        for protocol, tabulate in (("base2new", base2new_table), ("transfer", transfer_table)):
            if protocols[protocol]:
                table = (tabulate(protocols[protocol], group, spread, notes) if protocol == "base2new"
                         else tabulate(protocols[protocol], group, spread))
                md += ("\n" if md else "") + table.markdown()
                written += emit(f"summary{suffix}_{protocol}" if rows else f"summary{suffix}", table)
        write_text(out / f"summary{suffix}.md", md)
        print(md)
        print(f"written to {out}: {', '.join([f'summary{suffix}.md', *written])}\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
