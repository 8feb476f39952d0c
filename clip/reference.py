"""The region pool with the published code's numerics (``pool_precision: float16_reference``).

The code published with the paper converts its copy of the attention pool to float16 and
trains the float16 weights directly: AdamW (eps 1e-4) updates applied to half-precision
parameters and half-precision moment estimates, no loss scaling, no float32 master copy; the
pool computes multi-head attention over all tokens with ``F.multi_head_attention_forward``
in its operation order (``published_pool_forward``: in float16 the order is part of the
result), the loss is computed on float16 logits, and evaluation blends float16 logits. In half precision a weight of magnitude 0.02
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
import torch.nn.functional as F
from torch import nn

from clip.region_pool import RegionAttentionPool
from clip.vit_pool import FrozenTail, ViTRegionPool, vit_all_token_forward
from utils import RaftError

PRECISIONS = ("float32", "float16_reference")


def published_pool_forward(pool: RegionAttentionPool, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ResNet region pool in the published code's operation order, which float16 rounding
    makes part of the result: the map (as a convolution leaves it, ``B×E×H×W`` contiguous)
    viewed as ``HW×B×E`` through a permutation (a strided view), the mean token reduced on
    that view, the ``(HW+2)×B×E`` sequence concatenated (contiguous) with the positional
    embedding added, then multi-head attention over all tokens, queries for every token."""
    b, e = fmap.shape[:2]
    x = fmap.contiguous().reshape(b, e, -1).permute(2, 0, 1)
    mean = x.mean(dim=0, keepdim=True)
    x = torch.cat([mean, mean, x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    mask = None
    if pool.mask_bg_in_cls:   # this project's variant; the published code has no mask
        mask = torch.zeros(x.shape[0], x.shape[0], dtype=torch.bool, device=x.device)
        mask[0, 1] = True
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=e, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training,
        need_weights=False, attn_mask=mask)
    return out[0], out[1]


class Float16Reference(nn.Module):
    """Wraps a region pool: float16 parameters, float16 inputs, the all-token computation. Its
    state dict is the pool's own (same keys, float16 values)."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool.half()
        self.num_heads, self.summary_keys = pool.num_heads, pool.summary_keys
        if isinstance(pool, ViTRegionPool):
            tail = pool.tail
            half = [copy.deepcopy(m).half() for m in (tail.ln_1, tail.ls_1, tail.ln_2, tail.mlp, tail.ls_2,
                                                       tail.ln_post)]
            self.__dict__["tail"] = FrozenTail(*half, tail.proj.detach().half())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.half()
        if isinstance(self.pool, ViTRegionPool):
            return vit_all_token_forward(self.pool, features, self.tail)
        return published_pool_forward(self.pool, features)

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
    if precision == "float16_reference" and clip.family == "map":
        raise RaftError(f"pool_precision float16_reference reproduces the published code's float16 step; "
                        f"{clip.backbone}'s attention-pool head has no published code: use float32")
    pool = clip.region_pool(mask_bg_in_cls)
    return Float16Reference(pool) if precision == "float16_reference" else pool


def reference_adamw(params: list, lr: float, eps: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch's AdamW with its default implementation (no fused kernel: that one computes in
    float32 and rounds once), as the published code creates it."""
    return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay)


def never_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter tensor, the share of its values that are bit-for-bit where they started."""
    return {name: (after[name] == before[name].to(after[name].dtype)).float().mean().item() for name in after}
