"""Tip-Adapter, training-free (Zhang et al., ECCV 2022; doc/baselines.md).

Cache keys ``K``: for every few-shot image, ``v0`` of 10 augmented views (RandomResizedCrop
scale 0.5–1, bicubic, flip) averaged and L2-normalised; cache values: one-hot labels ``L``.
For a feature ``f``:

    logits = 100 · f · T[:, :C] + a · exp(-b · (1 - f · Kᵀ)) · L

``a, b`` are searched on validation accuracy over the published grid (b: 200 values 0.1 … 7,
a: 20 values 0.1 … 3), starting from a = b = 1 (a grid point replaces it only when strictly
better). Since ``L`` is one-hot, ``exp(…) · L`` is a per-class sum (``index_add``), computed
in chunks so that no ``features × keys`` matrix larger than ``CHUNK`` values is ever held.
"""
from __future__ import annotations

import os

import torch

from utils import RaftError

from .base import Baseline, BaselineData, accuracy

B_GRID = [0.1 + i * (7.0 - 0.1) / 200 for i in range(200)]
A_GRID = [0.1 + j * (3.0 - 0.1) / 20 for j in range(20)]
START = (1.0, 1.0)
CHUNK = 1 << 24   # affinity values per chunk (64 MiB in float32)


def cache_keys(views: torch.Tensor) -> torch.Tensor:
    """The mean over the views of each image's ``v0``, L2-normalised: ``N×D``."""
    return torch.nn.functional.normalize(views.mean(0), dim=-1)


def check_fits(keys: torch.Tensor, device: torch.device) -> None:
    """The keys and one chunk of affinities must fit in the device's free memory."""
    need = keys.numel() * 4 + CHUNK * 4 * 3
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else None
    if free is not None and need > free:
        raise RaftError(f"Tip-Adapter's cache ({keys.shape[0]} keys × {keys.shape[1]} = {keys.numel() * 4 / 2**30:.2f} "
                        f"GiB, {need / 2**30:.2f} GiB with its working memory) does not fit in the free memory of "
                        f"{device} ({free / 2**30:.2f} GiB): leave it out of `baselines`")


def cache_term(features: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor, num_classes: int,
               b: float) -> torch.Tensor:
    """``exp(-b · (1 - f · Kᵀ)) · L`` for every row of ``features``: ``M×C``."""
    out = features.new_zeros(len(features), num_classes)
    rows = max(1, CHUNK // max(1, len(keys)))
    for start in range(0, len(features), rows):
        affinity = features[start:start + rows] @ keys.T
        out[start:start + rows].index_add_(1, key_labels, torch.exp(-b * (1.0 - affinity)))
    return out


def tip_logits(data: BaselineData, features: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
               a: float, b: float) -> torch.Tensor:
    return data.zero_shot_logits(features) + a * cache_term(features, keys, key_labels, data.num_classes, b)


def search_ab(data: BaselineData, keys: torch.Tensor, key_labels: torch.Tensor) -> dict:
    """The published grid search of a, b on validation accuracy, from a = b = 1."""
    zero_shot = data.zero_shot_logits(data.val)
    best = {"a": START[0], "b": START[1],
            "val_acc": accuracy(tip_logits(data, data.val, keys, key_labels, *START), data.val_labels)}
    a = torch.tensor(A_GRID, dtype=zero_shot.dtype, device=zero_shot.device).view(-1, 1, 1)
    for b in B_GRID:
        cache = cache_term(data.val, keys, key_labels, data.num_classes, b)
        correct = ((zero_shot + a * cache).argmax(-1) == data.val_labels).float().mean(-1) * 100.0
        j = int(correct.argmax())
        if correct[j].item() > best["val_acc"]:
            best = {"a": A_GRID[j], "b": b, "val_acc": correct[j].item()}
    return {"a": best["a"], "b": best["b"], "ab_source": "val"}


class TipAdapter(Baseline):
    name = "tip_adapter"

    def fit(self, data: BaselineData) -> None:
        self.keys = cache_keys(data.views)
        check_fits(self.keys, self.keys.device)
        self.key_labels = data.train_labels
        self.ab = {"a": START[0], "b": START[1], "ab_source": "fixed: no validation data (a = b = 1)"}

    def choose(self, data: BaselineData) -> dict:
        if data.val is not None:
            self.ab = search_ab(data, self.keys, self.key_labels)
        return dict(self.ab)

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        return tip_logits(data, features, self.keys, self.key_labels, self.ab["a"], self.ab["b"])
