"""The model of a run: frozen CLIP (its BatchNorm statistics measured or restored), the text
classifier of the trained and of each scored class set, and a fresh region pool.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from clip.backbone import FrozenCLIP, calibrate_batchnorm, load_open_clip, restore_batchnorm
from clip.reference import make_region_pool
from clip.text import cached_text_matrix, class_sentences, load_descriptions
from datasets import DatasetSplits
from datasets.loader import eval_transform, make_loader
from datasets.published import file_blob_id, published_descriptions
from run.config import Config
from run.distributed import WORLD
from utils import RaftError

if TYPE_CHECKING:
    from run.folders import RunPlan
    from run.task import ImageSets, Task

@dataclass
class Model:
    clip: FrozenCLIP
    text: torch.Tensor           # D × (C+1) of the trained classes: class columns, then the background column
    pool: torch.nn.Module        # RegionAttentionPool (ResNet) or ViTRegionPool
    target_text: dict[str, torch.Tensor]   # the same for each scored class set


def load_frozen_clip(cfg: Config, images: ImageSets, plan: RunPlan, device: torch.device) -> FrozenCLIP:
    """Frozen CLIP; a random trunk's BatchNorm statistics restored from the checkpoint, or
    measured on the few-shot images (a deterministic function of them)."""
    clip = FrozenCLIP(load_open_clip(cfg.backbone, cfg.weights, cfg.quick_gelu), cfg.backbone, cfg.weights).to(device)
    if plan.ckpt is not None and plan.ckpt.get("trunk_batchnorm"):  # measured in training: not read again
        restore_batchnorm(clip, plan.ckpt["trunk_batchnorm"])
        plan.log.info(f"BatchNorm statistics restored from {plan.ckpt_path}")
    elif cfg.calibrate_bn:
        calibrate_on(clip, images.train, cfg, device, plan.log)
    return clip


def task_texts(clip: FrozenCLIP, cfg: Config, task: Task, device: torch.device, log) -> tuple[torch.Tensor, dict]:
    """The text matrix of the trained classes, and of each scored class set."""
    views = {id(view): view for view in (task.train, *task.targets.values())}   # each class set once
    texts = {key: build_text(clip, view, cfg, log).to(device) for key, view in views.items()}
    return texts[id(task.train)], {name: texts[id(view)] for name, view in task.targets.items()}


def build_model(cfg: Config, data: DatasetSplits, task: Task, images: ImageSets, plan: RunPlan,
                device: torch.device) -> Model:
    log = plan.log
    clip = load_frozen_clip(cfg, images, plan, device)
    text, target_text = task_texts(clip, cfg, task, device, log)
    pool = make_region_pool(clip, cfg.mask_bg_in_cls, cfg.pool_precision).to(device)
    log.info(f"backbone {cfg.backbone} (weights {cfg.weights or 'random'}): {clip.spec.what} "
             f"{'×'.join(map(str, clip.feature_shape))} ({clip.grid}×{clip.grid} grid), embedding {clip.embed_dim}, "
             f"{pool.num_heads} heads, {sum(p.numel() for p in pool.parameters() if p.requires_grad):,} "
             f"trainable parameters")
    return Model(clip, text, pool, target_text)


GPT3_DIR = Path(__file__).resolve().parents[1] / "gpt3_file"   # where `descriptions: auto` looks


def description_file(cfg: Config, dataset: str) -> Path | None:
    """The class-description file a run reads: ``auto`` = gpt3_file/<dataset>_prompt.json when it
    exists; a path; or none (templates)."""
    if cfg.descriptions == "auto":
        default = GPT3_DIR / f"{dataset}_prompt.json"
        return default if default.is_file() else None
    return None if cfg.descriptions is None else Path(cfg.descriptions)


def text_source(cfg: Config, data: DatasetSplits) -> dict:
    """What a run's text classifier was built from, for results.json: the description file and
    its git blob id (``published``: the very file the published code ships for this dataset),
    or the templates."""
    source = description_file(cfg, data.name)
    if source is None or not source.is_file():
        return {"kind": "templates", "templates": list(cfg.templates or data.templates)}
    published = published_descriptions(data.name)
    blob = file_blob_id(source)
    return {"kind": "descriptions", "file": str(source), "git_blob": blob,
            "published": published is not None and blob == published.git_blob}


def build_text(clip: FrozenCLIP, data: DatasetSplits, cfg: Config, log) -> torch.Tensor:
    templates = cfg.templates or data.templates
    descriptions, source = None, description_file(cfg, data.name)
    if source is not None:
        descriptions = load_descriptions(source)
        log.info(f"class descriptions: {source}")
    else:
        log.info(f"class descriptions: none, templates {templates}")
    sentences = class_sentences(data.classnames, templates, descriptions, str(source))
    world = WORLD
    if world.main:  # one process encodes and caches; the others then read the cache
        text = cached_text_matrix(clip, data.classnames, sentences, cfg.cache_dir, data.name, cfg.renorm_bg_text)
    world.barrier()
    if not world.main:
        text = cached_text_matrix(clip, data.classnames, sentences, cfg.cache_dir, data.name, cfg.renorm_bg_text)
    return text


def calibrate_on(clip: FrozenCLIP, items, cfg: Config, device: torch.device, log) -> None:
    """Measure the random trunk's BatchNorm statistics on the training images (eval transform)."""
    loader = make_loader(items, eval_transform(clip.preprocess), cfg.eval_batch_size, shuffle=False,
                         num_workers=cfg.num_workers, device=device)

    def batches():
        for images, _, failures in loader:
            if failures:
                raise RaftError(f"unreadable training image {failures[0]}")
            yield images.to(device)

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in clip.model.visual.modules()):
        log.info(f"calibrate_bn: {clip.backbone} has no BatchNorm (LayerNorm needs no statistics): nothing to do")
        return
    log.info(f"BatchNorm statistics re-estimated on {calibrate_batchnorm(clip, batches())} training images")
