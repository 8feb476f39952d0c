"""On-disk stores of frozen-trunk outputs: memory-mapped arrays written in a temporary folder,
renamed into place with their manifest last, built once under an OS lock (two processes
building the same store at once: one builds, the other waits and reads it).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from datasets.base import Datum
from run.distributed import WORLD
from utils import RaftError, background

log = logging.getLogger("raft")

# 2: images read with their EXIF orientation applied, the trunk's batch size in every key
CACHE_VERSION = 2


NO_MAPS = (0,)   # the map shape of a store that keeps CLIP's own feature v0 alone (what the baselines read)


def file_stamps(items: list[Datum]) -> list:
    """(path, label, size, mtime) per image: any change to an image changes the cache key."""
    out = []
    for d in items:
        try:
            st = os.stat(d.path)
            out.append((d.path, d.label, st.st_size, st.st_mtime_ns))
        except OSError:   # missing, a symlink loop, ...: read (and failed or skipped) when the store is built
            out.append((d.path, d.label, None, None))
    return out


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


class Progress:
    """Off a terminal (SLURM, nohup: no progress bar) a log line with the count and its total
    at least every ``every`` seconds; on a terminal the bar says it."""

    def __init__(self, desc: str, total: int, every: float = 30.0):
        self.desc, self.total, self.every = desc, total, every
        self.done, self.last = 0, time.monotonic()
        self.quiet = sys.stderr.isatty()

    def add(self, n: int) -> None:
        self.done = min(self.total, self.done + n)
        if not self.quiet and time.monotonic() - self.last >= self.every and self.done < self.total:
            log.info(f"{self.desc}: {self.done}/{self.total} images")
            self.last = time.monotonic()


def build_store(final: Path, manifest: dict, rows: int, batches, clip, desc: str,
                map_shape: tuple | None = None, float32: bool = False) -> FeatureStore:
    """Run ``batches(skipped)`` (an iterable factory of (fmap, v0, labels) that appends the
    images it could not read to ``skipped``) into a store; float16 maps unless a value
    overflows float16, then float32. ``map_shape``: one row's trunk output (default: the model's).
    Under torchrun every process computes its share of each batch; rank 0 gathers the shares
    in order and alone writes, the others open the store once it is in place."""
    world = WORLD
    map_shape = tuple(clip.feature_shape) if map_shape is None else map_shape
    for dtype in (np.float32,) if float32 else (np.float16, np.float32):
        writer = StoreWriter(final, rows, map_shape, clip.embed_dim, np.dtype(dtype)) if world.main else None
        try:
            skipped = []
            report = Progress(desc, rows) if world.main else None
            for fmap, v0, labels in tqdm(batches(skipped), desc=desc, leave=False, dynamic_ncols=True,
                                         disable=None if world.main else True):
                if report is not None:
                    report.add(len(labels) * world.size)
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
