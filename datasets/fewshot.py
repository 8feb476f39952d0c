"""Seeded per-class sampling: the few-shot training set, and ImageNet's validation set.

The sample is a function of (items in split order, n, seed) alone: Python's ``random``
with an integer or string seed is the same on every machine.
"""
from __future__ import annotations

import os
import random
from collections import defaultdict
from pathlib import Path

from utils import RaftError, write_json

from .base import Datum


def sample_per_class(items: list[Datum], n: int, seed: int | str, num_classes: int,
                     exclude: set[str] = frozenset()) -> list[Datum]:
    """``n`` items per class, without replacement unless a class has fewer than ``n``."""
    rng = random.Random(seed)
    by_class: dict[int, list[Datum]] = defaultdict(list)
    for d in items:
        if d.path not in exclude:
            by_class[d.label].append(d)
    out: list[Datum] = []
    for label in range(num_classes):
        pool = by_class.get(label, [])
        if not pool:
            raise RaftError(f"class {label} has no training images to sample from")
        out.extend(rng.sample(pool, n) if len(pool) >= n else rng.choices(pool, k=n))
    return out


def few_shot(train: list[Datum], shots: int, seed: int, num_classes: int) -> list[Datum]:
    return sample_per_class(train, shots, seed, num_classes)


def validation_from_train(train: list[Datum], per_class: int, seed: int, classnames: list[str],
                          taken: set[str]) -> list[Datum]:
    """A validation set for datasets without one: ``per_class`` train images per class that are
    not in the few-shot set, drawn without replacement (a class with fewer gives all it has:
    a repeated image would count twice in the choice of alpha)."""
    rng = random.Random(f"val:{seed}")
    by_class: dict[int, list[Datum]] = defaultdict(list)
    for d in train:
        if d.path not in taken:
            by_class[d.label].append(d)
    out: list[Datum] = []
    for label, name in enumerate(classnames):
        pool = by_class.get(label, [])
        if not pool:
            raise RaftError(f"the validation draw failed: class '{name}' has no training images outside the "
                            f"few-shot set (val_per_class={per_class}); give the dataset a val split "
                            f"(a val/ folder), lower shots, or set val_per_class: 0 and a fixed alpha")
        out.extend(rng.sample(pool, min(per_class, len(pool))))
    return out


def save_list(path: str | Path, items: list[Datum], root: str | Path, **meta) -> None:
    """Save a sampled list (paths relative to the dataset root) so a run can be audited and repeated."""
    rows = [[os.path.relpath(d.path, root), d.label, d.classname] for d in items]
    write_json(path, {**meta, "root": str(root), "items": rows})
