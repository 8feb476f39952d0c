"""What every baseline shares: the features it reads, its three steps, the selection rule.

A baseline sees only what a RAFT run already has — CLIP's own feature ``v0`` of the few-shot
images (and of augmented views of them), of the validation and test images, and the text
matrix's class columns — all L2-normalised. Its steps: ``fit`` on the few-shot features,
``choose`` its hyper-parameters on validation data (never on test), then ``logits`` for any
features. Test labels only score it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch



@dataclass
class BaselineData:
    text: torch.Tensor                 # D×C: the class columns of the text matrix
    train: torch.Tensor | None         # N×D: v0 of the few-shot images (evaluation transform)
    train_labels: torch.Tensor         # N
    views: torch.Tensor | None         # V×N×D: v0 of V augmented views of the same images, in the same order
    # (train and views are None when no requested method needs them: see Baseline.needs)
    val: torch.Tensor | None           # M×D (None: the dataset has no validation data)
    val_labels: torch.Tensor | None
    scale: float = 100.0               # CLIP's logit scale
    seed: int = 1

    @property
    def num_classes(self) -> int:
        return self.text.shape[1]

    def zero_shot_logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * features @ self.text


class Baseline:
    """fit on the few-shot features -> choose on validation -> logits of any features."""

    name = ""     # its key: in the config's `baselines`, results.json and summarize's tables
    label = ""    # how tables and plots show it (its key when empty)
    note = ""     # how this implementation differs from the original, if it does
    needs: tuple[str, ...] = ()   # the few-shot features it reads: "train" and/or "views"

    def fit(self, data: BaselineData) -> None:
        pass

    def choose(self, data: BaselineData) -> dict:
        """The chosen hyper-parameters (and where they came from)."""
        return {}

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item()


def best_index(scores: list[float]) -> int:
    """The first of the best scores (ties go to the earlier candidate)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def shown(hyper: dict) -> str:
    """Chosen hyper-parameters as a person reads them: numbers to 4 significant digits (a grid
    value 0.1 + i·0.0345 prints 3.343, not 3.3430000000000004)."""
    return "{" + ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in hyper.items()) + "}"
