"""RAFT's logits and training loss (doc/method.md §4–§5)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cosine_logits(features: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """``scale · normalise(features) · text``; features ``B×D``, text ``D×K``."""
    return scale * F.normalize(features.float(), dim=-1) @ text.float()


def reference_logits(features: torch.Tensor, text: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """The same logits as the published code computes them (``pool_precision: float16_reference``):
    in the features' precision (float16), divided by their norm, then ``scale · f @ T``."""
    return scale * (features / features.norm(dim=-1, keepdim=True)) @ text.to(features.dtype)


def raft_loss(v_cls: torch.Tensor, v_bg: torch.Tensor, v0: torch.Tensor, text: torch.Tensor,
              labels: torch.Tensor, *, tau1: float, tau2: float, lambda1: float, lambda2: float,
              scale: float = 100.0, total: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and its four terms.

    ``text`` is ``T = [t_1 … t_C, t_bg]`` (D × (C+1)); the last column is the background.
    Every term is a mean over a batch of ``total`` images (default: these), written as a sum
    over these images divided by ``total``: a process of a torchrun run holding a shard of the
    global batch computes its share, and the shares add up to the one-process loss.
    """
    num_classes = text.shape[1] - 1
    n = labels.shape[0]
    total = n if total is None else total
    cls_logits = cosine_logits(v_cls, text[:, :num_classes], scale)
    bg_logits = cosine_logits(v_bg, text, scale)
    with torch.no_grad():
        clip_logits = cosine_logits(v0, text[:, :num_classes], scale)
    bg_target = torch.full_like(labels, num_classes)
    cosine = F.cosine_similarity(v_cls.float(), v_bg.float(), dim=-1)
    terms = {
        "cls": F.cross_entropy(cls_logits / tau1, labels, reduction="sum") / total,       # classify the class region
        "bg": F.cross_entropy(bg_logits / tau2, bg_target, reduction="sum") / total,      # background -> its column
        "l1": lambda2 * (cls_logits - clip_logits).abs().sum() / (total * num_classes),   # consistent with CLIP
        "sep": lambda1 * (cosine.sum() - n) / total,                                      # mean cos - 1: push apart
    }
    return sum(terms.values()), terms


def reference_loss(v_cls: torch.Tensor, v_bg: torch.Tensor, v0: torch.Tensor, text: torch.Tensor,
                   labels: torch.Tensor, *, tau1: float, tau2: float, lambda1: float, lambda2: float,
                   scale: float = 100.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The same loss computed as the published code computes it (one process, its batch's means) (``pool_precision:
    float16_reference``): in the inputs' precision (float16), features divided by their norms,
    ``100 · f @ T``, torch's L1, cross-entropy and cosine-embedding losses, summed as it sums them."""
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
