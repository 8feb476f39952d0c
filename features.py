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
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.base import Datum
from datasets.augment import CROP_RATIO, CROP_SCALE, augment, crop_params, prepare_batch  # noqa: F401 (re-exported)
from datasets.loader import UnreadableImage, eval_transform, make_loader, read_rgb
from utils import WORLD, RaftError, World, autocast, background, resolve_workers, sha256_text


log = logging.getLogger("raft")

CACHE_VERSION = 1
NO_MAPS = (0,)   # the map shape of a store that keeps CLIP's own feature v0 alone (what the baselines read)
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
        """Rows ``offset + order`` (or all, in order) as float tensors on ``device``, ``batch_size`` at a time."""
        if count is None:
            count = len(self) - offset if order is None else len(order)
        index = torch.arange(count) if order is None else order
        groups = [index[start:start + batch_size] for start in range(0, count, batch_size)]
        return self.read_groups(groups, device, offset, contiguous=order is None)

    def read_groups(self, groups: list[torch.Tensor], device: torch.device, offset: int = 0,
                    contiguous: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One batch per group of rows (a group may be empty: a torchrun process's share of a
        small last batch). A background thread reads the next batches from the memory maps
        (into pinned memory for a GPU) while the current one is used."""
        pin = device.type == "cuda"

        def read():
            for group in groups:
                rows = group.numpy() + offset
                yield (self._rows(self.maps, rows, contiguous, pin), self._rows(self.pooled, rows, contiguous, pin),
                       self.labels[torch.from_numpy(rows)])

        feed = iter(background(read(), depth=2))
        try:
            for fmap, v0, labels in feed:
                yield (fmap.to(device, non_blocking=True).float(), v0.to(device, non_blocking=True),
                       labels.to(device, non_blocking=True))
        finally:
            feed.close()

    @staticmethod
    def _rows(array: np.ndarray, rows: np.ndarray, contiguous: bool, pin: bool) -> torch.Tensor:
        """``array[rows]`` as a (pinned) tensor: one slice read when the rows are consecutive,
        else the rows in ascending order (kinder to the disk), put back in the asked order."""
        dtype = torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype
        out = torch.empty((len(rows), *array.shape[1:]), dtype=dtype, pin_memory=pin)
        if not len(rows):
            return out
        if contiguous:
            out.numpy()[:] = array[rows[0]:rows[-1] + 1]
        else:
            ascending = np.argsort(rows)
            out.numpy()[ascending] = array[rows[ascending]]
        return out


@contextmanager
def cache_lock(path: Path):
    """Hold an advisory lock of the OS (``<cache>/locks/<store>.lock``) while a cache is checked
    and built: a second process building the same cache at once waits, then finds it built.
    Without fcntl (Windows) there is no lock; the build is still atomic (a temporary folder
    renamed into place). The lock files stay: removing one while a process waits on it would
    let a third one take a new lock beside it."""
    locks = path.parent.parent / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(locks / f"{path.name}.lock", "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def cached_store(path: Path, key: str, build, found: str) -> FeatureStore:
    """The store at ``path`` if it holds ``key`` (logging ``found``), else ``build()``'s, under
    ``cache_lock``. The decision is rank 0's, for every process of a torchrun run (they build
    it together)."""
    world = WORLD
    with cache_lock(path) if world.main else nullcontext():
        if world.any(world.main and FeatureStore.valid(path, key)):
            log.info(found)
            return FeatureStore(path)
        return build()


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


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy, made asynchronously into pinned memory when ``tensor`` is on a GPU."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.device.type == "cuda")
    return host.copy_(tensor, non_blocking=True)


class StoreWriter:
    """Fills a new store folder in a temporary sibling, then renames it into place.

    ``write`` does the device's part at once — the float16 conversion, the finiteness check
    (kept on the device: no sync per batch), an asynchronous copy to pinned host memory — and
    leaves the write into the memory maps to a background thread, so that the device computes
    the next batch meanwhile."""

    def __init__(self, final: Path, rows: int, map_shape: tuple, pooled_dim: int, dtype: np.dtype):
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent)
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.dtype = dtype
        self.torch_dtype = torch.float16 if dtype == np.float16 else torch.float32
        self.rows = 0
        self.finite: torch.Tensor | None = None   # on the device: every value so far fits the dtype
        self.from_half = False                     # the trunk itself returned float16 (mixed precision)
        self.pending: list[Future] = []
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        try:
            self.maps = allocated_memmap(self.tmp / "maps.npy", dtype, (rows, *map_shape))
            self.pooled = allocated_memmap(self.tmp / "pooled.npy", np.float32, (rows, pooled_dim))
        except BaseException:
            self.abort()
            raise
        self.labels = np.zeros(rows, dtype=np.int64)

    def write(self, fmap: torch.Tensor, v0: torch.Tensor, labels: torch.Tensor) -> None:
        """Append a batch (see the class)."""
        maps = fmap.detach().to(self.torch_dtype)
        fits = torch.isfinite(maps).all()
        self.finite = fits if self.finite is None else self.finite & fits
        self.from_half |= fmap.dtype != torch.float32
        host = (to_host(maps), to_host(v0.detach().float()), to_host(labels))
        ready = None
        if fmap.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        row, self.rows = self.rows, self.rows + len(maps)
        while len(self.pending) >= 2:  # at most two batches in flight: bounded pinned memory
            self.pending.pop(0).result()
        self.pending.append(self.pool.submit(self._store, row, host, ready))

    def _store(self, row: int, host: tuple, ready) -> None:
        if ready is not None:
            ready.synchronize()
        maps, v0, labels = (t.numpy() for t in host)
        n = len(maps)
        self.maps[row:row + n] = maps
        self.pooled[row:row + n] = v0
        self.labels[row:row + n] = labels

    def finish(self) -> bool:
        """Wait for the writes; False when float32 maps did not fit float16 (store float32 instead)."""
        for future in self.pending:
            future.result()
        self.pending = []
        if self.finite is None or bool(self.finite):
            return True
        if self.from_half:  # mixed precision: the trunk itself overflowed float16, float32 storage cannot help
            raise RaftError("the frozen trunk's features overflow float16 under mixed precision (amp): "
                            "rerun with --amp false")
        return False

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
        self.pool.shutdown()
        return FeatureStore(self.final)

    def abort(self) -> None:
        for future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def build_store(final: Path, manifest: dict, rows: int, batches, clip, desc: str,
                map_shape: tuple | None = None) -> FeatureStore:
    """Run ``batches(skipped)`` (an iterable factory of (fmap, v0, labels) that appends the
    images it could not read to ``skipped``) into a store; float16 maps unless a value
    overflows float16, then float32. ``map_shape``: one row's trunk output (default: the model's).
    Under torchrun every process computes its share of each batch; rank 0 gathers the shares
    in order and alone writes, the others open the store once it is in place."""
    world = WORLD
    map_shape = tuple(clip.feature_shape) if map_shape is None else map_shape
    for dtype in (np.float16, np.float32):
        writer = StoreWriter(final, rows, map_shape, clip.embed_dim, np.dtype(dtype)) if world.main else None
        try:
            skipped = []
            for fmap, v0, labels in tqdm(batches(skipped), desc=desc, leave=False, dynamic_ncols=True,
                                         disable=None if world.main else True):
                if map_shape == NO_MAPS:  # a store of v0 alone: the maps are neither gathered nor written
                    fmap = fmap.new_zeros(len(fmap), 0)
                if world.many:
                    fmap, v0, labels = world.gather(fmap), world.gather(v0), world.gather(labels)
                if writer is not None:
                    writer.write(fmap, v0, labels)
            fits = not world.any(writer is not None and not writer.finish())
            skipped = [path for part in world.gather_objects(skipped) for path in part]
            if fits:
                store = writer.commit({**manifest, "skipped": skipped, "family": clip.family}) if writer else None
                world.barrier()
                return store or FeatureStore(final)
            log.info(f"{desc}: trunk features overflow float16, storing float32")
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            writer.abort()
    raise RaftError(f"{desc}: the trunk produced non-finite features")


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
    transform = eval_transform(clip.image_size)
    key = sha256_text("eval-features", CACHE_VERSION, clip.backbone, clip.fingerprint(), repr(transform),
                      file_stamps(items), amp and device.type == "cuda", skip_bad, *([] if keep_maps else ["v0 only"]))
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


def decode_images(items: list[Datum], image_size: int, num_workers: int | str,
                  margin: float = DECODE_MARGIN) -> list[torch.Tensor]:
    """Decode every training image once, up front: an unreadable one stops the run before
    training starts, naming the file(s). ``margin``: the smallest crop side over the shorter
    side that the augmentation draws (no crop is then upsampled from the reduced image)."""
    side = math.ceil(image_size / margin)
    workers = resolve_workers(num_workers, len(items))
    loader = DataLoader(DecodedImage(items, side), batch_size=16, num_workers=workers, collate_fn=as_list)
    decoded = [img for batch in tqdm(loader, desc="decode", leave=False, disable=None) for img in batch]
    bad = [x for x in decoded if isinstance(x, str)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RaftError(f"unreadable training image {bad[0]}{more}")
    return [torch.from_numpy(img).permute(2, 0, 1) for img in decoded]


def encode_share(clip, images: torch.Tensor, whole: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The trunk on a torchrun process's share of a global batch of ``whole`` images. A share
    of one image out of more runs as two (the image twice, one row kept): CPU kernels take
    another path for a batch of one (oneDNN's), whose last bits differ from the same image's
    inside a larger batch, which is what one process computes (doc/distributed.md)."""
    if images.shape[0] == 1 and whole > 1:
        fmap, v0 = clip.encode_image(images.expand(2, *images.shape[1:]))
        return fmap[:1], v0[:1]
    return clip.encode_image(images)


@torch.no_grad()
def share_rounding(clip, batch_sizes: list[int], size: int, device: torch.device, amp: bool) -> dict:
    """Whether the trunk gives an image the same bits inside a torchrun process's share as
    inside the whole global batch (what one process computes), for the global batch sizes of
    a run and ``size`` processes: ``dist_exact`` is exact exactly when it does. Probed on
    seeded random images; kernels choose their algorithm by shape, not by pixel values."""
    gen = torch.Generator().manual_seed(0)
    worst, shares = 0.0, set()
    for whole in sorted(set(batch_sizes)):
        images = torch.randn(whole, 3, clip.image_size, clip.image_size, generator=gen).to(device)
        with autocast(device, amp):
            reference, _ = clip.encode_image(images)
            for rank in range(size):
                part = World(rank, size).shard(whole)
                if part.stop > part.start:
                    shares.add(part.stop - part.start)
                    fmap, _ = encode_share(clip, images[part], whole)
                    worst = max(worst, (fmap.float() - reference[part].float()).abs().max().item())
    return {"share_sizes": sorted(shares), "global_batches": sorted(set(batch_sizes)), "max_difference": worst,
            "exact": worst == 0.0}


class LiveSource:
    """Faithful training batches: a fresh augmentation of every image each epoch, trunk on the fly.

    The host's part of a batch (drawing its crops, gathering them into pinned memory) runs in a
    background thread one or two batches ahead, while the device trains on the current one;
    the device's part (resizing, the trunk) stays in the training thread. The augmentation
    generator's state is recorded after each batch, so a resumed run draws what an
    uninterrupted one would although the thread had drawn ahead."""

    def __init__(self, clip, items: list[Datum], batch_size: int, seed: int, device: torch.device, amp: bool,
                 num_workers: int | str):
        self.clip, self.batch_size, self.device, self.amp = clip, batch_size, device, amp
        self.images = decode_images(items, clip.image_size, num_workers)
        self.labels = torch.tensor([d.label for d in items])
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 1_000_003)
        self.aug_state: torch.Tensor | None = None   # the generator after the last batch handed out
        self.order: torch.Tensor | None = None

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def batch_images(self, position: int) -> int:
        """The number of images in the epoch's batch ``position`` (all processes together)."""
        return min(self.batch_size, len(self.labels) - position * self.batch_size)

    def state_dict(self) -> dict:
        aug = self.aug_state if self.aug_state is not None else self.aug_gen.get_state()
        return {"order_gen": self.order_gen.get_state(), "aug_gen": aug, "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.aug_gen.set_state(state["aug_gen"])
        self.aug_state = None
        self.order = state["order"]

    def whole_batch(self, fmap: torch.Tensor, v0: torch.Tensor, labels: torch.Tensor):
        """``dist_exact``: the global batch, in every process — the processes' trunk outputs (each
        its rank's contiguous part) put together, and CLIP's ``v0`` computed again on all of them
        as one process computes it (a product's rows may round differently with the batch size)."""
        fmap, labels = WORLD.gather(fmap), WORLD.gather(labels)
        with torch.no_grad(), autocast(self.device, self.amp):
            return fmap, self.clip.pooled(fmap), labels

    def epoch(self, epoch: int, start: int = 0):
        """Batches of the epoch from batch ``start`` on (start > 0: resuming inside an epoch)."""
        if start == 0:
            self.order = torch.randperm(len(self.labels), generator=self.order_gen)
        chunks = [self.order[i:i + self.batch_size] for i in range(start * self.batch_size, len(self.order),
                                                                    self.batch_size)]
        pin = self.device.type == "cuda"

        def host_work():  # in the background thread: the generator's calls, in batch order
            for idx in chunks:
                mine = WORLD.shard(len(idx))   # a torchrun process's part of the global batch
                batch = prepare_batch([self.images[i] for i in idx], self.clip.image_size, self.aug_gen,
                                      self.device, keep=mine)
                labels = self.labels[idx[mine]]
                yield batch, (labels.pin_memory() if pin else labels), self.aug_gen.get_state()

        feed = iter(background(host_work(), depth=2))
        try:
            for position, (batch, labels, state) in enumerate(feed, start):
                images = batch.finish(self.device, self.amp)
                with autocast(self.device, self.amp):
                    fmap, v0 = encode_share(self.clip, images, self.batch_images(position))
                self.aug_state = state
                yield fmap, v0, labels.to(self.device, non_blocking=True)
        finally:
            feed.close()  # stops the thread; a later epoch draws from where the last batch left off
            if self.aug_state is not None:
                self.aug_gen.set_state(self.aug_state)


def view_store(clip, items: list[Datum], views: int, seed: int, cache_dir: str | Path, name: str,
               device: torch.device, amp: bool, num_workers: int | str, batch_size: int,
               scale: tuple[float, float] = CROP_SCALE, keep_maps: bool = True) -> FeatureStore:
    """``views`` augmented views of every image through the frozen trunk, computed once and
    cached (rows: view 0 of every image, then view 1, ...). ``keep_maps=False`` keeps only
    CLIP's own feature ``v0`` (Tip-Adapter's views), not the trunk outputs."""
    margin = math.sqrt(scale[0] * CROP_RATIO[0])   # the smallest crop's side over the image's shorter side
    parts = [views, seed, scale, CROP_RATIO, min(margin, DECODE_MARGIN), clip.image_size, amp and device.type == "cuda"]
    key = sha256_text("train-views", CACHE_VERSION, clip.backbone, clip.fingerprint(), file_stamps(items),
                      *parts, *([] if keep_maps else ["v0 only"]))  # RAFT's view caches keep their old keys
    kind = "views" if keep_maps else "v0views"
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
                    prepared = prepare_batch(images[s:s + batch_size], clip.image_size, gen, device, scale=scale,
                                             keep=slice(None) if mine else slice(0))
                    if mine:
                        batch, rows = prepared.finish(device, amp), slice(s, s + batch_size)
                with autocast(device, amp):
                    fmap, v0 = clip.encode_image(batch)
                yield fmap, v0, labels[rows]

    store = build_store(path, {"key": key, "kind": f"train-{kind}", "views": views, "images": len(items),
                               "crop_scale": list(scale)},
                        views * len(items), batches, clip, f"features: {views} views",
                        None if keep_maps else NO_MAPS)
    log.info(f"{views} augmented views of {len(items)} images computed in {time.perf_counter() - start:.1f}s ({path})")
    return store


class ViewSource:
    """Cached training batches: ``views`` augmented views per image computed once, epoch e
    uses view e mod views (Tip-Adapter-F's cached augmentation)."""

    def __init__(self, clip, items: list[Datum], views: int, batch_size: int, seed: int, cache_dir: str | Path,
                 name: str, device: torch.device, amp: bool, num_workers: int):
        self.batch_size, self.device, self.views, self.n = batch_size, device, views, len(items)
        self.store = view_store(clip, items, views, seed, cache_dir, name, device, amp, num_workers, batch_size)
        self.order_gen = torch.Generator().manual_seed(seed)
        self.order: torch.Tensor | None = None

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def batch_images(self, position: int) -> int:
        """The number of images in the epoch's batch ``position`` (all processes together)."""
        return min(self.batch_size, self.n - position * self.batch_size)

    def state_dict(self) -> dict:
        return {"order_gen": self.order_gen.get_state(), "order": self.order}

    def load_state_dict(self, state: dict) -> None:
        self.order_gen.set_state(state["order_gen"])
        self.order = state["order"]

    @staticmethod
    def whole_batch(fmap: torch.Tensor, v0: torch.Tensor, labels: torch.Tensor):
        """``dist_exact``: the global batch, in every process: the rows one process would read."""
        return WORLD.gather(fmap), WORLD.gather(v0), WORLD.gather(labels)

    def epoch(self, epoch: int, start: int = 0):
        if start == 0:
            self.order = torch.randperm(self.n, generator=self.order_gen)
        view = (epoch - 1) % self.views
        rest = self.order[start * self.batch_size:]
        chunks = [rest[i:i + self.batch_size] for i in range(0, len(rest), self.batch_size)]
        shares = [chunk[WORLD.shard(len(chunk))] for chunk in chunks]   # a torchrun process's part
        yield from self.store.read_groups(shares, self.device, offset=view * self.n)
