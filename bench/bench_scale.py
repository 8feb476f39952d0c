"""How a run's phases grow with the number of classes: ImageNet-shaped fake data, the real pipeline.

    python bench/bench_scale.py                              # 50, 100, 200 classes: a few minutes on a CPU
    python bench/bench_scale.py --classes 100 300 1000 --epochs 2 --work /tmp/scale
    python bench/bench_scale.py --classes 1000 --epochs 50   # the reference length, measured (long on a CPU)

For each class count it writes an ImageNet tree (classnames.txt, images/train/<wnid>/,
images/val/<wnid>/; small generated JPEGs, hard-linked from a pool so that building it is
quick while every file is decoded as a real one), runs main_imagenet.py on it in a fresh
process from empty caches (tiny random CLIP by default, every baseline on), and reads the run's own phase
clock from results.json (wall, user and system CPU seconds, peak resident memory). It prints
one table per measure with each phase's growth exponent in the class count (log t₂/t₁ ÷
log c₂/c₁ between the smallest and the largest count: 1 is linear, 2 quadratic), and the
baselines' share of a RAFT run of --reference-epochs epochs (the training loop's measured
per-epoch time scaled up when --epochs is fewer, and said so).
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ToolParser, bounded, run_main  # noqa: E402

from baselines import METHODS  # noqa: E402

PHASES = ["sample_images", "build_model", "training images", "training loop", "evaluate_run", "alpha search",
          "measure_baselines", "baseline features", "baseline features before the last projection",
          *(f"baseline {name}" for name in METHODS)]
# the methods this wave added, all on cached features: their share of a RAFT run is printed apart
NEW_METHODS = ["gda", "lp_plus_plus", "ape", "ape_t", "clap", "prolip", "task_res", "clip_adapter"]
MEASURES = {"wall": "wall-clock s", "user": "user CPU s", "sys": "system CPU s", "peak_mb": "peak resident MB"}


def build_tree(root: Path, classes: int, train: int, test: int, size: int) -> None:
    """An ImageNet-shaped tree; its images are links into a pool of generated JPEGs."""
    from datasets.demo import DEMO_CLASSES, draw_image
    if (root / "classnames.txt").is_file():
        return
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    sources = []
    for i in range(64):
        name, colour, shape = DEMO_CLASSES[i % len(DEMO_CLASSES)]
        path = pool / f"{i}.jpg"
        draw_image(shape, colour, size, rng).save(path, quality=90)
        sources.append(path)
    wnids = [f"n{k:08d}" for k in range(classes)]
    for split, count in (("train", train), ("val", test)):
        for k, wnid in enumerate(wnids):
            folder = root / "images" / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                os.link(sources[(k * 7 + j) % len(sources)], folder / f"{wnid}_{j}.JPEG")
    (root / "classnames.txt").write_text("".join(f"{w} class {k}\n" for k, w in enumerate(wnids)))


def run_once(args, classes: int, work: Path) -> dict:
    data = work / f"imagenet_{classes}"
    build_tree(data, classes, args.train_per_class, args.test_per_class, args.image_size)
    out, cache = work / f"out_{classes}", work / f"cache_{classes}"
    for folder in (out, cache):   # every run cold: no features, listings or text from an earlier one
        shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "main_imagenet.py"), "--config", str(ROOT / "configs/imagenet.yaml"),
           "--data_path", str(data), "--num_classes", str(classes), "--backbone", args.backbone, "--weights", "null",
           "--calibrate_bn", "true", "--shots", str(args.shots), "--train_epoch", str(args.epochs),
           "--warmup_epoch", "1", "--val_per_class", str(args.val_per_class), "--batch_size", str(args.batch),
           "--output_dir", str(out), "--cache_dir", str(cache), "--descriptions", "null",
           "--device", args.device, "--force", "--name", "scale"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run at {classes} classes failed:\n{proc.stderr[-3000:]}")
    results = json.loads(next(out.rglob("results.json")).read_text())
    return {"process_seconds": time.perf_counter() - start, "phases": results["phases"],
            "train_images": results["sizes"]["train"], "test_images": results["sizes"]["test"],
            "val_images": results["sizes"]["val"]}


def exponent(small: float, large: float, c_small: int, c_large: int) -> float | None:
    if small <= 0 or large <= 0:
        return None
    return math.log(large / small) / math.log(c_large / c_small)


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__)
    parser.add_argument("--classes", type=bounded(int, 2, 100_000), nargs="+", default=[50, 100, 200],
                        help="class counts, in increasing order")
    parser.add_argument("--shots", type=bounded(int, 1, 1000), default=16, help="few-shot images per class")
    parser.add_argument("--train-per-class", type=bounded(int, 2, 10_000), default=24,
                        help="training images per class in the tree (shots and the drawn validation come from them)")
    parser.add_argument("--val-per-class", type=bounded(int, 1, 1000), default=4,
                        help="validation images per class drawn from train (val_per_class)")
    parser.add_argument("--test-per-class", type=bounded(int, 1, 10_000), default=5,
                        help="test images per class (images/val/)")
    parser.add_argument("--epochs", type=bounded(int, 1, 1000), default=2, help="RAFT training epochs per run")
    parser.add_argument("--reference-epochs", type=bounded(int, 1, 1000), default=50,
                        help="the RAFT run length the baselines' share is computed against")
    parser.add_argument("--batch", type=bounded(int, 1, 4096), default=128, help="training batch size")
    parser.add_argument("--backbone", default="tiny-rn", help="any backbone (random weights)")
    parser.add_argument("--image-size", type=bounded(int, 16, 1024), default=64, help="side of the generated JPEGs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--work", default=None, help="folder for the trees, runs and caches (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    counts = sorted(args.classes)
    work = Path(args.work or tempfile.mkdtemp(prefix="raft_scale_"))
    import torch
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"device {args.device}; {args.backbone}, {args.shots} shots, {args.epochs} epochs, "
          f"{args.test_per_class} test and {args.val_per_class} val images per class")
    runs = {}
    for classes in counts:
        runs[classes] = run_once(args, classes, work)
        r = runs[classes]
        print(f"  {classes} classes: {r['train_images']} training, {r['val_images']} val, {r['test_images']} test "
              f"images; the process took {r['process_seconds']:.0f}s")
    phases = [p for p in PHASES if any(p in r["phases"] for r in runs.values())]
    for measure, label in MEASURES.items():
        print(f"\n{label} per phase" + ("" if measure == "peak_mb" else " (growth exponent in classes)"))
        print(f"  {'phase':<22}" + "".join(f"{c:>10}" for c in counts) + "   growth")
        for phase in phases:
            values = [runs[c]["phases"].get(phase, {}).get(measure, 0.0) for c in counts]
            growth = exponent(values[0], values[-1], counts[0], counts[-1]) if len(counts) > 1 else None
            print(f"  {phase:<22}" + "".join(f"{v:>10.1f}" for v in values)
                  + ("" if growth is None else f"   {growth:5.2f}"))
    largest = runs[counts[-1]]["phases"]
    per_epoch = largest["training loop"]["wall"] / args.epochs
    raft = largest["train_or_load"]["wall"] - largest["training loop"]["wall"] + per_epoch * args.reference_epochs \
        + largest["evaluate_run"]["wall"]
    baselines = largest["measure_baselines"]["wall"]
    scaled = "" if args.epochs == args.reference_epochs else \
        f" (its training loop scaled from {args.epochs} measured epochs: {per_epoch:.1f}s each)"
    print(f"\nat {counts[-1]} classes: the baselines took {baselines:.1f}s, a {args.reference_epochs}-epoch RAFT run "
          f"{raft:.1f}s{scaled}: ratio {baselines / raft:.1%}")
    added = sum(largest.get(f"baseline {name}", {}).get("wall", 0.0) for name in NEW_METHODS)
    # their features: the Dassl view set and ProLIP's pass (the Tip views were there before)
    features = largest.get("baseline features before the last projection", {}).get("wall", 0.0)
    print(f"the methods on cached features added in this wave ({', '.join(NEW_METHODS)}): {added:.1f}s fitting "
          f"and scoring, {features:.1f}s for the val/test features before the last projection: "
          f"ratio {(added + features) / raft:.1%} of that RAFT run")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print(f"work folder: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
