"""Readers for the CoOp layout of the ten fine-grained datasets (doc/datasets.md).

Dataset differences are data: one row of ``LAYOUTS`` per dataset says where its images
live, which split file labels them and which hand-written template describes a class.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from utils import RaftError, printable, read_json, read_text

from .base import DatasetSplits, Datum, check_splits_usable, inside


@dataclass(frozen=True)
class Variant:
    """Another folder layout people have for a dataset, accepted as it is when unambiguous."""
    name: str                      # where it comes from (for the log and check_data)
    image_dir: str                 # its image folder under the root
    nested: bool = False           # each split path's first folder is repeated (cars_train/cars_train/x.jpg)

    def path(self, listed: str) -> str:
        """Where a split file's path lies in this layout, relative to ``image_dir``."""
        if not self.nested or "/" not in listed:
            return listed
        first, rest = listed.split("/", 1)
        return f"{first}/{first}/{rest}"


@dataclass(frozen=True)
class Layout:
    image_dir: str                 # image folder under the root ("" = the root itself)
    split_file: str                # split_zhou_*.json, or FGVC's variants.txt
    templates: tuple[str, ...]     # used when no description file covers a class
    reader: str = "json"           # "json" (CoOp split file) or "fgvc" (FGVC's text files)
    variants: tuple[Variant, ...] = ()   # other layouts people have (doc/datasets.md)
    benchmark: bool = True         # one of the paper's datasets (the sweeps' default, summarize's columns)


LAYOUTS: dict[str, Layout] = {
    "caltech101": Layout("101_ObjectCategories", "split_zhou_Caltech101.json", ("a photo of a {}.",)),
    "oxford_pets": Layout("images", "split_zhou_OxfordPets.json", ("a photo of a {}, a type of pet.",)),
    "stanford_cars": Layout("", "split_zhou_StanfordCars.json", ("a photo of a {}.",),
                            variants=(Variant("Kaggle's copy", "", nested=True),)),
    "oxford_flowers": Layout("jpg", "split_zhou_OxfordFlowers.json", ("a photo of a {}, a type of flower.",),
                             variants=(Variant("the published RAFT code's", "data/jpg"),)),
    "food101": Layout("images", "split_zhou_Food101.json", ("a photo of {}, a type of food.",)),
    "fgvc": Layout("images", "variants.txt", ("a photo of a {}, a type of aircraft.",), reader="fgvc"),
    "sun397": Layout("SUN397", "split_zhou_SUN397.json", ("a photo of a {}.",)),
    "dtd": Layout("images", "split_zhou_DescribableTextures.json", ("{} texture.",)),
    "eurosat": Layout("2750", "split_zhou_EuroSAT.json", ("a centered satellite photo of {}.",)),
    "ucf101": Layout("UCF-101-midframes", "split_zhou_UCF101.json", ("a photo of a person doing {}.",)),
    # the offline demo's generated dataset (datasets/demo.py)
    "demo": Layout("images", "split_zhou_Demo.json", ("a photo of a {}.",), benchmark=False),
}
# The benchmark's 11 datasets in the paper's column order (ImageNet, then the ten by name): what
# the sweeps run by default (scripts/common.sh), check_data.py checks and summarize.py orders by.
BENCHMARK = ("imagenet", *sorted(name for name, layout in LAYOUTS.items() if layout.benchmark))
SPLITS = ("train", "val", "test")
log = logging.getLogger("raft")


def expected_layout(name: str) -> str:
    layout = LAYOUTS[name]
    images = f"{layout.image_dir}/" if layout.image_dir else "<image folders>"
    if layout.reader == "fgvc":
        return f"{images}, variants.txt, images_variant_{{train,val,test}}.txt"
    return f"{images}, {layout.split_file}"


PROBE_ROWS = 8   # split rows looked up per layout to tell the layouts apart


def recognise_layout(name: str, root: Path, listed: list[str]) -> Variant:
    """The layout the dataset folder has: CoOp's, or one of ``Layout.variants`` when its files
    are the ones present. Two layouts that both hold the split's images are refused, naming
    the folders that decide."""
    layout = LAYOUTS[name]
    candidates = (Variant("CoOp's", layout.image_dir), *layout.variants)
    probe = listed[:PROBE_ROWS]
    found = [v for v in candidates if any((root / v.image_dir / v.path(p)).is_file() for p in probe)]
    if len(found) > 1:
        places = " and ".join(f"{v.name} ({root / v.image_dir / v.path(probe[0])})" for v in found)
        raise RaftError(f"{name} at {printable(root)} holds its images in two layouts, {places}: keep one (move or "
                        f"remove the other) so that each split row names one file")
    return found[0] if found else candidates[0]


def _check_root(name: str, root: Path) -> None:
    if not root.is_dir():
        raise RaftError(f"data_path {root} does not exist; {name} expects a folder holding {expected_layout(name)} "
                        f"(see doc/datasets.md)")


def _labels_to_names(rows_by_split: dict[str, list[tuple[str, int, str]]], source: str) -> list[str]:
    """Class names indexed by label, checking labels are 0..C-1 and names are consistent
    (work in the number of rows, whatever the labels' values)."""
    names: dict[int, str] = {}
    for rows in rows_by_split.values():
        for _, label, classname in rows:
            if names.setdefault(label, classname) != classname:
                raise RaftError(f"{source}: label {label} is called both '{names[label]}' and '{classname}'")
    if not names:
        raise RaftError(f"{source} holds no images")
    count = len(names)
    outside = sorted(label for label in names if not 0 <= label < count)
    if outside:
        missing = [i for i in range(count) if i not in names][:5]
        raise RaftError(f"{source}: labels must be 0..C-1 without gaps; {count} classes, but label {outside[0]} is "
                        f"outside 0..{count - 1} (missing {missing})")
    return [names[i] for i in range(count)]


def _read_json_split(path: Path, image_root: Path) -> dict[str, list[tuple[str, int, str]]]:
    data = read_json(path, "split file")
    if not isinstance(data, dict) or any(s not in data for s in SPLITS):
        raise RaftError(f"split file {path} must be an object with 'train', 'val' and 'test' lists")
    out = {}
    for split in SPLITS:
        rows = data[split]
        if not isinstance(rows, list):
            raise RaftError(f"split file {path}: '{split}' must be a list")
        checked = []
        for i, row in enumerate(rows):
            if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
                    and isinstance(row[1], int) and not isinstance(row[1], bool) and isinstance(row[2], str)):
                raise RaftError(f"split file {path}: {split}[{i}] = {printable(repr(row))[:200]} is not "
                                f"[image_path, label, classname]")
            inside(image_root, row[0], f"split file {path}: {split}[{i}]")
            checked.append((row[0], row[1], row[2]))
        out[split] = checked
    return out


def _read_fgvc_split(root: Path, image_root: Path) -> tuple[list[str], dict[str, list[tuple[str, int, str]]]]:
    variants_file = root / "variants.txt"
    classnames = [line.strip() for line in read_text(variants_file, "class list").splitlines() if line.strip()]
    label_of = {name: i for i, name in enumerate(classnames)}
    out = {}
    for split in SPLITS:
        path = root / f"images_variant_{split}.txt"
        if not path.is_file():
            raise RaftError(f"split file missing: {path}; fgvc expects {expected_layout('fgvc')}")
        rows = []
        for n, line in enumerate(read_text(path, "split file").splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")  # variant names contain spaces
            if variant not in label_of:
                raise RaftError(f"{path}:{n}: variant '{variant}' is not in variants.txt")
            inside(image_root, f"{image_id}.jpg", f"{path}:{n}")
            rows.append((f"{image_id}.jpg", label_of[variant], variant))
        out[split] = rows
    return classnames, out


def read_coop_dataset(name: str, root: str | Path) -> DatasetSplits:
    """Read one of ``LAYOUTS`` from its root folder into train/val/test lists."""
    if name not in LAYOUTS:
        known = ", ".join(sorted(LAYOUTS))
        hint = " (ImageNet runs through main_imagenet.py)" if name == "imagenet" else ""
        raise RaftError(f"unknown dataset '{name}'{hint}; known: {known}")
    layout = LAYOUTS[name]
    root = Path(root)
    _check_root(name, root)
    split_path = root / layout.split_file
    if not split_path.is_file():
        raise RaftError(f"split file missing: {split_path}; {name} expects {expected_layout(name)} under data_path")
    image_root = root / layout.image_dir
    if layout.reader == "fgvc":
        classnames, rows = _read_fgvc_split(root, image_root)
        _labels_to_names(rows, str(root))  # consistency checks only: names come from variants.txt
    else:
        rows = _read_json_split(split_path, image_root)
        classnames = _labels_to_names(rows, str(split_path))
    check_splits_usable(name, rows["train"], rows["test"], f"split file {split_path}")
    variant = recognise_layout(name, root, [p for s in SPLITS for p, _, _ in rows[s]])
    if variant.image_dir != layout.image_dir or variant.nested:
        log.info(f"{name}: {variant.name} layout ({root / variant.image_dir})")
    image_root = root / variant.image_dir
    splits = {s: [Datum(str(image_root / variant.path(p)), label, c, p if variant.nested else "")
                  for p, label, c in rows[s]] for s in SPLITS}
    extra = [root / f"images_variant_{s}.txt" for s in SPLITS] if layout.reader == "fgvc" else []
    return DatasetSplits(name, root, classnames, list(layout.templates), **splits, split_file=split_path,
                         extra_split_files=extra, image_root=image_root, layout=variant.name)
