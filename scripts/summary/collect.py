"""Reading run folders into records, grouped so that nothing but seeds is ever averaged.

A group is one run-folder name without its shots and seed (backbone, cached views,
protocol, tag). Inside a group, a table cell is one dataset (on one set of data) at one shot
count: runs in it differ in their seed alone. Two runs of one dataset on different data (a
subset of ImageNet's classes, another split) get different columns; a seed that appears twice
in a cell is reported.
"""
from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from pathlib import Path

from run.config import CONFIG_DIR, NAMED_KEYS, NOT_TRAINING_KEYS, file_values
from utils import RaftError, printable, read_json

PROTOCOLS = ("fewshot", "base2new", "transfer", "methods")


def group_of(run_dir: Path) -> str:
    """The run folder's name without shots and seed: backbone and settings (RN50_views10_lr=0.0002)."""
    return re.sub(r"_\d+shots_seed\d+", "", run_dir.name)


def read_record(path: Path) -> dict | None:
    """A results file as its dict, or None (said on stderr, by name) when it is damaged: not a
    bounded UTF-8 JSON file, or one of the fields a table reads missing or of the wrong kind."""
    try:
        r = read_json(path, "results file")
        problem = record_problem(r)
    except RaftError as exc:
        problem = str(exc)
    if problem:
        print(f"skipping {printable(path)}: {problem}", file=sys.stderr)
        return None
    return r


def accuracy(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        0 <= value <= 100


def record_problem(r) -> str | None:
    """What makes a results file unusable for the tables (None: nothing)."""
    if not isinstance(r, dict):
        return "not a RAFT results file (not a JSON object)"
    checks = [("test_acc", accuracy(r.get("test_acc"))), ("zero_shot_acc", accuracy(r.get("zero_shot_acc"))),
              ("shots", isinstance(r.get("shots"), int) and not isinstance(r.get("shots"), bool)),
              ("dataset", isinstance(r.get("dataset"), str)), ("backbone", isinstance(r.get("backbone"), str)),
              ("seed", isinstance(r.get("seed"), (int, str)))]
    for key in ("config", "text_source", "split", "shift", "baselines", "base2new"):
        if r.get(key) is not None and not isinstance(r[key], dict):
            return f"'{key}' is not a mapping: not a RAFT results file of this form"
    checks.append(("history", r.get("history") is None or isinstance(r["history"], list)))
    for name, part in (r.get("shift") or {}).items():
        checks.append((f"shift.{name}", isinstance(part, dict) and accuracy(part.get("test_acc"))
                       and accuracy(part.get("zero_shot_acc"))))
    for name, part in (r.get("baselines") or {}).items():   # a number, or why there is none
        checks.append((f"baselines.{name}", isinstance(part, dict) and (
            accuracy(part.get("test_acc")) or isinstance(part.get("failed", part.get("skipped")), str))))
    if r.get("protocol") == "base2new":
        parts = r.get("base2new") or {}
        checks += [(f"base2new.{p}", isinstance(parts.get(p), dict) and accuracy(parts[p].get("test_acc"))
                    and accuracy(parts[p].get("zero_shot_acc"))) for p in ("base", "new")]
    source = r.get("text_source") or {}
    checks.append(("text_source", source.get("kind") != "descriptions" or isinstance(source.get("git_blob"), str)))
    bad = [key for key, ok in checks if not ok]
    return f"'{bad[0]}' is missing or of the wrong kind: not a RAFT results file of this form" if bad else None


def data_id(r: dict) -> str:
    """What data a run used, short: the SHA-256 of its class names and split lists (results of
    this version), else its split file's, else its class count."""
    if r.get("data_sha256"):
        return r["data_sha256"][:8]
    files = (r.get("split") or {}).get("files") or []
    return files[0]["sha256"][:8] if files else f"{r.get('num_classes', '?')}c"


def text_label(r: dict) -> str:
    """The text source, short: the description file's git blob id, or 'templates' (runs before
    the text source was recorded: 'unrecorded')."""
    source = r.get("text_source")
    if not source:
        return "unrecorded"
    return f"descriptions {source['git_blob'][:7]}" if source.get("kind") == "descriptions" else "templates"


def record(r: dict, path: Path) -> dict:
    return {"dataset": r["dataset"], "shots": int(r["shots"]), "seed": r["seed"], "backbone": r["backbone"],
            "acc": float(r["test_acc"]), "zero_shot": float(r["zero_shot_acc"]), "data": data_id(r),
            "classes": r.get("num_classes"), "text": text_label(r), "folder": str(path.parent),
            "config": r.get("config"), "history": r.get("history"), "alpha_source": r.get("alpha_source"),
            "shift": {k: (float(v["test_acc"]), float(v["zero_shot_acc"])) for k, v in (r.get("shift") or {}).items()}}


def method_row(r: dict, base: dict, raft: float | None) -> dict:
    """Each method's test accuracy in one run (RAFT's too when it ran); a method without one is
    kept as failed or skipped (shown so, never dropped)."""
    accs = {name: float(m["test_acc"]) for name, m in r["baselines"].items() if "test_acc" in m}
    if raft is not None:
        accs["raft"] = raft
    states = {name: "failed" if "failed" in m else "skipped" for name, m in r["baselines"].items()
              if "test_acc" not in m}
    return base | {"accs": accs, "states": states}


def collect(root: Path) -> dict[str, dict[str, list[dict]]]:
    """Every results file under ``root``, grouped by run-folder group, then by protocol; the
    domain-shift evaluations (results_shift.json; results_eval.json of earlier versions) and the
    transfers (transfer_<dataset>.json) beside a run join its record."""
    groups: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {p: [] for p in PROTOCOLS})
    for path in sorted(root.rglob("baselines.json")):   # scripts/run_baselines.py, where RAFT has not run (yet)
        if not (path.parent / "results.json").is_file():
            try:
                b = read_json(path, "baselines file")
                if b.get("protocol", "fewshot") == "fewshot":
                    base = {"dataset": b["dataset"], "shots": int(b["shots"]), "seed": b["seed"], "data": data_id(b),
                            "classes": b.get("num_classes"), "text": text_label(b), "folder": str(path.parent)}
                    groups[group_of(path.parent)]["methods"].append(method_row(b, base, None))
            except (RaftError, AttributeError, KeyError, TypeError, ValueError):
                print(f"skipping {printable(path)}: not a baselines file", file=sys.stderr)
    for path in sorted(root.rglob("results.json")):
        r = read_record(path)
        if r is None:
            continue
        row = record(r, path)
        method = r.get("method", "raft")
        if method != "raft":   # a method inside CLIP: a column of its RAFT group's methods table
            found = re.search(rf"_({re.escape(method)}(?:-[^_]+)?)", path.parent.name)
            name = found.group(1) if found else method
            home = group_of(path.parent.with_name(path.parent.name.replace(f"_{name}", "", 1)))
            groups[home]["methods"].append(row | {"accs": {name: row["acc"]}, "states": {}})
            continue
        group = groups[group_of(path.parent)]
        if r.get("protocol") == "base2new":
            parts = r["base2new"]
            group["base2new"].append(row | {part: (float(parts[part]["test_acc"]), float(parts[part]["zero_shot_acc"]))
                                            for part in ("base", "new")})
            continue
        for name in ("results_shift.json", "results_eval.json"):
            evaluated = path.parent / name
            if not row["shift"] and evaluated.is_file() and (again := read_record(evaluated)) is not None:
                row["shift"] = record(again, evaluated)["shift"]
        group["fewshot"].append(row)
        if r.get("baselines"):
            group["methods"].append(method_row(r, row, row["acc"]))
        for transfer in sorted(path.parent.glob("transfer_*.json")):
            t = read_record(transfer)
            if t is not None:
                group["transfer"].append(row | {"target": t["dataset"], "target_acc": float(t["test_acc"]),
                                                "target_zero_shot": float(t["zero_shot_acc"])})
    for protocols in groups.values():
        label_data(protocols)
    return groups


def label_data(protocols: dict[str, list[dict]]) -> None:
    """A dataset seen on more than one set of data in a group gets one column per set: its
    name, its class count and its data id (never averaged together)."""
    seen: dict[str, set] = defaultdict(set)
    for rows in protocols.values():
        for row in rows:
            seen[row["dataset"]].add(row["data"])
    for rows in protocols.values():
        for row in rows:
            row["name"] = row["dataset"]
            if len(seen[row["dataset"]]) > 1:
                row["dataset"] = f"{row['dataset']} [{row['classes']} classes, data {row['data']}]"


def repeated_seeds(rows: list[dict], *key: str) -> list[str]:
    """Cells (``key`` + dataset + shots) in which a seed appears in more than one run folder. A
    folder gives several rows (its few-shot result, its baselines, each transfer): one run."""
    cells: dict[tuple, list] = defaultdict(list)
    for r in rows:
        cells[(r["dataset"], r["shots"], *(r[k] for k in key))].append(r)
    notes = []
    for cell, runs in cells.items():
        folders: dict = defaultdict(dict)   # seed -> its folders, in order, once each
        for r in runs:
            folders[r["seed"]][r["folder"]] = None
        for seed, seen in folders.items():
            if len(seen) > 1:
                notes.append(f"seed {seed} appears {len(seen)} times for {cell[0]} at {cell[1]} shots "
                             f"({', '.join(seen)})")
    return notes


def tag_settings(rows: list[dict]) -> dict[str, str]:
    """What a group's tag stands for: the training settings its runs have that their dataset's
    config file does not (the tag abbreviates them when long, `…_and2more-<hash>`)."""
    for r in rows:
        config = r.get("config")
        path = CONFIG_DIR / f"{r.get('name', r['dataset'])}.yaml"
        if not config or not path.is_file():
            continue
        defaults = file_values(path)
        changed = {k: v for k, v in config.items() if k not in NOT_TRAINING_KEYS | NAMED_KEYS
                   and k in defaults and defaults[k] != v}
        return {k: str(v) for k, v in changed.items()}
    return {}
