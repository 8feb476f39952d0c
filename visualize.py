"""Show where RAFT's class and background tokens look, beside CLIP's own attention pool.

    python visualize.py output/oxford_pets/RN50_16shots_seed1 photo.jpg --out attention/
    python visualize.py RUN_DIR images/ --out attention/

One PNG per image: the image as the model sees it (resized and centre-cropped), then the
attention of the class token, of the background token and of CLIP's original pool over
the feature-map grid (averaged over heads, upsampled to the image, overlaid; one colour
scale for the three maps).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from datasets.loader import CLIP_MEAN, CLIP_STD
from inference import attention_maps, class_probabilities, image_files, load_images, load_run, run_arguments
from utils import atomic_write, bounded, printable, run_main

PANELS = (("class", "class token"), ("background", "background token"), ("clip", "CLIP's pool"))


def render(image: torch.Tensor, maps: dict[str, torch.Tensor], title: str, path: Path, dpi: int = 100) -> None:
    """One figure: the image, then each attention map upsampled and overlaid on it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    rgb = (image.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    size = rgb.shape[:2]
    vmax = max(float(m.max()) for m in maps.values())  # one colour scale for the three maps
    fig, axes = plt.subplots(1, 1 + len(PANELS), figsize=(3.2 * (1 + len(PANELS)), 3.6))
    axes[0].imshow(rgb)
    axes[0].set_title("image")
    for ax, (key, label) in zip(axes[1:], PANELS):
        grid = maps[key]
        up = torch.nn.functional.interpolate(grid[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(rgb)
        ax.imshow(up.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax)
        ax.set_title(f"{label}\n(max {100 * grid.max():.0f}% of {grid.numel()} cells)", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=dpi))
    plt.close(fig)


def main(argv: list[str] | None = None):
    parser = run_arguments(__doc__)
    parser.add_argument("--out", required=True, help="folder for the PNG files")
    parser.add_argument("--dpi", type=bounded(int, 10, 600), default=100,
                        help="resolution of the PNG files (10 to 600)")
    args = parser.parse_args(argv)
    run = load_run(args.run_dir, args.device, args.weights)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, used = 0, set()
    for path in image_files(args.images):
        good, images, errors = load_images(run, [path])
        for err in errors:
            print(f"skipped unreadable image {err}", file=sys.stderr)
        if images is None:
            continue
        maps = {k: v[0] for k, v in attention_maps(run, images).items()}
        probs = class_probabilities(run, images)[0]
        top = int(probs.argmax())
        name = path.stem
        while name in used:  # same file name in two folders
            name += "_"
        used.add(name)
        target = out / f"{name}.png"
        render(images[0], maps, f"{printable(path.name)}: {run.classnames[top]} ({100 * probs[top]:.1f}%)", target,
               args.dpi)
        print(printable(target))
        written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
