"""Show where RAFT's class and background tokens look, beside CLIP's own attention pool.

    python scripts/visualize.py output/oxford_pets/RN50_16shots_seed1 photo.jpg --out attention/
    python scripts/visualize.py RUN_DIR images/ --out attention/

One PNG per image: the image as the model sees it (resized and centre-cropped), then the
attention of the class token, of the background token and of CLIP's original pool over
the feature-map grid (averaged over heads, upsampled to the image, overlaid; one colour
scale for the three maps).
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clip.preprocess import Preprocess  # noqa: E402
from datasets import load_dataset  # noqa: E402
from run.inference import (attention_maps, class_probabilities, image_files, load_images, load_run,  # noqa: E402
                           run_arguments)
from utils import RaftError, atomic_write, bounded, printable, run_main  # noqa: E402

PANELS = (("class", "class token"), ("background", "background token"), ("clip", "CLIP's pool"))


def colour_top(maps: dict[str, torch.Tensor], fixed: float | None = None) -> float:
    """The colour scale's top (a share of the grid): ``fixed``, else the largest cell of the three
    maps, but at least twice the uniform level 1/cells, so that attention spread evenly shows
    mid-scale rather than as the scale's top (solid red)."""
    if fixed is not None:
        return fixed
    uniform = 1.0 / next(iter(maps.values())).numel()
    return max(2.0 * uniform, max(float(m.max()) for m in maps.values()))


def render(image: torch.Tensor, maps: dict[str, torch.Tensor], title: str, path: Path, pre: Preprocess,
           dpi: int = 100, fixed_top: float | None = None) -> None:
    """One figure: the image (its normalisation undone), then each attention map upsampled and
    overlaid on it, on one colour scale whose uniform level (every cell alike) is marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(pre.mean).view(3, 1, 1)
    std = torch.tensor(pre.std).view(3, 1, 1)
    rgb = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    size = rgb.shape[:2]
    vmax = colour_top(maps, fixed_top)   # one colour scale for the three maps
    uniform = 100.0 / next(iter(maps.values())).numel()
    fig, axes = plt.subplots(1, 1 + len(PANELS), figsize=(3.2 * (1 + len(PANELS)) + 0.8, 3.8))
    axes[0].imshow(rgb)
    axes[0].set_title("image")
    for ax, (key, label) in zip(axes[1:], PANELS):
        grid = maps[key]
        up = torch.nn.functional.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(rgb)
        shown = ax.imshow(100 * up.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=100 * vmax)
        ax.set_title(f"{label}\nmax {100 * grid.max():.0f}% of {grid.numel()} cells", fontsize=9)
    for ax in axes:
        ax.axis("off")
    scale = plt.cm.ScalarMappable(norm=shown.norm, cmap=shown.cmap)   # the colours at full strength
    bar = fig.colorbar(scale, ax=list(axes[1:]), fraction=0.025, pad=0.02)
    bar.set_label("attention, % of the grid (one scale)", fontsize=8)
    bar.ax.axhline(uniform, color="white", linewidth=1.5)
    bar.ax.text(1.6, uniform, f"uniform {uniform:.1f}%", transform=bar.ax.get_yaxis_transform(), fontsize=7,
                va="center")
    fig.suptitle(title, fontsize=10)
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    plt.close(fig)


def main(argv: list[str] | None = None):
    parser = run_arguments(__doc__)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--dpi", type=bounded(int, 10, 600), default=100,
                        help="resolution of the PNG files (10 to 600)")
    parser.add_argument("--scale-max", type=bounded(float, 0.01, 100), metavar="PERCENT",
                        help="the colour scale's top, in %% of the grid, the same for every image (default: each "
                             "image's largest cell, at least twice the uniform level)")
    args = parser.parse_args(argv)
    run = load_run(args.run_dir, args.device, args.weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = image_files(args.images)
    targets = output_paths(paths, out)
    truth = true_labels(run)
    written = 0
    for path, target in zip(paths, targets):
        good, images, errors = load_images(run, [path])
        for err in errors:
            print(f"skipped unreadable image {err}", file=sys.stderr)
        if images is None:
            continue
        maps = {k: v[0] for k, v in attention_maps(run, images).items()}
        probs = class_probabilities(run, images)[0]
        top = int(probs.argmax())
        relative = target.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        known = truth.get(str(path.resolve()))
        title = (f"{printable(relative)}: predicted {run.classnames[top]}, {100 * probs[top]:.1f}%"
                 + (f"; true class {known}" if known else ""))
        render(images[0], maps, title, target, run.clip.preprocess, args.dpi,
               None if args.scale_max is None else args.scale_max / 100)
        print(printable(target))
        written += 1
    return 0 if written else 1


def common_folder(paths: list[Path]) -> Path:
    """The deepest folder holding every image (output names keep the paths below it)."""
    return Path(os.path.commonpath([str(p.resolve().parent) for p in paths]))


def output_paths(paths: list[Path], out: Path) -> list[Path]:
    """Each image's PNG under ``out``: the source's own tree below the images' common folder,
    ``<stem>.png``; images that would share one (photo.jpg and photo.png of one folder) keep
    their whole name (photo.jpg.png, photo.png.png): no output ever replaces another."""
    base = common_folder(paths)
    relative = [p.resolve().relative_to(base) for p in paths]
    plain = [r.with_suffix(".png") for r in relative]
    taken = Counter(plain)
    return [out / (r.with_name(r.name + ".png") if taken[p] > 1 else p) for r, p in zip(relative, plain)]


def true_labels(run) -> dict[str, str]:
    """Class names of the images the run's own dataset labels (its splits), by resolved path;
    empty when that dataset is not readable here (images from elsewhere have no known label)."""
    try:
        data = load_dataset(run.config, writes=False)   # only where --out says: nothing generated or recorded
    except (RaftError, OSError):
        return {}
    return {str(Path(d.path).resolve()): d.classname for split in (data.train, data.val, data.test) for d in split}


if __name__ == "__main__":
    sys.exit(run_main(main))
