"""Evaluation (doc/method.md §7): logits of a split, the alpha search, the reported numbers."""
from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from clip.backbone import FrozenCLIP
from clip.published import Numerics
from datasets import DatasetSplits, Datum
from datasets.loader import eval_transform
from run.checkpoints import read_results
from run.config import Config
from run.context import Model, RunContext
from run.distributed import WORLD
from run.features import eval_store, live_batches
from run.methods import prompt_text
from run.task import in_classes
from utils import RaftError, autocast, harmonic_mean


class SplitLogits(NamedTuple):
    cls: torch.Tensor      # N×C fine-tuned logits (class token)
    clip: torch.Tensor     # N×C zero-shot CLIP logits
    labels: torch.Tensor   # N
    bg_cos: float          # mean cos(v_cls, v_bg): how far the background token moved away
    v0: torch.Tensor | None = None   # N×D CLIP's own features, L2-normalised (what the baselines read)

    def restrict(self, subset: list[int], num_classes: int) -> "SplitLogits":
        """Keep the columns of ``subset`` (200-class ImageNet variants) and relabel into it."""
        index = torch.tensor(subset)
        remap = torch.full((num_classes,), -1, dtype=torch.long)
        remap[index] = torch.arange(len(index))
        return self._replace(cls=self.cls[:, index], clip=self.clip[:, index], labels=remap[self.labels])


@torch.no_grad()
def collect_logits(pool: torch.nn.Module, text: torch.Tensor, batches, device: torch.device, amp: bool,
                   desc: str, numerics: Numerics, scale: float = 100.0) -> SplitLogits:
    """Fine-tuned and zero-shot logits (on the CPU) and labels for a whole split, from
    ``(feature map, v0, labels)`` batches, computed as the run's numerics computes them (the
    published float16 step: float16 logits, so the alpha blend and its argmax run in float16)."""
    pool.eval()
    num_classes = text.shape[1] - 1
    cls_all, clip_all, labels_all, v0_all = [], [], [], []
    cos_sum = torch.zeros((), dtype=torch.float64, device=device)
    for fmap, v0, labels in tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=None):
        with autocast(device, amp and numerics.amp):
            v_cls, v_bg = pool(fmap)
        clip_v0 = numerics.clip_feature(pool, fmap, v0)
        cls_all.append(numerics.logits(v_cls, text[:, :num_classes], scale).cpu())
        clip_all.append(numerics.logits(clip_v0, text[:, :num_classes], scale).cpu())
        v0_all.append(F.normalize(v0.float(), dim=-1).cpu())
        cos_sum += F.cosine_similarity(v_cls.float(), v_bg.float(), dim=-1).sum()
        labels_all.append(labels.cpu())
    labels = torch.cat(labels_all)
    return SplitLogits(torch.cat(cls_all), torch.cat(clip_all), labels, cos_sum.item() / max(1, len(labels)),
                       torch.cat(v0_all))


def alpha_grid(low: float, high: float, steps: int) -> list[float]:
    return [low + i * (high - low) / steps for i in range(steps + 1)]


def accuracy_curve(cls_logits: torch.Tensor, clip_logits: torch.Tensor, labels: torch.Tensor,
                   alphas: list[float], device: torch.device | None = None) -> list[float]:
    """Top-1 accuracy (%) of ``alpha·cls + (1-alpha)·clip`` for each alpha, on ``device`` (default:
    where the logits are), the blends written into two buffers allocated once (no allocation
    per alpha) and the counts read back once. The same products and sum as the expression."""
    device = device or cls_logits.device
    cls_logits, clip_logits, labels = cls_logits.to(device), clip_logits.to(device), labels.to(device)
    blend, other = torch.empty_like(cls_logits), torch.empty_like(clip_logits)
    counts = torch.empty(len(alphas), dtype=torch.long, device=device)
    for i, a in enumerate(alphas):
        torch.mul(cls_logits, a, out=blend)
        torch.mul(clip_logits, 1 - a, out=other)
        counts[i] = (blend.add_(other).argmax(1) == labels).sum()
    shares = (counts.float() / max(1, len(labels))).tolist()   # float32, as a mean of 0/1 values is
    return [100.0 * s for s in shares]


def choose_alpha(alphas: list[float], val_curve: list[float]) -> float:
    """The alpha with the best validation accuracy (the smallest one on ties)."""
    best = max(range(len(alphas)), key=lambda i: (val_curve[i], -i))
    return alphas[best]


def summarise(alphas: list[float], alpha: float, logits: SplitLogits, device: torch.device | None = None) -> dict:
    """Test numbers at the given alpha, plus zero-shot, fine-tuned-only and the test oracle."""
    curve = accuracy_curve(logits.cls, logits.clip, logits.labels, alphas, device)
    at = accuracy_curve(logits.cls, logits.clip, logits.labels, [alpha, 0.0, 1.0], device)
    oracle_i = max(range(len(alphas)), key=lambda i: (curve[i], -i))
    return {
        "test_acc": at[0], "zero_shot_acc": at[1], "finetuned_acc": at[2],
        "oracle": {"alpha": alphas[oracle_i], "test_acc": curve[oracle_i],
                   "note": "alpha picked on test labels: an upper bound, never the reported result"},
        "cls_bg_cosine": logits.bg_cos, "curve": curve,
    }


def evaluate(val: SplitLogits | None, test: SplitLogits, cfg: Config,
             shifts: dict[str, SplitLogits] | None = None, device: torch.device | None = None) -> dict:
    """Alpha from validation data (or the config's fixed alpha). Test labels only *report*
    accuracies; nothing reported as the result is picked with them."""
    alphas = alpha_grid(cfg.search_low, cfg.search_high, cfg.search_step)
    val_curve = accuracy_curve(val.cls, val.clip, val.labels, alphas, device) if val is not None else None
    if cfg.alpha is not None:
        alpha, source = cfg.alpha, "config"
    elif cfg.get("alpha_on") == "test":   # the published ImageNet protocol: an oracle, for comparison only
        alpha, source = choose_alpha(alphas, accuracy_curve(test.cls, test.clip, test.labels, alphas, device)), "test"
    elif val_curve is not None:
        alpha, source = choose_alpha(alphas, val_curve), "val"
    else:
        raise RaftError("no validation data to choose alpha: set `alpha` or `val_per_class` > 0")
    out = {"alpha": alpha, "alpha_source": source}
    if val is not None:
        out["val_acc"] = accuracy_curve(val.cls, val.clip, val.labels, [alpha], device)[0]
    test_summary = summarise(alphas, alpha, test, device)
    out["alpha_curve"] = {"alphas": alphas, "val": val_curve, "test": test_summary.pop("curve")}
    out.update(test_summary)
    for name, logits in (shifts or {}).items():
        summary = summarise(alphas, alpha, logits, device)
        summary.pop("curve")
        out.setdefault("shift", {})[name] = summary | {"size": len(logits.labels), "num_classes": logits.cls.shape[1]}
    return out


def evaluate_base2new(val: SplitLogits | None, base: SplitLogits, new: SplitLogits, cfg: Config,
                      num_classes: dict[str, int], device: torch.device | None = None) -> dict:
    """Base-to-new (doc/protocols.md): alpha from the base classes' validation data; the same
    pool and alpha scored on the base classes' test images and on the new classes', each with
    its own text matrix. The result is the harmonic mean of the two test accuracies."""
    out = evaluate(val, base, cfg, device=device)
    alphas, alpha = out["alpha_curve"]["alphas"], out["alpha"]
    parts = {"base": {k: out.pop(k) for k in ("test_acc", "zero_shot_acc", "finetuned_acc", "oracle",
                                                "cls_bg_cosine")}}
    curves = {"base": out["alpha_curve"].pop("test")}
    parts["new"] = summarise(alphas, alpha, new, device)
    curves["new"] = parts["new"].pop("curve")
    for name, logits in (("base", base), ("new", new)):
        parts[name] |= {"size": len(logits.labels), "num_classes": num_classes[name]}
    hm = harmonic_mean(parts["base"]["test_acc"], parts["new"]["test_acc"])
    curves["hm"] = [harmonic_mean(b, n) for b, n in zip(curves["base"], curves["new"])]
    oracle = max(range(len(alphas)), key=lambda i: (curves["hm"][i], -i))
    out.update({
        "test_acc": hm,
        "zero_shot_acc": harmonic_mean(parts["base"]["zero_shot_acc"], parts["new"]["zero_shot_acc"]),
        "finetuned_acc": harmonic_mean(parts["base"]["finetuned_acc"], parts["new"]["finetuned_acc"]),
        "oracle": {"alpha": alphas[oracle], "test_acc": curves["hm"][oracle],
                   "note": "alpha picked on test labels (by HM): an upper bound, never the reported result"},
        "cls_bg_cosine": parts["base"]["cls_bg_cosine"],
        "base2new": {"base": parts["base"], "new": parts["new"], "hm": hm},
    })
    out["alpha_curve"] |= curves
    return out


# --------------------------------------------------------------------------- a run's splits
class SplitFeatures:
    """The frozen trunk's outputs for a run's splits: from the cache when enabled (computed once
    for the whole split, then shared by every protocol, run and baseline), else computed on the
    fly; only the images of a class view's classes, their labels mapped to the view's."""

    def __init__(self, clip: FrozenCLIP, cfg: Config, data: DatasetSplits, device: torch.device, use_amp: bool,
                 numerics: Numerics):
        self.clip, self.cfg, self.data, self.device, self.amp = clip, cfg, data, device, use_amp
        self.numerics = numerics
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
        return live_batches(self.clip, in_classes(items, view), eval_transform(self.clip.preprocess),
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
                                self.numerics, self.cfg.logit_scale)
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


def source_alpha(ctx: RunContext) -> tuple[float, str]:
    """A transfer is scored at the alpha its source run chose on its own validation data
    (or at a fixed --alpha): nothing about the target's labels chooses anything."""
    if ctx.cfg.alpha is not None:
        return ctx.cfg.alpha, "config"
    source_results = ctx.folder.ckpt_path.parent / "results.json"
    if not source_results.is_file():
        raise RaftError(f"{source_results} is missing: the source run's alpha is unknown "
                        f"(finish that run first, or pass a fixed --alpha)")
    source = read_results(source_results)
    if source.get("alpha_source") == "test":
        raise RaftError(f"{source_results} chose its alpha on its own test labels (alpha_on: test): a transfer at that "
                        f"alpha would report a choice made with test labels; transfer a run with alpha_on: val")
    return float(source["alpha"]), f"the source run, {source_results}"


def evaluate_run(ctx: RunContext, model: Model) -> dict:
    """Logits once per split (trunk features of the whole split from the cache when enabled,
    shared by every protocol), then alpha from validation data and the scores. Without a pool
    (the methods alone): CLIP's own features of each split, for the methods to read."""
    cfg, data, task, images, device = ctx.cfg, ctx.data, ctx.task, ctx.images, ctx.device
    if cfg.method != "raft" and model.pool is not None:   # a method inside CLIP scores its own classifier
        return evaluate_method(ctx, model)
    start = time.perf_counter()
    splits = SplitFeatures(model.clip, cfg, data, device, ctx.amp, ctx.numerics)
    val_items = data.val if images.val_source == "split" else images.val
    sizes = {"train": len(images.train)}
    if model.pool is None:
        logits = {"val": splits.v0(val_items, "val", task.train) if images.val else None,
                  **{name: splits.v0(data.test, "test", view) for name, view in task.targets.items()}}
        sizes |= {"val": len(logits["val"].labels) if images.val else 0,
                  "test": sum(len(v.labels) for k, v in logits.items() if k != "val")}
        return {"sizes": sizes, "skipped": splits.skipped, "val_source": images.val_source, "logits": logits,
                "seconds": time.perf_counter() - start}

    def logits_of(items: list[Datum], split: str, view: DatasetSplits, text: torch.Tensor) -> SplitLogits:
        return splits.logits(model.pool, text, items, split, view)

    val = logits_of(val_items, "val", task.train, model.text) if images.val else None
    scored = {name: logits_of(data.test, "test", view, model.target_text[name])
              for name, view in task.targets.items()}
    shifts = {}
    for name, shift in data.shift_sets.items() if "test" in scored else ():
        logits = logits_of(shift.items, name, data, model.text)
        if shift.class_subset is not None:  # 200-class variants: restrict to their classes
            logits = logits.restrict(shift.class_subset, data.num_classes)
        shifts[name] = logits
    with ctx.clock.section("alpha search"):   # on the run's device
        if ctx.folder.transfer_from is not None:
            alpha, alpha_source = source_alpha(ctx)
            metrics = evaluate(None, scored["test"], Config(dict(cfg) | {"alpha": alpha}), shifts, device)
            metrics["alpha_source"] = alpha_source
        elif "test" in scored:
            metrics = evaluate(val, scored["test"], cfg, shifts, device)
        else:
            metrics = evaluate_base2new(val, scored["base"], scored["new"], cfg,
                                        {name: view.num_classes for name, view in task.targets.items()}, device)
    sizes |= {"val": len(val.labels) if val else 0, "test": sum(len(logits.labels) for logits in scored.values())}
    return {"metrics": metrics, "sizes": sizes, "skipped": splits.skipped, "val_source": images.val_source,
            "logits": {"val": val, **scored}, "seconds": time.perf_counter() - start}


def evaluate_method(ctx: RunContext, model: Model) -> dict:
    """A method's classifier on the val and test images' CLIP features (the cache's, as every
    feature-level method reads them): its accuracy, and zero-shot CLIP's on the same images."""
    cfg, data, task, images = ctx.cfg, ctx.data, ctx.task, ctx.images
    start = time.perf_counter()
    splits = SplitFeatures(model.clip, cfg, data, ctx.device, ctx.amp, ctx.numerics)
    val_items = data.val if images.val_source == "split" else images.val
    with torch.no_grad():
        learned = prompt_text(model, model.pool.eval())
    hand = model.text[:, :-1].float()

    def accuracy(features, labels, text) -> float:
        logits = cfg.logit_scale * features.to(ctx.device) @ text
        return 100.0 * (logits.argmax(1).cpu() == labels).float().mean().item()

    test = splits.v0(data.test, "test", task.targets["test"])
    metrics = {"test_acc": accuracy(test.v0, test.labels, learned), "zero_shot_acc": accuracy(test.v0, test.labels, hand)}
    sizes = {"train": len(images.train), "val": 0, "test": len(test.labels)}
    if images.val:
        val = splits.v0(val_items, "val", task.train)
        metrics["val_acc"] = accuracy(val.v0, val.labels, learned)
        sizes["val"] = len(val.labels)
    return {"metrics": metrics, "sizes": sizes, "skipped": splits.skipped, "val_source": images.val_source,
            "logits": {}, "seconds": time.perf_counter() - start}
