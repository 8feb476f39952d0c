"""Tip-Adapter, training-free (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter; doc/baselines.md).

Cache keys ``K``: for every few-shot image, ``v0`` of 10 augmented views (RandomResizedCrop
scale 0.5–1, bicubic, flip) averaged, then L2-normalised (the mean of the raw features, as
published); cache values: one-hot labels ``L``. For a feature ``f``:

    logits = 100 · f · T[:, :C] + a · exp(-b · (1 - f · Kᵀ)) · L

``a, b`` are searched on validation accuracy over the published grid of each dataset
(``SETTINGS``: b over [0.1, scale_b), a over [0.1, scale_a)), every (b, a) in turn, a point
replacing the best only when strictly better, from none (the published search starts at an
accuracy of 0); without validation data: the dataset's published initial a, b. Since ``L`` is
one-hot, ``exp(…) · L`` is a per-class sum (``index_add``), computed in chunks so that no
``features × keys`` matrix larger than ``CHUNK`` values is ever held.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from utils import RaftError

from .base import Baseline, BaselineData, published_grid


@dataclass(frozen=True)
class TipSettings:
    """One dataset's row of the published configs (configs/<dataset>.yaml at d0e2d6f)."""
    scale_b: float
    scale_a: float
    init_b: float
    init_a: float
    train_epoch: int         # Tip-Adapter-F's epochs
    steps_b: int = 200
    steps_a: int = 20

    @property
    def b_grid(self) -> list[float]:
        return published_grid(self.scale_b, self.steps_b)

    @property
    def a_grid(self) -> list[float]:
        return published_grid(self.scale_a, self.steps_a)


SETTINGS = {
    "caltech101": TipSettings(12, 5, 1, 3, 20), "dtd": TipSettings(13, 13, 1, 2, 20),
    "eurosat": TipSettings(12, 10, 1, 2, 100), "fgvc": TipSettings(30, 30, 1, 5, 20),
    "food101": TipSettings(10, 10, 1, 1.17, 20), "imagenet": TipSettings(7, 3, 1, 1.17, 20),
    "oxford_flowers": TipSettings(50, 50, 1, 10, 20), "oxford_pets": TipSettings(7, 3, 1, 1.17, 20),
    "stanford_cars": TipSettings(20, 10, 1, 3, 20), "sun397": TipSettings(12, 10, 1, 1.17, 20),
    "ucf101": TipSettings(7, 3, 1, 3, 20),
}
DEFAULT = "imagenet"   # your own folders, the demo: ImageNet's row


def settings_of(dataset: str) -> TipSettings:
    return SETTINGS.get(dataset, SETTINGS[DEFAULT])


# ImageNet's grid: what a dataset without a row of its own searches
B_GRID, A_GRID = SETTINGS[DEFAULT].b_grid, SETTINGS[DEFAULT].a_grid
CHUNK = 1 << 24   # affinity values per chunk (64 MiB in float32)


def cache_keys(views: torch.Tensor) -> torch.Tensor:
    """The mean over the views of each image's ``v0`` (as published: the raw features' mean),
    L2-normalised: ``N×D``."""
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
               b: float, key_weights: torch.Tensor | None = None) -> torch.Tensor:
    """``exp(-b · (1 - f · Kᵀ)) · L`` for every row of ``features``: ``M×C`` (``key_weights``: L's
    rows weighted, APE's soft values). Without a gradient to keep (evaluation, Tip-Adapter-F's
    per-epoch validation) the chunks are computed in place in one buffer: the same operations in
    the same order, without four chunk-sized temporaries freed and allocated again per chunk
    (page faults, not arithmetic)."""
    out = features.new_zeros(len(features), num_classes)
    rows = max(1, CHUNK // max(1, len(keys)))
    trains = key_weights is not None and key_weights.requires_grad
    if torch.is_grad_enabled() and (features.requires_grad or keys.requires_grad or trains):   # training: autograd
        for start in range(0, len(features), rows):
            decayed = torch.exp(-b * (1.0 - features[start:start + rows] @ keys.T))
            out[start:start + rows].index_add_(1, key_labels, decayed if key_weights is None else decayed * key_weights)
        return out
    work = features.new_empty(min(rows, len(features)), len(keys))
    for start in range(0, len(features), rows):
        chunk = features[start:start + rows]
        w = work[:len(chunk)]
        torch.matmul(chunk, keys.T, out=w)
        torch.sub(1.0, w, out=w)
        w.mul_(-b).exp_()
        out[start:start + rows].index_add_(1, key_labels, w if key_weights is None else w.mul_(key_weights))
    return out


def tip_logits(data: BaselineData, features: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
               a: float, b: float) -> torch.Tensor:
    return data.zero_shot_logits(features) + a * cache_term(features, keys, key_labels, data.num_classes, b)


def grid_counts(data: BaselineData, keys: torch.Tensor, key_labels: torch.Tensor,
                b_grid: list[float] = B_GRID, a_grid: list[float] = A_GRID, key_weights: list[torch.Tensor] | None = None,
                val: torch.Tensor | None = None, zero_shot: torch.Tensor | None = None) -> torch.Tensor:
    """Correct validation predictions for every (b, a) of the grid: ``len(b_grid) × len(a_grid)``;
    with ``key_weights`` (APE: one weight per key for each γ) every (b, weights, a):
    ``len(b_grid) × len(key_weights) × len(a_grid)``. ``val``, ``zero_shot``: other validation
    features and zero-shot logits than ``data``'s (APE's refined channels, APE-T's adapted text).

    What does not depend on a grid value is computed once per chunk of validation images: the
    affinities ``1 − f·Kᵀ`` (one product, not one per b) and the zero-shot logits; per b one
    exponential pass over them, per weight vector one per-class sum (``index_add``: the product
    with one-hot values, without a ``keys × classes`` matrix), per a one blend. Every buffer is
    allocated once, before the loops (large temporaries freed and allocated again cost page
    faults, not arithmetic), and the chunks bound the memory."""
    val = data.val if val is None else val
    labels = data.val_labels
    classes, a_values = data.num_classes, len(a_grid)
    weighted = key_weights is not None
    weights = key_weights if weighted else [None]
    rows = max(1, CHUNK // max(1, len(keys)))                 # cache_term's chunks: the same products
    blend_rows = max(1, CHUNK // max(1, a_values * classes))
    a = torch.tensor(a_grid, dtype=val.dtype, device=val.device).view(-1, 1, 1)
    counts = torch.zeros(len(b_grid), len(weights), a_values, dtype=torch.long, device=val.device)
    zero_shot = data.zero_shot_logits(val) if zero_shot is None else zero_shot
    distance = val.new_empty(min(rows, len(val)), len(keys))
    decayed = torch.empty_like(distance)
    scaled = torch.empty_like(distance) if weighted else None
    cache = val.new_empty(len(distance), classes)
    blend = val.new_empty(a_values, min(blend_rows, len(distance)), classes)
    for start in range(0, len(val), rows):
        n = min(rows, len(val) - start)
        d, e, c = distance[:n], decayed[:n], cache[:n]
        torch.matmul(val[start:start + n], keys.T, out=d)
        torch.sub(1.0, d, out=d)                                       # 1 − f·Kᵀ, once for every b
        for i, b in enumerate(b_grid):
            torch.mul(d, -b, out=e).exp_()
            for j, w in enumerate(weights):
                c.zero_().index_add_(1, key_labels, e if w is None else torch.mul(e, w, out=scaled[:n]))
                for first in range(0, n, blend_rows):                  # zero_shot + a · cache, every a
                    k = min(blend_rows, n - first)
                    m = torch.mul(c[first:first + k].unsqueeze(0), a, out=blend[:, :k])
                    m.add_(zero_shot[start + first:start + first + k])
                    counts[i, j] += (m.argmax(-1) == labels[start + first:start + first + k]).sum(-1)
    return counts if weighted else counts[:, 0]


def search_ab(data: BaselineData, keys: torch.Tensor, key_labels: torch.Tensor,
              settings: TipSettings | None = None) -> dict:
    """The published grid search of a, b on validation accuracy: every (b, a) in turn, b outer,
    a point replacing the best only when it has strictly more correct predictions, from none
    (an accuracy of 0: every point but a useless one replaces it). Compared as counts: percentages
    rounded in float32 can make an equal count look better."""
    settings = settings or settings_of(data.dataset)
    b_grid, a_grid = settings.b_grid, settings.a_grid
    counts = grid_counts(data, keys, key_labels, b_grid, a_grid).tolist()
    best = (0.0, 0.0, 0)
    for i, b in enumerate(b_grid):
        j = max(range(len(a_grid)), key=lambda k: (counts[i][k], -k))
        if counts[i][j] > best[2]:
            best = (a_grid[j], b, counts[i][j])
    return {"a": best[0], "b": best[1], "ab_source": "val"}


class TipAdapter(Baseline):
    name = "tip_adapter"
    label = "Tip-Adapter"
    needs = ("views:tip",)

    def fit(self, data: BaselineData) -> None:
        keys = cache_keys(data.view_set("tip", normalised=False) if "tip" in data.raw else data.views)
        check_fits(keys, keys.device)
        self.use_keys(keys, data.train_labels, settings_of(data.dataset))

    def use_keys(self, keys: torch.Tensor, key_labels: torch.Tensor, settings: TipSettings) -> None:
        """The cache this adapter scores with, at the dataset's initial a, b until ``choose`` searches them."""
        self.keys, self.key_labels, self.settings = keys, key_labels, settings
        self.ab = {"a": float(settings.init_a), "b": float(settings.init_b),
                   "ab_source": "fixed: no validation data (the published initial a, b)"}

    def choose(self, data: BaselineData) -> dict:
        if data.val is not None:
            self.ab = search_ab(data, self.keys, self.key_labels, self.settings)
        return dict(self.ab)

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        return tip_logits(data, features, self.keys, self.key_labels, self.ab["a"], self.ab["b"])
