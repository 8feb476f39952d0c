"""RAFT's logits and training loss (doc/method.md §4–§5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_logits(features: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``scale · normalise(features) · text``; features ``B×D``, text ``D×K``."""
    return scale * F.normalize(features.float(), dim=-1) @ text.float()


def raft_loss(v_cls: torch.Tensor, v_bg: torch.Tensor, v0: torch.Tensor, text: torch.Tensor,
              labels: torch.Tensor, *, tau1: float, tau2: float, lambda1: float, lambda2: float,
              scale: float = 100.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its four terms.

    ``text`` is ``T = [t_1 … t_C, t_bg]`` (D × (C+1)); the last column is the background.
    """
    num_classes = text.shape[1] - 1
    cls_logits = cosine_logits(v_cls, text[:, :num_classes], scale)
    bg_logits = cosine_logits(v_bg, text, scale)
    with torch.no_grad():
        clip_logits = cosine_logits(v0, text[:, :num_classes], scale)
    bg_target = torch.full_like(labels, num_classes)
    terms = {
        "cls": F.cross_entropy(cls_logits / tau1, labels),                # classify the class region
        "bg": F.cross_entropy(bg_logits / tau2, bg_target),               # background token -> background column
        "l1": lambda2 * (cls_logits - clip_logits).abs().mean(),          # stay consistent with zero-shot CLIP
        "sep": lambda1 * (F.cosine_similarity(v_cls.float(), v_bg.float(), dim=-1).mean() - 1),  # push apart
    }
    return sum(terms.values()), terms
