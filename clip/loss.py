"""RAFT's logits and training loss (doc/method.md §4–§5).

``TERMS`` is the one list of the loss's terms: the total is their sum, and the training loop's
tally, its epoch line, ``history.csv`` and TensorBoard iterate it. A new term is one entry here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


def cosine_logits(features: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``scale · normalise(features) · text``; features ``B×D``, text ``D×K``."""
    return scale * F.normalize(features.float(), dim=-1) @ text.float()


def published_logits(features: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """The same logits as the published code computes them (``pool_precision: float16_published``):
    in the features' precision (float16), divided by their norm, then ``scale · f @ T``."""
    return scale * (features / features.norm(dim=-1, keepdim=True)) @ text.to(features.dtype)


@dataclass
class LossInputs:
    """What the terms read, for one batch (or a torchrun process's share of one)."""
    cls_logits: torch.Tensor    # B×C: the class token against the class columns
    bg_logits: torch.Tensor     # B×(C+1): the background token against every column
    clip_logits: torch.Tensor   # B×C: zero-shot CLIP (no gradient)
    cosine: torch.Tensor        # B: cos(v_cls, v_bg)
    labels: torch.Tensor        # B
    total: int                  # the global batch's size: every term is a sum over it divided by it
    tau1: float
    tau2: float
    lambda1: float
    lambda2: float


TERMS: dict[str, Callable[[LossInputs], torch.Tensor]] = {
    # classify the class region
    "cls": lambda x: F.cross_entropy(x.cls_logits / x.tau1, x.labels, reduction="sum") / x.total,
    # the background token to the background column
    "bg": lambda x: F.cross_entropy(x.bg_logits / x.tau2, torch.full_like(x.labels, x.bg_logits.shape[1] - 1),
                                    reduction="sum") / x.total,
    # consistent with zero-shot CLIP
    "l1": lambda x: x.lambda2 * (x.cls_logits - x.clip_logits).abs().sum() / (x.total * x.cls_logits.shape[1]),
    # mean cos - 1: push the two features apart
    "sep": lambda x: x.lambda1 * (x.cosine.sum() - x.labels.shape[0]) / x.total,
}


def raft_loss(v_cls: torch.Tensor, v_bg: torch.Tensor, v0: torch.Tensor, text: torch.Tensor,
              labels: torch.Tensor, *, tau1: float, tau2: float, lambda1: float, lambda2: float,
              scale: float = 100.0, total: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its terms (``TERMS``).

    ``text`` is ``T = [t_1 … t_C, t_bg]`` (D × (C+1)); the last column is the background.
    Every term is a mean over a batch of ``total`` images (default: these), written as a sum
    over these images divided by ``total``: a process of a torchrun run holding a shard of the
    global batch computes its share, and the shares add up to the one-process loss.
    """
    num_classes = text.shape[1] - 1
    with torch.no_grad():
        clip_logits = cosine_logits(v0, text[:, :num_classes], scale)
    inputs = LossInputs(cosine_logits(v_cls, text[:, :num_classes], scale), cosine_logits(v_bg, text, scale),
                        clip_logits, F.cosine_similarity(v_cls.float(), v_bg.float(), dim=-1), labels,
                        labels.shape[0] if total is None else total, tau1, tau2, lambda1, lambda2)
    terms = {name: term(inputs) for name, term in TERMS.items()}
    return sum(terms.values()), terms


def published_loss(v_cls: torch.Tensor, v_bg: torch.Tensor, v0: torch.Tensor, text: torch.Tensor,
                   labels: torch.Tensor, *, tau1: float, tau2: float, lambda1: float, lambda2: float,
                   scale: float = 100.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same loss computed as the published code computes it (one process, its batch's
    means) for ``pool_precision: float16_published``: in the inputs' precision (float16),
    features divided by their norms, ``100 · f @ T``, torch's L1, cross-entropy and
    cosine-embedding losses, summed in its order. Its terms carry ``TERMS``' names."""
    num_classes = text.shape[1] - 1
    # normalised once and used by both the logits and the cosine term, as published: in float16
    # the two gradient paths meeting at one tensor round differently than at two
    v0, v_cls, v_bg = (v / v.norm(dim=-1, keepdim=True) for v in (v0, v_cls, v_bg))
    clip_logits = scale * v0 @ text[:, :num_classes]
    cls_logits = scale * v_cls @ text[:, :num_classes]
    bg_logits = scale * v_bg @ text
    consistency = F.l1_loss(cls_logits, clip_logits)
    cls = F.cross_entropy(cls_logits / tau1, labels)
    bg = F.cross_entropy(bg_logits / tau2, torch.full_like(labels, num_classes))
    diff = -F.cosine_embedding_loss(v_cls, v_bg, torch.ones(len(labels), device=labels.device))
    loss = lambda1 * diff + lambda2 * consistency + cls + bg
    return loss, {"cls": cls, "bg": bg, "l1": lambda2 * consistency, "sep": lambda1 * diff}
