"""Image reading, transforms (doc/method.md §6) and data loaders."""
from __future__ import annotations

import os
import stat

import numpy as np
import torch
from open_clip.transform import CenterCropOrPad, ResizeKeepRatio
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from clip.preprocess import INTERPOLATION, Preprocess, as_preprocess
from utils import first_line, printable, resolve_workers

from .base import Datum


def train_transform(spec: Preprocess | int) -> T.Compose:
    pre = as_preprocess(spec)
    return T.Compose([
        T.RandomResizedCrop(pre.size, scale=(0.8, 1.0), interpolation=INTERPOLATION[pre.interpolation]),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(pre.mean, pre.std),
    ])


def eval_transform(spec: Preprocess | int) -> T.Compose:
    """open_clip's evaluation transform for the model's resize mode (shortest: torchvision's
    Resize + CenterCrop, as OpenAI's CLIP)."""
    pre = as_preprocess(spec)
    interpolation = INTERPOLATION[pre.interpolation]
    fit = {"shortest": lambda: [T.Resize(pre.size, interpolation=interpolation), T.CenterCrop(pre.size)],
           "squash": lambda: [T.Resize((pre.size, pre.size), interpolation=interpolation)],
           "longest": lambda: [ResizeKeepRatio(pre.size, longest=1, interpolation=pre.interpolation),
                               CenterCropOrPad(pre.size, fill=pre.fill_color)]}[pre.resize_mode]()
    return T.Compose([*fit, T.ToTensor(), T.Normalize(pre.mean, pre.std)])


class UnreadableImage(Exception):
    def __init__(self, path: str, reason: str):
        super().__init__(f"{printable(path)}: {reason}")
        self.path, self.reason = path, reason


TIFF_BITS_PER_SAMPLE = 258


def sample_range(img: Image.Image) -> float | None:
    """The largest sample value of a high-bit-depth image's encoding (what white is), or None
    when Pillow's mode says 8 bits. Float images are read as 0..1; integer images by their
    declared bit depth: 16 for the I;16 modes and for the "I" images of PNG and PGM (Pillow
    scales a PGM's maxval to 16 bits), a TIFF's BitsPerSample otherwise."""
    if img.mode.startswith("I;16"):
        return 65535.0
    if img.mode == "F":
        return 1.0
    if img.mode == "I":
        bits = getattr(img, "tag_v2", {}).get(TIFF_BITS_PER_SAMPLE, 16)
        bits = bits[0] if isinstance(bits, tuple) else bits
        return float(2 ** int(bits) - 1) if int(bits) <= 16 else None
    return None


def to_rgb(img: Image.Image, path: str) -> Image.Image:
    """Any mode Pillow returns as 8-bit RGB. High-bit-depth greyscale (I;16*, I, F) is scaled
    from its own range (``sample_range``: a 16-bit value v becomes v/257, so an image saved at
    16 bits reads as its 8-bit twin); Pillow's own conversion would clip it to nearly white.
    What has no unambiguous 8-bit reading is refused, naming the mode."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        white = sample_range(img)
        if white is None:
            raise UnreadableImage(path, f"mode {img.mode} with 32-bit integer samples has no standard 8-bit scale")
        values = np.asarray(img).astype(np.float64)
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= white):
            raise UnreadableImage(path, f"mode {img.mode} with values {low:g}..{high:g} outside 0..{white:g}: "
                                        f"no unambiguous 8-bit scale")
        grey = np.rint(values * (255.0 / white)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:   # a mode Pillow cannot convert (La, ...)
        raise UnreadableImage(path, f"mode {img.mode} cannot be converted to RGB") from None


MAX_ASPECT = 20.0   # the longest side over the shortest: a thin image is resized to a size of that ratio


def read_rgb(path: str) -> Image.Image:
    """Open and fully decode an image to 8-bit RGB (``to_rgb``), turned upright as its EXIF
    orientation says (a phone's photo stored sideways, tags 2-8): the one reader of every image
    a run, a tool or a check reads. Unreadable files raise ``UnreadableImage`` with a short reason:
    not a regular file (a FIFO would block, a device never end), empty, not an image, truncated,
    or so thin that the evaluation resize (short side to the model's) would make it gigabytes."""
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableImage(path, "not a regular file" + (" (a folder)" if stat.S_ISDIR(info.st_mode) else ""))
        if info.st_size == 0:
            raise UnreadableImage(path, "empty file")
        with Image.open(path) as img:
            w, h = img.size
            if max(w, h) > MAX_ASPECT * max(1, min(w, h)):
                raise UnreadableImage(path, f"{w}×{h} pixels: more than {MAX_ASPECT:g} times longer than it is "
                                            f"wide, resized to the model's size it would be {max(w, h) / min(w, h):,.0f} "
                                            f"times its side")
            img.load()            # forces the full decode: truncated files fail here
            return to_rgb(ImageOps.exif_transpose(img), path)
    except UnreadableImage:
        raise
    except FileNotFoundError:
        raise UnreadableImage(path, "file not found") from None
    except UnidentifiedImageError:
        raise UnreadableImage(path, "not an image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"corrupt or truncated ({first_line(exc, 120)})"
        raise UnreadableImage(path, reason) from None


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
