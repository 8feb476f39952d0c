"""CLAP: a zero-shot-initialised linear probe held near the text classifier by a class-adaptive
penalty (Silva-Rodríguez et al., CVPR 2024; jusiro/CLAP, trainers/adapters.py at dbdf409),
validation-free as published.

Training samples: 20 augmented views of every few-shot image (Dassl's transform: random resized
crop, flip; the published code extracts 20 passes of it once, as here), each one sample.
Prototypes ``P`` (C×D) start at the text classifier ``T``; logits ``100 · normalise(f) ·
normalise(P)ᵀ``. The penalty ``mean_c λ_c ‖P_c − T_c‖²``, with ``λ_c`` zero-shot CLIP's mean
softmax probability of class c on its own training samples (its "l2" constraint). SGD (lr 0.1,
momentum 0.9, no weight decay), 300 epochs, a constant warm-up epoch at 1e-5 then a cosine;
each epoch shuffles all samples (numpy, seeded by the run's seed as Dassl seeds it) and takes
as many batches of 256 as Dassl's loader has over the few-shot *images* (N // 256, at least
one): the published loop's count. The last epoch is kept.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .base import Baseline, BaselineData, dassl_lr

LR, MOMENTUM, EPOCHS, BATCH = 0.1, 0.9, 300, 256


CHUNK = 1 << 22   # logits per chunk of samples while the multipliers are summed (16 MiB)


def class_multipliers(features: torch.Tensor, base: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """λ_c: zero-shot CLIP's mean softmax probability of class c over class c's samples (the
    published ``diag(softmax(logits)ᵀ · onehot) / counts``, summed chunk by chunk: 20 views of
    16,000 images against 1000 classes are 1.3 GB of logits at once)."""
    classes = base.shape[0]
    sums = features.new_zeros(classes)
    rows = max(1, CHUNK // classes)
    for start in range(0, len(features), rows):
        y = labels[start:start + rows]
        p = scores(features[start:start + rows], base, scale).softmax(-1)
        sums.index_add_(0, y, p[torch.arange(len(y), device=p.device), y])
    return sums / torch.bincount(labels, minlength=classes).to(sums.dtype)


def scores(features: torch.Tensor, prototypes: torch.Tensor, scale: float) -> torch.Tensor:
    """The published order: the cosine matrix first, then the scale."""
    return F.normalize(features, dim=-1) @ F.normalize(prototypes, dim=-1).T * scale


def batches_per_epoch(images: int) -> int:
    """Dassl's training loader over the few-shot images: drop_last when there is a full batch."""
    return images // BATCH if images >= BATCH else 1


class CLAP(Baseline):
    name = "clap"
    label = "CLAP"
    needs = ("views:dassl",)
    note = "the 20 augmented passes are the cached views of Dassl's transform, as the published code caches them"

    def fit(self, data: BaselineData) -> None:
        views = data.view_set("dassl", normalised=False)
        features = views.reshape(-1, views.shape[-1]).float()                 # view 0 of every image, then view 1 ...
        labels = data.train_labels.repeat(len(views))
        base = data.text.float().T                                               # C×D
        self.multipliers = class_multipliers(features, base, labels, data.scale)
        prototypes = base.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([prototypes], lr=LR, momentum=MOMENTUM, weight_decay=0.0)
        rng = np.random.RandomState(data.seed)
        steps = batches_per_epoch(len(data.train_labels))
        with torch.enable_grad():
            for epoch in range(EPOCHS):
                for group in optimizer.param_groups:
                    group["lr"] = dassl_lr(epoch, LR, EPOCHS)
                order = torch.from_numpy(rng.rand(len(features)).argsort(axis=0)).to(features.device)
                for step in range(steps):
                    idx = order[step * BATCH:(step + 1) * BATCH]
                    logits = scores(features[idx], prototypes, data.scale)
                    penalty = torch.mean(self.multipliers * (prototypes - base).pow(2).sum(-1))
                    loss = F.cross_entropy(logits, labels[idx]) + penalty
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        self.prototypes = prototypes.detach()

    def choose(self, data: BaselineData) -> dict:
        return {"epochs": EPOCHS, "epoch_source": "last (validation-free, as published)"}

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        return scores(features.float(), self.prototypes, data.scale)
