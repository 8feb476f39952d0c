"""Frozen-trunk outputs, computed as rarely as the method allows (doc/method.md §9).

The trunk is frozen, so its output for an (image, transform) pair never changes:
- evaluation: val/test feature maps and CLIP's pooled features are computed once per
  (weights, image list, transform) and stored memory-mapped on disk (``FeatureStore``);
- training, ``train_views: V``: V augmented views per training image are computed once and
  cycled through the epochs (``ViewSource``);
- training, faithful mode (default): a fresh augmentation of every image in every epoch, the
  trunk run on the fly, but each image decoded only once per run and augmented in batches on
  the device (``LiveSource``).
All three yield batches of ``(feature map, v0, labels)`` to the same training/eval loops.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.base import Datum
from datasets.loader import CLIP_MEAN, CLIP_STD, UnreadableImage, eval_transform, make_loader, read_rgb
from utils import RaftError, autocast, sha256_text

log = logging.getLogger("raft")

CACHE_VERSION = 1
CROP_SCALE = (0.8, 1.0)                  # RandomResizedCrop of doc/method.md §6
CROP_RATIO = (3 / 4, 4 / 3)
# The smallest crop side is sqrt(0.8 · 3/4) ≈ 0.775 of the image's shorter side: images kept
# with a shorter side of size / 0.77 are never upsampled by any crop, as with the original.
DECODE_MARGIN = 0.77


def file_stamps(items: list[Datum]) -> list:
    """(path, label, size, mtime) per image: any change to an image changes the cache key."""
    out = []
    for d in items:
        try:
            st = os.stat(d.path)
            out.append((d.path, d.label, st.st_size, st.st_mtime_ns))
        except FileNotFoundError:
            out.append((d.path, d.label, None, None))
    return out


# --------------------------------------------------------------------------- on-disk store
class FeatureStore:
    """Memory-mapped trunk outputs of a list of images.

    Folder layout: ``maps.npy`` (rows × E × H × W, float16 unless that overflows),
    ``pooled.npy`` (rows × D float32, CLIP's own pooled feature), ``labels.npy``, and
    ``manifest.json``, written last: a folder without a matching manifest is never read.
    """

    def __init__(self, path: Path):
        self.path = path
        self.manifest = json.loads((path / "manifest.json").read_text())
        rows = self.manifest["rows"]  # unreadable images skipped while building leave no row
        self.maps = np.load(path / "maps.npy", mmap_mode="r")[:rows]
        self.pooled = np.load(path / "pooled.npy", mmap_mode="r")[:rows]
        self.labels = torch.from_numpy(np.load(path / "labels.npy")[:rows])
        self.skipped: list[str] = self.manifest.get("skipped", [])

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def valid(path: Path, key: str) -> bool:
        try:
            manifest = json.loads((path / "manifest.json").read_text())
            if manifest.get("key") != key or manifest.get("version") != CACHE_VERSION:
                return False
            maps = np.load(path / "maps.npy", mmap_mode="r")
            pooled = np.load(path / "pooled.npy", mmap_mode="r")
            return (list(maps.shape) == manifest["maps_shape"] and list(pooled.shape) == manifest["pooled_shape"]
                    and 0 <= manifest["rows"] <= maps.shape[0])
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            return False

    def batches(self, batch_size: int, device: torch.device, order: torch.Tensor | None = None,
                offset: int = 0, count: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Rows ``offset + order`` (or all, in order) as float tensors on ``device``."""
        count = len(self) - offset if count is None else count
        index = torch.arange(count) if order is None else order
        for start in range(0, count, batch_size):
            rows = index[start:start + batch_size].numpy() + offset
            if order is None:  # contiguous slice: one read
                maps = self.maps[rows[0]:rows[-1] + 1]
                pooled = self.pooled[rows[0]:rows[-1] + 1]
            else:
                maps, pooled = self.maps[np.sort(rows)], self.pooled[np.sort(rows)]
                back = np.argsort(np.argsort(rows))  # restore the requested order
                maps, pooled = maps[back], pooled[back]
            # np.require copies read-only memory-mapped slices into ordinary (writable) arrays
            fmap = torch.from_numpy(np.require(maps, requirements=["C", "W"])).to(device, non_blocking=True).float()
            v0 = torch.from_numpy(np.require(pooled, requirements=["C", "W"])).to(device, non_blocking=True)
            yield fmap, v0, self.labels[torch.from_numpy(rows)].to(device, non_blocking=True)


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary folders of builds whose process is gone (killed mid-build) are garbage."""
    if os.name != "posix":  # os.kill(pid, 0) is only a liveness probe on POSIX
        return
    for tmp in folder.glob(".*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            if int(pid) == os.getpid():
                raise ProcessLookupError  # a leftover of this very process
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


def allocated_memmap(path: Path, dtype, shape: tuple) -> np.memmap:
    """A .npy memory map whose disk space is reserved up front: a full disk raises ENOSPC here
    instead of killing the process with SIGBUS when the pages are written later."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as fh:
            os.posix_fallocate(fh.fileno(), 0, os.path.getsize(path))
    return array


class StoreWriter:
    """Fills a new store folder in a temporary sibling, then renames it into place."""

    def __init__(self, final: Path, rows: int, map_shape: tuple, pooled_dim: int, dtype: np.dtype):
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent)
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.dtype = dtype
        self.rows = 0
        try:
            self.maps = allocated_memmap(self.tmp / "maps.npy", dtype, (rows, *map_shape))
            self.pooled = allocated_memmap(self.tmp / "pooled.npy", np.float32, (rows, pooled_dim))
        except BaseException:
            self.abort()
            raise
        self.labels = np.zeros(rows, dtype=np.int64)

    def write(self, fmap: torch.Tensor, v0: torch.Tensor, labels: torch.Tensor) -> bool:
        """Append a batch; False when float32 maps do not fit float16 storage (retry as float32)."""
        if fmap.dtype != torch.float32 and not torch.isfinite(fmap).all():
            # mixed precision: the trunk itself overflowed float16, storing float32 cannot help
            raise RaftError(f"the frozen trunk's features overflow float16 under mixed precision (amp): "
                            f"rerun with --amp false")
        with np.errstate(over="ignore"):  # overflow is detected just below
            maps = fmap.detach().to("cpu", torch.float32).numpy().astype(self.dtype)
        if not np.isfinite(maps).all():
            return False
        row, n = self.rows, len(maps)
        self.maps[row:row + n] = maps
        self.pooled[row:row + n] = v0.detach().to("cpu", torch.float32).numpy()
        self.labels[row:row + n] = labels.cpu().numpy()
        self.rows += n
        return True

    def commit(self, manifest: dict) -> FeatureStore:
        self.maps.flush()
        self.pooled.flush()
        np.save(self.tmp / "labels.npy", self.labels)
        manifest = {**manifest, "version": CACHE_VERSION, "rows": self.rows, "maps_shape": list(self.maps.shape),
                    "pooled_shape": list(self.pooled.shape), "maps_dtype": str(self.dtype),
                    "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        del self.maps, self.pooled  # close the memory maps before the rename
        (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if self.final.exists():  # stale or half-written leftover under the same name
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return FeatureStore(self.final)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_store(final: Path, manifest: dict, rows: int, batches, clip, desc: str) -> FeatureStore:
    """Run ``batches(skipped)`` (an iterable factory of (fmap, v0, labels) that appends the
    images it could not read to ``skipped``) into a store; float16 maps unless a value
    overflows float16, then float32."""
    map_shape = (clip.feature_channels, clip.grid, clip.grid)
    for dtype in (np.float16, np.float32):
        writer = StoreWriter(final, rows, map_shape, clip.embed_dim, np.dtype(dtype))
        try:
            fits, skipped = True, []
            for fmap, v0, labels in tqdm(batches(skipped), desc=desc, leave=False, dynamic_ncols=True,
                                         disable=None):
                if not writer.write(fmap, v0, labels):
                    fits = False
                    break
            if fits:
                return writer.commit({**manifest, "skipped": skipped})
            log.info(f"{desc}: feature maps overflow float16, storing float32")
        except BaseException:
            writer.abort()
            raise
        writer.abort()
    raise RaftError(f"{desc}: the trunk produced non-finite features")


def live_batches(clip, items: list[Datum], transform, batch_size: int, num_workers: int,
                 device: torch.device, amp: bool, skipped: list[str] | None = None):
    """Decode, transform and run the trunk batch by batch (the uncached path).

    An unreadable image stops with its name, or, when ``skipped`` is a list (the
    ``bad_images: skip`` policy), is left out and recorded there."""
    loader = make_loader(items, transform, batch_size, shuffle=False, num_workers=num_workers, device=device)
    for images, labels, failures in loader:
        if failures:
            if skipped is None:
                raise RaftError(f"unreadable image {failures[0]} (set bad_images: skip to leave such "
                                f"val/test images out)")
            skipped.extend(failures)
            log.warning(f"warning: skipped unreadable image(s): {'; '.join(failures)}")
        if images is None:
            continue
        with autocast(device, amp):
            fmap, v0 = clip.encode_image(images.to(device, non_blocking=True))
        yield fmap, v0, labels.to(device)


def eval_store(clip, items: list[Datum], cache_dir: str | Path, name: str, batch_size: int,
               num_workers: int, device: torch.device, amp: bool, skip_bad: bool = False) -> FeatureStore:
    """The store of ``items`` under the eval transform: reused when every input matches.
    ``skip_bad``: leave unreadable images out (listed in the store's ``skipped``) instead of failing."""
    transform = eval_transform(clip.image_size)
    key = sha256_text("eval-features", CACHE_VERSION, clip.backbone, clip.fingerprint(), repr(transform),
                      file_stamps(items), amp and device.type == "cuda", skip_bad)
    path = Path(cache_dir) / "features" / f"{name}_{clip.backbone}_{key[:20]}"
    if FeatureStore.valid(path, key):
        log.info(f"{name}: cached trunk features {path}")
        return FeatureStore(path)
    start = time.perf_counter()
    store = build_store(path, {"key": key, "kind": "eval", "name": name, "images": len(items),
                               "transform": repr(transform)}, len(items),
                        lambda skipped: live_batches(clip, items, transform, batch_size, num_workers, device, amp,
                                                     skipped if skip_bad else None),
                        clip, f"features: {name}")
    log.info(f"{name}: trunk features of {len(items)} images cached in {time.perf_counter() - start:.1f}s ({path})")
    return store


# --------------------------------------------------------------------------- faithful training
class DecodedImage(Dataset):
    """Decode once to RGB uint8 (an ``H×W×3`` numpy array), shorter side reduced to ``side`` when larger.

    Workers hand numpy arrays back pickled through their pipe, so the decoded images land in
    ordinary memory of the main process. (Tensors would travel as shared-memory segments,
    one open file descriptor each for as long as the image lives: 16-shot ImageNet would
    need 16,000 descriptors and a /dev/shm as large as the images.)"""

    def __init__(self, items: list[Datum], side: int):
        self.items, self.side = items, side

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            img = read_rgb(self.items[i].path)
        except UnreadableImage as exc:
            return str(exc)
        w, h = img.size
        if min(w, h) > self.side:
            scale = self.side / min(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        return np.array(img, dtype=np.uint8)


def as_list(batch: list) -> list:
    """Keep a batch as a list (images of different sizes); a module-level function, so
    worker processes started with 'spawn' (macOS, Windows) can unpickle it."""
    return batch


def decode_images(items: list[Datum], image_size: int, num_workers: int) -> list[torch.Tensor]:
    """Decode every training image once, up front: an unreadable one stops the run before
    training starts, naming the file(s)."""
    side = math.ceil(image_size / DECODE_MARGIN)
    loader = DataLoader(DecodedImage(items, side), batch_size=16, num_workers=num_workers, collate_fn=as_list)
    decoded = [img for batch in tqdm(loader, desc="decode", leave=False, disable=None) for img in batch]
    bad = [x for x in decoded if isinstance(x, str)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RaftError(f"unreadable training image {bad[0]}{more}")
    return [torch.from_numpy(img).permute(2, 0, 1) for img in decoded]


def crop_params(height: int, width: int, gen: torch.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's sampling (scale 0.8–1, ratio 3/4–4/3, 10 tries, else a centre crop)."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*CROP_SCALE, generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_lo, log_hi, generator=gen).item())
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, (1,), generator=gen).item()
            left = torch.randint(0, width - w + 1, (1,), generator=gen).item()
            return top, left, h, w
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment(images: list[torch.Tensor], size: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """doc/method.md §6's training transform on decoded images: random resized crop (bicubic,
    antialiased), horizontal flip, CLIP normalisation — on ``device``."""
    out = torch.empty(len(images), 3, size, size, device=device)
    flips = torch.rand(len(images), generator=gen) < 0.5
    for i, img in enumerate(images):
        top, left, h, w = crop_params(img.shape[1], img.shape[2], gen)
        crop = img[:, top:top + h, left:left + w].to(device, non_blocking=True).float().unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        out[i] = crop[0].flip(-1) if flips[i] else crop[0]
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1) * 255
    return (out.clamp_(0, 255) - mean) / std


class LiveSource:
    """Faithful training batches: a fresh augmentation of every image each epoch, trunk on the fly."""

    def __init__(self, clip, items: list[Datum], batch_size: int, seed: int, device: torch.device, amp: bool,
                 num_workers: int):
        self.clip, self.batch_size, self.device, self.amp = clip, batch_size, device, amp
        self.images = decode_images(items, clip.image_size, num_workers)
        self.labels = torch.tensor([d.label for d in items])
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 1_000_003)
        self.order: torch.Tensor | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def state_dict(self) -> dict:
        return {"order_gen": self.order_gen.get_state(), "aug_gen": self.aug_gen.get_state(), "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.aug_gen.set_state(state["aug_gen"])
        self.order = state["order"]

    def epoch(self, epoch: int, start: int = 0):
        """Batches of the epoch from batch ``start`` on (start > 0: resuming inside an epoch)."""
        if start == 0:
            self.order = torch.randperm(len(self.labels), generator=self.order_gen)
        order = self.order
        for first in range(start * self.batch_size, len(order), self.batch_size):
            idx = order[first:first + self.batch_size]
            images = augment([self.images[i] for i in idx], self.clip.image_size, self.aug_gen, self.device)
            with autocast(self.device, self.amp):
                fmap, v0 = self.clip.encode_image(images)
            yield fmap, v0, self.labels[idx].to(self.device)


class ViewSource:
    """Cached training batches: ``views`` augmented views per image computed once, epoch e
    uses view e mod views (Tip-Adapter-F's cached augmentation)."""

    def __init__(self, clip, items: list[Datum], views: int, batch_size: int, seed: int, cache_dir: str | Path,
                 name: str, device: torch.device, amp: bool, num_workers: int):
        self.batch_size, self.device, self.views, self.n = batch_size, device, views, len(items)
        key = sha256_text("train-views", CACHE_VERSION, clip.backbone, clip.fingerprint(), file_stamps(items),
                          views, seed, CROP_SCALE, CROP_RATIO, DECODE_MARGIN, clip.image_size,
                          amp and device.type == "cuda")
        path = Path(cache_dir) / "features" / f"{name}_views{views}_{clip.backbone}_{key[:20]}"
        if FeatureStore.valid(path, key):
            log.info(f"training views: cached {path}")
            self.store = FeatureStore(path)
        else:
            start = time.perf_counter()
            images = decode_images(items, clip.image_size, num_workers)
            labels = torch.tensor([d.label for d in items])
            gen = torch.Generator().manual_seed(seed + 2_000_003)

            def batches(skipped):
                for _ in range(views):  # each pass draws new crops from gen
                    for s in range(0, len(images), batch_size):
                        batch = augment(images[s:s + batch_size], clip.image_size, gen, device)
                        with autocast(device, amp):
                            fmap, v0 = clip.encode_image(batch)
                        yield fmap, v0, labels[s:s + batch_size]

            self.store = build_store(path, {"key": key, "kind": "train-views", "views": views, "images": len(items)},
                                     views * len(items), batches, clip, f"features: {views} views")
            log.info(f"training views: {views}×{len(items)} computed in {time.perf_counter() - start:.1f}s ({path})")
        self.order_gen = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def state_dict(self) -> dict:
        return {"order_gen": self.order_gen.get_state(), "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.order = state["order"]

    def epoch(self, epoch: int, start: int = 0):
        if start == 0:
            self.order = torch.randperm(self.n, generator=self.order_gen)
        view = (epoch - 1) % self.views
        rest = self.order[start * self.batch_size:]
        yield from self.store.batches(self.batch_size, self.device, rest, offset=view * self.n, count=len(rest))
