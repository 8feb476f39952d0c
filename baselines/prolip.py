"""ProLIP: fine-tuning the image encoder's last projection, held near its initial value
(Fahes et al.; astra-vision/ProLIP, methods/ProLIP.py at b43e795), validation-free as published.

The features are what CLIP's last linear map reads (``FrozenCLIP.before_projection``): for a
ResNet the attention pool's output before ``c_proj`` (``c_proj``'s weight trains, its bias stays
frozen, as published), for a ViT the class token after ``ln_post`` (``proj`` trains). SigLIP-style
heads are refused: their output projection is followed by a residual MLP, so no linear map of
the final feature exists. With ``M₀`` the initial map:

    logits = 100 · normalise(x M + b) · T,    loss = CE + (1/shots) · ‖M − M₀‖²  (a sum)

Adam (lr 1e-5, eps 1e-4), a cosine over 300 full-batch epochs; epoch e reads one augmented
view of every image (RandomResizedCrop 0.5–1, flip: Tip-Adapter's transform, which the published
code saves its views with), the views taken in the published order 1, 2, …, V−1, 0, 1, …
**Difference**: the published runs cycle 300 saved views; here the 10 cached ones. The
published code's "few-shot validation" variant (a 7 × 7 grid of lr and λ, 49 trainings) is not
run: ProLIP's headline protocol is the validation-free one reproduced here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Baseline, BaselineData

LR, EPS, EPOCHS = 1e-5, 1e-4, 300


def view_order(epochs: int, views: int) -> list[int]:
    """The view each epoch reads: the published counter starts at 0 and is advanced (wrapping
    at the view count) before the epoch reads it."""
    order, count = [], 0
    for _ in range(epochs):
        count = 0 if (count + 1) % views == 0 else count + 1
        order.append(count)
    return order


class ProLIP(Baseline):
    name = "prolip"
    label = "ProLIP"
    needs = ("pre",)
    note = "trained on the 10 cached augmented views (the published runs cycle 300 saved views)"

    def skip_reason(self, data: BaselineData) -> str | None:
        return data.pre.get("refused")

    def fit(self, data: BaselineData) -> None:
        views, start, self.bias = data.pre["views"].float(), data.pre["weight"].float(), data.pre["bias"]
        shots = data.shots or len(data.train_labels) // data.num_classes
        self.lam = 1.0 / shots
        weight = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([weight], lr=LR, eps=EPS)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS)
        text = data.text.float()
        with torch.enable_grad():
            for v in view_order(EPOCHS, len(views)):
                logits = self._logits(views[v], weight, text, data.scale)
                loss = F.cross_entropy(logits, data.train_labels) + self.lam * (start - weight).pow(2).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        self.weight = weight.detach()

    def _logits(self, before: torch.Tensor, weight: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        mapped = before @ weight
        if self.bias is not None:
            mapped = mapped + self.bias
        return scale * F.normalize(mapped, dim=-1) @ text

    def choose(self, data: BaselineData) -> dict:
        return {"lambda": self.lam, "lr": LR, "epochs": EPOCHS, "source": "fixed (validation-free, as published)"}

    def score(self, data: BaselineData, split: str, features: torch.Tensor) -> torch.Tensor:
        return self._logits(data.pre[split].float(), self.weight, data.text.float(), data.scale)

    def logits(self, data: BaselineData, features: torch.Tensor) -> torch.Tensor:
        """``features``: what the last projection reads (not ``v0``)."""
        return self._logits(features.float(), self.weight, data.text.float(), data.scale)
