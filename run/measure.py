"""The baselines measured on a run's own ground (doc/baselines.md): its few-shot images, CLIP's
features of its val and test images (already computed for RAFT's evaluation), its text
matrix, hyper-parameters chosen on its validation data.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from baselines import METHODS, BaselineData, run_baselines
from run.context import Model, RunContext
from run.features import eval_store, view_store

TIP_VIEWS, TIP_CROP_SCALE = 10, (0.5, 1.0)   # Tip-Adapter's cache: 10 augmented views (doc/baselines.md)


def few_shot_features(ctx: RunContext, model: Model, needs: set[str]) -> tuple[torch.Tensor | None, ...]:
    """CLIP's own features ``v0`` (L2-normalised) of the few-shot images that the requested
    methods read: under the evaluation transform (``train``, N×D) and of 10 augmented views
    (``views``, V×N×D); both cached, shared by every run and method of the same images."""
    cfg, images, device, clip = ctx.cfg, ctx.images, ctx.device, model.clip
    normed = lambda x: F.normalize(x.float(), dim=-1).to(device)  # noqa: E731
    train = views = None
    if "train" in needs:
        # v0 only (N×D, small): stored like the views below whatever feature_cache says, which
        # also puts torchrun's shares back in the images' order
        store = eval_store(clip, images.train, cfg.cache_dir, f"{ctx.data.name}_train", cfg.eval_batch_size,
                           cfg.num_workers, device, ctx.amp, keep_maps=False)
        train = normed(torch.from_numpy(np.array(store.pooled, dtype=np.float32)))
    if "views" in needs:
        store = view_store(clip, images.train, TIP_VIEWS, cfg.seed, cfg.cache_dir, ctx.train_cache_name(), device,
                           ctx.amp, cfg.num_workers, cfg.eval_batch_size, scale=TIP_CROP_SCALE, keep_maps=False)
        views = normed(torch.from_numpy(np.array(store.pooled, dtype=np.float32))
                       .view(TIP_VIEWS, len(images.train), -1))
    return train, views


def measure_baselines(ctx: RunContext, model: Model, evaluation: dict) -> dict | None:
    """The methods of ``cfg.baselines`` on this run's own ground: its few-shot images, CLIP's
    features of its val and test images (already computed for RAFT's evaluation), its text
    matrix, alpha-free selection on its validation data. Only the few-shot images' features
    are new, and only those the requested methods read."""
    cfg, device = ctx.cfg, ctx.device
    if not cfg.baselines or ctx.folder.transfer_from is not None or not ctx.images.train:
        return None
    start = time.perf_counter()
    with ctx.clock.section("baseline features"):   # only what the requested methods read
        train, views = few_shot_features(ctx, model, {need for name in cfg.baselines for need in METHODS[name].needs})
    logits = evaluation["logits"]
    val = logits["val"]
    data = BaselineData(model.text[:, :-1].float(), train,
                        torch.tensor([d.label for d in ctx.images.train], device=device), views,
                        None if val is None else val.v0.to(device), None if val is None else val.labels.to(device),
                        cfg.logit_scale, cfg.seed)
    features_seconds = time.perf_counter() - start
    if "test" in logits:
        targets = {"test_acc": (logits["test"].v0.to(device), logits["test"].labels.to(device), None)}
    else:  # base-to-new: the trained methods know the base classes only; zero-shot CLIP scores both
        targets = {"base_acc": (logits["base"].v0.to(device), logits["base"].labels.to(device), None),
                   "new_acc": (logits["new"].v0.to(device), logits["new"].labels.to(device),
                               model.target_text["new"][:, :-1].float())}
    measured = run_baselines(cfg.baselines, data, targets, ctx.log, ctx.clock)
    return {"methods": measured, "seconds": {"features": features_seconds, "total": time.perf_counter() - start}}
