"""The frozen CLIP model, loaded through open_clip: its ResNets and its ViTs.

``FrozenCLIP.encode_image`` is the one place where the frozen image trunk runs: a single
forward yields both what the region pool reads (a ResNet's feature map before attention
pooling, or a ViT's token sequence entering the last block) and CLIP's own image feature
``v0``. Everything in here is frozen and stays in eval mode. What differs between the two
families is a row of ``FAMILIES``.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import os
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import open_clip
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from clip.region_pool import RegionAttentionPool, clip_pool_attention, clip_pool_forward
from clip.torchscript import is_torchscript_archive, read_torchscript_weights
from clip.vit_pool import ViTRegionPool, batch_first, clip_vit_attention, clip_vit_forward
from utils import RaftError, torch_load

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)  # registers tiny-rn, tiny-vit (and any config dropped there)

# CLIP's ResNets (RAFT fine-tunes their attention pool) and ViTs (the last block's attention,
# doc/method.md §10), by open_clip's names, plus the tiny random models of the tests and demo.
RESNETS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "tiny-rn")
VITS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "tiny-vit")
SUPPORTED_BACKBONES = RESNETS + VITS
TINY_INIT_SEED = 0  # random backbones are always built from this seed: they stand in for fixed weights

# Entries of TorchScript archives that are metadata or derived buffers, not weights.
_NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

log = logging.getLogger("raft")


def _check_state_fits(model: nn.Module, state: dict, path: Path, backbone: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        families = {"a ResNet's": "visual.attnpool.", "a ViT's": "visual.transformer.resblocks."}
        theirs = next((name for name, key in families.items() if any(k.startswith(key) for k in state)), None)
        ours = next((name for name, key in families.items() if any(k.startswith(key) for k in expected)), None)
        if theirs is not None and theirs != ours:
            raise RaftError(f"{path} holds {theirs} image tower, but {backbone} is {ours[:-2]}: "
                            f"pick the backbone the weights are for")
        detail = (f"{len(wrong)} shape mismatches (first: {wrong[0]})" if wrong
                  else f"{len(missing)} missing / {len(unexpected)} unexpected tensors "
                       f"(first: {(missing or unexpected)[0]})")
        raise RaftError(f"{path} does not hold {backbone} weights: {detail}")


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


def first_line(exc: BaseException, limit: int = 240) -> str:
    """The first line of an exception's message, shortened at a word boundary."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    return text


def _create(name: str, quick_gelu: bool, pretrained: str | None = None) -> nn.Module:
    try:
        with quiet_libraries():
            return open_clip.create_model(name, pretrained=pretrained, force_quick_gelu=quick_gelu,
                                          device="cpu", precision="fp32")
    except RaftError:
        raise
    except Exception as exc:  # missing file, incompatible checkpoint, a download that broke off
        raise RaftError(f"cannot load CLIP {name} with weights '{pretrained}': {first_line(exc)}") from None


HUB_TIMEOUT = 5.0  # seconds to wait for the Hugging Face hub before calling it unreachable
HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # what open_clip downloads


def openai_weights_file(backbone: str) -> Path | None:
    """A local copy of OpenAI's weights for ``backbone``, if one is cached: the ``clip``
    package's download (``~/.cache/clip/RN50.pt``), or open_clip's in the Hugging Face cache."""
    cfg = open_clip.get_pretrained_cfg(backbone, "openai")
    url = cfg.get("url", "")
    if url:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip" / url.rsplit("/", 1)[-1]
        if cache.is_file():
            return cache
    repo = cfg.get("hf_hub", "").rstrip("/")
    if repo:
        from huggingface_hub import try_to_load_from_cache
        for filename in HUB_FILES:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    return None


def check_hub_reachable(backbone: str) -> None:
    """Fail in seconds, with one line, when OpenAI's weights are not cached and the hub cannot
    be reached (the download library retries each candidate file for about a minute)."""
    from huggingface_hub import constants
    endpoint = constants.ENDPOINT
    advice = "offline, set `weights` to a local checkpoint (doc/weights.md)"
    if constants.HF_HUB_OFFLINE:
        raise RaftError(f"OpenAI's {backbone} weights are not in the local cache and HF_HUB_OFFLINE is set; {advice}")
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_TIMEOUT).close()
    except urllib.error.HTTPError:
        return  # the server answered: reachable
    except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, a bad endpoint
        reason = getattr(exc, "reason", exc)
        raise RaftError(f"cannot download OpenAI's {backbone} weights: the Hugging Face hub ({endpoint}) cannot be "
                        f"reached ({first_line(reason) if isinstance(reason, BaseException) else reason}); "
                        f"{advice}") from None


def load_open_clip(backbone: str, weights: str | None, quick_gelu: bool = True) -> nn.Module:
    """Build an open_clip CLIP ResNet.

    ``weights``: 'openai' (open_clip's download/cache of OpenAI's weights), a local file
    (open_clip/safetensors state dict, or OpenAI's original TorchScript ``RN50.pt``), or
    ``None`` for random weights seeded with ``TINY_INIT_SEED``.
    """
    if backbone not in SUPPORTED_BACKBONES:
        raise RaftError(f"unknown backbone '{backbone}'; supported: {', '.join(SUPPORTED_BACKBONES)}")
    if weights is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            return _create(backbone, quick_gelu)
    if weights == "openai":
        if not open_clip.get_pretrained_cfg(backbone, "openai"):
            raise RaftError(f"{backbone} has no pretrained weights: set `weights: null`")
        cached = openai_weights_file(backbone)
        if cached is not None:
            return load_local(backbone, cached, quick_gelu)
        check_hub_reachable(backbone)
        return _create(backbone, quick_gelu, "openai")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise RaftError(f"weights file not found: {path} (use 'openai', a checkpoint path, or null)")
    return load_local(backbone, path, quick_gelu)


def load_local(backbone: str, path: Path, quick_gelu: bool) -> nn.Module:
    """A local checkpoint: OpenAI's TorchScript archive, or an open_clip state dict."""
    if is_torchscript_archive(path):
        # OpenAI's own download (~/.cache/clip/RN50.pt) is a TorchScript archive: its tensors
        # are read as data (clip/torchscript.py), none of its code runs
        state = {k: v for k, v in read_torchscript_weights(path).items() if k not in _NON_WEIGHT_KEYS}
    else:
        state = read_state_dict(path)
    model = _create(backbone, quick_gelu)
    _check_state_fits(model, state, path, backbone)
    model.load_state_dict(state, strict=True)
    return model


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


# --------------------------------------------------------------------------- the two families
class ResNetTrunk(nn.Module):
    """The frozen ResNet trunk (stem + 4 residual stages) with every BatchNorm folded into the
    convolution before it, in channels-last layout. Same function (to float rounding),
    ~20% less work; channels-last convolutions are 1.3-1.6x faster on CPU (oneDNN) and use
    tensor cores on CUDA. The original modules are left untouched (state dict, calibration)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.fused = inference_trunk(visual)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fused(images.contiguous(memory_format=torch.channels_last))


class ViTTrunk(nn.Module):
    """The frozen ViT trunk: patch embedding, class token, positional embedding, ``ln_pre`` and
    every block but the last -> the tokens entering the last block, ``B×(1+N)×W``. Uses the
    model's own modules (nothing is copied)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.blocks = nn.ModuleList(visual.transformer.resblocks[:-1])
        self.batch_first = batch_first(visual.transformer.resblocks[-1].attn)
        self.__dict__["visual"] = visual  # not registered again: it is the model's

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        v = self.visual
        x = v.conv1(images).flatten(2).transpose(1, 2)                          # B, N, W
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.ln_pre(v.patch_dropout(x))
        x = x if self.batch_first else x.transpose(0, 1)
        for block in self.blocks:
            x = block(x)
        return x if self.batch_first else x.transpose(0, 1)


def resnet_sizes(visual: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    pool = visual.attnpool
    grid = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))                   # H = W
    channels = pool.k_proj.in_features                                                      # E
    return channels, pool.c_proj.out_features, grid, (channels, grid, grid)


def vit_sizes(visual: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    width = visual.conv1.out_channels                                                       # W
    grid = int(visual.grid_size[0])
    return width, visual.proj.shape[1], grid, (grid * grid + 1, width)


@dataclass(frozen=True)
class Family:
    """What a backbone family computes, each part read off the loaded model."""
    trunk: type              # visual -> module: images -> what the region pool reads
    pooled: Callable         # (visual, features) -> CLIP's own image feature v0
    clip_attention: Callable  # (visual, features) -> (out, weights B×heads×1×(1+HW)) of CLIP's class query
    region_pool: Callable    # (visual, mask_bg_in_cls) -> the trainable region pool
    sizes: Callable          # visual -> (feature channels, embedding D, grid side, per-image feature shape)
    what: str                # what the cached features are, for logs and docs


FAMILIES = {
    "resnet": Family(ResNetTrunk, lambda v, f: clip_pool_forward(v.attnpool, f),
                     lambda v, f: clip_pool_attention(v.attnpool, f),
                     lambda v, mask: RegionAttentionPool(v.attnpool, mask), resnet_sizes, "feature map"),
    "vit": Family(ViTTrunk, clip_vit_forward, clip_vit_attention, ViTRegionPool, vit_sizes,
                  "tokens entering the last block"),
}


def family_of(visual: nn.Module, backbone: str) -> str:
    """'resnet' or 'vit', after checking that RAFT's pool applies to this model."""
    if hasattr(visual, "attnpool"):
        return "resnet"
    if not (hasattr(visual, "transformer") and hasattr(visual, "class_embedding")):
        raise RaftError(f"{backbone}'s image tower ({type(visual).__name__}) is neither CLIP's ResNet nor its ViT")
    if getattr(visual, "attn_pool", None) is not None:
        raise RaftError(f"{backbone} pools its tokens with an attentional pooler; RAFT on a ViT needs CLIP's "
                        f"class-token pooling")
    pool_type = getattr(visual, "pool_type", "tok")
    if pool_type != "tok":
        raise RaftError(f"{backbone} pools its tokens by '{pool_type}'; RAFT on a ViT needs the class token "
                        f"(pool_type 'tok')")
    grid = tuple(visual.grid_size)
    if grid[0] != grid[1]:
        raise RaftError(f"{backbone}'s patch grid is {grid[0]}×{grid[1]}; RAFT on a ViT needs a square grid")
    attn = getattr(visual.transformer.resblocks[-1], "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.in_proj_bias is None:
        raise RaftError(f"{backbone}'s last block does not use CLIP's standard attention (one packed q/k/v "
                        f"projection with biases); RAFT on a ViT is defined for that block")
    if getattr(visual, "proj", None) is None:
        raise RaftError(f"{backbone} has no image projection (proj): not a CLIP image tower")
    return "vit"


class FrozenCLIP(nn.Module):
    """CLIP with every parameter frozen, in eval mode for good."""

    def __init__(self, model: nn.Module, backbone: str):
        super().__init__()
        self.model = model.eval()
        self.backbone = backbone
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(backbone)
        visual = model.visual
        self.family = family_of(visual, backbone)
        self.spec = FAMILIES[self.family]
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        # E (ResNet) or W (ViT), D, the grid side H = W, and one image's trunk output shape
        self.feature_channels, self.embed_dim, self.grid, self.feature_shape = self.spec.sizes(visual)
        self._fingerprint: str | None = None
        self._fast_trunk: nn.Module | None = None

    def train(self, mode: bool = True):  # frozen means frozen: BatchNorm statistics never move
        return super().train(False)

    @property
    def attnpool(self) -> nn.Module:
        """A ResNet's attention pool (ViTs have none: their last block plays its part)."""
        return self.model.visual.attnpool

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """What the region pool reads: the feature map ``B×E×H×W`` (ResNet) or the tokens
        entering the last block ``B×(1+N)×W`` (ViT)."""
        if self._fast_trunk is None:
            self._fast_trunk = self.spec.trunk(self.model.visual)
        return self._fast_trunk(images)

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One trunk forward -> (trunk output, CLIP's own image feature ``v0`` ``B×D``); ``v0``
        is computed for CLIP's class query only, and equals ``model.encode_image``."""
        features = self.trunk(images)
        return features, self.spec.pooled(self.model.visual, features)

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """``v0`` from trunk outputs (e.g. cached ones)."""
        return self.spec.pooled(self.model.visual, features)

    def clip_attention(self, features: torch.Tensor) -> torch.Tensor:
        """Weights of CLIP's own class query over its tokens: ``B×heads×1×(1+HW)``."""
        return self.spec.clip_attention(self.model.visual, features)[1]

    def region_pool(self, mask_bg_in_cls: bool = False) -> nn.Module:
        """A new trainable region pool initialised from this model (doc/method.md §2, §10)."""
        return self.spec.region_pool(self.model.visual, mask_bg_in_cls)

    def _apply(self, fn, *args, **kwargs):  # .to(device) etc.: rebuild the fused trunk from the moved model
        self._fast_trunk = None
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens).float()

    def fingerprint(self) -> str:
        """SHA-256 of every weight and buffer: names what the frozen model computes (cache keys)."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.backbone.encode())
            for name, tensor in sorted(self.model.state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def inference_trunk(visual: nn.Module) -> nn.Module:
    """The ResNet trunk's modules with BatchNorm folded, channels-last (see ``ResNetTrunk``)."""
    trunk = copy.deepcopy(nn.Sequential(visual.conv1, visual.bn1, visual.act1, visual.conv2, visual.bn2,
                                        visual.act2, visual.conv3, visual.bn3, visual.act3, visual.avgpool,
                                        visual.layer1, visual.layer2, visual.layer3, visual.layer4))

    def fold(module: nn.Module) -> None:
        names = list(module._modules)
        for prev, name in zip(names, names[1:]):
            conv, norm = module._modules[prev], module._modules[name]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                module._modules[prev] = fuse_conv_bn_eval(conv, norm)
                module._modules[name] = nn.Identity()
        for child in module.children():
            fold(child)

    fold(trunk)
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.eval().to(memory_format=torch.channels_last)


@torch.no_grad()
def calibrate_batchnorm(clip: FrozenCLIP, batches) -> int:
    """Re-estimate the trunk's BatchNorm running statistics from images (cumulative average).

    A randomly initialised ResNet in eval mode uses the default statistics (mean 0, var 1)
    and maps every image to nearly the same vector; with statistics measured on real
    images its random features differ between images. Only for random backbones.
    """
    norms = [m for m in clip.model.visual.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:  # a ViT: LayerNorm normalises each token itself, there are no statistics to measure
        return 0
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
        nn.Module.train(m, True)
    v = clip.model.visual
    seen = 0
    try:
        for images in batches:  # through the original modules: the fused trunk has no BatchNorm
            v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
            seen += images.shape[0]
    finally:
        for m in norms:
            nn.Module.train(m, False)
    clip._fingerprint = None
    clip._fast_trunk = None
    return seen


def batchnorm_statistics(clip: FrozenCLIP) -> dict[str, torch.Tensor]:
    """The trunk's BatchNorm running statistics (what ``calibrate_batchnorm`` measures)."""
    return {k: v for k, v in clip.model.visual.state_dict().items() if "running_" in k or "num_batches_tracked" in k}


def restore_batchnorm(clip: FrozenCLIP, statistics: dict[str, torch.Tensor]) -> None:
    """Put back statistics saved from ``batchnorm_statistics`` (a calibrated random trunk)."""
    clip.model.visual.load_state_dict(statistics, strict=False)
    clip._fingerprint = None
    clip._fast_trunk = None
