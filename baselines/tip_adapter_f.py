"""Tip-Adapter-F (Zhang et al., ECCV 2022; doc/baselines.md): Tip-Adapter with trainable keys.

The cache keys start from Tip-Adapter's and are trained with AdamW (lr 1e-3, eps 1e-4), a
cosine schedule over all iterations, batch 256, cross-entropy on the Tip logits at the
dataset's published initial a, b, for its published epochs (20; EuroSAT 100). **Difference
from the original**, which runs the frozen encoder on fresh augmentations every epoch: here
epoch e trains on the e mod 10-th of the 10 cached augmented views that built the cache, so
it costs no encoder pass. The epoch kept is the one with the best validation accuracy (the
original keeps the best on test), strictly better; then a, b are searched on validation as
for Tip-Adapter.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import BaselineData, accuracy, best_index
from .tip_adapter import TipAdapter, cache_keys, check_fits, settings_of, tip_logits

BATCH = 256
LR, EPS = 1e-3, 1e-4


class TipAdapterF(TipAdapter):
    """Tip-Adapter whose keys are trained first (``fit``); its a, b are searched as Tip-Adapter's."""

    name = "tip_adapter_f"
    label = "Tip-Adapter-F"
    needs = ("views:tip",)
    note = "keys trained on the 10 cached augmented views (epoch e: view e mod 10), not fresh augmentations"
    published = {("RN50", 16): 75.83}

    def fit(self, data: BaselineData) -> None:
        settings = settings_of(data.dataset)
        epochs, ab0 = settings.train_epoch, (settings.init_a, settings.init_b)   # the logits it trains
        keys = torch.nn.Parameter(cache_keys(data.view_set("tip", normalised=False) if "tip" in data.raw
                                             else data.views).clone())
        check_fits(keys, keys.device)
        labels = data.train_labels
        optimizer = torch.optim.AdamW([keys], lr=LR, eps=EPS)
        steps = epochs * math.ceil(len(labels) / BATCH)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
        gen = torch.Generator().manual_seed(data.seed)
        kept, scores = [], []
        for epoch in range(epochs):
            inputs = data.views[epoch % len(data.views)]
            order = torch.randperm(len(labels), generator=gen).to(inputs.device)
            with torch.enable_grad():
                for start in range(0, len(labels), BATCH):
                    idx = order[start:start + BATCH]
                    loss = F.cross_entropy(tip_logits(data, inputs[idx], keys, labels, *ab0), labels[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            if data.val is not None:   # the epoch is chosen on validation data, never on test
                with torch.no_grad():
                    scores.append(accuracy(tip_logits(data, data.val, keys.detach(), labels, *ab0),
                                           data.val_labels))
                kept.append(keys.detach().clone())
        best = best_index(scores) if scores else epochs - 1
        self.use_keys(kept[best] if kept else keys.detach(), labels, settings)
        self.epoch = best + 1

    def choose(self, data: BaselineData) -> dict:
        return {"epoch": self.epoch, "epoch_source": "val" if data.val is not None else "last", **super().choose(data)}
