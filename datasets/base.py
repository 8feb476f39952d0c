"""What every reader returns: labelled image lists and the class names."""
from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

from utils import RaftError, name_bytes, printable

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Datum:
    path: str        # full path of the image file
    label: int       # 0-based class index
    classname: str
    key: str = ""    # the path as the split file writes it, where the folder layout differs from it

    def listed_as(self, image_root: str | Path) -> str:
        """The image's path as its split file lists it (what sample digests hash)."""
        return self.key or os.path.relpath(self.path, image_root)


@dataclass
class ShiftSet:
    """A test set labelled with a subset (or all) of the training classes."""
    items: list[Datum]
    class_subset: list[int] | None = None  # indices of the classes it covers; None = all


@dataclass
class DatasetSplits:
    name: str
    root: Path
    classnames: list[str]
    templates: list[str]
    train: list[Datum]
    val: list[Datum]
    test: list[Datum]
    shift_sets: dict[str, ShiftSet] = field(default_factory=dict)
    split_file: Path | None = None  # the file(s) that define the split, for the record
    extra_split_files: list[Path] = field(default_factory=list)  # FGVC: one text file per split
    image_root: Path | None = None  # the folder the split file's paths are relative to (default: root)
    layout: str | None = None       # which folder layout was recognised (CoOp's, or another one people have)
    parent_labels: list[int] | None = None  # a class subset's original labels (base-to-new), else None
    part: str | None = None                 # that subset's name: 'base' or 'new'

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def class_subset(self, labels: list[int], part: str) -> "DatasetSplits":
        """The dataset restricted to the classes ``labels`` (original ids), relabelled 0…k-1 in
        that order (base-to-new: ``part`` is 'base' or 'new'); ``parent_labels`` keeps the ids."""
        remap = {old: new for new, old in enumerate(labels)}

        def keep(items: list[Datum]) -> list[Datum]:
            return [Datum(d.path, remap[d.label], d.classname, d.key) for d in items if d.label in remap]

        view = DatasetSplits(self.name, self.root, [self.classnames[i] for i in labels], self.templates,
                             keep(self.train), keep(self.val), keep(self.test), split_file=self.split_file,
                             extra_split_files=self.extra_split_files, image_root=self.image_root,
                             layout=self.layout)
        view.parent_labels, view.part = list(labels), part
        return view

    def digest(self, splits: tuple[str, ...] = ("train", "val", "test")) -> str:
        """SHA-256 of what the dataset is: its class names and the images of ``splits`` (paths
        relative to the image folder, labels). A run folder reused on other data -- another
        data_path, an edited split file -- is told apart from one reused by another version.
        What a trained pool depends on is ``digest(("train",))``."""
        h = hashlib.sha256(name_bytes(json.dumps(self.classnames, ensure_ascii=False)))
        base = self.image_root or self.root
        for split in splits:
            h.update(name_bytes(f"\x00{split}"))
            for d in getattr(self, split):
                h.update(name_bytes(f"\n{d.listed_as(base)}\t{d.label}"))
        return h.hexdigest()

    def split_record(self) -> dict | None:
        """What a reader needs to confirm which split a run used: each split file's path and
        SHA-256, and the sizes of the full splits (before the few-shot sample)."""
        files = [f for f in [self.split_file, *self.extra_split_files] if f is not None]
        if not files:
            return None
        return {"files": [{"path": str(f), "sha256": file_sha256(f)} for f in files],
                "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)}}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def image_names(folder: str | Path) -> list[str]:
    """The names of the image files directly inside ``folder``, sorted (hidden files skipped).
    ``os.scandir`` reads each entry's type from the directory itself: one system call per
    folder, not one ``stat`` per file (ImageNet's 1.28 M training files; doc/performance.md)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".")
                      and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES and e.is_file())


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return [folder / name for name in image_names(folder)]


def inside(folder: Path, relative: str, source: str) -> str:
    """The full path of ``relative``, a path read from a data file (a split file's row, a class
    list's folder name), which must stay inside ``folder``: relative, and no ``..`` that leaves
    it. Otherwise the run stops here, before anything is trained, naming the file and the row.
    Symbolic links inside the dataset folder are followed: they are the folder's own layout
    (an images folder linked to another disk), not something a file can ask for
    (doc/robustness.md)."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        raise RaftError(f"{source}: {printable(repr(relative))} is not a file path")
    normal = posixpath.normpath(relative.replace("\\", "/"))
    if posixpath.isabs(normal) or normal == ".." or normal.startswith("../") or Path(relative).is_absolute():
        raise RaftError(f"{source}: the path {printable(repr(relative))} leaves the dataset folder {printable(folder)} "
                        f"(paths in data files must be relative and stay inside it)")
    return str(folder / relative)


def check_splits_usable(name: str, train: list, test: list, source: str) -> None:
    """Before anything is trained: a dataset needs training and test images (an empty test list
    would only fail after training, and again at every rerun)."""
    for split, items in (("train", train), ("test", test)):
        if not items:
            raise RaftError(f"{source}: the {split} split of {name} is empty; a run needs training and test images")
