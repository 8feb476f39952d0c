"""What every method of the comparison shares: the features it reads, its three steps, the
selection rule, and the pieces of the published training code several of them use.

A method sees only what a RAFT run already has: CLIP's own feature ``v0`` of the few-shot
images (under the evaluation transform, and of augmented views of them), of the validation and
test images, and the text matrix's class columns. Its steps: ``fit`` on the few-shot features,
``choose`` its hyper-parameters on validation data (never on test; without validation data, its
published validation-free rule or default), then ``logits`` for any features. Test labels only
score it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewSet:
    """Augmented views of the few-shot images, computed once through the frozen trunk and cached:
    ``count`` RandomResizedCrop(scale) + flip views of every image."""
    count: int
    scale: tuple[float, float]
    about: str


# The view sets the published methods train on, each shared by every method that reads it.
VIEW_SETS = {
    # Tip-Adapter's cache (10 views, crops of 0.5-1 of the image): also GDA, LP++, APE, ProLIP's transform
    "tip": ViewSet(10, (0.5, 1.0), "Tip-Adapter's 10 views, RandomResizedCrop scale 0.5-1"),
    # Dassl's training transform (random_resized_crop at its default scale 0.08-1, random_flip): CLAP's
    # 20 augmented passes; TaskRes and CLIP-Adapter train on the same transform
    "dassl": ViewSet(20, (0.08, 1.0), "Dassl's transform, 20 views, RandomResizedCrop scale 0.08-1"),
}


@dataclass
class BaselineData:
    text: torch.Tensor                 # D×C: the class columns of the text matrix
    train: torch.Tensor | None         # N×D: v0 of the few-shot images (evaluation transform), L2-normalised
    train_labels: torch.Tensor         # N
    views: torch.Tensor | None         # V×N×D: v0 of Tip-Adapter's views, L2-normalised, in the same order
    val: torch.Tensor | None           # M×D, L2-normalised (None: no validation data)
    val_labels: torch.Tensor | None
    scale: float = 100.0               # CLIP's logit scale
    seed: int = 1
    raw: dict[str, torch.Tensor] = field(default_factory=dict)   # each view set's v0, not normalised: V×N×D
    dataset: str = ""                  # the dataset (methods with per-dataset settings read its row)
    shots: int = 0
    # ProLIP: what CLIP's last projection reads -- "views" (V×N×W, of the Tip view set), one entry
    # per scored split ("val", "test_acc", ...: M×W) -- and that projection: "weight" W×D, "bias" D or None
    pre: dict = field(default_factory=dict)
    # (train, views, raw and pre are absent when no requested method reads them: see Baseline.needs)

    @property
    def num_classes(self) -> int:
        return self.text.shape[1]

    def zero_shot_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features @ self.text

    def view_set(self, name: str, normalised: bool = True) -> torch.Tensor:
        """V×N×D views of a view set; the Tip set normalised is ``views`` itself."""
        if name == "tip" and normalised and self.views is not None:
            return self.views
        raw = self.raw[name]
        return F.normalize(raw, dim=-1) if normalised else raw


class Baseline:
    """fit on the few-shot features -> choose on validation -> logits of any features."""

    name = ""     # its key: in the config's `baselines`, results.json and summarize's tables
    label = ""    # how tables and plots show it (its key when empty)
    note = ""     # how this implementation differs from the original, if it does
    needs: tuple[str, ...] = ()   # what it reads: "train", "views:<set>" (VIEW_SETS), "pre" (ProLIP)
    published: dict = {}          # (backbone, shots) -> the 11-dataset average its paper reports (doc/baselines.md)

    def fit(self, data: BaselineData) -> None:
        pass

    def choose(self, data: BaselineData) -> dict:
        """The chosen hyper-parameters (and where they came from)."""
        return {}

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, data: BaselineData, split: str, features: torch.Tensor) -> torch.Tensor:
        """The logits of a scored split (``"val"``, ``"test_acc"``, ...) whose ``v0`` is ``features``;
        a method reading other features of the split (ProLIP) finds them by the split's name."""
        return self.logits(data, features)

    def skip_reason(self, data: BaselineData) -> str | None:
        """Why the method cannot run on this setting (None: it can); said in the log and results."""
        return None


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Correct predictions, as a count: percentages rounded in float32 can make an equal count look better."""
    return int((logits.argmax(-1) == labels).sum())


def best_index(scores: list[float]) -> int:
    """The first of the best scores (ties go to the earlier candidate)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def shown(hyper: dict) -> str:
    """Chosen hyper-parameters as a person reads them: numbers to 4 significant digits (a grid
    value 0.1 + i·0.0345 prints 3.343, not 3.3430000000000004)."""
    return "{" + ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in hyper.items()) + "}"


def published_grid(scale: float, steps: int, low: float = 0.1) -> list[float]:
    """``[i·(scale - low)/steps + low for i < steps]``: the search grids of Tip-Adapter and APE."""
    return [i * (scale - low) / steps + low for i in range(steps)]


def dassl_lr(epoch: int, base_lr: float, max_epoch: int, warmup: int = 1, warmup_lr: float = 1e-5) -> float:
    """Dassl's schedule (its ConstantWarmupScheduler over CosineAnnealingLR(T_max = max_epoch)),
    stepped once per epoch: ``warmup_lr`` for the warm-up epochs, then the cosine from
    ``base_lr`` started anew: epoch ``warmup + k`` runs at ``base_lr·(1 + cos(π k / max_epoch))/2``."""
    if epoch < warmup:
        return warmup_lr
    return base_lr * (1 + math.cos(math.pi * (epoch - warmup) / max_epoch)) / 2


def epoch_orders(n: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """Each epoch's order of the n few-shot images (a shuffling data loader's), from the seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=gen) for _ in range(epochs)]


def batches_of(order: torch.Tensor, batch: int, drop_last: bool) -> list[torch.Tensor]:
    """An epoch's batches of indices; ``drop_last`` as Dassl's training loader (when the set is
    at least a batch): the last incomplete batch is left out."""
    stop = len(order) - len(order) % batch if drop_last and len(order) % batch else len(order)
    return [order[i:i + batch] for i in range(0, stop, batch)]


def seeded(seed: int, build):
    """``build()`` with torch's global generator seeded (a module's default initialisation, as
    the published code draws it) and then put back as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def dassl_training(optimizer: torch.optim.Optimizer, views: torch.Tensor, labels: torch.Tensor, logits_of,
                   epochs: int, batch: int, seed: int) -> None:
    """Dassl's TrainerX loop on cached views: each epoch a shuffled order of the few-shot images
    in batches (the last incomplete one dropped when the set holds at least a batch, as Dassl's
    training loader), cross-entropy, one optimiser step per batch, the learning rate of
    ``dassl_lr`` (warm-up then cosine, stepped per epoch). Epoch e reads view e mod V of the
    V×N×· ``views``: Dassl draws a fresh augmentation of every image each epoch."""
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    n = len(labels)
    with torch.enable_grad():
        for epoch, order in enumerate(epoch_orders(n, epochs, seed)):
            for group, base in zip(optimizer.param_groups, base_lrs):
                group["lr"] = dassl_lr(epoch, base, epochs)
            inputs = views[epoch % len(views)]
            for idx in batches_of(order.to(inputs.device), batch, drop_last=n >= batch):
                loss = F.cross_entropy(logits_of(inputs[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()


def cosine_scores(features: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale · normalise(f) · normalise(T)``: the logits every Dassl-trained method computes
    (``text`` D×C, normalised per column)."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(text, dim=0)
