"""The model of a run: frozen CLIP (its BatchNorm statistics measured or restored), the text
classifier of the trained and of each scored class set, and a fresh region pool.
"""
from __future__ import annotations

from dataclasses import replace

from pathlib import Path

import torch

from clip.backbone import FrozenCLIP, calibrate_batchnorm, load_open_clip, restore_batchnorm
from clip.text import class_sentences, load_descriptions, text_classifier
from datasets import DatasetSplits
from datasets.loader import eval_transform, make_loader
from datasets.published import file_blob_id, published_descriptions
from run.config import Config
from run.context import Model, RunContext
from run.distributed import WORLD
from utils import RaftError


def frozen_clip(cfg: Config, batchnorm: dict | None = None) -> FrozenCLIP:
    """The frozen CLIP a config names (backbone, weights, QuickGELU), on the CPU; ``batchnorm``:
    a random trunk's BatchNorm statistics measured in training (a checkpoint's), put back."""
    clip = FrozenCLIP(load_open_clip(cfg.backbone, cfg.weights, cfg.quick_gelu), cfg.backbone, cfg.weights)
    if batchnorm:
        restore_batchnorm(clip, batchnorm)
    return clip


def load_frozen_clip(ctx: RunContext) -> FrozenCLIP:
    """Frozen CLIP on the run's device; a random trunk's BatchNorm statistics restored from the
    checkpoint, or measured on the few-shot images (a deterministic function of them)."""
    ckpt = ctx.folder.ckpt
    measured = ckpt.get("trunk_batchnorm") if ckpt is not None else None
    clip = frozen_clip(ctx.cfg, measured).to(ctx.device)
    if measured:   # measured in training: not read again
        ctx.log.info(f"BatchNorm statistics restored from {ctx.folder.ckpt_path}")
    elif ctx.cfg.calibrate_bn:
        calibrate_on(clip, ctx.images.train, ctx.cfg, ctx.device, ctx.log)
    return clip


def task_texts(ctx: RunContext, clip: FrozenCLIP) -> tuple[torch.Tensor, dict, dict]:
    """The text matrix of the trained classes, and of each scored class set; what the trained
    classes' sentences lost to the text encoder's window."""
    task = ctx.task
    views = {id(view): view for view in (task.train, *task.targets.values())}   # each class set once
    built = {key: build_text(clip, view, ctx.cfg, ctx.log) for key, view in views.items()}
    texts = {key: text.to(ctx.device) for key, (text, _) in built.items()}
    return (texts[id(task.train)], {name: texts[id(view)] for name, view in task.targets.items()},
            built[id(task.train)][1])


def build_model(ctx: RunContext, pool: bool = True) -> Model:
    """Frozen CLIP, the text classifiers and (``pool``) a fresh region pool in the run's numerics."""
    clip = load_frozen_clip(ctx)
    text, target_text, report = task_texts(ctx, clip)
    if not pool:
        return Model(clip, text, None, target_text, report)
    if ctx.cfg.method != "raft":   # a method inside CLIP trains its own module (run/methods.py)
        from run.methods import build_prompts
        model = Model(clip, text, None, target_text, report)
        prompts = build_prompts(ctx, model)
        ctx.log.info(f"{ctx.cfg.method}: {prompts.n_ctx} context tokens"
                     f"{' per class' if ctx.cfg.coop_class_specific else ''}, class name at the {prompts.position}, "
                     f"{prompts.ctx.numel():,} trainable parameters")
        return replace(model, pool=prompts)
    region_pool = ctx.numerics.pool(clip, ctx.cfg.mask_bg_in_cls).to(ctx.device)
    ctx.log.info(f"backbone {ctx.cfg.backbone} (weights {ctx.cfg.weights or 'random'}): {clip.spec.what} "
                 f"{'×'.join(map(str, clip.feature_shape))} ({clip.grid}×{clip.grid} grid), embedding "
                 f"{clip.embed_dim}, {region_pool.num_heads} heads, "
                 f"{sum(p.numel() for p in region_pool.parameters() if p.requires_grad):,} trainable parameters")
    return Model(clip, text, region_pool, target_text, report)


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


def build_text(clip: FrozenCLIP, data: DatasetSplits, cfg: Config, log) -> tuple[torch.Tensor, dict]:
    """The class set's text matrix, and what the text encoder's window cut (``sentence_report``)."""
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
        text, report = text_classifier(clip, data.classnames, sentences, cfg.cache_dir, data.name, cfg.renorm_bg_text)
    world.barrier()
    if not world.main:
        text, report = text_classifier(clip, data.classnames, sentences, cfg.cache_dir, data.name, cfg.renorm_bg_text)
    if report["cut_sentences"]:
        cut = report["cut_by_class"]
        log.warning(f"warning: {report['cut_sentences']} of {sum(map(len, sentences))} class sentences are longer than "
                    f"the text encoder's {report['context_length']} tokens and were cut, in {len(cut)} of "
                    f"{len(sentences)} classes ({', '.join(f'{k}: {v}' for k, v in list(cut.items())[:5])}"
                    f"{' …' if len(cut) > 5 else ''}); results.json → text_cut lists them")
    return text, report


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
