"""RAFT on CLIP's ViTs (doc/method.md §10): the last transformer block's attention, queried by
two summary tokens. This is this project's extension; the paper fine-tunes ResNet pools only.

With ``X = [x_cls, x_1 … x_N]`` the tokens entering the last block (the frozen trunk's output),

    S   = [x_cls + e_cls, x_cls + e_bg, x_1 … x_N]                 (N + 2 tokens)
    z_s = S_s + ls_1(Attn(LN_1(S))_s)        for the summary tokens s = 0, 1
    z_s = z_s + ls_2(MLP(LN_2(z_s)))
    v_s = LN_post(z_s) · proj                v_cls = v_0, v_bg = v_1

Trainable: a copy of the block's attention (the packed q/k/v input projection and the output
projection) and the offsets ``e_cls, e_bg``, zero at the start — the analogue of the ResNet
pool's duplicated positional row: the two tokens start identical and separate only through
their offsets' different gradients. Frozen, and CLIP's own modules (not parameters of the
pool, not in its state dict): LN_1, LN_2, the MLP, the layer scales, ``ln_post``, ``proj``.

Only the summary tokens' outputs are used, so only they are queried, with keys and values
folded into the query side as for ResNets (``folded_attention``); the MLP, ``ln_post`` and
``proj`` run on 2 tokens per image.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from clip.pool import SummaryPool
from clip.region_pool import folded_attention, projections


@dataclass
class FrozenTail:
    """The parts of CLIP's last block (and head) that the pool applies but never trains."""
    ln_1: nn.Module
    ls_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module
    ln_post: nn.Module
    proj: torch.Tensor

    @classmethod
    def of(cls, visual: nn.Module) -> "FrozenTail":
        block = visual.transformer.resblocks[-1]
        identity = nn.Identity()
        return cls(block.ln_1, getattr(block, "ls_1", identity), block.ln_2, block.mlp,
                   getattr(block, "ls_2", identity), visual.ln_post, visual.proj)

    def finish(self, inputs: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of the block and the head for some tokens: their block inputs ``B×Q×W`` and
        their attention outputs after the output projection -> embeddings ``B×Q×D``."""
        z = self.before_projection(inputs, attended)
        return z @ self.proj.to(z.dtype)

    def before_projection(self, inputs: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """``finish`` up to ``ln_post``: the features the last projection ``proj`` maps (``B×Q×W``)."""
        z = inputs + self.ls_1(attended)
        z = z + self.ls_2(self.mlp(self.ln_2(z)))
        return self.ln_post(z)


def last_block_attention(visual: nn.Module) -> nn.MultiheadAttention:
    return visual.transformer.resblocks[-1].attn


def batch_first(attn: nn.MultiheadAttention) -> bool:
    return getattr(attn, "batch_first", False)


def clip_vit_attention(visual: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's last block queried for its class token only: the attention output before the
    output projection (``B×1×W``) and the weights (``B×heads×1×(1+N)``)."""
    attn = last_block_attention(visual)
    keys = visual.transformer.resblocks[-1].ln_1(tokens)
    return folded_attention(keys, 1, projections(attn), attn.num_heads)


def clip_vit_forward(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's own image feature ``v0`` from the tokens entering the last block: equal to
    ``encode_image``, which runs the block on all 1+N tokens and keeps the class token."""
    out, _ = clip_vit_attention(visual, tokens)
    attended = last_block_attention(visual).out_proj(out)
    return FrozenTail.of(visual).finish(tokens[:, :1], attended)[:, 0]


def clip_vit_before_projection(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's class token after ``ln_post``, before ``proj`` (``B×W``): ``v0 = this @ proj``."""
    out, _ = clip_vit_attention(visual, tokens)
    attended = last_block_attention(visual).out_proj(out)
    return FrozenTail.of(visual).before_projection(tokens[:, :1], attended)[:, 0]


class ViTRegionPool(SummaryPool):
    """``forward(X: B×(1+N)×W) -> (v_cls: B×D, v_bg: B×D)``; every size is read off the model."""

    def __init__(self, visual: nn.Module, mask_bg_in_cls: bool = False):
        attn = last_block_attention(visual)
        super().__init__(attn.num_heads, attn.embed_dim, visual.proj.shape[1], mask_bg_in_cls)
        self.attn = copy.deepcopy(attn)
        # e_cls, e_bg: zero, so both summary tokens start as CLIP's class token
        self.summary_offsets = nn.Parameter(torch.zeros(2, attn.embed_dim, dtype=attn.in_proj_weight.dtype,
                                                        device=attn.in_proj_weight.device))
        self.__dict__["tail"] = FrozenTail.of(visual)  # CLIP's modules: not registered, not trained, not saved
        self.make_trainable()

    def summary_inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[x_cls + e_cls, x_cls + e_bg]``: ``B×2×W``."""
        return tokens[:, :1] + self.summary_offsets.to(tokens.dtype)

    def sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """S = the two summary tokens, then the N patch tokens: ``B×(N+2)×W``."""
        return torch.cat([self.summary_inputs(tokens), tokens[:, 1:]], dim=1)

    def attention_mask(self, n_query: int, n_tokens: int, device) -> torch.Tensor | None:
        if not self.mask_bg_in_cls:
            return None
        mask = torch.zeros(n_query, 1, n_tokens, dtype=torch.bool, device=device)
        mask[0, 0, 1] = True  # the class token ignores the background token -> v_cls == v0 at step 0
        return mask

    def attention(self, tokens: torch.Tensor, tail: FrozenTail | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention outputs of the two summary tokens before the output projection
        (``B×2×W``) and the weights (``B×heads×2×(N+2)``)."""
        keys = (tail or self.tail).ln_1(self.sequence(tokens))
        mask = self.attention_mask(2, keys.shape[1], tokens.device)
        return folded_attention(keys, 2, projections(self.attn), self.num_heads, mask)

    def finish(self, tokens: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self.tail.finish(self.summary_inputs(tokens), self.attn.out_proj(attended))


def vit_all_token_forward(pool: ViTRegionPool, tokens: torch.Tensor,
                          tail: FrozenTail | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward computation: the whole last block (with the pool's attention) on
    all N+2 tokens, then keep tokens 0 and 1. Ground truth of the tests, baseline of the
    benchmark. ``tail``: other copies of CLIP's frozen parts (float16 ones, clip/published.py)."""
    tail = tail or pool.tail
    s = pool.sequence(tokens)
    y = tail.ln_1(s)
    n = y.shape[1]
    mask = None
    if pool.mask_bg_in_cls:
        mask = torch.zeros(n, n, dtype=torch.bool, device=tokens.device)
        mask[0, 1] = True
    if not batch_first(pool.attn):
        y = y.transpose(0, 1)
    a = pool.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
    if not batch_first(pool.attn):
        a = a.transpose(0, 1)
    z = s + tail.ls_1(a)
    z = z + tail.ls_2(tail.mlp(tail.ln_2(z)))
    v = tail.ln_post(z[:, :2]) @ tail.proj.to(z.dtype)
    return v[:, 0], v[:, 1]
