"""Tiny timm image towers for the tests and the demo, registered with timm so that open_clip
builds them from the shipped configs (clip/model_configs/tiny-siglip.json) exactly as it builds
SigLIP: a timm ViT without a class token whose tokens are pooled by an attention-pool (MAP)
head. open_clip passes no sizes to timm, so a small tower needs a name of its own."""
from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

# SigLIP's tower (timm's vit_*_siglip_*) at a test's size: 96 px, 16 px patches (6×6), 3 blocks
TINY_SIGLIP = dict(img_size=96, patch_size=16, embed_dim=64, depth=3, num_heads=4, class_token=False,
                   global_pool="map")


@register_model
def raft_tiny_siglip(pretrained: bool = False, **kwargs) -> VisionTransformer:
    if pretrained:
        raise ValueError("raft_tiny_siglip has no pretrained weights")
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")}
    return VisionTransformer(**{**TINY_SIGLIP, **kwargs})
