"""Training batches of ``(trunk output, v0, labels)``: a fresh augmentation of every image every
epoch, the trunk run on the fly (``LiveSource``, faithful), or cached views cycled through
the epochs (``ViewSource``, ``train_views``). Both save and restore their random state, so a
resumed run draws what an uninterrupted one would.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from datasets.augment import CROP_RATIO, CROP_SCALE, prepare_batch, published_batch
from datasets.base import Datum
from run.distributed import WORLD, World
from utils import autocast, background, resolve_workers

from .caches import view_store
from .decode import DECODE_MARGIN, decode_images, image_sizes


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
            whole_batch, _ = clip.encode_image(images)
            for rank in range(size):
                part = World(rank, size).shard(whole)
                if part.stop > part.start:
                    shares.add(part.stop - part.start)
                    fmap, _ = encode_share(clip, images[part], whole)
                    worst = max(worst, (fmap.float() - whole_batch[part].float()).abs().max().item())
    return {"share_sizes": sorted(shares), "global_batches": sorted(set(batch_sizes)), "max_difference": worst,
            "exact": worst == 0.0}


def checked_order(order, n: int) -> torch.Tensor | None:
    """A saved epoch's data order: None (before the first epoch) or an order of the run's n images."""
    if order is not None and (not isinstance(order, torch.Tensor) or order.dim() != 1
                              or not torch.equal(order.sort().values, torch.arange(n))):
        raise ValueError(f"its data order is not an order of the run's {n} training images")
    return order


class LiveSource:
    """Faithful training batches: a fresh augmentation of every image each epoch, trunk on the fly.

    The host's part of a batch (drawing its crops, gathering them into pinned memory) runs in a
    background thread one or two batches ahead, while the device trains on the current one;
    the device's part (resizing, the trunk) stays in the training thread. The augmentation
    generator's state is recorded after each batch, so a resumed run draws what an
    uninterrupted one would although the thread had drawn ahead."""

    def __init__(self, clip, items: list[Datum], batch_size: int, seed: int, device: torch.device, amp: bool,
                 num_workers: int | str, scale: tuple[float, float] = CROP_SCALE):
        self.clip, self.batch_size, self.device, self.amp = clip, batch_size, device, amp
        self.scale = scale   # the crops' area range: RAFT's, or another method's (CoOp: Dassl's 0.08-1)
        self.images = self.load(items, num_workers)
        self.labels = torch.tensor([d.label for d in items])
        self.order_gen = torch.Generator().manual_seed(seed)
        self.aug_gen = torch.Generator().manual_seed(seed + 1_000_003)
        self.aug_state: torch.Tensor | None = None   # the generator after the last batch handed out
        self.order: torch.Tensor | None = None

    def load(self, items: list[Datum], num_workers: int | str) -> list:
        """Every training image decoded once, up front (an unreadable one stops the run here)."""
        margin = math.sqrt(self.scale[0] * CROP_RATIO[0])   # the smallest crop's side over the shorter side
        return decode_images(items, self.clip.image_size, num_workers, min(margin, DECODE_MARGIN))

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
        self.order = checked_order(state["order"], len(self.labels))

    def whole_batch(self, fmap: torch.Tensor, v0: torch.Tensor, labels: torch.Tensor):
        """``dist_exact``: the global batch, in every process — the processes' trunk outputs (each
        its rank's contiguous part) put together, and CLIP's ``v0`` computed again on all of them
        as one process computes it (a product's rows may round differently with the batch size)."""
        fmap, labels = WORLD.gather(fmap), WORLD.gather(labels)
        with torch.no_grad(), autocast(self.device, self.amp):
            return fmap, self.clip.pooled(fmap), labels

    def prepare(self, idx: torch.Tensor, mine: slice):
        """The host's part of a batch (in the background thread): draw its flips and crops from
        the augmentation generator, gather this process's crops (``.finish`` does the rest)."""
        return prepare_batch([self.images[i] for i in idx], self.clip.preprocess, self.aug_gen, self.device,
                             scale=self.scale, keep=mine)

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
                batch = self.prepare(idx, mine)
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


class PublishedSource(LiveSource):
    """``augment: published``: the published code's augmentation. Every epoch each image is read
    from its file again and cropped and resized once, by PIL from full resolution (torchvision's
    RandomResizedCrop on a PIL image, bicubic), flipped, converted and normalised -- where the
    default keeps each image decoded at a reduced size and resizes its crops with torch on the
    device. The crops and flips are drawn from the same generator, in the same order, on the
    full-resolution sizes. Every image is decoded once up front all the same, so that an
    unreadable one stops the run before training, and its size is known."""

    def load(self, items: list[Datum], num_workers: int | str) -> list:
        self.paths = [d.path for d in items]
        self.threads = max(1, resolve_workers(num_workers, len(items)))
        return [(h, w) for w, h in image_sizes(items, num_workers)]

    def prepare(self, idx: torch.Tensor, mine: slice):
        return published_batch([self.paths[i] for i in idx], [self.images[i] for i in idx], self.clip.preprocess,
                               self.aug_gen, keep=mine, threads=self.threads,
                               pin=self.device.type == "cuda")


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
        self.order = checked_order(state["order"], self.n)

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
