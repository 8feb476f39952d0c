"""The training augmentation of doc/method.md §6 on decoded images, a whole batch at a time.

RandomResizedCrop(scale 0.8–1, ratio 3/4–4/3, bicubic with antialiasing) + horizontal flip +
CLIP's normalisation, as torchvision computes them:

- ``crop_params`` draws each image's crop exactly as torchvision's ``RandomResizedCrop.get_params``
  does (same generator calls, in the same order), so a seed gives the same crops as ever;
- ``prepare_batch`` is the host's part — draw the batch's flips and crops, gather the crops
  (into one pinned buffer when the device is a GPU) — and runs in a background thread while
  the device trains on the previous batch (``features.LiveSource``);
- ``PreparedBatch.finish`` is the device's part. The antialiased bicubic resize is separable
  and linear: for an ``h×w`` crop it is ``W_y · crop · W_xᵀ``, with ``W_y`` (``S×h``) and ``W_x``
  (``S×w``) the weights torch's antialiasing kernel uses (``resize_weights``, built on the
  device from the crop sizes). Crops padded to a common size (zero weights on the padding)
  make the whole batch two batched matrix products — a handful of kernel launches however
  many images, where resizing image by image costs several launches each. A flip reverses
  the rows of ``W_x``. On the CPU, torch's own separable resampling kernel is cheaper than
  the dense products, so there each crop goes through ``F.interpolate``; both compute the
  same numbers to float rounding (tested).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from clip.preprocess import INTERPOLATION, Preprocess, as_preprocess
from utils import RaftError, autocast

from .loader import UnreadableImage, read_rgb

CROP_SCALE = (0.8, 1.0)                  # RandomResizedCrop of doc/method.md §6
CROP_RATIO = (3 / 4, 4 / 3)
BICUBIC_A = -0.5                         # torch's antialiased bicubic kernel (Keys, as PIL)


def _cubic(x: torch.Tensor) -> torch.Tensor:
    a = BICUBIC_A
    return torch.where(x < 1.0, ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0,
                       torch.where(x < 2.0, (((x - 5.0) * x + 8.0) * x - 4.0) * a, torch.zeros_like(x)))


# torch's antialiased filters: (support at scale 1, kernel of |x|), as its resampling kernels define them
FILTERS = {"bicubic": (2.0, _cubic), "bilinear": (1.0, lambda x: (1.0 - x).clamp(min=0.0))}


def crop_params(height: int, width: int, gen: torch.Generator,
                scale: tuple[float, float] = CROP_SCALE) -> tuple[int, int, int, int]:
    """RandomResizedCrop's sampling (scale 0.8–1 by default, ratio 3/4–4/3, 10 tries, else a centre crop)."""
    area = height * width
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target = area * torch.empty(1).uniform_(*scale, generator=gen).item()
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


def resize_weights(in_sizes: torch.Tensor, out_size: int, width: int, interpolation: str = "bicubic") -> torch.Tensor:
    """``B×out_size×width`` weights of torch's antialiased interpolation along one axis
    (``F.interpolate(..., mode=interpolation, antialias=True, align_corners=False)``, bicubic or
    bilinear), for inputs of ``in_sizes`` pixels (zero beyond each one's size). Output pixel i
    takes the taps around ``center = scale·(i + 0.5)`` within the filter's support (times the
    scale when downsampling), the kernel stretched by the scale when downsampling, normalised
    to sum 1 — torch's own recipe."""
    reach, kernel = FILTERS[interpolation]
    sizes = in_sizes.to(torch.float32).view(-1, 1, 1)
    scale = sizes / out_size
    down = scale >= 1.0
    support = torch.where(down, reach * scale, torch.full_like(scale, reach))
    inv = torch.where(down, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=in_sizes.device, dtype=torch.float32).view(1, -1, 1) + 0.5)
    lo = (center - support + 0.5).trunc().clamp(min=0)                    # C's int(): truncation
    hi = torch.minimum((center + support + 0.5).trunc(), sizes)
    j = torch.arange(width, device=in_sizes.device, dtype=torch.float32).view(1, 1, -1)
    taps = kernel(((j - center + 0.5) * inv).abs())
    taps = taps * ((j >= lo) & (j < hi))
    total = taps.sum(-1, keepdim=True)
    return taps / torch.where(total == 0, torch.ones_like(total), total)


def normalise(pixels: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """0–255 float pixels (clamped) -> the model's normalised input, in place (the caller's buffer)."""
    mean = torch.tensor(pre.mean, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=pixels.device).view(1, 3, 1, 1) * 255
    return pixels.clamp_(0, 255).sub_(mean).div_(std)


@dataclass
class PreparedBatch:
    """A batch after the host's work: its crops and flips, ready for the device's."""
    crops: list[torch.Tensor] | torch.Tensor   # CPU: the crops (views); else B×3×H×W uint8, padded (pinned)
    sizes: torch.Tensor                        # B×2 crop heights and widths
    flips: torch.Tensor                        # B bools
    pre: Preprocess                            # the output side S, the filter, the statistics

    def finish(self, device: torch.device, amp: bool = False) -> torch.Tensor:
        """Resize, flip and normalise on ``device``: ``B×3×S×S`` float32. Under mixed precision
        on a GPU the two products run in float16 (the trunk reads its input in float16 anyway)."""
        size, mode = self.pre.size, self.pre.interpolation
        if isinstance(self.crops, list):   # the CPU: torch's separable kernel, crop by crop
            out = torch.empty(len(self.crops), 3, size, size)
            for i, crop in enumerate(self.crops):
                pixels = F.interpolate(crop.float().unsqueeze(0), size=(size, size), mode=mode,
                                       align_corners=False, antialias=True)[0]
                out[i] = pixels.flip(-1) if self.flips[i] else pixels
            return normalise(out, self.pre)
        crops = self.crops.to(device, non_blocking=True)
        sizes = self.sizes.to(device, non_blocking=True)
        flips = self.flips.to(device, non_blocking=True).view(-1, 1, 1)
        rows = resize_weights(sizes[:, 0], size, crops.shape[2], mode)
        cols = resize_weights(sizes[:, 1], size, crops.shape[3], mode)
        cols = torch.where(flips, cols.flip(1), cols)
        with autocast(device, amp):
            out = torch.matmul(torch.matmul(rows.unsqueeze(1), crops.float()), cols.unsqueeze(1).transpose(-1, -2))
        return normalise(out.float(), self.pre)


def prepare_batch(images: list[torch.Tensor], spec: Preprocess | int, gen: torch.Generator, device: torch.device,
                  batched: bool | None = None, scale: tuple[float, float] = CROP_SCALE,
                  keep: slice = slice(None)) -> PreparedBatch:
    """Draw flips and crops for the batch (the per-image transform's generator calls, in its
    order: the flips, then each image's crop) and gather the crops for ``device``.
    ``spec``: the model's ``Preprocess`` (or a side alone: OpenAI's statistics, bicubic).
    ``batched``: resize with the batched products (default: on every device but the CPU).
    ``scale``: the crops' area range (Tip-Adapter's views use 0.5–1).
    ``keep``: the images to gather (a torchrun process's shard): the draws are the whole batch's,
    so every process's generator stays where a one-process run's would be."""
    pre = as_preprocess(spec)
    flips = torch.rand(len(images), generator=gen) < 0.5
    boxes = [crop_params(img.shape[1], img.shape[2], gen, scale) for img in images]
    images, flips, boxes = images[keep], flips[keep], boxes[keep]
    sizes = torch.tensor([[h, w] for _, _, h, w in boxes], dtype=torch.long).view(-1, 2)
    crops = [img[:, top:top + h, left:left + w] for img, (top, left, h, w) in zip(images, boxes)]
    if not (device.type != "cpu" if batched is None else batched):
        return PreparedBatch(crops, sizes, flips, pre)
    pin = device.type == "cuda"
    height, width = (int(sizes[:, 0].max()), int(sizes[:, 1].max())) if len(images) else (1, 1)
    packed = torch.zeros(len(images), 3, height, width, dtype=torch.uint8, pin_memory=pin)
    for i, crop in enumerate(crops):
        packed[i, :, :crop.shape[1], :crop.shape[2]] = crop
    return PreparedBatch(packed, sizes.pin_memory() if pin else sizes, flips.pin_memory() if pin else flips, pre)


@dataclass
class ReadyBatch:
    """A batch the host finished (``augment: published``): ``B×3×S×S`` normalised pixels."""
    pixels: torch.Tensor

    def finish(self, device: torch.device, amp: bool = False) -> torch.Tensor:
        return self.pixels.to(device, non_blocking=True)


def published_crop(path: str, box: tuple[int, int, int, int], flip: bool, pre: Preprocess) -> torch.Tensor:
    """The published transform on one image, given its crop: the file decoded at full
    resolution, cropped and resized by PIL (the model's filter, bicubic for CLIP, as
    torchvision's RandomResizedCrop on a PIL image), flipped, converted to 0..1 and normalised
    with the model's statistics."""
    try:
        img = read_rgb(path)
    except UnreadableImage as exc:   # read again every epoch: the file may have changed since the start
        raise RaftError(f"unreadable training image {exc}") from None
    top, left, h, w = box
    img = TF.resized_crop(img, top, left, h, w, [pre.size, pre.size], interpolation=INTERPOLATION[pre.interpolation])
    if flip:
        img = TF.hflip(img)
    return TF.normalize(TF.to_tensor(img), pre.mean, pre.std)


def published_batch(paths: list[str], sizes: list[tuple[int, int]], spec: Preprocess | int, gen: torch.Generator,
                    keep: slice = slice(None), threads: int = 1, pin: bool = False) -> ReadyBatch:
    """``augment: published``: draw flips and crops as ``prepare_batch`` does (the flips, then each
    image's crop, on its full-resolution ``(height, width)``), then make this process's crops
    with ``published_crop``, in ``threads`` threads (PIL's decoding and resampling release the GIL)."""
    pre = as_preprocess(spec)
    flips = torch.rand(len(paths), generator=gen) < 0.5
    boxes = [crop_params(h, w, gen) for h, w in sizes]
    work = list(zip(paths, boxes, flips.tolist()))[keep]
    if threads > 1 and len(work) > 1:
        with ThreadPoolExecutor(max_workers=min(threads, len(work))) as pool:
            crops = list(pool.map(lambda job: published_crop(job[0], job[1], job[2], pre), work))
    else:
        crops = [published_crop(p, b, f, pre) for p, b, f in work]
    pixels = torch.stack(crops) if crops else torch.zeros(0, 3, pre.size, pre.size)
    return ReadyBatch(pixels.pin_memory() if pin else pixels)


def augment(images: list[torch.Tensor], spec: Preprocess | int, gen: torch.Generator, device: torch.device,
            amp: bool = False, scale: tuple[float, float] = CROP_SCALE) -> torch.Tensor:
    """doc/method.md §6's training transform on decoded ``3×H×W`` uint8 images: random resized
    crop (the model's filter, antialiased), horizontal flip, the model's normalisation — on ``device``."""
    return prepare_batch(images, spec, gen, device, scale=scale).finish(device, amp)
