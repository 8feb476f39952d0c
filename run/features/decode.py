"""Training images decoded once per run, up front: an unreadable one stops the run before
training starts; decoded images live in ordinary memory of the main process.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.base import Datum
from datasets.loader import UnreadableImage, read_rgb
from utils import RaftError, resolve_workers

# The smallest crop side is sqrt(0.8 · 3/4) ≈ 0.775 of the image's shorter side: images kept
# with a shorter side of size / 0.77 are never upsampled by any crop, as with the original.
DECODE_MARGIN = 0.77


class DecodedImage(Dataset):
    """Decode once to RGB uint8 (an ``H×W×3`` numpy array), shorter side reduced to ``side`` when larger.

    Workers hand numpy arrays back pickled through their pipe, so the decoded images land in
    ordinary memory of the main process. (Tensors would travel as shared-memory segments,
    one open file descriptor each for as long as the image lives: 16-shot ImageNet would
    need 16,000 descriptors and a /dev/shm as large as the images.)"""

    def __init__(self, items: list[Datum], side: int | None):
        self.items, self.side = items, side   # side None: return only the (width, height) after the decode

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        try:
            img = read_rgb(self.items[i].path)
        except UnreadableImage as exc:
            return str(exc)
        w, h = img.size
        if self.side is None:
            return w, h
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
    decoded = decode_all(items, math.ceil(image_size / margin), num_workers)
    return [torch.from_numpy(img).permute(2, 0, 1) for img in decoded]


def image_sizes(items: list[Datum], num_workers: int | str) -> list[tuple[int, int]]:
    """Every training image's (width, height), each decoded once to be sure it can be read."""
    return decode_all(items, None, num_workers)


def decode_all(items: list[Datum], side: int | None, num_workers: int | str) -> list:
    workers = resolve_workers(num_workers, len(items))
    loader = DataLoader(DecodedImage(items, side), batch_size=16, num_workers=workers, collate_fn=as_list)
    decoded = [img for batch in tqdm(loader, desc="decode", leave=False, disable=None) for img in batch]
    bad = [x for x in decoded if isinstance(x, str)]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise RaftError(f"unreadable training image {bad[0]}{more}")
    return decoded
