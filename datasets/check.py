"""Check a dataset tree before any training (``scripts/check_data.py``): the folder, the split
file (against the published one), the layout, every image the split lists, a sample of them
(or all) actually decoded. Everything missing is listed at once, not found by a run an hour in.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from utils import RaftError, printable

from .base import Datum, list_images
from .coop import LAYOUTS, SPLITS, read_coop_dataset
from .imagenet import read_classnames
from .loader import UnreadableImage, read_rgb
from .published import PUBLISHED_FILES, file_blob_id

SHOWN = 3   # missing or unreadable files named per split (the counts are always complete)


@dataclass
class Report:
    dataset: str
    folder: Path
    status: str = "ok"                 # ok | incomplete | missing | error
    split_file: str = "–"              # published | differs | missing | –
    layout: str = "–"
    classes: str = "–"
    splits: dict = field(default_factory=dict)      # split -> {"listed", "missing", "first_missing"}
    opened: int = 0
    unreadable: list = field(default_factory=list)
    problems: list = field(default_factory=list)

    def problem(self, text: str, status: str = "incomplete") -> None:
        self.problems.append(text)
        if self.status in ("ok", "incomplete"):
            self.status = status

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "folder": str(self.folder), "status": self.status,
                "split_file": self.split_file, "layout": self.layout, "classes": self.classes,
                "splits": self.splits, "opened": self.opened, "unreadable": self.unreadable,
                "problems": self.problems}


def published_split(dataset: str):
    return next((f for f in PUBLISHED_FILES if f.dataset == dataset and f.kind == "split"
                 and f.target_name.startswith("split_zhou_")), None)


def split_file_state(report: Report, dataset: str, path: Path) -> None:
    """Whether the split file is the published one; a file that is another dataset's says so."""
    published = published_split(dataset)
    if published is None:
        return
    blob = file_blob_id(path)
    if blob == published.git_blob:
        report.split_file = "published"
        return
    report.split_file = "differs"
    other = next((f.dataset for f in PUBLISHED_FILES if f.git_blob == blob), None)
    if other is not None:
        report.problem(f"{path.name} is {other}'s published split file, not {dataset}'s", "error")
    else:
        report.problems.append(f"{path.name} is not the published file (git blob {blob[:12]}…, published "
                               f"{published.git_blob[:12]}…): your own split?")


def missing_images(report: Report, splits: dict[str, list[Datum]], where: Path) -> None:
    for split, items in splits.items():
        gone = [d.path for d in items if not os.path.isfile(d.path)]
        report.splits[split] = {"listed": len(items), "missing": len(gone),
                                "first_missing": [printable(os.path.relpath(p, where)) for p in gone[:SHOWN]]}
        if gone:
            report.problem(f"{split}: {len(gone)} of {len(items)} images missing under {printable(where)}, e.g. "
                           + ", ".join(report.splits[split]["first_missing"]))


def open_images(report: Report, items: list[Datum], sample: int | None, seed: int = 0) -> None:
    """Decode ``sample`` of the images (all when None) that exist: truncated or non-image files."""
    present = [d for d in items if os.path.isfile(d.path)]
    chosen = present if sample is None or sample >= len(present) else random.Random(seed).sample(present, sample)
    for d in chosen:
        try:
            read_rgb(d.path)
        except UnreadableImage as exc:
            report.unreadable.append(str(exc))
    report.opened = len(chosen)
    if report.unreadable:
        report.problem(f"{len(report.unreadable)} of {len(chosen)} opened images are unreadable, e.g. "
                       + "; ".join(report.unreadable[:SHOWN]))


def check_coop(dataset: str, folder: Path, expected_classes: int | None, sample: int | None,
               classes_of: dict[str, int]) -> Report:
    report = Report(dataset, folder)
    layout = LAYOUTS[dataset]
    split_path = folder / layout.split_file
    if not split_path.is_file():
        report.split_file = "missing"
        report.problem(f"{split_path.name} missing in {printable(folder)}"
                       + ("" if layout.reader == "fgvc" else f" (python scripts/get_files.py {dataset})"), "missing")
        return report
    if layout.reader != "fgvc":
        split_file_state(report, dataset, split_path)
    try:
        data = read_coop_dataset(dataset, folder)
    except RaftError as exc:
        report.problem(str(exc), "error")
        return report
    report.layout = data.layout or "CoOp's"
    report.classes = str(data.num_classes)
    if expected_classes is not None and data.num_classes != expected_classes:
        same = [name for name, n in classes_of.items() if n == data.num_classes and name != dataset]
        report.problem(f"the split lists {data.num_classes} classes, {dataset} has {expected_classes}"
                       + (f" ({' or '.join(same)} has {data.num_classes}: their split file?)" if same else ""), "error")
    missing_images(report, {"train": data.train, "val": data.val, "test": data.test}, data.image_root or folder)
    if any(s["missing"] for s in report.splits.values()):
        report.problems.append(f"{WHERE_FROM} ({dataset})")
    open_images(report, data.train + data.val + data.test, sample)
    return report


def check_imagenet(folder: Path, sample: int | None) -> Report:
    report = Report("imagenet", folder, layout="CoOp's")
    try:
        wnids, names = read_classnames(folder)
    except RaftError as exc:
        report.problem(str(exc), "missing" if not (folder / "classnames.txt").is_file() else "error")
        return report
    report.classes = str(len(wnids))
    splits: dict[str, list[Datum]] = {}
    for split in ("train", "val"):
        base = folder / "images" / split
        absent = [w for w in wnids if not (base / w).is_dir()]
        if absent:
            report.problem(f"images/{split}: {len(absent)} of {len(wnids)} class folders missing under "
                           f"{printable(base)}, e.g. {', '.join(absent[:SHOWN])}")
        gone = set(absent)
        listed = {w: list_images(base / w) for w in wnids if w not in gone}   # each folder read once
        items = [Datum(str(p), label, names[label]) for label, w in enumerate(wnids) for p in listed.get(w, ())]
        splits[split] = items
        report.splits[split] = {"listed": len(items), "missing": 0, "first_missing": [],
                                "class_folders_missing": len(absent)}
        empty = [w for w, files in listed.items() if not files]
        if empty:
            report.problem(f"images/{split}: {len(empty)} class folders hold no image, e.g. {', '.join(empty[:SHOWN])}")
    open_images(report, splits["train"] + splits["val"], sample)
    return report


WHERE_FROM = "doc/datasets.md says where its images come from and how to lay them out"


def check_folder(folder: Path, sample: int | None, fractions: list[float], seed: int) -> Report:
    """Your own images (``dataset: folder``), anywhere: the class folders, the split drawn (or
    given as train/ val/ test/), a sample of the images decoded. Nothing is written."""
    from .folder import read_folder_dataset
    report = Report(f"folder {printable(folder.name)}", folder, layout="class folders")
    try:
        data = read_folder_dataset(folder, fractions, seed, None)
    except RaftError as exc:
        report.problem(str(exc), "error")
        return report
    report.classes = str(data.num_classes)
    report.splits = {split: {"listed": len(items), "missing": 0, "first_missing": []}
                     for split, items in (("train", data.train), ("val", data.val), ("test", data.test))}
    open_images(report, data.train + data.val + data.test, sample)
    return report


def check_dataset(dataset: str, folder: Path, expected_classes: int | None, sample: int | None,
                  classes_of: dict[str, int]) -> Report:
    if not folder.is_dir():
        report = Report(dataset, folder)
        report.problem(f"folder {printable(folder)} does not exist ({WHERE_FROM})", "missing")
        return report
    if dataset == "imagenet":
        return check_imagenet(folder, sample)
    return check_coop(dataset, folder, expected_classes, sample, classes_of)


def split_counts(report: Report) -> list[str]:
    """'present/listed' per split, for the table."""
    out = []
    for split in SPLITS:
        s = report.splits.get(split)
        out.append("–" if s is None else f"{s['listed'] - s['missing']}/{s['listed']}")
    return out
