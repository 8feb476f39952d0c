"""RAFT on an attention-pool head: SigLIP's and SigLIP2's image towers (doc/method.md §11).

open_clip builds these towers through timm; their tokens ``X = [x_1 … x_N]`` (the trunk's
output after its final norm, no class token) are pooled by a MAP head: one learned latent
query ``l`` attends over all of them,

    y  = W_o · MHA(q = W_q l + b_q;  k, v = kv(X)) + b_o
    z  = y + MLP(LN(y))
    v0 = tail(z)            (fc_norm and the heads after the pool: identities for SigLIP)

That head is the layer RAFT fine-tunes. The region pool queries it with two latents,
``[l_cls, l_bg]``, both starting as ``l``: the class and background summary tokens, which
diverge only through their rows' different gradients (as the ResNet pool's duplicated
positional row and the ViT's zero offsets). Trainable, as copies: the two latents and the
head's attention (``q``, the packed ``kv``, the output projection ``proj``). Frozen, and the
model's own modules (not parameters of the pool, not in its state dict): ``LN``, the ``MLP``
and the tail — the same cut as on a ViT (§10), where the block's MLP stays frozen.

The keys are the patch tokens only, so the two queries never see each other: the class
output equals CLIP's own ``v0`` at initialisation whatever ``mask_bg_in_cls`` says (there is
nothing to mask). Keys and values are folded into the query side (``folded_attention``), so
the N tokens are never projected: the pool costs a few W×W products per image.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from clip.pool import SummaryPool
from clip.region_pool import folded_queries_attention
from utils import RaftError


def map_head(visual: nn.Module) -> nn.Module:
    """The attention-pool head of an open_clip timm tower (``AttentionPoolLatent``)."""
    return visual.trunk.attn_pool


def map_prefix_keys(trunk: nn.Module) -> int:
    """Prefix tokens (class, registers) among the keys of a MAP head: timm's ViT says whether
    it pools them (``pool_include_prefix``); towers without that switch (Eva) pool every token."""
    return trunk.num_prefix_tokens if getattr(trunk, "pool_include_prefix", True) else 0


def check_map_head(head: nn.Module, backbone: str) -> None:
    """RAFT's fold needs the head SigLIP has: a linear query projection, no q/k norms, no
    positional term on the keys, one latent pooled as a token, and the LayerNorm + MLP after."""
    problems = [why for bad, why in (
        (not isinstance(head.q, nn.Linear), "its latent is not projected by a linear query layer"),
        (not isinstance(head.q_norm, nn.Identity) or not isinstance(head.k_norm, nn.Identity),
         "it normalises queries and keys"),
        (head.pos_embed is not None, "it adds a positional embedding to the keys"),
        (head.latent_len != 1 or head.pool != "token", f"it pools {head.latent_len} latents by '{head.pool}'"),
        (head.mlp is None, "it has no MLP after the attention (pre-logits mode)"),
    ) if bad]
    if problems:
        raise RaftError(f"{backbone}'s attention-pool head differs from SigLIP's ({problems[0]}); RAFT's pool on "
                        f"a MAP head is defined for SigLIP's (doc/method.md §11)")


@dataclass
class MapTail:
    """What the head applies after its attention, never trained: LN + MLP, then the tail."""
    norm: nn.Module
    mlp: nn.Module
    after: nn.Module

    @classmethod
    def of(cls, visual: nn.Module) -> "MapTail":
        trunk, head = visual.trunk, map_head(visual)
        after = nn.Sequential(trunk.fc_norm, trunk.head_drop, trunk.head, visual.head)
        return cls(head.norm, head.mlp, after)

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """Attention outputs after the output projection ``B×Q×W`` -> embeddings ``B×Q×D``."""
        return self.after(y + self.mlp(self.norm(y)))


def head_projections(head: nn.Module) -> tuple[torch.Tensor, ...]:
    """(W_q, b_q, W_k, b_k, W_v, b_v) of a MAP head: the query layer and the packed kv (views,
    so gradients reach the packed parameters)."""
    w_k, w_v = head.kv.weight.chunk(2)
    b_k, b_v = head.kv.bias.chunk(2)
    return head.q.weight, head.q.bias, w_k, b_k, w_v, b_v


def clip_map_attention(visual: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's own head for its latent: the attention output before ``proj`` (``B×1×W``)
    and the weights (``B×heads×1×N``)."""
    head = map_head(visual)
    queries = head.latent.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
    return folded_queries_attention(queries, tokens, head_projections(head), head.num_heads)


def clip_map_forward(visual: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's own image feature ``v0`` from the tokens the head reads: equal to ``encode_image``."""
    out, _ = clip_map_attention(visual, tokens)
    return MapTail.of(visual).finish(map_head(visual).proj(out))[:, 0]


def map_embed_dim(visual: nn.Module) -> int:
    """D: the width after the tail (the last linear layer's, else the head's own)."""
    linears = [m for m in MapTail.of(visual).after.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else map_head(visual).proj.out_features


class MapRegionPool(SummaryPool):
    """``forward(X: B×N×W) -> (v_cls: B×D, v_bg: B×D)``; every size is read off the model."""

    def __init__(self, visual: nn.Module, mask_bg_in_cls: bool = False):
        head = map_head(visual)
        # mask_bg_in_cls: nothing to mask, the queries are not keys
        super().__init__(head.num_heads, head.kv.in_features, map_embed_dim(visual), mask_bg_in_cls)
        self.q, self.kv, self.proj = (copy.deepcopy(m) for m in (head.q, head.kv, head.proj))
        latent = head.latent.detach()[0, :1]                              # 1×W: the head's query
        self.latent = nn.Parameter(torch.cat([latent, latent]).clone())   # [l_cls, l_bg]
        self.summary_keys = map_prefix_keys(visual.trunk)   # keys before the grid (none for SigLIP)
        self.__dict__["tail"] = MapTail.of(visual)   # the model's modules: not registered, trained or saved
        self.make_trainable()

    def attention(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention outputs of the two latents before ``proj`` (``B×2×W``) and the weights
        (``B×heads×2×N``)."""
        queries = self.latent.to(tokens.dtype).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return folded_queries_attention(queries, tokens, head_projections(self), self.num_heads)

    def finish(self, tokens: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self.tail.finish(self.proj(attended))


def map_all_token_forward(pool: MapRegionPool, visual: nn.Module,
                          tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward computation: timm's own head module run with the pool's latents
    and layers (every token projected to keys and values, both latents kept), then the tail.
    Ground truth of the tests, baseline of the benchmark."""
    head = copy.copy(map_head(visual))            # a shallow copy: its modules are shared, then replaced
    head._modules = dict(head._modules, q=pool.q, kv=pool.kv, proj=pool.proj)
    head._parameters = {k: v for k, v in head._parameters.items() if k != "latent"}
    head.latent = pool.latent.unsqueeze(0)        # 1×2×W, a plain tensor: gradients reach the pool's
    head.latent_len, head.pool = 2, ""
    v = pool.tail.after(head(tokens))
    return v[:, 0], v[:, 1]
