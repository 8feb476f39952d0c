"""What is cached: val/test trunk outputs under the evaluation transform (``eval_store``),
and augmented views of the training images (``view_store``: ``train_views`` and Tip-Adapter's
cache). Each store's key hashes everything that determines it (weights, images with sizes
and modification times, transform, views, seed, precision).
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from datasets.augment import CROP_RATIO, CROP_SCALE, prepare_batch
from datasets.base import Datum
from datasets.loader import eval_transform, make_loader
from run.distributed import WORLD
from utils import RaftError, amp_identity, autocast, sha256_text

from .decode import DECODE_MARGIN, decode_images
from .store import CACHE_VERSION, NO_MAPS, FeatureStore, build_store, cached_store, file_stamps

log = logging.getLogger("raft")

def live_batches(clip, items: list[Datum], transform, batch_size: int, num_workers: int,
                 device: torch.device, amp: bool, skipped: list[str] | None = None):
    """Decode, transform and run the trunk batch by batch (the uncached path).

    An unreadable image stops with its name, or, when ``skipped`` is a list (the
    ``bad_images: skip`` policy), is left out and recorded there. Under torchrun each
    process computes its share of every batch of ``batch_size`` × processes images, and
    yields one (possibly empty) batch per such batch, so that the processes' batches line up
    (``build_store`` puts the shares back in order)."""
    world = WORLD
    span = batch_size * world.size
    shares = [items[start:start + span][world.shard(len(items[start:start + span]))]
              for start in range(0, len(items), span)]
    mine = [d for share in shares for d in share]
    batches = iter(make_loader(mine, transform, batch_size, shuffle=False, num_workers=num_workers, device=device))
    for share in shares:
        images, labels, failures = next(batches) if share else (None, torch.zeros(0, dtype=torch.long), [])
        if failures:
            if skipped is None:
                raise RaftError(f"unreadable image {failures[0]} (set bad_images: skip to leave such "
                                f"val/test images out)")
            skipped.extend(failures)
            log.warning(f"warning: skipped unreadable image(s): {'; '.join(failures)}")
        if images is None:
            if not world.many:
                continue
            images = torch.zeros(0, 3, clip.image_size, clip.image_size)
        with autocast(device, amp):
            fmap, v0 = clip.encode_image(images.to(device, non_blocking=True))
        yield fmap, v0, labels.to(device, non_blocking=True)


def eval_store(clip, items: list[Datum], cache_dir: str | Path, name: str, batch_size: int,
               num_workers: int, device: torch.device, amp: bool, skip_bad: bool = False,
               keep_maps: bool = True) -> FeatureStore:
    """The store of ``items`` under the eval transform: reused when every input matches.
    ``skip_bad``: leave unreadable images out (listed in the store's ``skipped``) instead of failing.
    ``keep_maps=False``: CLIP's own feature ``v0`` only (what the baselines read)."""
    transform = eval_transform(clip.preprocess)
    # the batch size too: the trunk's kernels can round an image's features differently in
    # batches of other sizes (a batch of one takes another path on CPUs)
    key = sha256_text("eval-features", CACHE_VERSION, clip.backbone, clip.fingerprint(), repr(transform),
                      file_stamps(items), amp_identity(device, amp), skip_bad, batch_size,
                      *([] if keep_maps else ["v0 only"]))
    path = Path(cache_dir) / "features" / f"{name}_{clip.backbone}_{key[:20]}"

    def build() -> FeatureStore:
        start = time.perf_counter()
        store = build_store(path, {"key": key, "kind": "eval", "name": name, "images": len(items),
                                   "transform": repr(transform)}, len(items),
                            lambda skipped: live_batches(clip, items, transform, batch_size, num_workers, device,
                                                         amp, skipped if skip_bad else None),
                            clip, f"features: {name}", None if keep_maps else NO_MAPS)
        log.info(f"{name}: trunk features of {len(items)} images cached in {time.perf_counter() - start:.1f}s "
                 f"({path})")
        return store

    return cached_store(path, key, build, f"{name}: cached trunk features {path}")


def view_store(clip, items: list[Datum], views: int, seed: int, cache_dir: str | Path, name: str,
               device: torch.device, amp: bool, num_workers: int | str, batch_size: int,
               scale: tuple[float, float] = CROP_SCALE, keep_maps: bool | str = True) -> FeatureStore:
    """``views`` augmented views of every image through the frozen trunk, computed once and
    cached (rows: view 0 of every image, then view 1, ...). ``keep_maps=False`` keeps only
    CLIP's own feature ``v0`` (Tip-Adapter's views), not the trunk outputs; ``"pre"`` keeps, in
    the maps' place, what CLIP's last projection reads (ProLIP's features, float32)."""
    margin = math.sqrt(scale[0] * CROP_RATIO[0])   # the smallest crop's side over the image's shorter side
    parts = [views, seed, scale, CROP_RATIO, min(margin, DECODE_MARGIN), clip.image_size, amp_identity(device, amp),
             batch_size]
    key = sha256_text("train-views", CACHE_VERSION, clip.backbone, clip.fingerprint(), file_stamps(items),
                      *parts, *({True: [], False: ["v0 only"], "pre": ["before the last projection"]}[keep_maps]))
    kind = {True: "views", False: "v0views", "pre": "previews"}[keep_maps]
    path = Path(cache_dir) / "features" / f"{name}_{kind}{views}_{clip.backbone}_{key[:20]}"
    return cached_store(path, key, lambda: build_views(clip, items, views, seed, path, key, kind, device, amp,
                                                       num_workers, batch_size, scale, margin, keep_maps),
                        f"{views} augmented views: cached {path}")


def build_views(clip, items, views, seed, path, key, kind, device, amp, num_workers, batch_size, scale, margin,
                keep_maps) -> FeatureStore:
    start = time.perf_counter()
    images = decode_images(items, clip.image_size, num_workers, min(margin, DECODE_MARGIN))
    labels = torch.tensor([d.label for d in items])
    gen = torch.Generator().manual_seed(seed + 2_000_003)

    world = WORLD
    empty = torch.zeros(0, 3, clip.image_size, clip.image_size)

    def batches(skipped):
        starts = list(range(0, len(images), batch_size))
        for _ in range(views):  # each pass draws new crops from gen
            for first in range(0, len(starts), world.size):   # a round: chunk first + k goes to process k
                batch, rows = empty.to(device), slice(0)
                for rank, s in enumerate(starts[first:first + world.size]):   # every process draws every crop
                    mine = rank == world.rank
                    prepared = prepare_batch(images[s:s + batch_size], clip.preprocess, gen, device, scale=scale,
                                             keep=slice(None) if mine else slice(0))
                    if mine:
                        batch, rows = prepared.finish(device, amp), slice(s, s + batch_size)
                with autocast(device, amp):
                    fmap, v0 = clip.encode_image(batch)
                    if keep_maps == "pre":
                        fmap = clip.before_projection(fmap)
                yield fmap, v0, labels[rows]

    map_shape = (clip.last_layer()[0].shape[0],) if keep_maps == "pre" else None if keep_maps else NO_MAPS
    store = build_store(path, {"key": key, "kind": f"train-{kind}", "views": views, "images": len(items),
                               "crop_scale": list(scale)},
                        views * len(items), batches, clip, f"features: {views} views", map_shape,
                        float32=keep_maps == "pre")
    log.info(f"{views} augmented views of {len(items)} images computed in {time.perf_counter() - start:.1f}s ({path})")
    return store
