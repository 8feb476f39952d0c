"""The frozen CLIP model, loaded through open_clip: its ResNets, its ViTs, and SigLIP-style
timm ViTs whose tokens are pooled by an attention-pool (MAP) head.

``FrozenCLIP.encode_image`` is the one place where the frozen image trunk runs: a single
forward yields both what the region pool reads (a ResNet's feature map before attention
pooling, a ViT's token sequence entering the last block, or the tokens a MAP head reads) and
CLIP's own image feature ``v0``. Everything in here is frozen and stays in eval mode. What
differs between the families is a row of ``FAMILIES``; which row applies is decided from the
built model's module types (``family_of``), never from a list of names.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
from dataclasses import dataclass
from typing import Callable

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.timm_model import TimmModel
from open_clip.transformer import QuickGELU, VisionTransformer
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from clip.map_pool import (MapRegionPool, check_map_head, clip_map_attention, clip_map_forward, map_embed_dim,
                           map_prefix_keys)
from clip.preprocess import Preprocess
from clip.region_pool import RegionAttentionPool, clip_pool_attention, clip_pool_forward
from clip.vit_pool import (ViTRegionPool, batch_first, clip_vit_attention, clip_vit_before_projection,
                           clip_vit_forward)
# loading lives in clip/weights.py; its names stay importable from here
from clip.weights import (TINY_INIT_SEED, check_model_name, load_open_clip,  # noqa: F401
                          openai_weights_file, quiet_libraries, read_state_dict, tokenizer_for,
                          weights_identity)
from utils import RaftError, first_line


log = logging.getLogger("raft")


# --------------------------------------------------------------------------- the families
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


class MapTrunk(nn.Module):
    """The frozen timm trunk of a SigLIP-style tower: everything before its attention-pool
    head -> the tokens the head reads, ``B×N×W`` (prefix tokens dropped unless the head reads
    them). Uses the model's own modules."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.__dict__["trunk"] = visual.trunk  # not registered again: it is the model's
        self.drop = visual.trunk.num_prefix_tokens - map_prefix_keys(visual.trunk)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(images)[:, self.drop:]


def resnet_sizes(visual: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    pool = visual.attnpool
    grid = int(round((pool.positional_embedding.shape[0] - 1) ** 0.5))                   # H = W
    channels = pool.k_proj.in_features                                                      # E
    return channels, pool.c_proj.out_features, grid, (channels, grid, grid)


def vit_sizes(visual: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    width = visual.conv1.out_channels                                                       # W
    grid = int(visual.grid_size[0])
    return width, visual.proj.shape[1], grid, (grid * grid + 1, width)


def map_sizes(visual: nn.Module) -> tuple[int, int, int, tuple[int, ...]]:
    width = visual.trunk.attn_pool.kv.in_features                                           # W
    grid = int(visual.trunk.patch_embed.grid_size[0])
    return width, map_embed_dim(visual), grid, (map_prefix_keys(visual.trunk) + grid * grid, width)


@dataclass(frozen=True)
class LastLayer:
    """CLIP's last linear map of the image feature (what ProLIP fine-tunes):
    ``v0 = before(visual, features) @ weight(visual) + bias(visual)``."""
    before: Callable          # (visual, trunk output) -> B×W, the features the map reads
    weight: Callable          # visual -> W×D
    bias: Callable | None     # visual -> D (None: the map has no bias)
    what: str                 # the module, in words


NO_LAST_LAYER = ("its attention-pool head ends in a residual MLP after the attention's output projection, so no "
                 "linear map of the final feature exists to fine-tune")


@dataclass(frozen=True)
class Family:
    """What a backbone family computes, each part read off the loaded model."""
    trunk: type              # visual -> module: images -> what the region pool reads
    pooled: Callable         # (visual, features) -> CLIP's own image feature v0
    clip_attention: Callable  # (visual, features) -> (out, weights B×heads×1×keys) of CLIP's own query
    region_pool: Callable    # (visual, mask_bg_in_cls) -> the trainable region pool
    sizes: Callable          # visual -> (feature channels, embedding D, grid side, per-image feature shape)
    summary_keys: Callable   # visual -> keys before the grid in CLIP's own attention (its class token)
    what: str                # what the cached features are, for logs and docs
    label: str               # the family in words
    last_layer: LastLayer | str = NO_LAST_LAYER   # or why the family has none


FAMILIES = {
    "resnet": Family(ResNetTrunk, lambda v, f: clip_pool_forward(v.attnpool, f),
                     lambda v, f: clip_pool_attention(v.attnpool, f),
                     lambda v, mask: RegionAttentionPool(v.attnpool, mask), resnet_sizes, lambda v: 1,
                     "feature map", "ResNet (attention pool)",
                     LastLayer(lambda v, f: clip_pool_attention(v.attnpool, f)[0][:, 0],
                               lambda v: v.attnpool.c_proj.weight.T, lambda v: v.attnpool.c_proj.bias,
                               "the attention pool's output projection c_proj")),
    "vit": Family(ViTTrunk, clip_vit_forward, clip_vit_attention, ViTRegionPool, vit_sizes, lambda v: 1,
                  "tokens entering the last block", "ViT (class token, last block's attention)",
                  LastLayer(clip_vit_before_projection, lambda v: v.proj, None, "proj")),
    "map": Family(MapTrunk, clip_map_forward, clip_map_attention, MapRegionPool, map_sizes,
                  lambda v: map_prefix_keys(v.trunk), "tokens the attention-pool head reads",
                  "SigLIP-style ViT (attention-pool head)"),
}
SUPPORTED = "CLIP's ResNets (attention pool), ViTs with a class token, and SigLIP-style ViTs (attention-pool head)"


def family_of(visual: nn.Module, backbone: str) -> str:
    """'resnet', 'vit' or 'map', from the image tower's module types, after checking that
    RAFT's pool applies to it; else one line saying why not and which towers work."""
    if isinstance(visual, ModifiedResNet):
        return "resnet"
    if isinstance(visual, TimmModel):
        trunk = visual.trunk
        head = getattr(trunk, "attn_pool", None)
        if type(head).__name__ != "AttentionPoolLatent":
            kind = getattr(trunk, "global_pool", None)
            pooled = (f"pools with {type(head).__name__}" if head is not None else
                      f"pools by '{kind}'" if isinstance(kind, str) and kind else "has no attention-pool head")
            raise RaftError(f"{backbone}'s image tower (timm {type(trunk).__name__}) {pooled}, not with an "
                            f"attention pool RAFT can fine-tune; RAFT runs on {SUPPORTED} (doc/weights.md)")
        if not hasattr(trunk, "forward_features") or not hasattr(trunk, "patch_embed"):
            raise RaftError(f"{backbone}'s image tower (timm {type(trunk).__name__}) has an attention-pool head "
                            f"but no patch grid; RAFT runs on {SUPPORTED} (doc/weights.md)")
        check_map_head(head, backbone)
        grid = tuple(trunk.patch_embed.grid_size)
        if grid[0] != grid[1]:
            raise RaftError(f"{backbone}'s patch grid is {grid[0]}×{grid[1]}; RAFT needs a square grid")
        return "map"
    if not isinstance(visual, VisionTransformer):
        raise RaftError(f"{backbone}'s image tower ({type(visual).__name__}) has no attention pool RAFT can "
                        f"fine-tune; RAFT runs on {SUPPORTED} (doc/weights.md)")
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


@functools.lru_cache(maxsize=None)
def backbone_family(backbone: str) -> str:
    """Before anything is written: the name is open_clip's and RAFT applies to its image tower.
    The model is built on the meta device (module types, no memory, a fraction of a second)."""
    check_model_name(backbone)
    try:
        with torch.device("meta"), quiet_libraries():
            model = open_clip.create_model(backbone, device="meta")
    except Exception as exc:   # a tower needing a package that is not installed, say
        raise RaftError(f"cannot build {backbone}: {first_line(exc)}") from None
    return family_of(model.visual, backbone)


class FrozenCLIP(nn.Module):
    """CLIP with every parameter frozen, in eval mode for good."""

    def __init__(self, model: nn.Module, backbone: str, weights: str | None = None):
        super().__init__()
        self.model = model.eval()
        self.backbone, self.weights = backbone, weights
        for p in self.model.parameters():
            p.requires_grad_(False)
        visual = model.visual
        self.family = family_of(visual, backbone)
        self.spec = FAMILIES[self.family]
        # size, mean/std, interpolation, resize mode: what open_clip records for these weights
        self.preprocess = Preprocess.of(getattr(visual, "preprocess_cfg", {}), visual.image_size, backbone)
        self.image_size = self.preprocess.size
        # E (ResNet) or W (ViT), D, the grid side H = W, and one image's trunk output shape
        self.feature_channels, self.embed_dim, self.grid, self.feature_shape = self.spec.sizes(visual)
        self.summary_keys = self.spec.summary_keys(visual)
        self._tokenizer = None
        self._fingerprint: str | None = None
        self._fast_trunk: nn.Module | None = None

    @property
    def tokenizer(self):
        """open_clip's tokenizer for the model, made when the text side first needs it (SigLIP's
        comes from Hugging Face: the image side runs without it)."""
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for(self.backbone, self.weights)
        return self._tokenizer

    @property
    def quick_gelu(self) -> bool:
        """Whether the model computes QuickGELU (read off its modules, not its config)."""
        return any(isinstance(m, QuickGELU) for m in self.model.modules())

    def train(self, mode: bool = True):  # frozen means frozen: BatchNorm statistics never move
        return super().train(False)

    @property
    def attnpool(self) -> nn.Module:
        """A ResNet's attention pool (ViTs have none: their last block plays its part)."""
        return self.model.visual.attnpool

    def trunk(self, images: torch.Tensor) -> torch.Tensor:
        """What the region pool reads: the feature map ``B×E×H×W`` (ResNet), the tokens
        entering the last block ``B×(1+N)×W`` (ViT), or the tokens its head reads ``B×N×W`` (MAP)."""
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

    def last_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight W×D, bias D or None) of CLIP's last linear map of the image feature, copies in
        float32; a family without one is refused with the reason."""
        layer = self.spec.last_layer
        if isinstance(layer, str):
            raise RaftError(f"{self.backbone} has no last projection to fine-tune: {layer}")
        visual = self.model.visual
        bias = None if layer.bias is None else layer.bias(visual).detach().float().clone()
        return layer.weight(visual).detach().float().clone(), bias

    @torch.no_grad()
    def before_projection(self, features: torch.Tensor) -> torch.Tensor:
        """What CLIP's last linear map reads, from trunk outputs (``B×W``): ``v0`` is it times
        ``last_layer``'s weight plus its bias."""
        layer = self.spec.last_layer
        if isinstance(layer, str):
            raise RaftError(f"{self.backbone} has no last projection to fine-tune: {layer}")
        return layer.before(self.model.visual, features)

    def clip_attention(self, features: torch.Tensor) -> torch.Tensor:
        """Weights of CLIP's own query over its keys: ``B×heads×1×(summary_keys + HW)``."""
        return self.spec.clip_attention(self.model.visual, features)[1]

    def region_pool(self, mask_bg_in_cls: bool = False) -> nn.Module:
        """A new trainable region pool initialised from this model (doc/method.md §2, §10, §11)."""
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
        """SHA-256 of every weight and buffer, the activation and the image preprocessing: names
        what the frozen model computes from an image file (cache keys). Two tags of one
        architecture differ in their weights, and often in their statistics or QuickGELU."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.backbone.encode())
            h.update(json.dumps({"quick_gelu": self.quick_gelu, "preprocess": self.preprocess.record(),
                                 "weights": weights_identity(self.backbone, self.weights)}).encode())
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
