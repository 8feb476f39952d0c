"""The pool's numerics, chosen once per run (``pool_precision``): ``float32`` (float32 weights,
mixed-precision compute on CUDA), or ``float16_published``, the published code's step.

The code published with the paper converts its copy of the attention pool to float16 and
trains the float16 weights directly: AdamW (eps 1e-4) updates applied to half-precision
parameters and half-precision moment estimates, no loss scaling, no float32 master copy; the
pool computes multi-head attention over all tokens with ``F.multi_head_attention_forward`` in
its operation order (``published_attention``: in float16 the order is part of the result); CLIP's
own feature ``v0`` comes from CLIP's float16 attention pool over all tokens, the loss from
float16 logits, and evaluation blends float16 logits. In half precision a weight of magnitude
0.02 moves only in steps of about 1.5e-5, so small updates round to nothing (``never_moved``
measures how much). doc/method.md ("Numerics") gives what it changes.

For ViTs (this project's extension, no published code) the same recipe applies to the ViT
pool: its parameters in float16, the whole last block on all tokens, with float16 copies of
CLIP's frozen parts of that block (CLIP's own modules stay as they are); ``v0`` is CLIP's
own feature in float16.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clip import loss as raft_losses
from clip.vit_pool import FrozenTail, ViTRegionPool, vit_all_token_forward
from utils import RaftError

PRECISIONS = ("float32", "float16_published")
FLOAT16_TINY = 2.0 ** -24   # the smallest positive float16 (a subnormal): smaller values round to 0


def published_attention(pool: nn.Module, fmap: torch.Tensor, summary: int,
                        mask_second: bool = False) -> torch.Tensor:
    """An attention pool (CLIP's, or the region pool) in the published code's operation order,
    which float16 rounding makes part of the result: the map (as a convolution leaves it,
    ``B×E×H×W`` contiguous) viewed as ``HW×B×E`` through a permutation (a strided view), the
    mean token reduced on that view, ``summary`` copies of it and the map concatenated
    (contiguous) with the positional embedding added, then multi-head attention over all
    tokens, queries for every token; the first ``summary`` outputs, ``summary×B×D``."""
    b, e = fmap.shape[:2]
    x = fmap.contiguous().reshape(b, e, -1).permute(2, 0, 1)
    mean = x.mean(dim=0, keepdim=True)
    x = torch.cat([mean] * summary + [x], dim=0)
    x = x + pool.positional_embedding[:, None, :].to(x.dtype)
    mask = None
    if mask_second:   # this project's variant; the published code has no mask
        mask = torch.zeros(x.shape[0], x.shape[0], dtype=torch.bool, device=x.device)
        mask[0, 1] = True
    out, _ = F.multi_head_attention_forward(
        query=x, key=x, value=x, embed_dim_to_check=e, num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0, out_proj_weight=pool.c_proj.weight,
        out_proj_bias=pool.c_proj.bias, use_separate_proj_weight=True, training=pool.training,
        need_weights=False, attn_mask=mask)
    return out[:summary]


class Float16Published(nn.Module):
    """Wraps a region pool: float16 parameters, float16 inputs, the all-token computation. Its
    state dict is the pool's own (same keys, float16 values). ``clip_feature``: CLIP's own
    ``v0`` as the published model computes it."""

    def __init__(self, pool: nn.Module, visual: nn.Module):
        super().__init__()
        self.pool = pool.half()
        self.num_heads, self.summary_keys = pool.num_heads, pool.summary_keys
        self.feature_channels, self.embed_dim = pool.feature_channels, pool.embed_dim
        if isinstance(pool, ViTRegionPool):
            tail = pool.tail
            half = [copy.deepcopy(m).half() for m in (tail.ln_1, tail.ls_1, tail.ln_2, tail.mlp, tail.ls_2,
                                                       tail.ln_post)]
            self.__dict__["tail"] = FrozenTail(*half, tail.proj.detach().half())
        else:   # CLIP's float16 attention pool: what the published model's encode_image returns as v0
            self.__dict__["clip_pool"] = copy.deepcopy(visual.attnpool).half().eval()

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = features.half()
        if isinstance(self.pool, ViTRegionPool):
            return vit_all_token_forward(self.pool, features, self.tail)
        out = published_attention(self.pool, features, 2, self.pool.mask_bg_in_cls)
        return out[0], out[1]

    @torch.no_grad()
    def clip_feature(self, features: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        if isinstance(self.pool, ViTRegionPool):
            return v0.half()
        return published_attention(self.clip_pool, features.half(), 1)[0]

    def attention(self, features: torch.Tensor):
        """The summary tokens' attention weights (visualize.py), computed as the pool does."""
        if isinstance(self.pool, ViTRegionPool):
            return self.pool.attention(features.half(), self.tail)
        return self.pool.attention(features.half())

    def _apply(self, fn, *args, **kwargs):   # .to(device): the unregistered float16 copies go along
        if "clip_pool" in self.__dict__:
            self.clip_pool._apply(fn)
        if "tail" in self.__dict__:
            t = self.tail
            for module in (t.ln_1, t.ls_1, t.ln_2, t.mlp, t.ls_2, t.ln_post):
                module._apply(fn)
            t.proj = fn(t.proj)
        return super()._apply(fn, *args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.pool.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.pool.load_state_dict(state_dict, strict=strict, assign=assign)


class Numerics:
    """``float32``: float32 weights, torch's fused AdamW where it has one, mixed-precision
    compute on CUDA, float32 logits."""

    name = "float32"
    amp = True             # mixed precision may be used (on CUDA)
    one_process = False    # the gradients may be summed across torchrun processes

    def check(self, values: dict) -> None:
        """Settings this numerics cannot carry out, refused before anything runs."""

    def pool(self, clip, mask_bg_in_cls: bool) -> nn.Module:
        return clip.region_pool(mask_bg_in_cls)

    def optimizer(self, params: list, lr: float, eps: float, weight_decay: float) -> torch.optim.Optimizer:
        kwargs = dict(lr=lr, eps=eps, weight_decay=weight_decay)
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            return torch.optim.AdamW(params, **kwargs)

    def text(self, text: torch.Tensor) -> torch.Tensor:
        """The text matrix in the loss's precision."""
        return text

    def clip_feature(self, pool: nn.Module, features: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        """CLIP's own feature ``v0`` as this numerics feeds it to the loss and the zero-shot logits."""
        return v0

    def loss(self, v_cls, v_bg, v0, text, labels, *, total: int, **weights):
        return raft_losses.raft_loss(v_cls, v_bg, v0, text, labels, total=total, **weights)

    def logits(self, features: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        return raft_losses.cosine_logits(features, text, scale)


class PublishedNumerics(Numerics):
    """``float16_published``: the published code's float16 step (the module's docstring)."""

    name = "float16_published"
    amp = False
    one_process = True

    def check(self, values: dict) -> None:
        if values.get("family") == "map":
            raise RaftError(f"pool_precision float16_published reproduces the published code's float16 step; "
                            f"{values['backbone']}'s attention-pool head has no published code: use float32")
        for key in ("eps", "lr"):
            if values[key] < FLOAT16_TINY:
                raise RaftError(f"{key} {values[key]:g} rounds to 0 in float16 (pool_precision float16_published "
                                f"computes AdamW in float16): the smallest float16 is {FLOAT16_TINY:.3g}; use a "
                                f"larger {key}, or pool_precision float32")

    def pool(self, clip, mask_bg_in_cls: bool) -> nn.Module:
        if clip.family == "map":
            self.check({"family": "map", "backbone": clip.backbone})
        return Float16Published(clip.region_pool(mask_bg_in_cls), clip.model.visual)

    def optimizer(self, params: list, lr: float, eps: float, weight_decay: float) -> torch.optim.Optimizer:
        # torch's default implementation, as the published code creates it (the fused kernel
        # computes in float32 and rounds once)
        return torch.optim.AdamW(params, lr=lr, eps=eps, weight_decay=weight_decay)

    def text(self, text: torch.Tensor) -> torch.Tensor:
        return text.half()

    def clip_feature(self, pool: nn.Module, features: torch.Tensor, v0: torch.Tensor) -> torch.Tensor:
        return pool.clip_feature(features, v0)

    def loss(self, v_cls, v_bg, v0, text, labels, *, total: int, **weights):
        return raft_losses.published_loss(v_cls, v_bg, v0.to(v_cls.dtype), text, labels, **weights)

    def logits(self, features: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        return raft_losses.published_logits(features.half(), text, scale)


NUMERICS = {n.name: n for n in (Numerics(), PublishedNumerics())}


def numerics_of(precision: str) -> Numerics:
    return NUMERICS[precision]


def make_region_pool(clip, mask_bg_in_cls: bool, precision: str) -> nn.Module:
    """The trainable pool of ``clip`` in the configured precision."""
    return numerics_of(precision).pool(clip, mask_bg_in_cls)


def never_moved(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per parameter tensor, the share of its values that are bit-for-bit where they started."""
    return {name: (after[name] == before[name].to(after[name].dtype)).float().mean().item() for name in after}
