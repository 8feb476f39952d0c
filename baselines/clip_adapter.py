"""CLIP-Adapter: a residual MLP on the image feature (Gao et al., IJCV 2023;
gaopengcuhk/CLIP-Adapter, trainers/clip_adapter.py at 08d07f8).

    g(f) = ReLU(ReLU(f W₁) W₂)        (D → D/4 → D, no biases)
    logits(f) = 100 · normalise(r g(f) + (1 - r) f) · normalise(T)     (r = 0.2)

Trained as published (CoOp's rn50 config, which its scripts run): SGD (lr 2e-3, momentum 0.9,
weight decay 5e-4), batch 32, 200 epochs, a constant warm-up epoch at 1e-5 then a cosine;
the last epoch is kept. The adapter's initial draw: nn.Linear's default, torch seeded with the
run's seed. **Differences**: trained on 20 cached views of Dassl's transform (epoch e: view e
mod 20), not fresh augmentations; in float32 (the published adapter is float16 on a GPU).
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Baseline, BaselineData, cosine_scores, dassl_training, seeded

RATIO, REDUCTION = 0.2, 4
LR, MOMENTUM, WEIGHT_DECAY = 2e-3, 0.9, 5e-4
EPOCHS, BATCH = 200, 32


def adapter(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, dim // REDUCTION, bias=False), nn.ReLU(inplace=True),
                         nn.Linear(dim // REDUCTION, dim, bias=False), nn.ReLU(inplace=True))


class CLIPAdapter(Baseline):
    name = "clip_adapter"
    label = "CLIP-Adapter"
    needs = ("views:dassl",)
    note = "trained on 20 cached views of Dassl's transform (epoch e: view e mod 20), not fresh augmentations"

    def fit(self, data: BaselineData) -> None:
        views = data.view_set("dassl")
        self.mlp = seeded(data.seed, lambda: adapter(views.shape[-1])).to(views.device)
        optimizer = torch.optim.SGD(self.mlp.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        dassl_training(optimizer, views, data.train_labels, lambda f: self._logits(data, f), EPOCHS, BATCH, data.seed)
        self.mlp.requires_grad_(False)

    def _logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        blended = RATIO * self.mlp(features) + (1 - RATIO) * features
        return cosine_scores(blended, data.text.float(), data.scale)

    def choose(self, data: BaselineData) -> dict:
        return {"ratio": RATIO, "epochs": EPOCHS, "epoch_source": "last (as published)"}

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        return self._logits(data, features.float())
