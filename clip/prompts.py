"""CoOp's learned prompts (Zhou et al., IJCV 2022; KaiyangZhou/CoOp, trainers/coop.py at ff61507):
context vectors in the text encoder's input, trained through the frozen text encoder.

Each class's prompt is ``[SOS] ctx₁ … ctx_M {class name}. [EOS]`` (the class token at the end;
``middle`` and ``front`` as published), the context one set for all classes or one per class
(``class_specific``), initialised from N(0, 0.02²) or from the embeddings of a phrase
(``ctx_init``: "a photo of a" gives its 4 tokens' embeddings, one context for all classes, as
published). The prefix ([SOS]) and suffix
(the class name, the full stop, [EOS] and the padding) are the frozen token embeddings of the
tokenized prompt with ``X`` placeholders, as published. The text features are the text
encoder's output at [EOS] through its projection (``encode_prompts``: open_clip's
``encode_text`` from the embedding step on).
"""
from __future__ import annotations

import torch
from torch import nn

from utils import RaftError

POSITIONS = ("end", "middle", "front")


def text_tower(model: nn.Module, backbone: str) -> nn.Module:
    """The CLIP whose text side CoOp can prompt: OpenAI-style (token embedding, positional
    embedding, transformer, ln_final, projection, argmax pooling), as open_clip builds it for
    CLIP's ResNets and ViTs; else one line saying why not."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    missing = [name for name in needed if not hasattr(model, name)]
    pooling = getattr(model, "text_pool_type", "argmax")
    if missing or pooling != "argmax":
        why = f"no {missing[0]}" if missing else f"its pooling is {pooling!r}"
        raise RaftError(f"{backbone}'s text tower is not CLIP's ({why}): CoOp's prompts are defined for CLIP's text "
                        f"transformer (token embedding, [EOS] pooling)")
    return model


def encode_prompts(model: nn.Module, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Text features of prompt embeddings (``C×L×W``) whose tokenization is ``tokens`` (its [EOS],
    the largest id, marks where each prompt is read): open_clip's ``encode_text`` after its
    token embedding."""
    cast = model.transformer.get_cast_dtype()
    x = prompts.to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
    projection = model.text_projection
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


class PromptLearner(nn.Module):
    """``forward() -> C×L×W`` prompt embeddings; only ``ctx`` trains."""

    def __init__(self, model: nn.Module, tokenizer, classnames: list[str], n_ctx: int = 16, ctx_init: str = "",
                 class_specific: bool = False, position: str = "end"):
        super().__init__()
        if position not in POSITIONS:
            raise RaftError(f"CoOp's class token position must be one of {', '.join(POSITIONS)}, got {position!r}")
        embedding = model.token_embedding
        width = model.ln_final.weight.shape[0]
        window = model.positional_embedding.shape[0]
        if ctx_init:
            phrase = ctx_init.replace("_", " ")
            n_ctx = len(phrase.split(" "))
            with torch.no_grad():   # (one context for all classes whatever class_specific says, as published)
                vectors = embedding(tokenizer([phrase]).to(embedding.weight.device))[0, 1:1 + n_ctx].clone()
            prefix = phrase
        else:
            if n_ctx < 1:
                raise RaftError(f"CoOp needs at least one context token, got n_ctx {n_ctx}")
            shape = (len(classnames), n_ctx, width) if class_specific else (n_ctx, width)
            vectors = torch.empty(shape, dtype=embedding.weight.dtype, device=embedding.weight.device)
            nn.init.normal_(vectors, std=0.02)
            prefix = " ".join(["X"] * n_ctx)
        names = [name.replace("_", " ") for name in classnames]
        prompts = [f"{prefix} {name}." for name in names]
        tokens = tokenizer(prompts).to(embedding.weight.device)
        # each prompt must fit the window: [SOS] + context + name + '.' + [EOS]
        eos = tokens.argmax(dim=-1)
        encode = getattr(tokenizer, "encode", None)   # the BPE tokens of a name alone (no [SOS]/[EOS])
        name_tokens = [len(encode(name)) if encode else len(tokenizer([name])[0].nonzero()) - 2 for name in names]
        for name, n, end in zip(names, name_tokens, eos.tolist()):
            if 1 + n_ctx + n + 1 + 1 > window or end != 1 + n_ctx + n + 1:
                raise RaftError(f"CoOp's prompt for class {name!r} does not fit the text encoder's window of {window} "
                                f"tokens with {n_ctx} context tokens (its name takes {n}): use fewer context tokens "
                                f"(n_ctx) or a shorter class name")
        with torch.no_grad():
            embedded = embedding(tokens)
        self.ctx = nn.Parameter(vectors)
        self.register_buffer("token_prefix", embedded[:, :1].clone())           # [SOS]
        self.register_buffer("token_suffix", embedded[:, 1 + n_ctx:].clone())   # the name, '.', [EOS], padding
        self.register_buffer("tokens", tokens)
        self.n_cls, self.n_ctx, self.position, self.name_lens = len(names), n_ctx, position, name_tokens

    def forward(self) -> torch.Tensor:
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.unsqueeze(0).expand(self.n_cls, -1, -1)
        prefix, suffix = self.token_prefix, self.token_suffix
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)
        rows = []
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            name, rest = suffix[i:i + 1, :n], suffix[i:i + 1, n:]
            if self.position == "middle":
                rows.append(torch.cat([prefix[i:i + 1], ctx[i:i + 1, :half], name, ctx[i:i + 1, half:], rest], dim=1))
            else:
                rows.append(torch.cat([prefix[i:i + 1], name, ctx[i:i + 1], rest], dim=1))
        return torch.cat(rows, dim=0)
