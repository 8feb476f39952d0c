"""Image transforms (METHOD.md §6) and data loaders."""
from __future__ import annotations

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

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


class ImageList(Dataset):
    def __init__(self, items: list[Datum], transform):
        self.items = items
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        d = self.items[i]
        with Image.open(d.path) as img:
            return self.transform(img.convert("RGB")), d.label


def make_loader(items: list[Datum], transform, batch_size: int, *, shuffle: bool, num_workers: int,
                seed: int = 0, device: torch.device | None = None) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)  # shuffling and worker seeds follow the run's seed
    return DataLoader(
        ImageList(items, transform), batch_size=batch_size, shuffle=shuffle, drop_last=False,
        num_workers=num_workers, persistent_workers=shuffle and num_workers > 0,
        pin_memory=device is not None and device.type == "cuda", generator=generator,
    )
