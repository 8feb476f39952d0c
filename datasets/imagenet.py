"""ImageNet in the CoOp layout, and the distribution-shift test sets that reuse its classes.

    <data_path>/classnames.txt          "<wnid> <class name>" per line, in label order
    <data_path>/images/train/<wnid>/*   training images
    <data_path>/images/val/<wnid>/*     the official validation set = the test set

ImageNet has no labelled validation split in this protocol: the engine draws one from
train images outside the few-shot set (see datasets/fewshot.py).
"""
from __future__ import annotations

import json
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from utils import RaftError, atomic_write, printable, read_json, read_text, sha256_text

from .base import IMAGE_SUFFIXES, DatasetSplits, Datum, ShiftSet, check_splits_usable, image_names, list_images

# ImageNet templates used when no description file exists (the 7-template ensemble of
# CLIP's ImageNet notebook that the Tip-Adapter lineage uses).
IMAGENET_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


@dataclass(frozen=True)
class ShiftLayout:
    folder: str       # the dataset's usual folder name (data_path may be it or its parent)
    labels: str       # "index": folders 0..999; "wnid": folders named by WordNet id
    subset: bool      # a class subset (scored over its own classes only) or all of ImageNet's


SHIFT_LAYOUTS = {
    "imagenet_v2": ShiftLayout("imagenetv2-matched-frequency-format-val", "index", subset=False),
    "imagenet_sketch": ShiftLayout("sketch", "wnid", subset=False),
    "imagenet_a": ShiftLayout("imagenet-a", "wnid", subset=True),      # 200 classes
    "imagenet_r": ShiftLayout("imagenet-r", "wnid", subset=True),      # 200 classes
}


def read_classnames(root: Path) -> tuple[list[str], list[str]]:
    """``classnames.txt``: '<wnid> <class name>' per line; the wnid and the name are separated by
    spaces or tabs (ImageNet's own words.txt uses a tab). A wnid names a folder under images/:
    a plain folder name, never a path."""
    path = root / "classnames.txt"
    if not path.is_file():
        raise RaftError(f"{path} missing; imagenet expects classnames.txt ('<wnid> <name>' per line), "
                        f"images/train/<wnid>/ and images/val/<wnid>/ under data_path (see doc/datasets.md)")
    wnids, names, line_of = [], [], {}
    for n, line in enumerate(read_text(path, "class list").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(None, 1)
        if len(parts) < 2 or not parts[1].strip():
            raise RaftError(f"{path}:{n}: expected '<wnid> <class name>', got {printable(repr(line))[:120]}")
        wnid, name = parts[0], parts[1].strip()
        if wnid in (".", "..") or "/" in wnid or "\\" in wnid:
            raise RaftError(f"{path}:{n}: the wnid {printable(repr(wnid))} is not a folder name "
                            f"(it would lead out of images/train/)")
        if wnid in line_of:
            raise RaftError(f"{path}:{n}: the wnid {wnid} is listed twice (line {line_of[wnid]} too)")
        line_of[wnid] = n
        wnids.append(wnid)
        names.append(name)
    if not wnids:
        raise RaftError(f"{path} lists no classes")
    return wnids, names


LISTING_VERSION = 1
RACY_NS = 2_000_000_000   # folders modified this recently are listed, not cached (file times are coarse)


def plain_name(name) -> bool:
    """A file name directly inside its folder: a listing read back from the cache must not lead
    anywhere a folder walk could not (doc/robustness.md: paths stay inside the dataset)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\x00" not in name \
        and os.sep not in name


def _listing(folder: Path, wnids: list[str], cache_dir: str | Path | None) -> dict[str, list[str]]:
    """The image names of every class folder, cached under ``<cache_dir>/listings/``. A folder's
    modification time changes whenever a file is added, removed or renamed in it, so the key
    (every class folder's mtime and inode, the folder's path, the image suffixes) changes with
    any change to the listing; reading 1,000 folder times replaces reading 1.28 M entries. A
    folder modified in the last two seconds is not cached: the kernel's file times are coarser
    than a nanosecond, and a file added in the same tick would not move the time."""
    states = []
    for wnid in wnids:
        try:
            st = os.stat(folder / wnid)
        except OSError:
            st = None
        if st is None or not stat.S_ISDIR(st.st_mode):
            raise RaftError(f"class folder missing: {folder / wnid} (listed in classnames.txt)")
        states.append((wnid, st.st_mtime_ns, st.st_ino))
    if cache_dir is None:
        return {wnid: image_names(folder / wnid) for wnid in wnids}
    where = sha256_text(os.path.realpath(folder))[:12]
    path = Path(cache_dir) / "listings" / f"{folder.name}_{where}_" \
        f"{sha256_text(LISTING_VERSION, sorted(IMAGE_SUFFIXES), states)[:16]}.json"
    try:
        cached = read_json(path, "listing cache")
        if isinstance(cached, dict) and list(cached) == wnids and all(
                isinstance(names, list) and all(plain_name(n) for n in names) for names in cached.values()):
            return cached
    except (RaftError, OSError):
        pass                                   # absent or unreadable: list again, write it anew
    listing = {wnid: image_names(folder / wnid) for wnid in wnids}
    if time.time_ns() - max(st for _, st, _ in states) < RACY_NS:
        return listing   # a folder changed just now: a change in the same clock tick would keep its mtime
    try:
        data = json.dumps(listing, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "backslashreplace")
        atomic_write(path, lambda fh: fh.write(data))   # compact: 1.28 M names
        for old in path.parent.glob(f"{folder.name}_{where}_*.json"):   # this folder's older states
            if old != path:
                old.unlink(missing_ok=True)
    except OSError:
        pass                                   # a read-only cache costs the next run a listing, nothing else
    return listing


def _read_folders(folder: Path, wnids: list[str], names: list[str], cache_dir: str | Path | None) -> list[Datum]:
    if not folder.is_dir():
        raise RaftError(f"image folder missing: {folder} (expected images/train/<wnid>/ and images/val/<wnid>/)")
    listing, items = _listing(folder, wnids, cache_dir), []
    for label, (wnid, name) in enumerate(zip(wnids, names)):
        prefix = f"{folder}{os.sep}{wnid}{os.sep}"       # a plain join: os.path.join per file costs seconds
        items.extend(Datum(prefix + file, label, name) for file in listing[wnid])
    return items


def read_imagenet(root: str | Path, cache_dir: str | Path | None = None) -> DatasetSplits:
    """ImageNet's splits; with ``cache_dir``, the folders' listing is cached there (keyed by the
    class folders' state, see ``_listing``)."""
    root = Path(root)
    if not root.is_dir():
        raise RaftError(f"data_path {root} does not exist; imagenet expects classnames.txt, images/train/<wnid>/ "
                        f"and images/val/<wnid>/ (see doc/datasets.md)")
    wnids, names = read_classnames(root)
    train = _read_folders(root / "images" / "train", wnids, names, cache_dir)
    test = _read_folders(root / "images" / "val", wnids, names, cache_dir)
    check_splits_usable("imagenet", train, test, str(root / "images"))
    return DatasetSplits("imagenet", root, names, list(IMAGENET_TEMPLATES), train, [], test)


def read_shift_set(kind: str, path: str | Path, wnids: list[str], names: list[str]) -> ShiftSet:
    """An ImageNet variant whose labels map onto the ImageNet classes (all, or a subset)."""
    if kind not in SHIFT_LAYOUTS:
        raise RaftError(f"unknown shift set '{kind}'; known: {', '.join(SHIFT_LAYOUTS)}")
    layout = SHIFT_LAYOUTS[kind]
    folder = Path(path)
    if (folder / layout.folder).is_dir():
        folder = folder / layout.folder
    if not folder.is_dir():
        raise RaftError(f"{kind}: folder {folder} does not exist")
    label_of = {w: i for i, w in enumerate(wnids)}
    items = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        key = class_dir.name
        if layout.labels == "index":
            if not key.isdigit() or int(key) >= len(wnids):
                raise RaftError(f"{kind}: folder '{key}' is not a class index 0..{len(wnids) - 1}")
            label = int(key)
        else:
            if key not in label_of:
                raise RaftError(f"{kind}: folder '{key}' is not an ImageNet wnid from classnames.txt")
            label = label_of[key]
        items.extend(Datum(str(p), label, names[label]) for p in list_images(class_dir))
    if not items:
        raise RaftError(f"{kind}: no images under {folder}")
    # -A and -R are scored over the classes they have (their 200); -V2 and -Sketch over all of
    # ImageNet's, even if a class folder is missing (an incomplete copy is not a subset)
    return ShiftSet(items, sorted({d.label for d in items}) if layout.subset else None)
