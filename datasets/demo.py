"""A small synthetic dataset in the CoOp layout for the offline demo and the tests.

Each class is a coloured shape drawn at a random place, size and angle over a random
textured background, so classes are easy to tell apart from pixels while the object
occupies only a region of the image (the situation RAFT's region pool is built for).
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from utils import write_json

DEMO_CLASSES = [
    ("red circle", (220, 40, 40), "circle"),
    ("blue square", (40, 80, 230), "square"),
    ("green triangle", (40, 190, 60), "triangle"),
    ("yellow star", (240, 220, 40), "star"),
    ("purple cross", (150, 50, 200), "cross"),
    ("orange ring", (250, 140, 20), "ring"),
    ("cyan diamond", (30, 210, 220), "diamond"),
    ("white bars", (245, 245, 245), "bars"),
]
SPLIT_FILE = "split_zhou_Demo.json"


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "star":
        pts = [(r if i % 2 == 0 else r * 0.45, i * math.pi / 5) for i in range(10)]
    else:
        sides = {"triangle": 3, "square": 4, "diamond": 4}[shape]
        pts = [(r, i * 2 * math.pi / sides + (math.pi / 4 if shape == "diamond" else 0)) for i in range(sides)]
    return [(cx + rr * math.cos(a + angle), cy + rr * math.sin(a + angle)) for rr, a in pts]


def draw_image(shape: str, colour: tuple[int, int, int], size: int, rng: random.Random) -> Image.Image:
    # background: a smooth random texture in dim colours (a small random grid, upsampled)
    cells = rng.choice([4, 6, 8])
    grid = Image.new("RGB", (cells, cells))
    grid.putdata([tuple(rng.randint(10, 130) for _ in range(3)) for _ in range(cells * cells)])
    img = grid.resize((size, size), Image.BICUBIC).filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.18, 0.32) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    angle = rng.uniform(0, 2 * math.pi)
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=jitter, width=max(2, int(r / 3)))
    elif shape == "cross":
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=jitter)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=jitter)
    elif shape == "bars":
        for k in range(-2, 3):
            x = cx + k * r / 2.5
            draw.rectangle([x - r / 10, cy - r, x + r / 10, cy + r], fill=jitter)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, angle), fill=jitter)
    return img


def ensure_demo_dataset(root: str | Path, per_split: tuple[int, int, int] = (16, 8, 24), size: int = 112,
                        num_classes: int = len(DEMO_CLASSES), seed: int = 0) -> Path:
    """Generate the dataset under ``root`` unless its split file already exists (written last)."""
    root = Path(root)
    split_path = root / SPLIT_FILE
    if split_path.is_file():
        return split_path
    total = sum(per_split) * num_classes
    # before any run folder (and its log) exists: straight to the console
    print(f"generating the demo dataset: {total} images of {num_classes} classes in {root} (once; later runs read "
          f"them)", flush=True)
    rng = random.Random(seed)
    split = {"train": [], "val": [], "test": []}
    for label, (name, colour, shape) in enumerate(DEMO_CLASSES[:num_classes]):
        folder = root / "images" / name.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        for split_name, count in zip(split, per_split):
            for i in range(count):
                rel = f"{folder.name}/{split_name}_{i:03d}.jpg"
                draw_image(shape, colour, size, rng).save(root / "images" / rel, quality=90)
                split[split_name].append([rel, label, name])
    write_json(split_path, split)
    return split_path
