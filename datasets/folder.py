"""Your own images: an ImageFolder-style directory as a RAFT dataset (``dataset: folder``).

    <data_path>/<class name>/*.jpg                      split here, seeded, by split_fractions
    <data_path>/{train,val,test}/<class name>/*.jpg     splits given (val/ optional)

Class names are the folder names (underscores read as spaces in prompts), in sorted order.
A generated split is saved in the CoOp split-file format under ``<cache_dir>/splits/`` and
its path is recorded in results.json; it depends only on the image files, the fractions
and the split seed.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path

from utils import RaftError, printable, sha256_text, write_json

from .base import DatasetSplits, Datum, check_splits_usable, list_images

DEFAULT_TEMPLATES = ["a photo of a {}."]


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_name(folder_name: str) -> str:
    """A class folder's name as the class name of prompts, logs and checkpoints: itself, or for
    a name that is not valid UTF-8 its bytes written as \\xNN (distinct names stay distinct; the
    folder itself is still read under its real name)."""
    return printable(folder_name)


def _given_splits(root: Path) -> tuple[list[str], dict[str, list[Datum]]]:
    classes = [d.name for d in _class_dirs(root / "train")]
    label_of = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split in ("train", "val", "test"):
        items = []
        if (root / split).is_dir():
            for d in _class_dirs(root / split):
                if d.name not in label_of:
                    raise RaftError(f"{root / split}: class folder '{d.name}' is not in {root / 'train'}")
                items += [Datum(str(p), label_of[d.name], class_name(d.name)) for p in list_images(d)]
        splits[split] = items
    return classes, splits


def _made_splits(root: Path, fractions: list[float], seed: int) -> tuple[list[str], dict[str, list[Datum]]]:
    classes = [d.name for d in _class_dirs(root)]
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        files = list_images(root / name)
        if len(files) < 2:
            raise RaftError(f"class folder {root / name} has {len(files)} image(s); at least 2 are needed "
                            f"(one to train on, one to test)")
        rng.shuffle(files)
        n = len(files)
        n_train = max(1, round(fractions[0] * n))
        n_val = min(round(fractions[1] * n), n - n_train - 1)
        parts = {"train": files[:n_train], "val": files[n_train:n_train + n_val], "test": files[n_train + n_val:]}
        for split, paths in parts.items():
            splits[split] += [Datum(str(p), label, class_name(name)) for p in sorted(paths)]
    return classes, splits


def folder_root(path: str | Path) -> Path:
    """A folder dataset's root as a run names it: the path as given (a symlink keeps its own
    name), resolved only when it has none (`--data_path .`, `..`). The one rule of main.py,
    scripts/pending.py and every tool."""
    root = Path(path)
    return root.resolve() if root.name in ("", ".", "..") else root


def read_folder_dataset(root: str | Path, fractions: list[float], seed: int, cache_dir: str | Path | None,
                        templates: list[str] | None = None) -> DatasetSplits:
    """``cache_dir`` None: read only (a tool's look at the data: the drawn split is not recorded)."""
    root = folder_root(root)
    if not root.is_dir():
        raise RaftError(f"data_path {root} does not exist; a folder dataset is <data_path>/<class name>/*.jpg "
                        f"or <data_path>/{{train,val,test}}/<class name>/*.jpg")
    given = (root / "train").is_dir() and (root / "test").is_dir()
    classes, splits = _given_splits(root) if given else _made_splits(root, fractions, seed)
    if not classes:
        raise RaftError(f"no class folders in {root / 'train' if given else root} (expected <class name>/*.jpg)")
    trained = {d.label for d in splits["train"]}
    empty = [printable(c) for i, c in enumerate(classes) if i not in trained]
    if empty:
        raise RaftError(f"no training images for class(es) {', '.join(empty[:5])} under {printable(root)}")
    check_splits_usable(printable(root.name), splits["train"], splits["test"], printable(root))
    odd = [printable(c) for c in classes if printable(c) != c]
    if odd:
        logging.getLogger("raft").warning(
            f"warning: class folder names that are not UTF-8: {', '.join(odd[:5])}; prompts use them as written "
            f"here (rename the folders for meaningful prompts)")
    data = DatasetSplits(root.name, root, [class_name(c) for c in classes], list(templates or DEFAULT_TEMPLATES),
                         **splits)
    if not given and cache_dir is not None:
        rows = {s: [[str(Path(d.path).relative_to(root)), d.label, d.classname] for d in items]
                for s, items in splits.items()}
        key = sha256_text("folder-split", str(root.resolve()), fractions, seed, rows)
        data.split_file = Path(cache_dir) / "splits" / f"{root.name}_{key[:16]}.json"
        if not data.split_file.is_file():
            write_json(data.split_file, rows)
    return data
