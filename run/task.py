"""What a run trains on and what it is scored on: the protocol's class sets (doc/protocols.md),
the few-shot training images and the validation images, checked against what a resumed or
evaluated run was trained on.
"""
from __future__ import annotations

import math

from datasets import (SAMPLER_VERSION, DatasetSplits, Datum, few_shot, sample_digest, saved_meta, saved_sample_differs,
                      validation_from_train)
from run.checkpoints import check_same_classes
from run.context import ImageSets, RunContext, Task
from run.folders import check_same_data
from utils import RaftError


def make_task(ctx: RunContext) -> Task:
    """The protocol as data: few-shot (all classes) or base-to-new (base = the first ceil(C/2)
    labels, new = the rest, each relabelled from 0)."""
    cfg, data, plan = ctx.cfg, ctx.data, ctx.folder
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise RaftError(f"config says num_classes={cfg.num_classes} but {data.name} at {cfg.data_path} "
                        f"has {data.num_classes} classes")
    if cfg.protocol == "base2new" and plan.transfer_from is None:
        if data.num_classes < 2:
            raise RaftError(f"protocol base2new needs at least 2 classes; {data.name} has {data.num_classes}")
        half = math.ceil(data.num_classes / 2)
        base = data.class_subset(list(range(half)), "base")
        new = data.class_subset(list(range(half, data.num_classes)), "new")
        ctx.log.info(f"base-to-new: {base.num_classes} base classes (trained, alpha chosen on their val images), "
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


def sample_images(ctx: RunContext) -> ImageSets:
    """The few-shot training set, and a validation set drawn from train if the dataset has none.
    Base-to-new samples every class, then keeps the base classes' images, as CoCoOp's code does
    (so seed 1 trains on the same images)."""
    cfg, data, task, plan = ctx.cfg, ctx.data, ctx.task, ctx.folder
    if plan.transfer_from is not None:  # alpha comes from the source run: no target label chooses anything
        return ImageSets([], [], None)
    check_shots(cfg.shots, data)
    train = in_classes(few_shot(data.train, cfg.shots, cfg.seed, data.num_classes), task.train)
    check_same_sample(ctx, train)
    val, source = validation(ctx, train)
    ctx.log.info(f"{data.name}: {task.train.num_classes} classes trained, few-shot train {len(train)} "
                 f"({cfg.shots} shots), val {len(val)} ({source if val else 'none'}), test {len(data.test)}")
    return ImageSets(train, val, source if val else None)


FROM_TRAIN = "train images outside the few-shot set"
FEWSHOT_VAL = "split, few-shot"   # CoOp's: min(shots, 4) images per class of the val split
COOP_VAL_MAX = 4


def validation(ctx: RunContext, train: list[Datum]) -> tuple[list[Datum], str | None]:
    """The validation images and where they come from (``val_source``): the val split of the
    trained classes (``split``; drawn from train outside the few-shot set where a dataset has
    none, ``val_per_class`` per class); CoOp's few-shot validation (``fewshot``: min(shots, 4)
    per class of the val split, or of train outside the few-shot set, drawn reproducibly from
    the seed); or none (the methods' validation-free rules, RAFT's fixed alpha)."""
    cfg, data, task = ctx.cfg, ctx.data, ctx.task
    if cfg.val_source == "none":
        return [], None
    val, taken = in_classes(data.val, task.train), {d.path for d in train}
    if cfg.val_source == "fewshot":
        per_class = min(cfg.shots, COOP_VAL_MAX)
        if val:
            return validation_from_train(val, per_class, cfg.seed, task.train.classnames, set(),
                                         "val images"), FEWSHOT_VAL
        return validation_from_train(in_classes(data.train, task.train), per_class, cfg.seed, task.train.classnames,
                                     taken), FROM_TRAIN
    if not val and cfg.val_per_class > 0:
        return validation_from_train(in_classes(data.train, task.train), cfg.val_per_class, cfg.seed,
                                     task.train.classnames, taken), FROM_TRAIN
    return val, "split" if val else None


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


def check_same_sample(ctx: RunContext, train: list[Datum]) -> None:
    """A run resumed or evaluated must have been trained on the images this version samples
    (the sample is part of what a run's settings determine). Runs of versions that visited
    the classes in label order differ where a split file's train list is not in label order."""
    cfg, data, plan = ctx.cfg, ctx.data, ctx.folder
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
