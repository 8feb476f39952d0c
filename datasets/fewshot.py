"""Seeded per-class sampling: the few-shot training set, and a validation set drawn from train.

The few-shot sample follows the published code's sampler (the Dassl ``generate_fewshot_dataset``
that CoOp, Tip-Adapter, CaFo and RAFT share): Python's ``random`` seeded with the run's seed,
classes visited in the order they first appear in the split's train list, ``random.sample``
of ``shots`` items per class (``random.choices`` when a class has fewer). So seed 1 trains on
the same images as those codebases. The sample is a function of (train list in split-file
order, shots, seed) alone: ``random`` with an integer seed is the same on every machine.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from utils import RaftError, name_bytes, write_json

from .base import Datum

# 1: classes in label order (versions before the published order was matched);
# 2: classes in order of first appearance in the train list, as the published code.
SAMPLER_VERSION = 2


def sample_per_class(items: list[Datum], n: int, seed: int | str, num_classes: int) -> list[Datum]:
    """``n`` items per class, without replacement unless a class has fewer than ``n``; classes
    in the order they first appear in ``items``."""
    rng = random.Random(seed)
    by_class: dict[int, list[Datum]] = {}
    for d in items:
        by_class.setdefault(d.label, []).append(d)   # insertion order: first appearance
    missing = [label for label in range(num_classes) if label not in by_class]
    if missing:
        raise RaftError(f"class {missing[0]} has no training images to sample from")
    out: list[Datum] = []
    for pool in by_class.values():
        out.extend(rng.sample(pool, n) if len(pool) >= n else rng.choices(pool, k=n))
    return out


def few_shot(train: list[Datum], shots: int, seed: int, num_classes: int) -> list[Datum]:
    return sample_per_class(train, shots, seed, num_classes)


def validation_from_train(train: list[Datum], per_class: int, seed: int, classnames: list[str],
                          taken: set[str], pool_name: str = "training images outside the few-shot set") -> list[Datum]:
    """A validation set drawn from ``train`` (for datasets without one: the train images not in
    the few-shot set; for CoOp's few-shot validation: the val split): ``per_class`` images per
    class, without replacement (a class with fewer gives all it has: a repeated image would count
    twice in the choice of alpha)."""
    rng = random.Random(f"val:{seed}")
    by_class: dict[int, list[Datum]] = {}
    for d in train:
        if d.path not in taken:
            by_class.setdefault(d.label, []).append(d)
    out: list[Datum] = []
    for label, name in enumerate(classnames):
        pool = by_class.get(label, [])
        if not pool:
            raise RaftError(f"the validation draw failed: class '{name}' has no {pool_name} ({per_class} per class "
                            f"wanted); give the dataset a val split (a val/ folder), lower shots, or set "
                            f"val_source: none and a fixed alpha")
        out.extend(rng.sample(pool, min(per_class, len(pool))))
    return out


def relative_paths(items: list[Datum], root: str | Path) -> list[str]:
    return [os.path.relpath(d.path, root) for d in items]


def sample_digest(items: list[Datum], image_root: str | Path) -> str:
    """SHA-256 of the sampled paths as the split file writes them (relative to the image
    folder), joined with newlines, in sampling order: names a sample independently of where
    the dataset lives, comparably with the published sampler's lists."""
    return hashlib.sha256(name_bytes("\n".join(d.listed_as(image_root) for d in items))).hexdigest()


def save_list(path: str | Path, items: list[Datum], root: str | Path, image_root: str | Path | None = None,
              **meta) -> None:
    """Save a sampled list (paths relative to the dataset root, in sampling order) so a run can
    be audited and repeated; ``sha256`` is ``sample_digest`` of it."""
    rows = [[rel, d.label, d.classname] for rel, d in zip(relative_paths(items, root), items)]
    write_json(path, {**meta, "root": str(root), "sampler": SAMPLER_VERSION,
                      "sha256": sample_digest(items, image_root or root), "items": rows})


def saved_meta(path: Path) -> dict:
    """The fields of a saved list (fewshot.json) beside its items; {} when there is none."""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in meta.items() if k != "items"} if isinstance(meta, dict) else {}


def saved_sample_differs(path: Path, items: list[Datum], root: str | Path) -> bool:
    """Whether the list saved at ``path`` (fewshot.json) holds other images, or another order,
    than ``items``; False when there is no saved list to compare with."""
    try:
        saved = [row[0] for row in json.loads(path.read_text())["items"]]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False
    return saved != relative_paths(items, root)
