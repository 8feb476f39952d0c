"""Image reading, transforms (doc/method.md §6) and data loaders."""
from __future__ import annotations

import os

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from utils import resolve_workers

from .base import Datum

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = T.InterpolationMode.BICUBIC


def train_transform(size: int) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.8, 1.0), interpolation=BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def eval_transform(size: int) -> T.Compose:
    return T.Compose([
        T.Resize(size, interpolation=BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


class UnreadableImage(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def read_rgb(path: str) -> Image.Image:
    """Open and fully decode an image; unreadable files raise ``UnreadableImage`` with a short reason."""
    try:
        if os.path.getsize(path) == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as img:
            return img.convert("RGB")   # forces the full decode: truncated files fail here
    except UnreadableImage:
        raise
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UnreadableImage(path, f"corrupt or truncated ({str(exc).splitlines()[0][:120]})") from None


class ImageList(Dataset):
    """(image tensor, label, None), or (None, label, "path: reason") for an unreadable file, so
    that one bad file neither kills a worker with a traceback nor hangs the loader."""

    def __init__(self, items: list[Datum], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        d = self.items[i]
        try:
            return self.transform(read_rgb(d.path)), d.label, None
        except UnreadableImage as exc:
            return None, d.label, str(exc)


def collate_readable(batch):
    """Stack the readable images; return the failures beside them."""
    good = [(x, y) for x, y, err in batch if err is None]
    failures = [err for _, _, err in batch if err is not None]
    images = torch.stack([x for x, _ in good]) if good else None
    return images, torch.tensor([y for _, y in good], dtype=torch.long), failures


def make_loader(items: list[Datum], transform, batch_size: int, *, shuffle: bool, num_workers: int | str,
                seed: int = 0, device: torch.device | None = None) -> DataLoader:
    """Batches of ``(images or None, labels, failures)``; see ``ImageList``. ``num_workers`` may be
    'auto' (``utils.resolve_workers``)."""
    num_workers = resolve_workers(num_workers, len(items))
    generator = torch.Generator().manual_seed(seed)  # shuffling and worker seeds follow the run's seed
    return DataLoader(
        ImageList(items, transform), batch_size=batch_size, shuffle=shuffle, drop_last=False,
        num_workers=num_workers, persistent_workers=shuffle and num_workers > 0, collate_fn=collate_readable,
        pin_memory=device is not None and device.type == "cuda", generator=generator,
    )
