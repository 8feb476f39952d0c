"""RegionAttentionPool: the only trainable module of RAFT (doc/method.md §2).

A copy of CLIP's attention pool whose token sequence carries two summary tokens,

    [mean(F), mean(F), F_1 … F_HW] + positional embedding (row 0 duplicated),

so that token 0 learns the class-region feature and token 1 the background feature.
Only the two summary tokens' outputs are used, so only they are queried, and the key and
value projections are folded into the query side (``folded_attention``): the pool costs a
few E×E products per image instead of projecting all HW+2 tokens.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from clip.pool import SummaryPool


def summary_tokens(fmap: torch.Tensor, positional_embedding: torch.Tensor, n_summary: int) -> torch.Tensor:
    """``B×E×H×W`` map -> ``B×(n_summary+HW)×E`` tokens: ``n_summary`` copies of the mean, then the grid."""
    # B, HW, E (row-major, as CLIP's pool), in one memory layout whatever the map's (the trunk's
    # channels-last output, a cached map, a torchrun gather): the same input, the same rounding
    x = fmap.flatten(2).transpose(1, 2).contiguous()
    mean = x.mean(dim=1, keepdim=True).expand(-1, n_summary, -1)
    return torch.cat([mean, x], dim=1) + positional_embedding.to(x.dtype)


def projections(module: nn.Module) -> tuple[torch.Tensor, ...]:
    """(W_q, b_q, W_k, b_k, W_v, b_v) of an attention module: CLIP's ResNet pool (separate
    q/k/v Linear layers) or a transformer block's ``nn.MultiheadAttention`` (one packed input
    projection; its chunks are views, so gradients reach the packed parameter)."""
    if isinstance(module, nn.MultiheadAttention):
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
        return w_q, b_q, w_k, b_k, w_v, b_v
    return (module.q_proj.weight, module.q_proj.bias, module.k_proj.weight, module.k_proj.bias,
            module.v_proj.weight, module.v_proj.bias)


def folded_attention(tokens: torch.Tensor, n_query: int, qkv: tuple[torch.Tensor, ...], num_heads: int,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention of the first ``n_query`` tokens over all tokens (``B×N×E``), before
    the output projection: returns ``B×n_query×E`` and the weights ``B×heads×n_query×N``.
    ``qkv`` = (W_q, b_q, W_k, b_k, W_v, b_v), see ``projections``."""
    return folded_queries_attention(tokens[:, :n_query], tokens, qkv, num_heads, mask)


def folded_queries_attention(queries: torch.Tensor, tokens: torch.Tensor, qkv: tuple[torch.Tensor, ...],
                             num_heads: int, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention of ``queries`` (``B×Q×E_q``, before the query projection) over
    ``tokens`` (``B×N×E``), before the output projection: ``B×Q×E`` and the weights ``B×heads×Q×N``.

    Keys and values are folded into the query side, so the N tokens are never projected.
    Per head h, with ``x_j`` the tokens:
      q·(W_k x_j + b_k) = (W_kᵀ q)·x_j + q·b_k   — the last term is the same for every j;
      Σ_j a_j (W_v x_j + b_v) = W_v (Σ_j a_j x_j) + b_v   — because Σ_j a_j = 1.
    Same outputs and gradients as attention over all tokens (``all_token_forward``).
    """
    w_q, b_q, w_k, b_k, w_v, b_v = qkv
    b, n_query = queries.shape[:2]
    e = tokens.shape[-1]
    h = num_heads
    d = w_k.shape[0] // h
    q = F.linear(queries, w_q, b_q).view(b, n_query, h, d) * d ** -0.5              # B, Q, h, d
    u = torch.einsum("bshd,hde->bshe", q, w_k.view(h, d, e))                       # B, Q, h, E: W_kᵀ q
    scores = torch.einsum("bshe,bne->bshn", u, tokens)                             # B, Q, h, N
    # q·b_k shifts every score of a query alike and softmax cancels it; kept so that b_k gets
    # the same (zero) gradient, hence the same AdamW update, as in full attention.
    scores = scores + (q * b_k.view(h, d)).sum(-1, keepdim=True)
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    mixed = torch.einsum("bshn,bne->bshe", weights, tokens)                        # B, Q, h, E: Σ_j a_j x_j
    out = torch.einsum("bshe,hde->bshd", mixed, w_v.view(h, d, e)) + b_v.view(h, d)
    return out.reshape(b, n_query, h * d), weights.transpose(1, 2)


def clip_pool_attention(attnpool: nn.Module, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's own attention pool queried for its class token only: the output before
    ``c_proj`` (``B×1×E``) and the attention weights (``B×heads×1×(HW+1)``)."""
    tokens = summary_tokens(fmap, attnpool.positional_embedding, 1)
    return folded_attention(tokens, 1, projections(attnpool), attnpool.num_heads)


def clip_pool_forward(attnpool: nn.Module, fmap: torch.Tensor) -> torch.Tensor:
    """CLIP's pooled feature ``v0``: equal to ``attnpool(fmap)``, which computes outputs for
    all HW+1 tokens and keeps one."""
    out, _ = clip_pool_attention(attnpool, fmap)
    return attnpool.c_proj(out[:, 0])


class RegionAttentionPool(SummaryPool):
    """``forward(F: B×E×H×W) -> (v_cls: B×D, v_bg: B×D)``; every size is read off ``attnpool``."""

    def __init__(self, attnpool: nn.Module, mask_bg_in_cls: bool = False):
        super().__init__(attnpool.num_heads, attnpool.k_proj.in_features, attnpool.c_proj.out_features,
                         mask_bg_in_cls)
        self.q_proj = copy.deepcopy(attnpool.q_proj)
        self.k_proj = copy.deepcopy(attnpool.k_proj)
        self.v_proj = copy.deepcopy(attnpool.v_proj)
        self.c_proj = copy.deepcopy(attnpool.c_proj)
        pos = attnpool.positional_embedding.detach().clone()     # (HW+1)×E, row 0 = CLIP's class row
        # Two summary tokens start from the same positional row; they diverge only because
        # their rows receive different gradients, so the embedding must stay trainable.
        self.positional_embedding = nn.Parameter(torch.cat([pos[:1], pos[:1], pos[1:]]))
        self.make_trainable()

    def attention(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention outputs of the two summary tokens before ``c_proj`` (``B×2×E``) and the
        attention weights (``B×heads×2×(HW+2)``)."""
        tokens = summary_tokens(fmap, self.positional_embedding, 2)
        mask = None
        if self.mask_bg_in_cls:
            mask = torch.zeros(2, 1, tokens.shape[1], dtype=torch.bool, device=fmap.device)
            mask[0, 0, 1] = True  # class token ignores the background token -> v_cls == CLIP's v0 at init
        return folded_attention(tokens, 2, projections(self), self.num_heads, mask)

    def finish(self, fmap: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        return self.c_proj(attended)


def all_token_forward(pool: RegionAttentionPool, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The straightforward computation, as the reference does it: multi-head attention with
    queries for all HW+2 tokens through ``F.multi_head_attention_forward``, then keep tokens
    0 and 1. Used as the ground truth in tests and as the baseline of the benchmark."""
    tokens = summary_tokens(fmap, pool.positional_embedding, 2).transpose(0, 1)  # N, B, E
    mask = None
    if pool.mask_bg_in_cls:
        n = tokens.shape[0]
        mask = torch.zeros(n, n, dtype=torch.bool, device=fmap.device)
        mask[0, 1] = True
    out, _ = F.multi_head_attention_forward(
        query=tokens, key=tokens, value=tokens,
        embed_dim_to_check=tokens.shape[-1], num_heads=pool.num_heads,
        q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
        out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
        use_separate_proj_weight=True, training=False, need_weights=False, attn_mask=mask,
    )
    return out[0], out[1]
