"""The methods that train inside CLIP, run as RAFT runs are (`method` config key): the same
few-shot images, text and splits, their own run folder (``…_<method>``), the training loop of
run/training.py (resume after any kill, torchrun, history.csv), results.json.

    coop   CoOp (Zhou et al., IJCV 2022; KaiyangZhou/CoOp at ff61507): context vectors learned
           through the frozen text encoder (clip/prompts.py), on CLIP's frozen image features
           of fresh augmentations every epoch (Dassl's RandomResizedCrop 0.08–1 and flip).

Each method is one entry of ``METHODS``: its published training settings, the module it trains,
its learner (the loss of a batch, the learning rate of every step) and its classifier.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from baselines import INSIDE
from baselines.base import dassl_lr
from clip.prompts import PromptLearner, encode_prompts, text_tower
from run.config import Config
from run.context import Model, RunContext
from utils import autocast


@dataclass(frozen=True)
class CoOpSettings:
    """The published configs (configs/trainers/CoOp/rn50*.yaml, vit_b16*.yaml; scripts/coop/main.sh and
    COOP.md): SGD lr 0.002 (Dassl's momentum 0.9, weight decay 5e-4), batch 32, one constant
    warm-up epoch at 1e-5 then a cosine per epoch; 50 epochs at 1 shot, 100 at 2 and 4, 200 at 8
    and 16 (ImageNet: 50 at every shot count)."""
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 32
    warmup_lr: float = 1e-5
    crop_scale: tuple[float, float] = (0.08, 1.0)

    @staticmethod
    def epochs(shots: int, dataset: str) -> int:
        if dataset == "imagenet":
            return 50
        return 50 if shots <= 1 else 100 if shots <= 4 else 200


COOP = CoOpSettings()
LABELS = {name: entry[0] for name, entry in INSIDE.items()}   # (their labels and published numbers: baselines/)


def training_config(cfg: Config, dataset: str) -> Config:
    """The settings the training loop reads, for a method: its published epochs and batch."""
    if cfg.method == "coop":
        return Config(dict(cfg) | {"train_epoch": COOP.epochs(cfg.shots, dataset), "warmup_epoch": 1,
                                   "batch_size": COOP.batch_size, "lr": COOP.lr})
    return cfg


def build_prompts(ctx: RunContext, model: Model) -> PromptLearner:
    """CoOp's prompt learner for the run's classes (the context drawn from the run's seed)."""
    cfg = ctx.cfg
    tower = text_tower(model.clip.model, cfg.backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return PromptLearner(tower, model.clip.tokenizer, ctx.task.train.classnames, cfg.coop_n_ctx,
                             cfg.coop_ctx_init, cfg.coop_class_specific, cfg.coop_position).to(ctx.device)


def prompt_text(model: Model, prompts: PromptLearner) -> torch.Tensor:
    """The learned classifier: ``D×C``, unit columns."""
    return F.normalize(encode_prompts(model.clip.model, prompts(), prompts.tokens).float(), dim=-1).T


class CoOpLearner:
    """What CoOp trains (the context vectors) and the loss of one batch: cross-entropy of
    ``scale · normalise(v0) · T(ctx)`` on CLIP's frozen image features."""

    terms = ("ce",)

    def __init__(self, prompts: PromptLearner, model: Model, cfg: Config, device: torch.device, amp: bool,
                 numerics):
        self.module, self.model, self.device, self.numerics = prompts, model, device, numerics
        self.amp = amp and device.type == "cuda"
        self.scale = cfg.logit_scale
        self.params = [prompts.ctx]
        self.optimizer = torch.optim.SGD(self.params, lr=COOP.lr, momentum=COOP.momentum,
                                         weight_decay=COOP.weight_decay)

    def rates(self, total: int, per_epoch: int, cfg: Config) -> list[float]:
        """Dassl's schedule, stepped per epoch: every step of epoch e runs at ``dassl_lr(e)``."""
        return [dassl_lr(step // per_epoch, cfg.lr, cfg.train_epoch, warmup_lr=COOP.warmup_lr) for step in range(total)]

    def loss(self, fmap: torch.Tensor, v0: torch.Tensor, labels: torch.Tensor, total: int):
        with autocast(self.device, self.amp):
            text = encode_prompts(self.model.clip.model, self.module(), self.module.tokens)
        logits = self.scale * F.normalize(v0.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
        # this process's share of the global batch's mean (torchrun sums the gradients)
        loss = F.cross_entropy(logits, labels, reduction="sum") / total
        with torch.no_grad():
            correct = (logits.argmax(1) == labels).sum()
        return loss, {"ce": loss}, correct
