"""The text classifier (doc/method.md §3): one column per class plus a background column.

    t_c  = normalise(mean_s normalise(enc(sentence_s of class c)))
    t_bg = mean_c normalise(enc("the background of {c}."))       (not re-normalised by default)
    T    = [t_1 … t_C, t_bg]                                     D × (C+1)

``T`` depends on the frozen text encoder and on the exact sentences, so its cache file is
keyed by the model's weight fingerprint and a hash of every sentence.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import RaftError, printable, read_json, sha256_text, torch_load, torch_save

BACKGROUND_TEMPLATE = "the background of {}."
TEXT_BATCH = 256

log = logging.getLogger("raft")


def readable(classname: str) -> str:
    """Split files may spell class names with underscores (UCF101: Apply_Eye_Makeup)."""
    return classname.replace("_", " ")


def load_descriptions(path: str | Path) -> dict[str, list[str]]:
    """Read a CaFo-format description file: ``{classname: [sentence, ...]}`` (a regular file of
    bounded size, UTF-8 JSON: ``utils.read_json``)."""
    data = read_json(path, "description file")
    if not isinstance(data, dict):
        raise RaftError(f"description file {printable(path)} must be a JSON object {{classname: [sentences]}}")
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


def token_count(tokenizer, text: str) -> int | None:
    """The tokens of ``text`` with its start and end tokens, before any truncation to the
    context window (None where the tokenizer does not say: then nothing is counted)."""
    if hasattr(tokenizer, "encode"):              # open_clip's SimpleTokenizer: BPE ids without sot/eot
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer: the Hugging Face one inside
    if inner is not None and callable(inner):
        return len(inner(text)["input_ids"])
    return None


def sentence_report(clip, classnames: list[str], sentences: list[list[str]]) -> dict:
    """What the text encoder's window does to the class sentences, checked before they are
    encoded: how many are cut at the context length (per class, in total); a class whose every
    sentence loses its name to the cut, and classes whose sentences tokenize the same (names
    that differ by case, spaces or underscores, or descriptions cut before they differ) are one
    line naming them -- their text columns would be identical and the second never predicted."""
    tokenizer = clip.tokenizer
    window = getattr(tokenizer, "context_length", None) or 77
    cut: dict[str, int] = {}
    lost = []
    for name, group in zip(classnames, sentences):
        counts = [token_count(tokenizer, s) for s in group]
        over = [s for s, n in zip(group, counts) if n is not None and n > window]
        if over:
            cut[name] = len(over)
            shown = readable(name).lower()
            if len(over) == len(group) and all(name_cut(tokenizer, s, shown, window) for s in over):
                lost.append(name)
    if lost:
        raise RaftError(f"every sentence of {len(lost)} class(es) is cut at the text encoder's {window} tokens before "
                        f"it names the class ({', '.join(map(repr, lost[:5]))}{' …' if len(lost) > 5 else ''}): "
                        f"their text columns would not know their class; shorten the descriptions")
    rows = tokenizer([s for group in sentences for s in group])
    by_tokens: dict[tuple, list[str]] = {}
    start = 0
    for name, group in zip(classnames, sentences):
        key = tuple(sorted(tuple(r) for r in rows[start:start + len(group)].tolist()))
        by_tokens.setdefault(key, []).append(name)
        start += len(group)
    same = [names for names in by_tokens.values() if len(names) > 1]
    if same:
        shown = "; ".join(" = ".join(repr(n) for n in names) for names in same[:4])
        why = " (their sentences are cut at the window before they differ)" if cut else ""
        raise RaftError(f"{sum(len(n) for n in same)} classes have sentences that tokenize the same{why}: {shown}"
                        f"{' …' if len(same) > 4 else ''}; the classifier could never tell them apart: rename or "
                        f"merge them")
    return {"context_length": window, "cut_sentences": sum(cut.values()), "cut_by_class": cut}


def name_cut(tokenizer, sentence: str, name: str, window: int) -> bool:
    """Whether the first mention of ``name`` in ``sentence`` lies past the window (False when the
    sentence does not mention it: nothing to lose)."""
    found = re.search(re.escape(name), sentence.lower())
    if found is None:
        return False
    through = token_count(tokenizer, sentence[:found.end()])
    return through is not None and through > window


def cached_text_matrix(clip, classnames: list[str], sentences: list[list[str]], cache_dir: str | Path,
                       dataset: str, renorm_bg: bool = False) -> torch.Tensor:
    """``text_matrix`` cached on disk under a key of (weights, class names, sentences, options)."""
    return text_classifier(clip, classnames, sentences, cache_dir, dataset, renorm_bg)[0]


def text_classifier(clip, classnames: list[str], sentences: list[list[str]], cache_dir: str | Path,
                    dataset: str, renorm_bg: bool = False) -> tuple[torch.Tensor, dict]:
    """``text_matrix`` and its ``sentence_report``, cached on disk under a key of (weights, class
    names, sentences, options): computed once, checked once."""
    key = sha256_text("text-matrix-v1", clip.backbone, clip.fingerprint(), classnames, sentences,
                      BACKGROUND_TEMPLATE, renorm_bg)
    path = Path(cache_dir) / "text" / f"{dataset}_{clip.backbone}_{key[:20]}.pt"
    if path.is_file():
        try:
            cached = torch_load(path, "text cache")
        except RaftError as exc:  # a damaged cache is rebuilt, never trusted
            cached = None
            log.info(f"{exc}: rebuilding")
        if (isinstance(cached, dict) and cached.get("key") == key and isinstance(cached.get("T"), torch.Tensor)
                and isinstance(cached.get("report"), dict)):
            log.info(f"text classifier: cached {path}")
            return cached["T"], cached["report"]
        log.info(f"text cache {path} does not match its inputs: rebuilding")
    report = sentence_report(clip, classnames, sentences)
    T = text_matrix(clip, classnames, sentences, renorm_bg).cpu()
    torch_save(path, {"key": key, "T": T, "report": report})
    log.info(f"text classifier: {T.shape[0]}×{T.shape[1]} written to {path}")
    return T, report
