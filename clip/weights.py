"""Where a backbone's weights come from (doc/weights.md): open_clip's model names, its
pretrained tags, Hugging Face hub repositories in open_clip's format, local files, or random.

``--weights`` takes

- ``null``: random weights, seeded (``TINY_INIT_SEED``): the tests, the demo, the benchmarks;
- a pretrained tag of the model (``openai``, ``laion2b_s34b_b79k``, ``webli``, …: open_clip's
  ``list_pretrained_tags_by_model``), found in the local caches or downloaded by open_clip;
- ``hf-hub:<org>/<repo>``: a repository holding ``open_clip_config.json`` and the weights;
- a local file: an open_clip state dict (torch or safetensors) or OpenAI's TorchScript archive.

What open_clip records for the weights decides what the loaded model computes besides its
tensors: QuickGELU (``recorded_quick_gelu``) and the image preprocessing (``preprocess_cfg``,
read by ``clip.backbone.FrozenCLIP``). Offline, cached weights are found without the network;
missing ones fail in seconds with one line.
"""
from __future__ import annotations

import difflib
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
from open_clip.model import set_model_preprocess_cfg
from open_clip.transform import PreprocessCfg
from torch import nn

import clip.timm_configs  # noqa: F401  (registers the tiny timm towers the shipped configs name)
from clip.torchscript import is_torchscript_archive, read_torchscript_weights
from utils import RaftError, first_line, printable, torch_load, unreachable

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # registers tiny-rn, tiny-vit, tiny-siglip (and any config dropped there)

TINY_INIT_SEED = 0  # random backbones are always built from this seed: they stand in for fixed weights
HUB_PREFIX = "hf-hub:"
HUB_TIMEOUT = 5.0  # seconds to wait for the Hugging Face hub before calling it unreachable
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # what open_clip downloads
HUB_CONFIG = "open_clip_config.json"
# Entries of TorchScript archives that are metadata or derived buffers, not weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# The first state-dict key of each image-tower kind, for "these are another family's weights".
TOWER_KEYS = {"visual.attnpool.": "a ResNet", "visual.transformer.resblocks.": "a ViT",
              "visual.trunk.attn_pool.": "a SigLIP-style ViT (attention-pool head)"}

log = logging.getLogger("raft")


@contextmanager
def quiet_libraries():
    """open_clip logs through the root logger and huggingface_hub through its own: their info
    and warning lines (random init, download retries) are noise around our one-line errors."""
    loggers = [logging.getLogger(), logging.getLogger("huggingface_hub")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------- names and tags
def check_model_name(backbone: str) -> None:
    """Any model open_clip can build (its configs and this project's tiny ones); else one
    line with the closest names. Whether RAFT applies to its image tower is decided from the
    built model (``clip.backbone.family_of``)."""
    names = open_clip.list_models()
    if backbone not in names:
        close = difflib.get_close_matches(backbone, names, n=3, cutoff=0.5) or \
            difflib.get_close_matches(backbone, names, n=3, cutoff=0.0)
        raise RaftError(f"unknown backbone '{printable(backbone)}' (did you mean {', '.join(close)}?); any open_clip "
                        f"model name with a ResNet, ViT or SigLIP image tower works (doc/weights.md)")


@dataclass(frozen=True)
class Weights:
    """What ``--weights`` names: kind 'random', 'tag', 'hub' or 'file', and the tag, repository or path."""
    kind: str
    value: str | None = None


def parse_weights(backbone: str, weights: str | None) -> Weights:
    """``weights`` read against ``backbone``'s pretrained tags; a tag that is not one of them is
    one line naming the tags that are (and the models it belongs to, if any)."""
    if weights is None:
        return Weights("random")
    if weights.startswith(HUB_PREFIX):
        repo = weights[len(HUB_PREFIX):].strip("/")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise RaftError(f"'{printable(weights)}' is not a hub repository: write hf-hub:<org>/<repo>")
        return Weights("hub", repo)
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if weights.lower() in tags:
        return Weights("tag", weights.lower())
    path = Path(weights).expanduser()
    if path.is_file() or os.sep in weights or "/" in weights or path.suffix in (".pt", ".pth", ".bin", ".safetensors"):
        if not path.is_file():
            raise RaftError(f"weights file not found: {printable(path)} (use a pretrained tag, hf-hub:<org>/<repo>, "
                            f"a checkpoint path, or null)")
        return Weights("file", str(path))
    owners = sorted({name for name, tag in open_clip.list_pretrained() if tag == weights.lower()})
    elsewhere = f" (it is a tag of {', '.join(owners[:4])}{', …' if len(owners) > 4 else ''})" if owners else ""
    known = f"its tags: {', '.join(tags)}" if tags else "it has no pretrained tags in open_clip (use a file or null)"
    raise RaftError(f"'{printable(weights)}' is not a pretrained tag of {backbone}{elsewhere}; {known}")


def weights_identity(backbone: str, weights: str | None) -> str:
    """A tag or hub repository by its name, a file or random weights by their kind (their
    tensors are hashed beside it): two tags of one architecture never share a cache."""
    if weights is None:
        return "random"
    if weights.startswith(HUB_PREFIX) or weights.lower() in open_clip.list_pretrained_tags_by_model(backbone):
        return weights.lower()
    return "file"


def recorded_quick_gelu(backbone: str, weights: str | None) -> bool:
    """QuickGELU as open_clip records it: the model's own config (``*-quickgelu``, the tiny
    models), else the tag's record, else the hub config's; for a file or random weights, what
    every tag of the model records when they agree, True when they disagree (OpenAI's files,
    and what this project always used before tags were accepted), False without tags (the
    model's own config)."""
    if (open_clip.get_model_config(backbone) or {}).get("quick_gelu"):
        return True
    tags = open_clip.list_pretrained_tags_by_model(backbone)
    if weights is not None and weights.lower() in tags:
        return bool(open_clip.get_pretrained_cfg(backbone, weights.lower()).get("quick_gelu", False))
    if weights is not None and weights.startswith(HUB_PREFIX):
        return False   # open_clip applies the hub config's own setting when it builds the model
    records = {bool(open_clip.get_pretrained_cfg(backbone, tag).get("quick_gelu", False))
               for tag in tags}
    return records.pop() if len(records) == 1 else bool(records)


PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode")


def tag_preprocess(backbone: str, tag: str | None = None) -> dict:
    """The image preprocessing open_clip records for ``tag``; without a tag (a file, random
    weights) the one every tag of the model records, if they agree; else nothing (open_clip's
    defaults: OpenAI's statistics, bicubic, shortest side)."""
    tags = [tag] if tag else open_clip.list_pretrained_tags_by_model(backbone)
    records = {tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in
                     open_clip.get_pretrained_cfg(backbone, t).items() if k in PREPROCESS_KEYS) for t in tags}
    return dict(records.pop()) if len(records) == 1 else {}


def set_preprocess(model: nn.Module, recorded: dict) -> nn.Module:
    """open_clip's preprocessing record on ``model``, as ``create_model`` leaves it for a tag."""
    cfg = {**PreprocessCfg().__dict__, "size": model.visual.image_size, **recorded}
    set_model_preprocess_cfg(model, cfg)
    return model


# --------------------------------------------------------------------------- finding cached files
def cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))


def cached_from_hub(repo: str, filenames: tuple[str, ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    for filename in filenames:
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def cached_tag_file(backbone: str, tag: str) -> Path | None:
    """A local copy of a tag's weights: the ``clip`` package's or open_clip's URL download
    (``~/.cache/clip/RN50.pt``), or open_clip's file in the Hugging Face cache."""
    cfg = open_clip.get_pretrained_cfg(backbone, tag)
    url = cfg.get("url", "")
    if url:
        cache = cache_home() / "clip" / url.rsplit("/", 1)[-1]
        if cache.is_file():
            return cache
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub)   # 'org/repo/' (open_clip's default files) or 'org/repo/file'
        return cached_from_hub(repo, (filename,) if filename else HUB_FILES)
    return None


def openai_weights_file(backbone: str) -> Path | None:
    """A local copy of OpenAI's weights for ``backbone``, if one is cached."""
    return cached_tag_file(backbone, "openai")


def check_hub_reachable(what: str) -> None:
    """Fail in seconds, with one line, when weights are not cached and the hub cannot be
    reached (the download library retries each candidate file for about a minute)."""
    from huggingface_hub import constants
    endpoint = constants.ENDPOINT
    advice = "offline, set `weights` to a local checkpoint (doc/weights.md)"
    if constants.HF_HUB_OFFLINE:
        raise RaftError(f"{what} are not in the local cache and HF_HUB_OFFLINE is set; {advice}")
    reason = unreachable(endpoint, HUB_TIMEOUT)
    if reason is not None:
        raise RaftError(f"cannot download {what}: the Hugging Face hub ({endpoint}) cannot be reached ({reason}); "
                        f"{advice}")


# --------------------------------------------------------------------------- loading
def _create(name: str, quick_gelu: bool, pretrained: str | None = None, **kwargs) -> nn.Module:
    try:
        with quiet_libraries():
            return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                          device="cpu", precision="fp32", **kwargs)
    except RaftError:
        raise
    except Exception as exc:  # missing file, incompatible checkpoint, a download that broke off
        raise RaftError(f"cannot load CLIP {name} with weights '{pretrained}': {first_line(exc)}") from None


def weights_label(backbone: str, weights: str | None) -> str:
    source = parse_weights(backbone, weights)
    return {"random": "random weights", "tag": f"{backbone}'s {source.value} weights",
            "hub": f"the weights of hf-hub:{source.value}", "file": f"weights {source.value}"}[source.kind]


def hub_snapshot(repo: str) -> Path | None:
    """The cached snapshot of an open_clip hub repository holding both its config and weights."""
    config = cached_from_hub(repo, (HUB_CONFIG,))
    weights = cached_from_hub(repo, HUB_FILES) if config is not None else None
    return config.parent if weights is not None and weights.parent == config.parent else None


def check_weights_available(backbone: str, weights: str | None) -> None:
    """Before a run writes anything: its weights are on disk, or the hub answers (seconds)."""
    source = parse_weights(backbone, weights)
    if source.kind == "tag" and cached_tag_file(backbone, source.value) is None:
        what = "OpenAI's" if source.value == "openai" else f"the {source.value}"
        check_hub_reachable(f"{what} {backbone} weights")
    if source.kind == "hub" and hub_snapshot(source.value) is None:
        check_hub_reachable(f"the weights of hf-hub:{source.value}")


def load_open_clip(backbone: str, weights: str | None, quick_gelu: bool | None = None) -> nn.Module:
    """Build an open_clip CLIP from ``weights`` (see the module's docstring); ``quick_gelu``
    None: as open_clip records it (``recorded_quick_gelu``)."""
    check_model_name(backbone)
    source = parse_weights(backbone, weights)
    quick_gelu = recorded_quick_gelu(backbone, weights) if quick_gelu is None else quick_gelu
    if source.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            return set_preprocess(_create(backbone, quick_gelu), tag_preprocess(backbone))
    if source.kind == "file":
        return set_preprocess(load_local(backbone, Path(source.value), quick_gelu), tag_preprocess(backbone))
    if source.kind == "hub":
        return load_hub(backbone, source.value, quick_gelu)
    cached = cached_tag_file(backbone, source.value)
    if cached is not None:
        return set_preprocess(load_local(backbone, cached, quick_gelu), tag_preprocess(backbone, source.value))
    what = "OpenAI's" if source.value == "openai" else f"the {source.value}"
    check_hub_reachable(f"{what} {backbone} weights")
    return _create(backbone, quick_gelu, source.value)


def load_hub(backbone: str, repo: str, quick_gelu: bool) -> nn.Module:
    """An open_clip repository on the Hugging Face hub: its own config and weights (from the
    cache when both are there), checked to be ``backbone``'s architecture."""
    snapshot = hub_snapshot(repo)
    if snapshot is not None:
        model = _create(f"local-dir:{snapshot}", quick_gelu)   # the cached snapshot, no network
    else:
        check_hub_reachable(f"the weights of hf-hub:{repo}")
        model = _create(f"{HUB_PREFIX}{repo}", quick_gelu)
    with torch.device("meta"), quiet_libraries():
        expected = open_clip.create_model(backbone, device="meta")
    check_state_fits(expected, model.state_dict(), f"hf-hub:{repo}", backbone)
    return model


def load_local(backbone: str, path: Path, quick_gelu: bool) -> nn.Module:
    """A local checkpoint: OpenAI's TorchScript archive, or an open_clip state dict."""
    if is_torchscript_archive(path):
        # OpenAI's own download (~/.cache/clip/RN50.pt) is a TorchScript archive: its tensors
        # are read as data (clip/torchscript.py), none of its code runs
        state = {k: v for k, v in read_torchscript_weights(path).items() if k not in _NON_WEIGHT_KEYS}
    else:
        state = read_state_dict(path)
    model = _create(backbone, quick_gelu)
    check_state_fits(model, state, path, backbone)
    model.load_state_dict(state, strict=True)
    return model


def check_state_fits(model: nn.Module, state: dict, source, backbone: str) -> None:
    """``state`` holds exactly ``model``'s tensors, or one line: another family's tower named
    as such, else the first mismatch."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {shape}" for k, shape in expected.items()
             if k in state and tuple(state[k].shape) != shape]
    if missing or unexpected or wrong:
        theirs = next((name for key, name in TOWER_KEYS.items() if any(k.startswith(key) for k in state)), None)
        ours = next((name for key, name in TOWER_KEYS.items() if any(k.startswith(key) for k in expected)), None)
        if theirs is not None and theirs != ours:
            raise RaftError(f"{printable(source)} holds the image tower of {theirs}, but {backbone} is "
                            f"{ours or 'another kind of tower'}: pick the backbone the weights are for")
        detail = (f"{len(wrong)} shape mismatches (first: {wrong[0]})" if wrong
                  else f"{len(missing)} missing / {len(unexpected)} unexpected tensors "
                       f"(first: {(missing or unexpected)[0]})")
        raise RaftError(f"{printable(source)} does not hold {backbone} weights: {detail}")


def read_state_dict(path: Path) -> dict:
    """An open_clip checkpoint as a state dict: safetensors, or a torch file read with
    ``weights_only=True`` (optionally wrapped in {'state_dict': ...} with 'module.' prefixes,
    as open_clip's training script saves it)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as exc:
            raise RaftError(f"cannot read weights {path}: {first_line(exc)}") from None
    state = torch_load(path, "weights file")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RaftError(f"{path} is not a state dict of CLIP weights")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- the text side's tokenizer
def tokenizer_packages(backbone: str) -> list[str]:
    """The optional packages the model's tokenizer needs that are not installed: Hugging Face's
    tokenizers (SigLIP, SigLIP2: ``transformers``, and ``sentencepiece`` for their vocabularies).
    open_clip's own tokenizer needs none; this project's tiny configs use it whatever their names."""
    hub = ((open_clip.get_model_config(backbone) or {}).get("text_cfg") or {}).get("hf_tokenizer_name")
    if not hub or (MODEL_CONFIG_DIR / f"{backbone}.json").is_file():
        return []
    import importlib.util
    return [name for name in ("transformers", "sentencepiece") if importlib.util.find_spec(name) is None]


def tokenizer_for(backbone: str, weights: str | None = None):
    """open_clip's tokenizer for the model (SigLIP's come from Hugging Face and need the
    ``transformers`` package and its files). This project's tiny configs are random models
    with open_clip's own simple tokenizer, whatever their names say (open_clip picks SigLIP's
    tokenizer by the name's 'siglip')."""
    source = parse_weights(backbone, weights)
    snapshot = hub_snapshot(source.value) if source.kind == "hub" else None
    name = (f"local-dir:{snapshot}" if snapshot else f"{HUB_PREFIX}{source.value}") if source.kind == "hub" else backbone
    try:
        with quiet_libraries():
            if (MODEL_CONFIG_DIR / f"{backbone}.json").is_file():
                context = open_clip.get_model_config(backbone)["text_cfg"].get("context_length", 77)
                return open_clip.SimpleTokenizer(context_length=context)
            return open_clip.get_tokenizer(name)
    except ImportError as exc:
        raise RaftError(f"{backbone}'s tokenizer needs a package that is not installed ({first_line(exc)}): "
                        f"pip install transformers sentencepiece (doc/weights.md)") from None
    except Exception as exc:  # tokenizer files not cached offline, a broken download
        raise RaftError(f"cannot load {backbone}'s tokenizer: {first_line(exc)} (doc/weights.md)") from None
