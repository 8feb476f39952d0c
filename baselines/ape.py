"""APE and APE-T: adaptive prior refinement (Zhu et al., ICCV 2023; yangyangyang127/APE, main.py and
utils.py at 70460de).

**Channel refinement.** Of the D feature channels APE keeps the k that separate the classes
best: ``criterion = -w₀ · sim + w₁ · var``, with ``sim`` the channel-wise product of features of
different classes averaged over every such pair (the text columns and the cache keys of each
class), and ``var`` each channel's variance over the text columns; the top k by criterion.

**APE (training-free).** Tip-Adapter's cache (keys: the mean of the 10 views' raw ``v0``,
normalised; values: one-hot labels), the refined channels re-normalised, and each cache entry
weighted by how much zero-shot CLIP disagrees with its label:

    logits = 100 f T + α · exp(-β (1 - f' K'ᵀ)) · (L ⊙ exp(γ · KL(L ‖ softmax(K' T'))))

with ``'`` the refined channels. ``β, α, γ`` searched on validation over the published grid of
each dataset (strictly better replaces, from an accuracy of 0; without validation data: the
published initial values).

**APE-T.** A residual ``R`` (C × k, zero at the start) added to the refined channels of the text
columns and of every key of its class, and a weight per cache entry (one at the start), trained
with AdamW (the dataset's lr and eps, weight decay 0.1), a cosine schedule over all steps, batch
256, cross-entropy at the initial β, α. The published code draws fresh augmentations each epoch
(here: epoch e reads the e mod 10-th cached view), keeps the best epoch on its validation split
(here as well), then searches β, α there. The published APE-T (commented out of its main.py)
selects ``training_free_feat_num`` channels for a residual of ``training_feat_num`` columns,
which fails where the two differ; here the residual's channels are the top ``training_feat_num``
by the training criterion (``w_training``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Baseline, BaselineData, batches_of, correct, epoch_orders, published_grid
from .tip_adapter import cache_keys, cache_term, grid_counts

BATCH = 256


@dataclass(frozen=True)
class APESettings:
    """One dataset's row of the published configs (configs/<dataset>.yaml at 70460de)."""
    search_scale: tuple[float, float, float]    # β, α, γ
    search_step: tuple[int, int, int]
    init: tuple[float, float, float]            # β, α, γ
    eps: float
    training_feat_num: int
    training_free_feat_num: int
    w_training_free: tuple[float, float]
    w_training: tuple[float, float]
    lr: float
    train_epoch: int

    def grids(self) -> tuple[list[float], list[float], list[float]]:
        betas = published_grid(self.search_scale[0], self.search_step[0])
        alphas = published_grid(self.search_scale[1], self.search_step[1])
        gammas = [i * self.search_scale[2] / self.search_step[2] for i in range(self.search_step[2])]
        return betas, alphas, gammas


def row(scale, step, alpha, eps, train_num, free_num, w_free, lr, epochs, beta=1, gamma=0.1):
    return APESettings(tuple(scale), tuple(step), (beta, alpha, gamma), eps, train_num, free_num, tuple(w_free),
                       (0.2, 0.8), lr, epochs)


SETTINGS = {
    "caltech101": row([7, 7, 1], [200, 20, 20], 1, 0.001, 900, 800, [0.5, 0.5], 0.001, 30),
    "dtd": row([7, 7, 1], [200, 20, 20], 3, 0.001, 700, 400, [0.5, 0.5], 0.001, 20),
    "eurosat": row([30, 5, 1.5], [200, 20, 20], 1, 0.001, 900, 700, [0.9, 0.1], 0.001, 200),
    "fgvc": row([20, 10, 1], [200, 20, 20], 5, 0.001, 900, 800, [0.1, 0.9], 0.001, 30),
    "food101": row([7, 7, 1], [200, 20, 20], 0.8, 0.001, 900, 700, [0.3, 0.7], 0.0001, 30),
    "imagenet": row([7, 7, 0.5], [200, 20, 5], 2, 0.001, 500, 500, [0.7, 0.3], 0.0001, 20),
    "oxford_flowers": row([7, 7, 1], [200, 20, 20], 3, 0.001, 800, 700, [0.4, 0.6], 0.001, 60),
    "oxford_pets": row([7, 7, 1], [200, 20, 20], 2, 0.002, 800, 800, [0.7, 0.3], 0.0001, 30),
    "stanford_cars": row([10, 7, 1], [200, 20, 20], 1, 0.005, 800, 500, [0.6, 0.4], 0.001, 30),
    "sun397": row([10, 7, 1], [200, 20, 20], 1, 0.001, 800, 800, [0.7, 0.3], 0.0001, 30),
    "ucf101": row([10, 7, 1.5], [200, 20, 20], 2, 0.002, 800, 700, [0.3, 0.7], 0.001, 30),
}
DEFAULT = "imagenet"


def settings_of(dataset: str) -> APESettings:
    return SETTINGS.get(dataset, SETTINGS[DEFAULT])


def class_major(keys: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and labels sorted by label (stably): APE reads its cache as C blocks of shots."""
    order = torch.sort(labels, stable=True).indices
    return keys[order], labels[order]


def criterion(text: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor, weights: tuple[float, float],
              with_keys: bool = True) -> torch.Tensor:
    """``-w₀ · sim + w₁ · var`` per channel (D). ``sim``: the mean over ordered pairs of samples of
    different classes of their channel-wise product, the samples of a class its text column and
    (``with_keys``) its cache keys -- the published four nested loops, summed in closed form:
    all pairs' products minus the same class's."""
    dim, classes = text.shape
    per_class = [text[:, c:c + 1].T for c in range(classes)]                  # 1×D each
    if with_keys:
        per_class = [torch.cat([t, keys[labels == c]]) for c, t in enumerate(per_class)]
    # each class's mean sample: the mean over pairs of a pair of classes is the product of their
    # means (equal to the published sum / shots² when every class has `shots` samples)
    means = torch.stack([block.mean(0) for block in per_class])             # C×D
    sim = (means.sum(0) ** 2 - (means ** 2).sum(0)) / (classes * (classes - 1))
    return -weights[0] * sim + weights[1] * torch.var(text, dim=1)


def top_channels(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score, k=min(k, len(score))).indices


class APE(Baseline):
    name = "ape"
    label = "APE"
    needs = ("views:tip",)

    def fit(self, data: BaselineData) -> None:
        self.settings = s = settings_of(data.dataset)
        keys, labels = class_major(cache_keys(data.view_set("tip", normalised=False)), data.train_labels)
        text = data.text.float()
        self.keys, self.labels = keys, labels
        self.values = F.one_hot(labels, data.num_classes).float()
        self.channels = top_channels(criterion(text, keys, labels, s.w_training_free), s.training_free_feat_num)
        refined_text = F.normalize(text[self.channels], dim=0)
        self.refined_keys = F.normalize(keys[:, self.channels], dim=-1)
        affinity = (self.refined_keys @ refined_text).softmax(1)                  # zero-shot CLIP on the keys
        self.divergence = torch.sum(self.values * torch.log2((self.values + 1e-6) / (affinity + 1e-6)), dim=1)[:, None]
        beta, alpha, gamma = s.init
        self.hyper = {"beta": float(beta), "alpha": float(alpha), "gamma": float(gamma),
                      "source": "fixed: no validation data (the published initial values)",
                      "channels": len(self.channels)}

    def _cache(self, features: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
        """The cache's logits, ``exp(-β(1 - f'K'ᵀ)) · (L ⊙ exp(γ·KL))``, as a per-class sum over the keys."""
        refined = F.normalize(features.float()[:, self.channels], dim=-1)
        return cache_term(refined, self.refined_keys, self.labels, len(self.values[0]), beta, self.soft(gamma))

    def soft(self, gamma: float) -> torch.Tensor:
        """Each key's weight in the soft cache values: ``exp(γ · KL(L ‖ zero-shot))``."""
        return (self.divergence[:, 0] * gamma).exp()

    def choose(self, data: BaselineData) -> dict:
        if data.val is None:
            return dict(self.hyper)
        betas, alphas, gammas = self.settings.grids()
        refined = F.normalize(data.val.float()[:, self.channels], dim=-1)
        counts = grid_counts(data, self.refined_keys, self.labels, betas, alphas, [self.soft(g) for g in gammas],
                             val=refined, zero_shot=100.0 * data.val.float() @ data.text.float()).tolist()
        best = (0, 0.0, 0.0, 0.0)
        for i, beta in enumerate(betas):   # the published loops: β, then α, then γ; strictly better replaces
            for k, alpha in enumerate(alphas):
                for j, gamma in enumerate(gammas):
                    if counts[i][j][k] > best[0]:
                        best = (counts[i][j][k], beta, alpha, gamma)
        self.hyper |= {"beta": best[1], "alpha": best[2], "gamma": best[3], "source": "val"}
        return dict(self.hyper)

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        h = self.hyper
        return 100.0 * features.float() @ data.text.float() + h["alpha"] * self._cache(features, h["beta"], h["gamma"])


class APET(Baseline):
    name = "ape_t"
    label = "APE-T"
    needs = ("views:tip",)
    note = ("trained on the 10 cached augmented views (epoch e: view e mod 10), not fresh augmentations; the residual's "
            "channels are the top training_feat_num by the training criterion")
    published = {("RN50", 16): 77.28}

    def fit(self, data: BaselineData) -> None:
        self.settings = s = settings_of(data.dataset)
        raw = data.view_set("tip", normalised=False)
        order = torch.sort(data.train_labels, stable=True).indices               # class-major, as the cache
        keys, labels = cache_keys(raw)[order], data.train_labels[order]
        views = data.view_set("tip")[:, order]
        text = data.text.float()
        classes = data.num_classes
        channels = top_channels(criterion(text, keys, labels, s.w_training), s.training_feat_num)
        self.parts = (keys, text, F.one_hot(labels, classes).float(), channels, labels)
        res = torch.zeros(classes, len(channels), device=keys.device, requires_grad=True)
        value_weights = torch.ones(len(labels), 1, device=keys.device, requires_grad=True)
        beta, alpha, _ = s.init
        optimizer = torch.optim.AdamW([value_weights, res], lr=s.lr, eps=s.eps, weight_decay=1e-1)
        per_epoch = len(batches_of(torch.arange(len(labels)), BATCH, False))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, s.train_epoch * per_epoch)
        best, self.epoch, kept = 0.0, 0, None
        for epoch, perm in enumerate(epoch_orders(len(labels), s.train_epoch, data.seed)):
            inputs = views[epoch % len(views)]
            with torch.enable_grad():
                for idx in batches_of(perm.to(keys.device), BATCH, False):
                    logits = self._logits(inputs[idx], res, value_weights, beta, alpha)
                    loss = -(F.one_hot(labels[idx], classes).float() * logits.log_softmax(-1)).sum(-1).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    schedule.step()
            if data.val is not None:
                with torch.no_grad():
                    acc = 100.0 * correct(self._logits(data.val.float(), res, value_weights, beta, alpha),
                                          data.val_labels) / len(data.val_labels)
                if acc > best:                      # the published loop: strictly better, from 0
                    best, self.epoch = acc, epoch
                    kept = (res.detach().clone(), value_weights.detach().clone())
        self.trained = kept if kept is not None else (res.detach().clone(), value_weights.detach().clone())
        self.ab = {"beta": float(beta), "alpha": float(alpha), "ab_source": "fixed: no validation data (the "
                   "published initial values)"}

    def _adapted(self, res: torch.Tensor, value_weights: torch.Tensor):
        keys, text, values, channels, labels = self.parts
        new_keys = keys.clone()   # each key gets its class's residual (the published repeat_interleave over
        new_keys[:, channels] = keys[:, channels] + res[labels]   # equal shots, also right when classes differ)
        new_text = text.clone()
        new_text[channels, :] = text[channels, :] + res.T
        return new_keys, new_text, value_weights[:, 0]

    def _logits(self, features, res, value_weights, beta, alpha) -> torch.Tensor:
        keys, text, weights = self._adapted(res, value_weights)
        cache = cache_term(features, keys, self.parts[4], text.shape[1], beta, weights)
        return 100.0 * features @ text + cache * alpha

    def choose(self, data: BaselineData) -> dict:
        epoch = {"epoch": self.epoch + 1, "epoch_source": "val" if data.val is not None else "last"}
        if data.val is None:
            return epoch | self.ab
        betas, alphas, _ = self.settings.grids()
        keys, text, weights = self._adapted(*self.trained)
        counts = grid_counts(data, keys, self.parts[4], betas, alphas, [weights], val=data.val.float(),
                             zero_shot=100.0 * data.val.float() @ text)[:, 0].tolist()
        best = (0, 0.0, 0.0)
        for i, beta in enumerate(betas):
            for k, alpha in enumerate(alphas):
                if counts[i][k] > best[0]:
                    best = (counts[i][k], beta, alpha)
        self.ab = {"beta": best[1], "alpha": best[2], "ab_source": "val"}
        return epoch | self.ab

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        return self._logits(features.float(), *self.trained, self.ab["beta"], self.ab["alpha"])
