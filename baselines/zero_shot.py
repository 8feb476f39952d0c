"""Zero-shot CLIP: ``100 · v0 · T[:, :C]`` (doc/baselines.md) — nothing to fit or choose."""
from __future__ import annotations

import torch

from .base import Baseline, BaselineData


class ZeroShot(Baseline):
    name = "zero_shot"
    label = "zero-shot CLIP"

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        return data.zero_shot_logits(features)
