"""The engine shared by main.py and main_imagenet.py: train the region pool, evaluate, write results.

``run`` reads top to bottom: run folder -> few-shot set -> frozen CLIP -> text classifier ->
region pool -> training -> evaluation (alpha chosen on validation data) -> results.json.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from clip.backbone import FrozenCLIP, batchnorm_statistics, calibrate_batchnorm, load_open_clip, restore_batchnorm
from clip.region_pool import RegionAttentionPool
from clip.text import cached_text_matrix, class_sentences, load_descriptions
from datasets import DatasetSplits, few_shot, sample_per_class, save_list
from datasets.loader import eval_transform, make_loader
from evaluation import collect_logits, evaluate
from features import LiveSource, ViewSource, eval_store, live_batches
from training import settings_differ, train_pool
from utils import (Config, RaftError, remove_temporaries, resolve_device, set_seed, setup_logging, torch_load,
                   torch_save, write_json, write_yaml)

CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- checkpoints
# Settings that shape what a trained pool computes, or which images it was trained on:
# evaluation of a checkpoint takes them from the checkpoint, not from the command line.
# val_per_class too: it decides the validation images (and so alpha) of a dataset without a val split.
TRAINING_KEYS = ("shots", "seed", "quick_gelu", "calibrate_bn", "mask_bg_in_cls", "renorm_bg_text",
                 "descriptions", "templates", "logit_scale", "val_per_class")


def save_checkpoint(path: Path, pool: RegionAttentionPool, cfg: Config, clip: FrozenCLIP, classnames: list[str],
                    text: torch.Tensor, train_seconds: float) -> None:
    """The region pool plus what using it needs without the dataset: the class names and the
    text classifier (predict.py, visualize.py), and a re-estimated trunk's BatchNorm statistics."""
    measured = batchnorm_statistics(clip) if cfg.calibrate_bn else {}
    torch_save(path, {"format": CHECKPOINT_FORMAT, "pool": pool.state_dict(), "config": dict(cfg),
                      "backbone": cfg.backbone, "num_classes": len(classnames), "classnames": list(classnames),
                      "text": text.detach().cpu(), "trunk_batchnorm": measured, "train_seconds": train_seconds})


def read_checkpoint(path: Path, cfg: Config) -> dict:
    """Load and check a checkpoint against this run's backbone (weights_only: no pickled code)."""
    ckpt = torch_load(path, "checkpoint")
    if not isinstance(ckpt, dict) or "pool" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise RaftError(f"{path} is not a RAFT checkpoint (no region-pool state)")
    if ckpt.get("backbone") != cfg.backbone:
        raise RaftError(f"checkpoint {path} was trained with backbone {ckpt.get('backbone')}, "
                        f"this run uses {cfg.backbone}")
    return ckpt


def load_pool_state(pool: RegionAttentionPool, ckpt: dict, path: Path, num_classes: int) -> None:
    if ckpt.get("num_classes") != num_classes:
        raise RaftError(f"checkpoint {path} was trained for {ckpt.get('num_classes')} classes, "
                        f"this dataset has {num_classes}")
    try:
        pool.load_state_dict(ckpt["pool"])
    except RuntimeError as exc:
        raise RaftError(f"checkpoint {path} does not fit this region pool: {str(exc).splitlines()[0]}") from None


def adopt_training_settings(cfg: Config, ckpt: dict, log) -> Config:
    trained = ckpt["config"]
    changed = {k: trained[k] for k in TRAINING_KEYS if k in trained and trained[k] != cfg[k]}
    if changed:
        log.info(f"evaluating with the checkpoint's training settings: {changed}")
    return Config(dict(cfg) | changed)


# --------------------------------------------------------------------------- the pipeline
def run_name(cfg: Config) -> str:
    views = f"_views{cfg.train_views}" if cfg.train_views else ""  # cached views: not the paper's protocol
    return f"{cfg.backbone}_{cfg.shots}shots_seed{cfg.seed}{views}"


def run_dir_of(cfg: Config, dataset: str) -> Path:
    return Path(cfg.output_dir) / dataset / run_name(cfg)


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
    return cached_text_matrix(clip, data.classnames, sentences, cfg.cache_dir, data.name, cfg.renorm_bg_text)


def run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits) -> dict | None:
    """The whole protocol for one (dataset, backbone, shots, seed); returns the results dict.

    Safe to kill at any moment: started again with the same command it resumes training
    from its last saved state (training.py), or evaluates the finished checkpoint."""
    ckpt = state_path = None
    if flags.eval_only:  # results go next to the checkpoint, under its training settings
        ckpt_path = Path(flags.checkpoint) if flags.checkpoint else run_dir_of(cfg, data.name) / "checkpoint.pt"
        ckpt = read_checkpoint(ckpt_path, cfg)
        run_dir, results_path = ckpt_path.parent, ckpt_path.parent / "results_eval.json"
        log = setup_logging(run_dir / "log.txt")
        cfg = adopt_training_settings(cfg, ckpt, log)
    else:
        run_dir = run_dir_of(cfg, data.name)
        ckpt_path, results_path, state_path = run_dir / "checkpoint.pt", run_dir / "results.json", run_dir / "resume.pt"
        if results_path.is_file() and not flags.force:
            print(f"{results_path} exists: run already finished (use --force to run it again)")
            return None
        log = setup_logging(run_dir / "log.txt")
        remove_temporaries(run_dir)  # left by a process killed while writing
        if flags.force:
            state_path.unlink(missing_ok=True)
            ckpt_path.unlink(missing_ok=True)
        elif ckpt_path.is_file():  # trained, but stopped before its results were written
            ckpt = read_checkpoint(ckpt_path, cfg)
            if settings_differ(ckpt["config"], cfg):
                raise RaftError(f"{ckpt_path} was trained with other settings; use --force to train again")
            log.info(f"training already finished ({ckpt_path}): evaluating")
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    log.info(f"run folder {run_dir}  device {device}{' (amp)' if use_amp else ''}  torch {torch.__version__}")
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise RaftError(f"config says num_classes={cfg.num_classes} but {data.name} at {cfg.data_path} "
                        f"has {data.num_classes} classes")

    # data: the few-shot training set, and a validation set drawn from train if there is none
    train_items = few_shot(data.train, cfg.shots, cfg.seed, data.num_classes)
    val_items, val_source = data.val, "split"
    if not val_items and cfg.val_per_class > 0:
        taken = {d.path for d in train_items}
        val_items = sample_per_class(data.train, cfg.val_per_class, f"val:{cfg.seed}", data.num_classes, taken)
        val_source = "train images outside the few-shot set"
    log.info(f"{data.name}: {data.num_classes} classes, few-shot train {len(train_items)} "
             f"({cfg.shots} shots), val {len(val_items)} ({val_source if val_items else 'none'}), "
             f"test {len(data.test)}")

    # model: frozen CLIP, text classifier, region pool
    clip = FrozenCLIP(load_open_clip(cfg.backbone, cfg.weights, cfg.quick_gelu), cfg.backbone).to(device)
    size = clip.image_size
    if ckpt is not None and ckpt.get("trunk_batchnorm"):  # measured in training: no need to read its images again
        restore_batchnorm(clip, ckpt["trunk_batchnorm"])
        log.info(f"BatchNorm statistics restored from {ckpt_path}")
    elif cfg.calibrate_bn:
        calibrate_on(clip, train_items, cfg, device, log)
    text = build_text(clip, data, cfg, log).to(device)
    pool = RegionAttentionPool(clip.attnpool, cfg.mask_bg_in_cls).to(device)
    log.info(f"backbone {cfg.backbone} (weights {cfg.weights or 'random'}): feature map {clip.feature_channels}×"
             f"{clip.grid}×{clip.grid}, embedding {clip.embed_dim}, {pool.num_heads} heads, "
             f"{sum(p.numel() for p in pool.parameters()):,} trainable parameters")

    # train the region pool (resuming if a state was saved), or load it
    if ckpt is not None:
        load_pool_state(pool, ckpt, ckpt_path, data.num_classes)
        train_seconds = None if flags.eval_only else ckpt.get("train_seconds")
        log.info(f"loaded region pool from {ckpt_path}")
    else:
        write_yaml(run_dir / "config.yaml", dict(cfg))
        save_list(run_dir / "fewshot.json", train_items, data.root, dataset=data.name, shots=cfg.shots,
                  seed=cfg.seed)
        if val_source != "split" and val_items:
            save_list(run_dir / "val_from_train.json", val_items, data.root, dataset=data.name, seed=cfg.seed)
        set_seed(cfg.seed)
        start = time.perf_counter()
        common = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device, amp=use_amp,
                      num_workers=cfg.num_workers)
        if cfg.train_views:  # decodes (and checks) the training images when the views are not cached
            source = ViewSource(clip, train_items, cfg.train_views, cache_dir=cfg.cache_dir,
                                name=f"{data.name}_train_{cfg.shots}shots_seed{cfg.seed}", **common)
        else:                # decodes every training image up front: a bad one stops the run here
            source = LiveSource(clip, train_items, **common)
        prepare_seconds = time.perf_counter() - start
        stats = train_pool(pool, text, source, cfg, device, log, state_path)
        train_seconds = prepare_seconds + stats["seconds"]
        save_checkpoint(ckpt_path, pool, cfg, clip, data.classnames, text, train_seconds)
        state_path.unlink(missing_ok=True)
        log.info(f"trained in {train_seconds:.1f}s; checkpoint {ckpt_path}")

    # evaluate: logits once per split, then the alpha search is cheap
    start = time.perf_counter()
    skipped: dict[str, list[str]] = {}

    def logits_of(items, split):
        skip = cfg.bad_images == "skip"
        if cfg.feature_cache:  # trunk features computed once per (weights, images, transform), then reused
            store = eval_store(clip, items, cfg.cache_dir, f"{data.name}_{split}", cfg.eval_batch_size,
                               cfg.num_workers, device, use_amp, skip_bad=skip)
            skipped[split] = store.skipped
            batches = store.batches(cfg.eval_batch_size, device)
        else:
            skipped[split] = []
            batches = live_batches(clip, items, eval_transform(size), cfg.eval_batch_size, cfg.num_workers,
                                   device, use_amp, skipped[split] if skip else None)
        logits = collect_logits(pool, text, batches, device, use_amp, split, cfg.logit_scale)
        if not len(logits.labels):
            raise RaftError(f"no readable {split} images")
        return logits

    val_logits = logits_of(val_items, "val") if val_items else None
    test_logits = logits_of(data.test, "test")
    shift_logits = {}
    for name, shift in data.shift_sets.items():
        logits = logits_of(shift.items, name)
        if shift.class_subset is not None:  # 200-class variants: restrict to their classes
            logits = logits.restrict(shift.class_subset, data.num_classes)
        shift_logits[name] = logits
    metrics = evaluate(val_logits, test_logits, cfg, shift_logits)
    eval_seconds = time.perf_counter() - start

    results = {
        "dataset": data.name, "backbone": cfg.backbone, "weights": cfg.weights, "shots": cfg.shots,
        "seed": cfg.seed, "num_classes": data.num_classes,
        "sizes": {"train": len(train_items), "val": len(val_logits.labels) if val_logits else 0,
                  "test": len(test_logits.labels)},
        "val_source": val_source if val_items else None,
        **({"split_file": str(data.split_file)} if data.split_file else {}),
        "skipped_images": {split: len(files) for split, files in skipped.items()},
        **metrics,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "checkpoint": str(ckpt_path), "device": str(device), "torch": torch.__version__,
        "host": platform.node(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if any(skipped.values()):
        results["skipped_files"] = {split: files for split, files in skipped.items() if files}
    results["alpha_curve"] = results.pop("alpha_curve")  # the long lists last, for readability
    write_json(results_path, results)
    log.info(f"zero-shot {results['zero_shot_acc']:.2f}%  fine-tuned only {results['finetuned_acc']:.2f}%  "
             f"RAFT {results['test_acc']:.2f}% at alpha={results['alpha']:.2f} ({results['alpha_source']})  "
             f"[oracle {results['oracle']['test_acc']:.2f}% at alpha={results['oracle']['alpha']:.2f}]  "
             f"cos(v_cls, v_bg) {results['cls_bg_cosine']:.4f}")
    for name, r in results.get("shift", {}).items():
        log.info(f"{name}: RAFT {r['test_acc']:.2f}%  zero-shot {r['zero_shot_acc']:.2f}%")
    if any(skipped.values()):
        log.warning(f"skipped unreadable images: { {k: len(v) for k, v in skipped.items() if v} }")
    log.info(f"results: {results_path}")
    results["run_dir"] = str(run_dir)
    print(f"\n{data.name} {cfg.backbone} {cfg.shots}-shot seed {cfg.seed}: zero-shot {results['zero_shot_acc']:.2f}% "
          f"-> RAFT {results['test_acc']:.2f}% (alpha {results['alpha']:.2f} from {results['alpha_source']}); "
          f"results in {results_path}")
    return results


def calibrate_on(clip: FrozenCLIP, items, cfg: Config, device: torch.device, log) -> None:
    """Measure the random trunk's BatchNorm statistics on the training images (eval transform)."""
    loader = make_loader(items, eval_transform(clip.image_size), cfg.eval_batch_size, shuffle=False,
                         num_workers=cfg.num_workers, device=device)

    def batches():
        for images, _, failures in loader:
            if failures:
                raise RaftError(f"unreadable training image {failures[0]}")
            yield images.to(device)

    log.info(f"BatchNorm statistics re-estimated on {calibrate_batchnorm(clip, batches())} training images")
