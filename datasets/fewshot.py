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


def save_list(path: str | Path, items: list[Datum], root: str | Path, **meta) -> None:
    """Save a sampled list (paths relative to the dataset root) so a run can be audited and repeated."""
    rows = [[os.path.relpath(d.path, root), d.label, d.classname] for d in items]
    write_json(path, {**meta, "root": str(root), "items": rows})
