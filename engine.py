"""The engine shared by main.py and main_imagenet.py: train the region pool, evaluate, write results.

``run`` is a short sequence of named phases:

    start_processes torchrun's processes (nothing in a plain run); check_global_batch
    plan_run        which run folder, what is already there (finished, trained, a resume state)
    choose_device   this process's device (one GPU per torchrun process) and amp
    make_task       which classes the pool trains on and which it is scored on (the protocol)
    sample_images   the few-shot training set and the validation set
    build_model     frozen CLIP, text classifier, region pool
    train_or_load   train the pool (resuming if a state was saved), or load a trained one
    evaluate_run    logits once per split, alpha chosen on validation data, test numbers
    pool_numerics   the pool's precision and what share of each tensor training never moved
    measure_baselines  zero-shot, linear probe, Tip-Adapter(-F) on the same images and features
    write_results   results.json (or results_eval.json / transfer_<dataset>.json)
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import math
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baselines import BaselineData, run_baselines
from clip.backbone import FrozenCLIP, calibrate_batchnorm, load_open_clip, restore_batchnorm
from clip.reference import make_region_pool, never_moved
from clip.text import cached_text_matrix, class_sentences, load_descriptions
from datasets import (SAMPLER_VERSION, DatasetSplits, Datum, few_shot, sample_digest, save_list, saved_meta,
                      saved_sample_differs, validation_from_train)
from datasets.loader import eval_transform, make_loader
from evaluation import SplitLogits, collect_logits, evaluate, evaluate_base2new
from features import LiveSource, ViewSource, eval_store, live_batches, share_rounding, view_store
from run.checkpoints import (check_backbone, check_same_classes, load_pool_state, read_checkpoint, read_results,
                             save_checkpoint, source_dataset)
from training import NOT_TRAINING_KEYS, describe_changes, settings_differ, train_pool
from utils import (SCHEMA, WORLD, Config, RaftError, World, check_outside_data, load_yaml, printable,
                   remove_temporaries, resolve_device, set_seed, setup_logging, start_processes, write_json, write_yaml)

# Settings that shape what a trained pool computes, or which images it was trained on:
# evaluation of a checkpoint takes them from the checkpoint, not from the command line.
# val_per_class too: it decides the validation images (and so alpha) of a dataset without a val split.
TRAINING_KEYS = ("shots", "seed", "quick_gelu", "calibrate_bn", "mask_bg_in_cls", "renorm_bg_text",
                 "descriptions", "templates", "logit_scale", "val_per_class", "protocol")
# ... of which these describe the source dataset's classes, not the pool: a transfer uses the target's.
SOURCE_ONLY_KEYS = ("descriptions", "templates", "protocol")
# Already spelled out in the folder name, so never part of its tag.
NAMED_KEYS = {"backbone", "shots", "seed", "train_views", "name", "protocol"}
MAX_TAG = 64  # longer tags keep their first settings and a hash of all of them


# --------------------------------------------------------------------------- run folders
def short_value(value) -> str:
    """A setting as it appears in a folder name: 0.0002, true, a file's name, none."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        return "list" + hashlib.sha256(repr(value).encode()).hexdigest()[:6]
    return Path(str(value)).name.replace(" ", "-") or "empty"


def run_tag(cfg: Config, flags: argparse.Namespace) -> str:
    """The tag after <backbone>_<shots>shots_seed<seed>: an explicit --name, or else the config
    file's own `name` followed by the training settings that the command line changed."""
    overrides = getattr(flags, "overrides", {})
    if "name" in overrides:
        return cfg.name or ""
    file_values = getattr(flags, "file_values", {})
    changed = [f"{k}={short_value(overrides[k])}" for k in SCHEMA  # schema order: same name for any argument order
               if k in overrides and k not in NAMED_KEYS and k not in NOT_TRAINING_KEYS
               and overrides[k] != file_values.get(k)]
    if len("_".join(changed)) > MAX_TAG:  # readable head, and a hash of all of them for uniqueness
        digest = hashlib.sha256("_".join(changed).encode()).hexdigest()[:6]
        head = []
        while changed and len("_".join(head + changed[:1])) <= MAX_TAG - 20:
            head.append(changed.pop(0))
        changed = head + [f"and{len(changed)}more-{digest}"]
    return "_".join(([cfg.name] if cfg.name else []) + changed)


def run_name(cfg: Config) -> str:
    views = f"_views{cfg.train_views}" if cfg.train_views else ""  # cached views: not the paper's protocol
    protocol = "" if cfg.protocol == "fewshot" else f"_{cfg.protocol}"
    tag = f"_{cfg.name}" if cfg.name else ""
    return f"{cfg.backbone}_{cfg.shots}shots_seed{cfg.seed}{views}{protocol}{tag}"


def run_dir_of(cfg: Config, dataset: str) -> Path:
    return Path(cfg.output_dir) / dataset / run_name(cfg)


# --------------------------------------------------------------------------- checkpoints
def adopt_checkpoint(cfg: Config, flags: argparse.Namespace, ckpt: dict, transfer: bool, log) -> Config:
    """The settings that define the checkpoint's model: its training settings always (not its
    class text, for a transfer), its backbone and weights unless the command line gives them."""
    trained, given = ckpt["config"], getattr(flags, "overrides", {})
    keys = [*(k for k in ("backbone", "weights") if k not in given),
            *(k for k in TRAINING_KEYS if not (transfer and k in SOURCE_ONLY_KEYS))]
    changed = {k: trained[k] for k in keys if k in trained and trained[k] != cfg[k]}
    if "num_classes" not in given and cfg.num_classes is not None:
        changed["num_classes"] = None  # the classes are checked by name against the checkpoint's (or a transfer's own)
    if changed:
        log.info(f"evaluating with the checkpoint's settings: {changed}")
    return Config(dict(cfg) | changed)


# --------------------------------------------------------------------------- phases
@dataclass
class RunPlan:
    """Where a run reads and writes, and what it starts from."""
    cfg: Config
    log: logging.Logger
    run_dir: Path
    results_path: Path
    ckpt_path: Path
    state_path: Path | None = None   # where training saves its resumable state (None: no training)
    ckpt: dict | None = None         # a trained pool to evaluate instead of training one
    transfer_from: str | None = None  # evaluating a pool trained on this other dataset
    share_rounding: dict | None = None  # dist_exact: whether the processes' trunk shares round as one batch

    @property
    def trains(self) -> bool:
        return self.ckpt is None


def plan_run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits) -> RunPlan | None:
    """Decide the run folder and what it starts from; None when the run has already finished."""
    cfg = Config(dict(cfg) | {"name": run_tag(cfg, flags)})
    check_outside_data(cfg)
    if flags.eval_only:  # results go next to the checkpoint, under its training settings
        ckpt_path = Path(flags.checkpoint) if flags.checkpoint else run_dir_of(cfg, data.name) / "checkpoint.pt"
        ckpt = read_checkpoint(ckpt_path)
        source = source_dataset(ckpt)
        same = source == data.name if source is not None else ckpt.get("classnames") == data.classnames
        if source is None and not same:
            raise RaftError(f"checkpoint {ckpt_path} records no dataset it was trained on (written by an older "
                            f"version): it can only be evaluated on its own classes; train it again to transfer it")
        run_dir = ckpt_path.parent
        log = setup_logging(run_dir / "log.txt")
        cfg = adopt_checkpoint(cfg, flags, ckpt, transfer=not same, log=log)
        check_backbone(ckpt, ckpt_path, cfg)
        if same:  # its classes are checked against the task's (make_task)
            return RunPlan(cfg, log, run_dir, run_dir / "results_eval.json", ckpt_path, ckpt=ckpt)
        log.info(f"cross-dataset transfer: a pool trained on {source}, evaluated on {data.name}")
        return RunPlan(cfg, log, run_dir, run_dir / f"transfer_{data.name}.json", ckpt_path, ckpt=ckpt,
                       transfer_from=source)
    run_dir = run_dir_of(cfg, data.name)
    plan = RunPlan(cfg, None, run_dir, run_dir / "results.json", run_dir / "checkpoint.pt", run_dir / "resume.pt")
    if plan.results_path.is_file() and not flags.force and finished_here(plan, cfg, data):
        print(f"{printable(plan.results_path)} exists: run already finished (use --force to run it again; "
              f"--eval-only evaluates it again under other evaluation settings)")
        return None
    plan.log = setup_logging(run_dir / "log.txt")
    world = WORLD
    if world.main:
        remove_temporaries(run_dir)  # left by a process killed while writing
        if flags.force:
            plan.state_path.unlink(missing_ok=True)
            plan.ckpt_path.unlink(missing_ok=True)
    world.barrier()  # every process sees the folder as rank 0 left it
    if not flags.force and plan.ckpt_path.is_file():  # trained, but stopped before its results were written
        ckpt = read_checkpoint(plan.ckpt_path)
        check_backbone(ckpt, plan.ckpt_path, cfg)
        changed = settings_differ(ckpt["config"], cfg)
        if changed:
            raise RaftError(f"{plan.ckpt_path} was trained with other settings ({describe_changes(changed)}); "
                            f"use --force to train again")
        plan.ckpt = ckpt
        plan.log.info(f"training already finished ({plan.ckpt_path}): evaluating")
    return plan


def finished_here(plan: RunPlan, cfg: Config, data: DatasetSplits) -> bool:
    """Whether the run folder's results.json answers for this run: made with these training
    settings (the ones written in config files too, not only the folder name's) on this data.
    A damaged results file is not an answer: the run is evaluated or trained again. Results of
    other settings or other data are refused, never reported as this run's."""
    try:
        results = read_results(plan.results_path)
    except RaftError as exc:
        print(f"warning: {exc}: evaluating the run again", file=sys.stderr)
        return False
    saved = results.get("config")
    if saved is None and (plan.run_dir / "config.yaml").is_file():   # results of versions that did not record it
        saved = load_yaml(plan.run_dir / "config.yaml")
    changed = settings_differ(saved, cfg) if saved is not None else {}
    if changed:
        raise RaftError(f"{plan.run_dir} holds a finished run with other settings ({describe_changes(changed)}): "
                        f"give this one its own folder with --name TAG, or --force to replace it")
    check_same_data(results.get("data_sha256"), data, plan.run_dir)
    return True


def check_same_data(stored: str | None, data: DatasetSplits, where: Path,
                    splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """A run folder made on other data (another data_path, an edited split file, other class
    folders) is named as such, not mistaken for an older version's. ``splits``: what the
    record covers (a trained pool: the class names and the training list)."""
    now = data.digest(splits)
    if stored and stored != now:
        listed = "training images" if splits == ("train",) else "images its splits list"
        raise RaftError(f"{where} was made on other data than {data.name} at {printable(data.root)} holds now (its "
                        f"class names or the {listed} differ; SHA-256 {stored[:12]}… then, {now[:12]}… now): point "
                        f"--data_path at that data, or use --force to start over on this one")


@dataclass
class Task:
    """What a run trains on and what it is scored on (doc/protocols.md). ``train`` is the
    dataset or its base classes (always the first labels, so their labels need no mapping);
    ``targets`` are the class sets whose test images are scored, each with its own text."""
    train: DatasetSplits
    targets: dict[str, DatasetSplits]


def choose_device(cfg: Config, plan: RunPlan) -> tuple[torch.device, bool]:
    """This process's device (under torchrun: the GPU of its local rank) and whether it uses amp."""
    world = WORLD
    device = resolve_device(f"cuda:{world.local_rank}" if world.many and cfg.device in ("auto", "cuda")
                            and torch.cuda.is_available() else cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    if device.type == "cuda":  # the frozen trunk sees one input size: let cuDNN pick its fastest kernels
        torch.backends.cudnn.benchmark = True
    plan.log.info(f"run folder {plan.run_dir}  device {device}{' (amp)' if use_amp else ''}  "
                  f"torch {torch.__version__}" + (f"  {world.size} processes (torchrun)" if world.many else ""))
    return device, use_amp


def make_task(cfg: Config, data: DatasetSplits, plan: RunPlan) -> Task:
    """The protocol as data: few-shot (all classes) or base-to-new (base = the first ceil(C/2)
    labels, new = the rest, each relabelled from 0)."""
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise RaftError(f"config says num_classes={cfg.num_classes} but {data.name} at {cfg.data_path} "
                        f"has {data.num_classes} classes")
    if cfg.protocol == "base2new" and plan.transfer_from is None:
        if data.num_classes < 2:
            raise RaftError(f"protocol base2new needs at least 2 classes; {data.name} has {data.num_classes}")
        half = math.ceil(data.num_classes / 2)
        base = data.class_subset(list(range(half)), "base")
        new = data.class_subset(list(range(half, data.num_classes)), "new")
        plan.log.info(f"base-to-new: {base.num_classes} base classes (trained, alpha chosen on their val images), "
                      f"{new.num_classes} new classes (never seen in training)")
        task = Task(base, {"base": base, "new": new})
    else:
        task = Task(data, {"test": data})
    if plan.ckpt is not None and plan.transfer_from is None:
        check_same_classes(plan.ckpt, plan.ckpt_path, task.train)
    return task


def in_classes(items: list[Datum], view: DatasetSplits) -> list[Datum]:
    """The items of ``view``'s classes, in the dataset's own labels (a view of all classes: all)."""
    if view.parent_labels is None:
        return items
    keep = set(view.parent_labels)
    return [d for d in items if d.label in keep]


@dataclass
class ImageSets:
    train: list[Datum]    # the few-shot training set (empty for a transfer: nothing is trained or chosen)
    val: list[Datum]
    val_source: str | None


def sample_images(cfg: Config, data: DatasetSplits, task: Task, plan: RunPlan) -> ImageSets:
    """The few-shot training set, and a validation set drawn from train if the dataset has none.
    Base-to-new samples every class, then keeps the base classes' images, as CoCoOp's code does
    (so seed 1 trains on the same images)."""
    if plan.transfer_from is not None:  # alpha comes from the source run: no target label chooses anything
        return ImageSets([], [], None)
    check_shots(cfg.shots, data)
    train = in_classes(few_shot(data.train, cfg.shots, cfg.seed, data.num_classes), task.train)
    check_same_sample(plan, train, data, cfg)
    val, source = in_classes(data.val, task.train), "split"
    if not val and cfg.val_per_class > 0:
        val = validation_from_train(in_classes(data.train, task.train), cfg.val_per_class, cfg.seed,
                                    task.train.classnames, {d.path for d in train})
        source = "train images outside the few-shot set"
    plan.log.info(f"{data.name}: {task.train.num_classes} classes trained, few-shot train {len(train)} "
                  f"({cfg.shots} shots), val {len(val)} ({source if val else 'none'}), test {len(data.test)}")
    return ImageSets(train, val, source if val else None)


PROTOCOL_SHOTS = 16   # the field's largest few-shot setting


def check_shots(shots: int, data: DatasetSplits) -> None:
    """Shots beyond what any class holds only repeat images (the sampler draws with replacement
    from a small class, as published) while every copy is decoded and trained on: bounded by
    the largest class's training images, or 16 for datasets smaller than the protocol."""
    counts: dict[int, int] = {}
    for d in data.train:
        counts[d.label] = counts.get(d.label, 0) + 1
    largest = max(counts.values(), default=0)
    bound = max(PROTOCOL_SHOTS, largest)
    if shots > bound:
        raise RaftError(f"shots {shots} is more than any class of {data.name} has training images (largest class: "
                        f"{largest}): every image would repeat, {shots * data.num_classes:,} copies decoded; "
                        f"shots may be at most {bound} (the largest class, or {PROTOCOL_SHOTS})")


def check_same_sample(plan: RunPlan, train: list[Datum], data: DatasetSplits, cfg: Config) -> None:
    """A run resumed or evaluated must have been trained on the images this version samples
    (the sample is part of what a run's settings determine). Runs of versions that visited
    the classes in label order differ where a split file's train list is not in label order."""
    if plan.ckpt is None and not (plan.state_path is not None and plan.state_path.is_file()):
        return  # a fresh run writes its own list
    if plan.transfer_from is None:
        check_same_data(plan.ckpt.get("train_data_sha256") if plan.ckpt is not None
                        else saved_meta(plan.run_dir / "fewshot.json").get("train_data_sha256"), data, plan.run_dir,
                        ("train",))
    stored = plan.ckpt.get("fewshot_sha256") if plan.ckpt is not None else None
    differs = (stored != sample_digest(train, data.image_root or data.root) if stored
               else saved_sample_differs(plan.run_dir / "fewshot.json", train, data.root))
    if differs:
        again = "rerun with --force" if plan.state_path is not None else "train it again (--force, without --eval-only)"
        raise RaftError(f"{plan.run_dir} was trained on another few-shot sample than this version draws for "
                        f"{data.name} {cfg.shots}-shot seed {cfg.seed} (a version before sampler {SAMPLER_VERSION}, "
                        f"which visited the classes in label order: see doc/datasets.md); {again} to train on "
                        f"the published code's sample")


@dataclass
class Model:
    clip: FrozenCLIP
    text: torch.Tensor           # D × (C+1) of the trained classes: class columns, then the background column
    pool: torch.nn.Module        # RegionAttentionPool (ResNet) or ViTRegionPool
    target_text: dict[str, torch.Tensor]   # the same for each scored class set


def load_frozen_clip(cfg: Config, images: ImageSets, plan: RunPlan, device: torch.device) -> FrozenCLIP:
    """Frozen CLIP; a random trunk's BatchNorm statistics restored from the checkpoint, or
    measured on the few-shot images (a deterministic function of them)."""
    clip = FrozenCLIP(load_open_clip(cfg.backbone, cfg.weights, cfg.quick_gelu), cfg.backbone).to(device)
    if plan.ckpt is not None and plan.ckpt.get("trunk_batchnorm"):  # measured in training: not read again
        restore_batchnorm(clip, plan.ckpt["trunk_batchnorm"])
        plan.log.info(f"BatchNorm statistics restored from {plan.ckpt_path}")
    elif cfg.calibrate_bn:
        calibrate_on(clip, images.train, cfg, device, plan.log)
    return clip


def task_texts(clip: FrozenCLIP, cfg: Config, task: Task, device: torch.device, log) -> tuple[torch.Tensor, dict]:
    """The text matrix of the trained classes, and of each scored class set."""
    texts = {id(view): build_text(clip, view, cfg, log).to(device) for view in (task.train, *task.targets.values())}
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


def train_or_load(model: Model, cfg: Config, data: DatasetSplits, task: Task, images: ImageSets, plan: RunPlan,
                  device: torch.device, use_amp: bool) -> float | None:
    """Train the region pool (resuming a saved state), or load the checkpoint's; the training seconds."""
    log = plan.log
    if not plan.trains:
        load_pool_state(model.pool, plan.ckpt, plan.ckpt_path)
        log.info(f"loaded region pool from {plan.ckpt_path}")
        return plan.ckpt.get("train_seconds") if plan.state_path is not None else None  # None: --eval-only
    world = WORLD
    if world.main:
        write_yaml(plan.run_dir / "config.yaml", dict(cfg))
        save_list(plan.run_dir / "fewshot.json", images.train, data.root, data.image_root, dataset=data.name,
                  shots=cfg.shots, seed=cfg.seed, train_data_sha256=data.digest(("train",)))
        if images.val_source not in (None, "split"):
            save_list(plan.run_dir / "val_from_train.json", images.val, data.root, dataset=data.name, seed=cfg.seed)
    if world.many and cfg.dist_exact and not cfg.train_views:   # cached views are computed in whole batches
        whole = [cfg.batch_size] + ([len(images.train) % cfg.batch_size] if len(images.train) % cfg.batch_size else [])
        plan.share_rounding = share_rounding(model.clip, whole, world.size, device, use_amp)
        if not plan.share_rounding["exact"]:
            log.warning(f"warning: dist_exact: on this machine the trunk rounds an image differently inside a "
                        f"process's share (sizes {plan.share_rounding['share_sizes']}) than inside the whole batch "
                        f"(max difference {plan.share_rounding['max_difference']:.1e}); the pool's updates stay one "
                        f"process's, its inputs differ in the last bits (doc/distributed.md)")
    set_seed(cfg.seed)
    start = time.perf_counter()
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device, amp=use_amp, num_workers=cfg.num_workers)
    if cfg.train_views:  # decodes (and checks) the training images when the views are not cached
        source = ViewSource(model.clip, images.train, cfg.train_views, cache_dir=cfg.cache_dir,
                            name=f"{data.name}_train_{cfg.shots}shots_seed{cfg.seed}", **common)
    else:                # decodes every training image up front: a bad one stops the run here
        source = LiveSource(model.clip, images.train, **common)
    prepare_seconds = time.perf_counter() - start
    stats = train_pool(model.pool, model.text, source, cfg, device, log, plan.state_path)
    train_seconds = prepare_seconds + stats["seconds"]
    if world.main:
        save_checkpoint(plan.ckpt_path, model.pool, cfg, model.clip, task.train, model.text, train_seconds,
                        sample_digest(images.train, data.image_root or data.root), data.digest(("train",)))
        plan.state_path.unlink(missing_ok=True)
    world.barrier()
    log.info(f"trained in {train_seconds:.1f}s; checkpoint {plan.ckpt_path}")
    return train_seconds


class SplitFeatures:
    """The frozen trunk's outputs for a run's splits: from the cache when enabled (computed once
    for the whole split, then shared by every protocol, run and baseline), else computed on the
    fly; only the images of a class view's classes, their labels mapped to the view's."""

    def __init__(self, clip: FrozenCLIP, cfg: Config, data: DatasetSplits, device: torch.device, use_amp: bool):
        self.clip, self.cfg, self.data, self.device, self.amp = clip, cfg, data, device, use_amp
        self.skipped: dict[str, list[str]] = {}

    def _rows_of(self, items: list[Datum], split: str, view: DatasetSplits):
        """(the cached store or None, the store rows of the view's classes or None for all)."""
        cfg = self.cfg
        if not cfg.feature_cache:
            self.skipped[split] = []
            return None, None
        store = eval_store(self.clip, items, cfg.cache_dir, f"{self.data.name}_{split}", cfg.eval_batch_size,
                           cfg.num_workers, self.device, self.amp, skip_bad=cfg.bad_images == "skip")
        self.skipped[split] = store.skipped
        keep = view.parent_labels
        return store, None if keep is None else torch.nonzero(torch.isin(store.labels, torch.tensor(keep))).flatten()

    def batches(self, items: list[Datum], split: str, view: DatasetSplits):
        """(trunk output, v0, labels) batches of the view's images among ``items`` (under
        torchrun: this process's share of them)."""
        store, rows = self._rows_of(items, split, view)
        if store is not None:
            rows = torch.arange(len(store)) if rows is None else rows
            mine = rows[WORLD.shard(len(rows))]
            return store.batches(self.cfg.eval_batch_size, self.device, order=mine)
        return live_batches(self.clip, in_classes(items, view), eval_transform(self.clip.image_size),
                            self.cfg.eval_batch_size, self.cfg.num_workers, self.device, self.amp,
                            self.skipped[split] if self.cfg.bad_images == "skip" else None)

    def relabel(self, labels: torch.Tensor, view: DatasetSplits, split: str) -> torch.Tensor:
        if not len(labels):
            raise RaftError(f"no readable {split} images{'' if view.parent_labels is None else f' of the {view.part} classes'}")
        if view.parent_labels is None:
            return labels
        lut = torch.full((self.data.num_classes,), -1, dtype=torch.long)
        lut[torch.tensor(view.parent_labels)] = torch.arange(len(view.parent_labels))
        return lut[labels]

    def logits(self, pool: torch.nn.Module, text: torch.Tensor, items: list[Datum], split: str,
               view: DatasetSplits) -> SplitLogits:
        """The split's logits; under torchrun each process scores its share of the images, then
        every process gets all of them (each image scored exactly once)."""
        logits = collect_logits(pool, text, self.batches(items, split, view), self.device, self.amp, split,
                                self.cfg.logit_scale)
        world = WORLD
        if world.many:
            total = world.gather_objects((logits.bg_cos * len(logits.labels), len(logits.labels)))
            logits = SplitLogits(world.gather(logits.cls), world.gather(logits.clip), world.gather(logits.labels),
                                 sum(c for c, _ in total) / max(1, sum(n for _, n in total)),
                                 world.gather(logits.v0))
        return logits._replace(labels=self.relabel(logits.labels, view, split))

    def v0(self, items: list[Datum], split: str, view: DatasetSplits) -> SplitLogits:
        """CLIP's own features only (``v0``, L2-normalised, and labels): read straight from the
        cache's small pooled array when there is one."""
        store, rows = self._rows_of(items, split, view)
        if store is not None:
            index = torch.arange(len(store)) if rows is None else rows
            v0 = torch.from_numpy(np.array(store.pooled, dtype=np.float32))[index]
            labels = store.labels[index]
        else:
            parts = [(v.float().cpu(), y.cpu()) for _, v, y in self.batches(items, split, view)]
            v0 = torch.cat([v for v, _ in parts]) if parts else torch.zeros(0, self.clip.embed_dim)
            labels = torch.cat([y for _, y in parts]) if parts else torch.zeros(0, dtype=torch.long)
        return SplitLogits(None, None, self.relabel(labels, view, split), 0.0, F.normalize(v0, dim=-1))


def evaluate_run(model: Model, cfg: Config, data: DatasetSplits, task: Task, images: ImageSets, plan: RunPlan,
                 device: torch.device, use_amp: bool) -> dict:
    """Logits once per split (trunk features of the whole split from the cache when enabled,
    shared by every protocol), then alpha from validation data and the scores."""
    start = time.perf_counter()
    splits = SplitFeatures(model.clip, cfg, data, device, use_amp)
    skipped = splits.skipped

    def logits_of(items: list[Datum], split: str, view: DatasetSplits, text: torch.Tensor) -> SplitLogits:
        return splits.logits(model.pool, text, items, split, view)

    val_items = data.val if images.val_source == "split" else images.val
    val = logits_of(val_items, "val", task.train, model.text) if images.val else None
    scored = {name: logits_of(data.test, "test", view, model.target_text[name])
              for name, view in task.targets.items()}
    shifts = {}
    for name, shift in data.shift_sets.items() if "test" in scored else ():
        logits = logits_of(shift.items, name, data, model.text)
        if shift.class_subset is not None:  # 200-class variants: restrict to their classes
            logits = logits.restrict(shift.class_subset, data.num_classes)
        shifts[name] = logits
    if plan.transfer_from is not None:
        alpha, alpha_source = source_alpha(plan, cfg)
        metrics = evaluate(None, scored["test"], Config(dict(cfg) | {"alpha": alpha}), shifts)
        metrics["alpha_source"] = alpha_source
    elif "test" in scored:
        metrics = evaluate(val, scored["test"], cfg, shifts)
    else:
        metrics = evaluate_base2new(val, scored["base"], scored["new"], cfg,
                                    {name: view.num_classes for name, view in task.targets.items()})
    sizes = {"train": len(images.train), "val": len(val.labels) if val else 0,
             "test": sum(len(logits.labels) for logits in scored.values())}
    return {"metrics": metrics, "sizes": sizes, "skipped": skipped, "val_source": images.val_source,
            "logits": {"val": val, **scored}, "seconds": time.perf_counter() - start}


def pool_numerics(model: Model, cfg: Config, plan: RunPlan) -> dict:
    """The pool's precision, and per tensor the share of entries training never moved from
    their initial values (a fresh pool: the copy of CLIP's) -- float16 updates can round away;
    for dist_exact, whether the trunk's shares rounded as one process's batches."""
    initial = make_region_pool(model.clip, cfg.mask_bg_in_cls, cfg.pool_precision).state_dict()
    return {"pool_precision": cfg.pool_precision, "never_moved": never_moved(initial, model.pool.state_dict()),
            **({"share_rounding": plan.share_rounding} if plan.share_rounding else {})}


TIP_VIEWS, TIP_CROP_SCALE = 10, (0.5, 1.0)   # Tip-Adapter's cache: 10 augmented views (doc/baselines.md)


def measure_baselines(model: Model, cfg: Config, data: DatasetSplits, task: Task, images: ImageSets,
                      evaluation: dict, plan: RunPlan, device: torch.device, use_amp: bool) -> dict | None:
    """The baselines of ``cfg.baselines`` on this run's own ground: its few-shot images, CLIP's
    features of its val and test images (already computed for RAFT's evaluation), its text
    matrix, alpha-free selection on its validation data. Only the few-shot images' features
    are new: once under the evaluation transform (linear probe) and for 10 augmented views
    (Tip-Adapter), both cached."""
    if not cfg.baselines or plan.transfer_from is not None or not images.train:
        return None
    start = time.perf_counter()
    clip, logits = model.clip, evaluation["logits"]
    name = f"{data.name}_train_{cfg.shots}shots_seed{cfg.seed}"
    # v0 only (N×D, small): stored like the views below whatever feature_cache says, which also
    # puts torchrun's shares back in the images' order
    store = eval_store(clip, images.train, cfg.cache_dir, f"{data.name}_train", cfg.eval_batch_size,
                       cfg.num_workers, device, use_amp, keep_maps=False)
    train = torch.from_numpy(np.array(store.pooled, dtype=np.float32))
    views = view_store(clip, images.train, TIP_VIEWS, cfg.seed, cfg.cache_dir, name, device, use_amp,
                       cfg.num_workers, cfg.eval_batch_size, scale=TIP_CROP_SCALE, keep_maps=False)
    views = torch.from_numpy(np.array(views.pooled, dtype=np.float32)).view(TIP_VIEWS, len(images.train), -1)
    normed = lambda x: F.normalize(x.float(), dim=-1).to(device)  # noqa: E731
    val = logits["val"]
    bdata = BaselineData(model.text[:, :-1].float(), normed(train),
                         torch.tensor([d.label for d in images.train], device=device), normed(views),
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


def source_alpha(plan: RunPlan, cfg: Config) -> tuple[float, str]:
    """A transfer is scored at the alpha its source run chose on its own validation data
    (or at a fixed --alpha): nothing about the target's labels chooses anything."""
    if cfg.alpha is not None:
        return cfg.alpha, "config"
    source_results = plan.ckpt_path.parent / "results.json"
    if not source_results.is_file():
        raise RaftError(f"{source_results} is missing: the source run's alpha is unknown "
                        f"(finish that run first, or pass a fixed --alpha)")
    return float(read_results(source_results)["alpha"]), f"source run ({source_results})"


def write_results(cfg: Config, data: DatasetSplits, plan: RunPlan, evaluation: dict, numerics: dict,
                  baselines: dict | None, train_seconds: float | None, device: torch.device) -> dict:
    metrics, skipped, log = evaluation["metrics"], evaluation["skipped"], plan.log
    results = {
        "dataset": data.name, "backbone": cfg.backbone, "weights": cfg.weights, "shots": cfg.shots,
        "data_sha256": data.digest(),
        "seed": cfg.seed, "num_classes": data.num_classes, "name": cfg.name or None,
        "sizes": evaluation["sizes"],
        "val_source": evaluation["val_source"],
        **({"split_file": str(data.split_file)} if data.split_file else {}),
        **({"split": data.split_record()} if data.split_record() else {}),
        "protocol": "cross_dataset" if plan.transfer_from is not None else cfg.protocol,
        **({"source": {"dataset": plan.transfer_from, "checkpoint": str(plan.ckpt_path)}}
           if plan.transfer_from is not None else {}),
        "skipped_images": {split: len(files) for split, files in skipped.items()},
        **metrics,
        **({"baselines": baselines["methods"], "baselines_seconds": baselines["seconds"]} if baselines else {}),
        "numerics": numerics,
        "train_seconds": train_seconds, "eval_seconds": evaluation["seconds"], "world_size": WORLD.size,
        "checkpoint": str(plan.ckpt_path), "device": str(device), "torch": torch.__version__,
        "host": platform.node(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "config": dict(cfg),
    }
    if any(skipped.values()):
        results["skipped_files"] = {split: files for split, files in skipped.items() if files}
    results["alpha_curve"] = results.pop("alpha_curve")  # the long lists last, for readability
    if not WORLD.main:  # one writer; every process holds the same numbers
        return results
    write_json(plan.results_path, results)
    log.info(f"zero-shot {results['zero_shot_acc']:.2f}%  fine-tuned only {results['finetuned_acc']:.2f}%  "
             f"RAFT {results['test_acc']:.2f}% at alpha={results['alpha']:.2f} ({results['alpha_source']})  "
             f"[oracle {results['oracle']['test_acc']:.2f}% at alpha={results['oracle']['alpha']:.2f}]  "
             f"cos(v_cls, v_bg) {results['cls_bg_cosine']:.4f}")
    for name, r in (results.get("shift", {}) | results.get("base2new", {})).items():
        if isinstance(r, dict):
            log.info(f"{name}: RAFT {r['test_acc']:.2f}%  zero-shot {r['zero_shot_acc']:.2f}%")
    if any(skipped.values()):
        log.warning(f"skipped unreadable images: { {k: len(v) for k, v in skipped.items() if v} }")
    log.info(f"results: {plan.results_path}")
    results["run_dir"] = str(plan.run_dir)
    what = (f"{plan.transfer_from} -> {data.name}" if plan.transfer_from is not None else data.name)
    scores = (f"zero-shot {results['zero_shot_acc']:.2f}% -> RAFT {results['test_acc']:.2f}%"
              if "base2new" not in results else
              "base {0:.2f}% new {1:.2f}% HM {2:.2f}% (zero-shot HM {3:.2f}%)".format(
                  results["base2new"]["base"]["test_acc"], results["base2new"]["new"]["test_acc"],
                  results["test_acc"], results["zero_shot_acc"]))
    print(f"\n{what} {cfg.backbone} {cfg.shots}-shot seed {cfg.seed}{' base-to-new' if 'base2new' in results else ''}: "
          f"{scores} (alpha {results['alpha']:.2f} from {results['alpha_source']}); results in {plan.results_path}")
    return results


def check_global_batch(cfg: Config, world: World) -> None:
    """Every torchrun process takes a share of each global batch: it needs at least one image."""
    if world.many and cfg.batch_size < world.size:
        raise RaftError(f"batch_size {cfg.batch_size} is smaller than the {world.size} torchrun processes: each "
                        f"process needs images of every global batch (raise batch_size or use fewer processes)")


def run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits) -> dict | None:
    """The whole protocol for one (dataset, backbone, shots, seed); returns the results dict.

    Safe to kill at any moment: started again with the same command it resumes training
    from its last saved state (training.py), or evaluates the finished checkpoint."""
    check_global_batch(cfg, start_processes(cfg.device, cfg.dist_timeout))
    plan = plan_run(cfg, flags, data)
    if plan is None:
        return None
    cfg = plan.cfg
    device, use_amp = choose_device(cfg, plan)
    task = make_task(cfg, data, plan)
    images = sample_images(cfg, data, task, plan)
    model = build_model(cfg, data, task, images, plan, device)
    train_seconds = train_or_load(model, cfg, data, task, images, plan, device, use_amp)
    evaluation = evaluate_run(model, cfg, data, task, images, plan, device, use_amp)
    numerics = pool_numerics(model, cfg, plan)
    baselines = measure_baselines(model, cfg, data, task, images, evaluation, plan, device, use_amp)
    return write_results(cfg, data, plan, evaluation, numerics, baselines, train_seconds, device)


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


# --------------------------------------------------------------------------- helpers
def build_text(clip: FrozenCLIP, data: DatasetSplits, cfg: Config, log) -> torch.Tensor:
    templates = cfg.templates or data.templates
    descriptions, source = None, None
    if cfg.descriptions == "auto":
        default = Path(__file__).resolve().parent / "gpt3_file" / f"{data.name}_prompt.json"
        if default.is_file():
            source = default
    elif cfg.descriptions is not None:
        source = Path(cfg.descriptions)
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
    loader = make_loader(items, eval_transform(clip.image_size), cfg.eval_batch_size, shuffle=False,
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
