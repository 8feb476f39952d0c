"""What RAFT's three pools share (doc/method.md §2, §10, §11): a trainable copy of the attention
that pools CLIP's image tower, queried by two summary tokens -- token 0 learns the class
region's feature, token 1 the background's. Each family's pool says how its tokens are formed
and queried (``attention``) and how the two attention outputs become embeddings (``finish``);
the rest is here.
"""
from __future__ import annotations

import torch
from torch import nn


class SummaryPool(nn.Module):
    """``forward(features) -> (v_cls: B×D, v_bg: B×D)``; the sizes are read off CLIP's modules by
    the subclass and kept as plain numbers."""

    summary_keys = 2   # keys before the grid in the pool's attention: the two summary tokens

    def __init__(self, num_heads: int, feature_channels: int, embed_dim: int, mask_bg_in_cls: bool):
        super().__init__()
        self.num_heads = num_heads
        self.feature_channels = feature_channels   # what the pool reads per token (E or W)
        self.embed_dim = embed_dim                 # D: the joint embedding's width
        self.mask_bg_in_cls = mask_bg_in_cls

    def make_trainable(self) -> None:
        """Every copied tensor trains (CLIP's own were frozen before they were copied)."""
        for p in self.parameters():
            p.requires_grad_(True)

    def attention(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two summary tokens' attention outputs before the output projection (``B×2×·``)
        and their weights (``B×heads×2×keys``)."""
        raise NotImplementedError

    def finish(self, features: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Attention outputs ``B×2×·`` -> embeddings ``B×2×D``."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = self.attention(features)
        v = self.finish(features, out)
        return v[:, 0], v[:, 1]
