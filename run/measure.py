"""The baselines measured on a run's own ground (doc/baselines.md): its few-shot images, CLIP's
features of its val and test images (already computed for RAFT's evaluation), its text
matrix, hyper-parameters chosen on its validation data.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from baselines import METHODS, BaselineData, run_baselines
from baselines.base import VIEW_SETS
from run.context import Model, RunContext
from run.distributed import WORLD
from run.evaluation import SplitFeatures
from run.features import eval_store, view_store
from utils import RaftError, read_bounded, write_json

def few_shot_features(ctx: RunContext, model: Model, needs: set[str]) -> dict:
    """What the requested methods read of the few-shot images, each computed once, cached and
    shared by every run and method of the same images: ``train`` (CLIP's ``v0`` under the
    evaluation transform, N×D, L2-normalised), ``raw`` (each view set's ``v0``, V×N×D, as the
    trunk gives it) and ``pre`` (the Tip views before CLIP's last projection, V×N×W)."""
    cfg, images, device, clip = ctx.cfg, ctx.images, ctx.device, model.clip
    pooled = lambda store: torch.from_numpy(np.array(store.pooled, dtype=np.float32)).to(device)  # noqa: E731
    out = {"raw": {}}
    if "train" in needs:
        # v0 only (N×D, small): stored like the views below whatever feature_cache says, which
        # also puts torchrun's shares back in the images' order
        store = eval_store(clip, images.train, cfg.cache_dir, f"{ctx.data.name}_train", cfg.eval_batch_size,
                           cfg.num_workers, device, ctx.amp, keep_maps=False)
        out["train"] = F.normalize(pooled(store), dim=-1)
    if "pre" in needs:
        out["pre"] = last_layer_features(ctx, model)
        if "store" in out["pre"]:   # the same crops as the Tip set's: its v0 serve the Tip methods
            out["raw"]["tip"] = pooled(out["pre"].pop("store")).view(VIEW_SETS["tip"].count, len(images.train), -1)
    for name in sorted(need.split(":", 1)[1] for need in needs if need.startswith("views:")):
        if name in out["raw"]:
            continue
        views = VIEW_SETS[name]
        store = view_store(clip, images.train, views.count, cfg.seed, cfg.cache_dir, ctx.train_cache_name(), device,
                           ctx.amp, cfg.num_workers, cfg.eval_batch_size, scale=views.scale, keep_maps=False)
        out["raw"][name] = pooled(store).view(views.count, len(images.train), -1)
    return out


def last_layer_features(ctx: RunContext, model: Model) -> dict:
    """ProLIP's ground: the Tip views of the few-shot images before CLIP's last projection
    (cached), that projection, and (filled in per split by ``measure_baselines``) the val and test
    images' features before it; or why the backbone has no such projection."""
    cfg, clip, device = ctx.cfg, model.clip, ctx.device
    try:
        weight, bias = clip.last_layer()
    except RaftError as exc:
        return {"refused": str(exc)}
    views = VIEW_SETS["tip"]
    store = view_store(clip, ctx.images.train, views.count, cfg.seed, cfg.cache_dir, ctx.train_cache_name(), device,
                       ctx.amp, cfg.num_workers, cfg.eval_batch_size, scale=views.scale, keep_maps="pre")
    before = torch.from_numpy(np.array(store.maps, dtype=np.float32)).to(device)
    return {"views": before.view(views.count, len(ctx.images.train), -1), "weight": weight.to(device),
            "bias": None if bias is None else bias.to(device), "store": store}


def split_before_projection(ctx: RunContext, model: Model, items, split: str, view) -> torch.Tensor:
    """A split's features before CLIP's last projection, in the order of its evaluation logits:
    from its cached trunk outputs when there are some (a pass over the trunk otherwise)."""
    splits = SplitFeatures(model.clip, ctx.cfg, ctx.data, ctx.device, ctx.amp, ctx.numerics)
    parts = [model.clip.before_projection(fmap).float() for fmap, _, _ in splits.batches(items, split, view)]
    width = model.clip.last_layer()[0].shape[0]
    return WORLD.gather(torch.cat(parts) if parts else torch.zeros(0, width, device=ctx.device))


class ResultStore:
    """Each method's result on one ground, kept for the runs that share it (a sweep over RAFT's
    own settings: lr, lambdas, epochs change nothing any method reads). The key hashes what the
    method reads -- every tensor of its ground and of the scored splits, the dataset, shots,
    seed, logit scale -- and its code (the source of its module and of baselines/base.py): a
    result is reused only when the method would compute it again bit for bit. One JSON file
    per method and ground, written atomically; a damaged file is computed again."""

    def __init__(self, cache_dir: str | Path, data: BaselineData, targets: dict, writes: bool):
        digest = hashlib.sha256()
        for name, tensor in sorted(ground_tensors(data, targets).items()):
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
        digest.update(json.dumps([data.dataset, data.shots, data.seed, data.scale]).encode())
        self.ground = digest.hexdigest()
        self.folder, self.writes = Path(cache_dir) / "baselines", writes

    def path(self, name: str) -> Path:
        module = inspect.getmodule(METHODS[name])
        code = hashlib.sha256(Path(inspect.getsourcefile(module)).read_bytes()
                              + Path(inspect.getsourcefile(BaselineData)).read_bytes()).hexdigest()
        return self.folder / f"{name}_{hashlib.sha256((self.ground + code).encode()).hexdigest()[:24]}.json"

    def get(self, name: str) -> dict | None:
        path = self.path(name)
        try:
            result = json.loads(read_bounded(path, "baseline result", 1 << 20))
        except (OSError, ValueError, RaftError):
            return None
        if not isinstance(result, dict) or not ("test_acc" in result or "skipped" in result):
            return None
        return result | {"reused": str(path)}

    def put(self, name: str, result: dict) -> None:
        if self.writes and "failed" not in result:   # a failure is tried again next time
            write_json(self.path(name), result)


def ground_tensors(data: BaselineData, targets: dict) -> dict[str, torch.Tensor]:
    tensors = {"text": data.text, "train_labels": data.train_labels}
    for name in ("train", "views", "val", "val_labels"):
        if getattr(data, name) is not None:
            tensors[name] = getattr(data, name)
    tensors |= {f"raw.{k}": v for k, v in data.raw.items()}
    tensors |= {f"pre.{k}": v for k, v in data.pre.items() if isinstance(v, torch.Tensor)}
    for target, (features, labels, text) in targets.items():
        tensors |= {f"{target}.features": features, f"{target}.labels": labels}
        if text is not None:
            tensors[f"{target}.text"] = text
    return tensors


def measure_baselines(ctx: RunContext, model: Model, evaluation: dict) -> dict | None:
    """The methods of ``cfg.baselines`` on this run's own ground: its few-shot images, CLIP's
    features of its val and test images (already computed for RAFT's evaluation), its text
    matrix, alpha-free selection on its validation data. Only the few-shot images' features
    are new, and only those the requested methods read."""
    cfg, device = ctx.cfg, ctx.device
    if not cfg.baselines or ctx.folder.transfer_from is not None or not ctx.images.train or cfg.method != "raft":
        return None   # (a method inside CLIP is one of the compared methods: its RAFT run measures the others)
    start = time.perf_counter()
    needs = {need for name in cfg.baselines for need in METHODS[name].needs}
    with ctx.clock.section("baseline features"):   # only what the requested methods read
        few = few_shot_features(ctx, model, needs)
    logits = evaluation["logits"]
    val = logits["val"]
    tip_raw = few["raw"].get("tip")
    data = BaselineData(model.text[:, :-1].float(), few.get("train"),
                        torch.tensor([d.label for d in ctx.images.train], device=device),
                        None if tip_raw is None else F.normalize(tip_raw, dim=-1),
                        None if val is None else val.v0.to(device), None if val is None else val.labels.to(device),
                        cfg.logit_scale, cfg.seed, raw=few["raw"], dataset=ctx.data.name, shots=cfg.shots,
                        pre=few.get("pre", {}))
    if "test" in logits:
        targets = {"test_acc": (logits["test"].v0.to(device), logits["test"].labels.to(device), None)}
    else:  # base-to-new: the trained methods know the base classes only; zero-shot CLIP scores both
        targets = {"base_acc": (logits["base"].v0.to(device), logits["base"].labels.to(device), None),
                   "new_acc": (logits["new"].v0.to(device), logits["new"].labels.to(device),
                               model.target_text["new"][:, :-1].float())}
    if "pre" in needs and "refused" not in data.pre:
        with ctx.clock.section("baseline features before the last projection"):
            task, images = ctx.task, ctx.images
            scored = {"val": (ctx.data.val if images.val_source == "split" else images.val, "val", task.train)}
            scored |= {"test_acc" if name == "test" else f"{name}_acc": (ctx.data.test, "test", view)
                       for name, view in task.targets.items() if name != "new"}
            for target, (items, split, view) in scored.items():
                if target != "val" or val is not None:
                    data.pre[target] = split_before_projection(ctx, model, items, split, view)
    features_seconds = time.perf_counter() - start
    reuse = ResultStore(cfg.cache_dir, data, targets, WORLD.main)
    measured = run_baselines(cfg.baselines, data, targets, ctx.log, ctx.clock, reuse)
    return {"methods": measured, "seconds": {"features": features_seconds, "total": time.perf_counter() - start}}
