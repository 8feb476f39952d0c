"""What every reader returns: labelled image lists and the class names."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


@dataclass(frozen=True)
class Datum:
    path: str        # full path of the image file
    label: int       # 0-based class index
    classname: str


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
    split_file: Path | None = None  # a split this project made (folder datasets), for the record

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
