"""The baselines measured on a run's own ground (doc/baselines.md): its few-shot images, CLIP's
features of its val and test images (already computed for RAFT's evaluation), its text
matrix, hyper-parameters chosen on its validation data.
"""
from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from datasets import DatasetSplits
from evaluation import SplitFeatures
from features import eval_store, view_store
from run.config import Config, check_outside_data
from run.distributed import choose_device
from run.folders import RunPlan, run_dir_of, run_tag
from run.model import Model, load_frozen_clip, task_texts
from run.task import make_task, sample_images
import utils
from utils import RaftError, setup_logging, write_json

if TYPE_CHECKING:
    from run.task import ImageSets, Task

from . import BASELINES, BaselineData, run_baselines

TIP_VIEWS, TIP_CROP_SCALE = 10, (0.5, 1.0)   # Tip-Adapter's cache: 10 augmented views (doc/baselines.md)


def measure_baselines(model: Model, cfg: Config, data: DatasetSplits, task: Task, images: ImageSets,
                      evaluation: dict, plan: RunPlan, device: torch.device, use_amp: bool) -> dict | None:
    """The baselines of ``cfg.baselines`` on this run's own ground: its few-shot images, CLIP's
    features of its val and test images (already computed for RAFT's evaluation), its text
    matrix, alpha-free selection on its validation data. Only the few-shot images' features
    are new, and only those the requested methods read: once under the evaluation transform
    (linear probe) and for 10 augmented views (Tip-Adapter, Tip-Adapter-F), both cached."""
    if not cfg.baselines or plan.transfer_from is not None or not images.train:
        return None
    start = time.perf_counter()
    clip, logits = model.clip, evaluation["logits"]
    name = f"{data.name}_train_{cfg.shots}shots_seed{cfg.seed}"
    needs = {need for method in cfg.baselines for need in BASELINES[method].needs}
    normed = lambda x: F.normalize(x.float(), dim=-1).to(device)  # noqa: E731
    train = views = None
    with utils.CLOCK.section("baseline features"):   # only what the requested methods read
        if "train" in needs:
            # v0 only (N×D, small): stored like the views below whatever feature_cache says, which
            # also puts torchrun's shares back in the images' order
            store = eval_store(clip, images.train, cfg.cache_dir, f"{data.name}_train", cfg.eval_batch_size,
                               cfg.num_workers, device, use_amp, keep_maps=False)
            train = normed(torch.from_numpy(np.array(store.pooled, dtype=np.float32)))
        if "views" in needs:
            store = view_store(clip, images.train, TIP_VIEWS, cfg.seed, cfg.cache_dir, name, device, use_amp,
                               cfg.num_workers, cfg.eval_batch_size, scale=TIP_CROP_SCALE, keep_maps=False)
            views = normed(torch.from_numpy(np.array(store.pooled, dtype=np.float32))
                           .view(TIP_VIEWS, len(images.train), -1))
    val = logits["val"]
    bdata = BaselineData(model.text[:, :-1].float(), train,
                         torch.tensor([d.label for d in images.train], device=device), views,
                         None if val is None else val.v0.to(device), None if val is None else val.labels.to(device),
                         cfg.logit_scale, cfg.seed)
    features_seconds = time.perf_counter() - start
    if "test" in logits:
        targets = {"test_acc": (logits["test"].v0.to(device), logits["test"].labels.to(device), None)}
    else:  # base-to-new: the trained methods know the base classes only; zero-shot CLIP scores both
        targets = {"base_acc": (logits["base"].v0.to(device), logits["base"].labels.to(device), None),
                   "new_acc": (logits["new"].v0.to(device), logits["new"].labels.to(device),
                               model.target_text["new"][:, :-1].float())}
    methods = run_baselines(cfg.baselines, bdata, targets, plan.log)
    return {"methods": methods, "seconds": {"features": features_seconds,
                                            "total": time.perf_counter() - start}}


def baselines_only(cfg: Config, flags: argparse.Namespace, data: DatasetSplits) -> dict:
    """The baselines of one setting without training RAFT (``baselines/run.py``): the same
    run folder, few-shot images, caches and validation data as the RAFT run of that setting;
    the results go to baselines.json there."""
    cfg = Config(dict(cfg) | {"name": run_tag(cfg, flags)})
    check_outside_data(cfg)
    if not cfg.baselines:
        raise RaftError("`baselines` is empty: nothing to run")
    run_dir = run_dir_of(cfg, data.name)
    plan = RunPlan(cfg, setup_logging(run_dir / "log.txt"), run_dir, run_dir / "baselines.json",
                   run_dir / "checkpoint.pt")
    device, use_amp = choose_device(cfg, plan)
    task = make_task(cfg, data, plan)
    images = sample_images(cfg, data, task, plan)
    clip = load_frozen_clip(cfg, images, plan, device)
    text, target_text = task_texts(clip, cfg, task, device, plan.log)
    splits = SplitFeatures(clip, cfg, data, device, use_amp)
    val_items = data.val if images.val_source == "split" else images.val
    logits = {"val": splits.v0(val_items, "val", task.train) if images.val else None,
              **{name: splits.v0(data.test, "test", view) for name, view in task.targets.items()}}
    measured = measure_baselines(Model(clip, text, None, target_text), cfg, data, task, images, {"logits": logits},
                                 plan, device, use_amp)
    results = {"dataset": data.name, "backbone": cfg.backbone, "weights": cfg.weights, "shots": cfg.shots,
               "seed": cfg.seed, "protocol": cfg.protocol, "num_classes": data.num_classes,
               "sizes": {"train": len(images.train), "val": len(logits["val"].labels) if images.val else 0,
                         "test": sum(len(v.labels) for k, v in logits.items() if k != "val")},
               "val_source": images.val_source, "baselines": measured["methods"],
               "baselines_seconds": measured["seconds"], "device": str(device),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(plan.results_path, results)
    print(f"\n{data.name} {cfg.backbone} {cfg.shots}-shot seed {cfg.seed}: "
          + ", ".join(f"{k} {v['test_acc']:.2f}%" for k, v in measured["methods"].items())
          + f"; results in {plan.results_path}")
    return results
