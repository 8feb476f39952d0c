"""The text classifier (doc/method.md §3): one column per class plus a background column.

    t_c  = normalise(mean_s normalise(enc(sentence_s of class c)))
    t_bg = mean_c normalise(enc("the background of {c}."))       (not re-normalised by default)
    T    = [t_1 … t_C, t_bg]                                     D × (C+1)

``T`` depends on the frozen text encoder and on the exact sentences, so its cache file is
keyed by the model's weight fingerprint and a hash of every sentence.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import RaftError, sha256_text, torch_load, torch_save

BACKGROUND_TEMPLATE = "the background of {}."
TEXT_BATCH = 256

log = logging.getLogger("raft")


def readable(classname: str) -> str:
    """Split files may spell class names with underscores (UCF101: Apply_Eye_Makeup)."""
    return classname.replace("_", " ")


def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """Read a CaFo-format description file: ``{classname: [sentence, ...]}``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RaftError(f"description file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RaftError(f"description file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RaftError(f"description file {path} must be a JSON object {{classname: [sentences]}}")
    return data


def lookup_description(descriptions: dict[str, list[str]], classname: str) -> list[str] | None:
    """Exact key first, then the underscore-free spelling; ``None`` when absent or unusable."""
    for key in (classname, readable(classname)):
        value = descriptions.get(key)
        if isinstance(value, list):
            sentences = [s.strip() for s in value if isinstance(s, str) and s.strip()]
            return sentences or None
    return None


def class_sentences(classnames: list[str], templates: list[str],
                    descriptions: dict[str, list[str]] | None = None,
                    source: str = "descriptions") -> list[list[str]]:
    """Sentences per class: descriptions where available, else the templates."""
    per_class, fallback = [], []
    for name in classnames:
        found = lookup_description(descriptions, name) if descriptions is not None else None
        if found is None:
            if descriptions is not None:
                fallback.append(name)
            found = [t.format(readable(name)) for t in templates]
        per_class.append(found)
    if fallback:
        shown = ", ".join(fallback[:10]) + (f" … ({len(fallback)} in all)" if len(fallback) > 10 else "")
        log.warning(f"warning: {source} has no usable sentences for {shown}; using templates for those")
    return per_class


def _encode(clip, sentences: list[str], desc: str) -> torch.Tensor:
    """Encode and L2-normalise each sentence (batched, with a progress bar when long)."""
    chunks = range(0, len(sentences), TEXT_BATCH)
    out = [F.normalize(clip.encode_text(sentences[i:i + TEXT_BATCH]), dim=-1)
           for i in tqdm(chunks, desc=desc, leave=False, disable=True if len(chunks) < 4 else None)]
    return torch.cat(out)


def text_matrix(clip, classnames: list[str], sentences: list[list[str]], renorm_bg: bool = False) -> torch.Tensor:
    """Compute ``T`` (D × (C+1)) with the frozen text encoder."""
    flat = [s for group in sentences for s in group]
    feats = _encode(clip, flat, "text: classes")
    columns, start = [], 0
    for group in sentences:
        columns.append(F.normalize(feats[start:start + len(group)].mean(0), dim=-1))
        start += len(group)
    bg = _encode(clip, [BACKGROUND_TEMPLATE.format(readable(c)) for c in classnames], "text: background").mean(0)
    if renorm_bg:
        bg = F.normalize(bg, dim=-1)
    return torch.stack(columns + [bg], dim=1)


def cached_text_matrix(clip, classnames: list[str], sentences: list[list[str]], cache_dir: str | Path,
                       dataset: str, renorm_bg: bool = False) -> torch.Tensor:
    """``text_matrix`` cached on disk under a key of (weights, class names, sentences, options)."""
    key = sha256_text("text-matrix-v1", clip.backbone, clip.fingerprint(), classnames, sentences,
                      BACKGROUND_TEMPLATE, renorm_bg)
    path = Path(cache_dir) / "text" / f"{dataset}_{clip.backbone}_{key[:20]}.pt"
    if path.is_file():
        try:
            cached = torch_load(path, "text cache")
        except RaftError as exc:  # a damaged cache is rebuilt, never trusted
            cached = None
            log.info(f"{exc}: rebuilding")
        if isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("T"), torch.Tensor):
            log.info(f"text classifier: cached {path}")
            return cached["T"]
        log.info(f"text cache {path} does not match its inputs: rebuilding")
    T = text_matrix(clip, classnames, sentences, renorm_bg).cpu()
    torch_save(path, {"key": key, "T": T})
    log.info(f"text classifier: {T.shape[0]}×{T.shape[1]} written to {path}")
    return T
