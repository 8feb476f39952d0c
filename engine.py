"""The engine shared by main.py and main_imagenet.py: train the region pool, evaluate, write results.

``run`` reads top to bottom: run folder -> few-shot set -> frozen CLIP -> text classifier ->
region pool -> training -> evaluation (alpha chosen on validation data) -> results.json.
"""
from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip.backbone import FrozenCLIP, calibrate_batchnorm, load_open_clip
from clip.region_pool import RegionAttentionPool
from clip.text import cached_text_matrix, class_sentences, load_descriptions
from datasets import DatasetSplits, Datum, few_shot, sample_per_class, save_list
from datasets.loader import eval_transform, make_loader
from features import LiveSource, ViewSource, eval_store, live_batches
from loss import cosine_logits, raft_loss
from utils import (Config, RaftError, autocast, resolve_device, set_seed, setup_logging, torch_load, torch_save,
                   write_json, write_yaml)

CHECKPOINT_FORMAT = 1


# --------------------------------------------------------------------------- schedule
def lr_at(step: int, total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> float:
    """Learning rate of iteration ``step`` (0-based): linear warm-up from 0 over ``warmup_steps``,
    then cosine decay from ``base_lr`` that reaches ``min_lr`` at ``step == total_steps``."""
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------- training
def adamw(params: list, cfg: Config) -> torch.optim.Optimizer:
    """AdamW (eps 1e-4 by default); the fused single-kernel update where this torch has it."""
    kwargs = dict(lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def train_pool(pool: RegionAttentionPool, text: torch.Tensor, source, cfg: Config, device: torch.device,
               log) -> dict:
    """AdamW over the region pool only, learning rate set per iteration (METHOD.md §6).

    ``source`` yields ``(feature map, v0, labels)`` batches for an epoch: computed on the fly
    (faithful mode) or read from cached views; the loop is the same.
    """
    use_amp = cfg.amp and device.type == "cuda"
    optimizer = adamw(list(pool.parameters()), cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    per_epoch = len(source)
    total, warmup = cfg.train_epoch * per_epoch, cfg.warmup_epoch * per_epoch
    step = 0
    history = []
    pool.train()
    for epoch in range(1, cfg.train_epoch + 1):
        sums = {"loss": 0.0, "cls": 0.0, "bg": 0.0, "l1": 0.0, "sep": 0.0}
        correct = seen = 0
        bar = tqdm(source.epoch(epoch), total=per_epoch, desc=f"epoch {epoch}/{cfg.train_epoch}", leave=False,
                   dynamic_ncols=True, disable=None)
        for fmap, v0, labels in bar:
            lr = lr_at(step, total, warmup, cfg.lr, cfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, use_amp):
                v_cls, v_bg = pool(fmap)
            loss, terms = raft_loss(v_cls, v_bg, v0, text, labels, tau1=cfg.tau1, tau2=cfg.tau2,
                                    lambda1=cfg.lambda1, lambda2=cfg.lambda2, scale=cfg.logit_scale)
            if not torch.isfinite(loss):
                raise RaftError(f"loss became {loss.item()} at epoch {epoch}, step {step} "
                                f"(terms: { {k: round(v.item(), 4) for k, v in terms.items()} }); "
                                f"try a lower lr or --amp false")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            n = labels.shape[0]
            sums["loss"] += loss.item() * n
            for k, v in terms.items():
                sums[k] += v.item() * n
            with torch.no_grad():
                correct += (cosine_logits(v_cls, text[:, :-1]).argmax(1) == labels).sum().item()
            seen += n
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
        row = {k: v / seen for k, v in sums.items()} | {"epoch": epoch, "train_acc": 100.0 * correct / seen, "lr": lr}
        history.append(row)
        log.info(f"epoch {epoch:3d}/{cfg.train_epoch}  loss {row['loss']:.4f} (cls {row['cls']:.3f} "
                 f"bg {row['bg']:.3f} l1 {row['l1']:.3f} sep {row['sep']:.3f})  "
                 f"train acc {row['train_acc']:.2f}%  lr {lr:.2e}")
    pool.eval()
    return {"history": history, "steps": step}


# --------------------------------------------------------------------------- evaluation
class SplitLogits(NamedTuple):
    cls: torch.Tensor      # N×C fine-tuned logits (class token)
    clip: torch.Tensor     # N×C zero-shot CLIP logits
    labels: torch.Tensor   # N
    bg_cos: float          # mean cos(v_cls, v_bg): how far the background token moved away

    def restrict(self, subset: list[int], num_classes: int) -> "SplitLogits":
        """Keep the columns of ``subset`` (200-class ImageNet variants) and relabel into it."""
        index = torch.tensor(subset)
        remap = torch.full((num_classes,), -1, dtype=torch.long)
        remap[index] = torch.arange(len(index))
        return SplitLogits(self.cls[:, index], self.clip[:, index], remap[self.labels], self.bg_cos)


@torch.no_grad()
def collect_logits(pool: RegionAttentionPool, text: torch.Tensor, batches, device: torch.device, amp: bool,
                   desc: str, scale: float = 100.0) -> SplitLogits:
    """Fine-tuned and zero-shot logits (on the CPU) and labels for a whole split, from
    ``(feature map, v0, labels)`` batches."""
    pool.eval()
    num_classes = text.shape[1] - 1
    cls_all, clip_all, labels_all, cos_sum = [], [], [], 0.0
    for fmap, v0, labels in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        with autocast(device, amp):
            v_cls, v_bg = pool(fmap)
        cls_all.append(cosine_logits(v_cls, text[:, :num_classes], scale).cpu())
        clip_all.append(cosine_logits(v0, text[:, :num_classes], scale).cpu())
        cos_sum += F.cosine_similarity(v_cls.float(), v_bg.float(), dim=-1).sum().item()
        labels_all.append(labels.cpu())
    labels = torch.cat(labels_all)
    return SplitLogits(torch.cat(cls_all), torch.cat(clip_all), labels, cos_sum / max(1, len(labels)))


def alpha_grid(low: float, high: float, steps: int) -> list[float]:
    return [low + i * (high - low) / steps for i in range(steps + 1)]


def accuracy_curve(cls_logits: torch.Tensor, clip_logits: torch.Tensor, labels: torch.Tensor,
                   alphas: list[float]) -> list[float]:
    """Top-1 accuracy (%) of ``alpha·cls + (1-alpha)·clip`` for each alpha."""
    out = []
    for a in alphas:
        pred = (a * cls_logits + (1 - a) * clip_logits).argmax(1)
        out.append(100.0 * (pred == labels).float().mean().item())
    return out


def choose_alpha(alphas: list[float], val_curve: list[float]) -> float:
    """The alpha with the best validation accuracy (the smallest one on ties)."""
    best = max(range(len(alphas)), key=lambda i: (val_curve[i], -i))
    return alphas[best]


def summarise(alphas: list[float], alpha: float, logits: SplitLogits) -> dict:
    """Test numbers at the given alpha, plus zero-shot, fine-tuned-only and the test oracle."""
    curve = accuracy_curve(logits.cls, logits.clip, logits.labels, alphas)
    at = accuracy_curve(logits.cls, logits.clip, logits.labels, [alpha, 0.0, 1.0])
    oracle_i = max(range(len(alphas)), key=lambda i: (curve[i], -i))
    return {
        "test_acc": at[0], "zero_shot_acc": at[1], "finetuned_acc": at[2],
        "oracle": {"alpha": alphas[oracle_i], "test_acc": curve[oracle_i],
                   "note": "alpha picked on test labels: an upper bound, never the reported result"},
        "cls_bg_cosine": logits.bg_cos, "curve": curve,
    }


def evaluate(val: SplitLogits | None, test: SplitLogits, cfg: Config,
             shifts: dict[str, SplitLogits] | None = None) -> dict:
    """Alpha from validation data (or the config's fixed alpha). Test labels only *report*
    accuracies; nothing reported as the result is picked with them."""
    alphas = alpha_grid(cfg.search_low, cfg.search_high, cfg.search_step)
    val_curve = accuracy_curve(val.cls, val.clip, val.labels, alphas) if val is not None else None
    if cfg.alpha is not None:
        alpha, source = cfg.alpha, "config"
    elif val_curve is not None:
        alpha, source = choose_alpha(alphas, val_curve), "val"
    else:
        raise RaftError("no validation data to choose alpha: set `alpha` or `val_per_class` > 0")
    out = {"alpha": alpha, "alpha_source": source}
    if val is not None:
        out["val_acc"] = accuracy_curve(val.cls, val.clip, val.labels, [alpha])[0]
    test_summary = summarise(alphas, alpha, test)
    out["alpha_curve"] = {"alphas": alphas, "val": val_curve, "test": test_summary.pop("curve")}
    out.update(test_summary)
    for name, logits in (shifts or {}).items():
        summary = summarise(alphas, alpha, logits)
        summary.pop("curve")
        out.setdefault("shift", {})[name] = summary | {"size": len(logits.labels)}
    return out


# --------------------------------------------------------------------------- checkpoints
# Settings that shape what a trained pool computes, or which images it was trained on:
# evaluation of a checkpoint takes them from the checkpoint, not from the command line.
TRAINING_KEYS = ("shots", "seed", "quick_gelu", "calibrate_bn", "mask_bg_in_cls", "renorm_bg_text",
                 "descriptions", "templates", "logit_scale")


def save_checkpoint(path: Path, pool: RegionAttentionPool, cfg: Config, num_classes: int) -> None:
    torch_save(path, {"format": CHECKPOINT_FORMAT, "pool": pool.state_dict(), "config": dict(cfg),
                      "backbone": cfg.backbone, "num_classes": num_classes})


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


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.output_dir) / cfg.dataset / run_name(cfg)


def build_text(clip: FrozenCLIP, data: DatasetSplits, cfg: Config, log) -> torch.Tensor:
    templates = cfg.templates or data.templates
    descriptions, source = None, None
    if cfg.descriptions == "auto":
        default = Path(__file__).resolve().parent / "gpt3_file" / f"{cfg.dataset}_prompt.json"
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
    return cached_text_matrix(clip, data.classnames, sentences, cfg.cache_dir, cfg.dataset, cfg.renorm_bg_text)


def check_images(items: list[Datum], what: str) -> None:
    missing = [d.path for d in items if not Path(d.path).is_file()]
    if missing:
        raise RaftError(f"{len(missing)} {what} image(s) missing, first: {missing[0]}")


def run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits) -> dict | None:
    """The whole protocol for one (dataset, backbone, shots, seed); returns the results dict."""
    ckpt = None
    if flags.eval_only:  # results go next to the checkpoint, under its training settings
        ckpt_path = Path(flags.checkpoint) if flags.checkpoint else run_dir_of(cfg) / "checkpoint.pt"
        ckpt = read_checkpoint(ckpt_path, cfg)
        run_dir, results_path = ckpt_path.parent, ckpt_path.parent / "results_eval.json"
        log = setup_logging(run_dir / "log.txt")
        cfg = adopt_training_settings(cfg, ckpt, log)
    else:
        run_dir = run_dir_of(cfg)
        ckpt_path, results_path = run_dir / "checkpoint.pt", run_dir / "results.json"
        if results_path.is_file() and not flags.force:
            print(f"{results_path} exists: run already finished (use --force to run it again)")
            return None
        log = setup_logging(run_dir / "log.txt")
    device = resolve_device(cfg.device)
    use_amp = cfg.amp and device.type == "cuda"
    log.info(f"run folder {run_dir}  device {device}{' (amp)' if use_amp else ''}  torch {torch.__version__}")
    if cfg.num_classes is not None and cfg.num_classes != data.num_classes:
        raise RaftError(f"config says num_classes={cfg.num_classes} but {cfg.dataset} at {cfg.data_path} "
                        f"has {data.num_classes} classes")

    # data: the few-shot training set, and a validation set drawn from train if there is none
    train_items = few_shot(data.train, cfg.shots, cfg.seed, data.num_classes)
    check_images(train_items, "few-shot training")
    val_items, val_source = data.val, "split"
    if not val_items and cfg.val_per_class > 0:
        taken = {d.path for d in train_items}
        val_items = sample_per_class(data.train, cfg.val_per_class, f"val:{cfg.seed}", data.num_classes, taken)
        val_source = "train images outside the few-shot set"
    log.info(f"{cfg.dataset}: {data.num_classes} classes, few-shot train {len(train_items)} "
             f"({cfg.shots} shots), val {len(val_items)} ({val_source if val_items else 'none'}), "
             f"test {len(data.test)}")

    # model: frozen CLIP, text classifier, region pool
    clip = FrozenCLIP(load_open_clip(cfg.backbone, cfg.weights, cfg.quick_gelu), cfg.backbone).to(device)
    size = clip.image_size

    if cfg.calibrate_bn:
        loader = make_loader(train_items, eval_transform(size), cfg.eval_batch_size, shuffle=False,
                             num_workers=cfg.num_workers, device=device)
        seen = calibrate_batchnorm(clip, (x.to(device) for x, _ in loader))
        log.info(f"BatchNorm statistics re-estimated on {seen} training images")
    text = build_text(clip, data, cfg, log).to(device)
    pool = RegionAttentionPool(clip.attnpool, cfg.mask_bg_in_cls).to(device)
    log.info(f"backbone {cfg.backbone} (weights {cfg.weights or 'random'}): feature map {clip.feature_channels}×"
             f"{clip.grid}×{clip.grid}, embedding {clip.embed_dim}, {pool.num_heads} heads, "
             f"{sum(p.numel() for p in pool.parameters()):,} trainable parameters")

    # train the region pool (or load it)
    train_seconds = None
    if ckpt is not None:
        load_pool_state(pool, ckpt, ckpt_path, data.num_classes)
        log.info(f"loaded region pool from {ckpt_path}")
    else:
        write_yaml(run_dir / "config.yaml", dict(cfg))
        save_list(run_dir / "fewshot.json", train_items, data.root, dataset=cfg.dataset, shots=cfg.shots,
                  seed=cfg.seed)
        if val_source != "split" and val_items:
            save_list(run_dir / "val_from_train.json", val_items, data.root, dataset=cfg.dataset, seed=cfg.seed)
        set_seed(cfg.seed)
        start = time.perf_counter()
        common = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device, amp=use_amp,
                      num_workers=cfg.num_workers)
        if cfg.train_views:
            source = ViewSource(clip, train_items, cfg.train_views, cache_dir=cfg.cache_dir,
                                name=f"{cfg.dataset}_train_{cfg.shots}shots_seed{cfg.seed}", **common)
        else:
            source = LiveSource(clip, train_items, **common)
        train_pool(pool, text, source, cfg, device, log)
        train_seconds = time.perf_counter() - start
        save_checkpoint(ckpt_path, pool, cfg, data.num_classes)
        log.info(f"trained in {train_seconds:.1f}s; checkpoint {ckpt_path}")

    # evaluate: logits once per split, then the alpha search is cheap
    start = time.perf_counter()

    def logits_of(items, split):
        if cfg.feature_cache:  # trunk features computed once per (weights, images, transform), then reused
            store = eval_store(clip, items, cfg.cache_dir, f"{cfg.dataset}_{split}", cfg.eval_batch_size,
                               cfg.num_workers, device, use_amp)
            batches = store.batches(cfg.eval_batch_size, device)
        else:
            batches = live_batches(clip, items, eval_transform(size), cfg.eval_batch_size, cfg.num_workers,
                                   device, use_amp)
        return collect_logits(pool, text, batches, device, use_amp, split, cfg.logit_scale)

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
        "dataset": cfg.dataset, "backbone": cfg.backbone, "weights": cfg.weights, "shots": cfg.shots,
        "seed": cfg.seed, "num_classes": data.num_classes,
        "sizes": {"train": len(train_items), "val": len(val_items), "test": len(data.test)},
        "val_source": val_source if val_items else None,
        **metrics,
        "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "checkpoint": str(ckpt_path), "device": str(device), "torch": torch.__version__,
        "host": platform.node(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results["alpha_curve"] = results.pop("alpha_curve")  # the long lists last, for readability
    write_json(results_path, results)
    log.info(f"zero-shot {results['zero_shot_acc']:.2f}%  fine-tuned only {results['finetuned_acc']:.2f}%  "
             f"RAFT {results['test_acc']:.2f}% at alpha={results['alpha']:.2f} ({results['alpha_source']})  "
             f"[oracle {results['oracle']['test_acc']:.2f}% at alpha={results['oracle']['alpha']:.2f}]  "
             f"cos(v_cls, v_bg) {results['cls_bg_cosine']:.4f}")
    for name, r in results.get("shift", {}).items():
        log.info(f"{name}: RAFT {r['test_acc']:.2f}%  zero-shot {r['zero_shot_acc']:.2f}%")
    log.info(f"results: {results_path}")
    results["run_dir"] = str(run_dir)
    return results
