"""The region pool with the published code's numerics (``pool_precision: float16_reference``).

The code published with the paper converts its copy of the attention pool to float16 and
trains the float16 weights directly: AdamW (eps 1e-4) updates applied to half-precision
parameters and half-precision moment estimates, no loss scaling, no float32 master copy; the
pool computes multi-head attention over all tokens with ``F.multi_head_attention_forward``,
and the loss is computed on float16 logits. In half precision a weight of magnitude 0.02
moves only in steps of about 1.5e-5, so small updates round to nothing
(``never_moved`` measures how much). This module reproduces that path; doc/method.md
("Numerics") gives what it changes.

For ViTs (this project's extension, no published code) the same recipe applies to the ViT
pool: its parameters in float16, the whole last block on all tokens, with float16 copies of
CLIP's frozen parts of that block (CLIP's own modules stay as they are).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from clip.region_pool import all_token_forward
from clip.vit_pool import FrozenTail, ViTRegionPool, vit_all_token_forward

PRECISIONS = ("float32", "float16_reference")


class Float16Reference(nn.Module):
    """Wraps a region pool: float16 parameters, float16 inputs, the all-token computation. Its
    state dict is the pool's own (same keys, float16 values)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool.half()
        self.num_heads = pool.num_heads
        if isinstance(pool, ViTRegionPool):
            tail = pool.tail
            half = [copy.deepcopy(m).half() for m in (tail.ln_1, tail.ls_1, tail.ln_2, tail.mlp, tail.ls_2,
                                                       tail.ln_post)]
            self.__dict__["tail"] = FrozenTail(*half, tail.proj.detach().half())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.half()
        if isinstance(self.pool, ViTRegionPool):
            return vit_all_token_forward(self.pool, features, self.tail)
        return all_token_forward(self.pool, features)

    def attention(self, features: torch.Tensor):
        """The summary tokens' attention weights (visualize.py), computed as the pool does."""
        if isinstance(self.pool, ViTRegionPool):
            return self.pool.attention(features.half(), self.tail)
        return self.pool.attention(features.half())

    def state_dict(self, *args, **kwargs):
        return self.pool.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.pool.load_state_dict(state_dict, strict=strict, assign=assign)


def make_region_pool(clip, mask_bg_in_cls: bool, precision: str) -> nn.Module:
    """The trainable pool of ``clip`` in the configured precision."""
    pool = clip.region_pool(mask_bg_in_cls)
    return Float16Reference(pool) if precision == "float16_reference" else pool


def reference_adamw(params: list, lr: float, eps: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW with its default implementation (no fused kernel: that one computes in
    float32 and rounds once), as the published code creates it."""
    return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay)


def never_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter tensor, the share of its values that are bit-for-bit where they started."""
    return {name: (after[name] == before[name].to(after[name].dtype)).float().mean().item() for name in after}
