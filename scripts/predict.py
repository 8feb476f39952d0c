"""Classify images with a trained RAFT run.

    python scripts/predict.py output/oxford_pets/RN50_16shots_seed1 photo.jpg more_photos/
    python scripts/predict.py RUN_DIR images/ --top-k 3 --json predictions.json

Uses the run's own config, class names, text classifier and chosen alpha: the fused logits
``alpha·cls + (1-alpha)·clip`` of the evaluation, turned into probabilities.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from run.inference import class_probabilities, image_files, load_images, load_run, run_arguments  # noqa: E402
from utils import RaftError, bounded, json_bytes, printable, run_main, write_json  # noqa: E402


def main(argv: list[str] | None = None):
    parser = run_arguments(__doc__)
    parser.add_argument("--top-k", type=bounded(int, 1, 100_000), default=5,
                        help="classes listed per image (1 to 100000; at most the run's classes are shown)")
    parser.add_argument("--json", metavar="FILE", help="also write the predictions as JSON to FILE, relative to the "
                                                       "current folder ('-': stdout only); never one of the images")
    parser.add_argument("--batch-size", type=bounded(int, 1, 1_024), default=32,
                        help="images classified at once (1 to 1024: a batch is held in memory)")
    args = parser.parse_args(argv)
    run = load_run(args.run_dir, args.device, args.weights)
    paths = image_files(args.images)
    if args.json not in (None, "-"):
        target = Path(os.path.expanduser(args.json)).absolute()
        if target.is_dir() or target.resolve() in {p.resolve() for p in paths} | {(run.run_dir / n).resolve() for n in
                                                                                  ("checkpoint.pt", "results.json")}:
            raise RaftError(f"--json {printable(args.json)} is {'a folder' if target.is_dir() else 'one of the inputs'}: "
                            f"give a file of its own for the predictions")
        args.json = str(target)
    k = max(1, min(args.top_k, len(run.classnames)))
    predictions, errors = [], []
    for start in range(0, len(paths), args.batch_size):
        good, images, bad = load_images(run, paths[start:start + args.batch_size])
        errors.extend(bad)
        if images is None:
            continue
        probs = class_probabilities(run, images)
        top_p, top_i = probs.topk(k, dim=-1)
        for path, ps, idx in zip(good, top_p.tolist(), top_i.tolist()):
            predictions.append({"image": str(path), "top": [
                {"class": run.classnames[i], "label": i, "probability": p} for p, i in zip(ps, idx)]})
    report = {"run": str(run.run_dir), "alpha": run.alpha, "alpha_source": run.alpha_source,
              "predictions": predictions, "errors": errors}
    if args.json == "-":
        print(json_bytes(report).decode())
    else:
        for pred in predictions:
            print(printable(pred["image"]))
            for rank, t in enumerate(pred["top"], 1):
                print(f"  {rank}. {t['class']:<30s} {100 * t['probability']:6.2f}%")
        if args.json:
            write_json(args.json, report)
            print(f"predictions written to {args.json}")
    for err in errors:
        print(f"skipped unreadable image {err}", file=sys.stderr)
    if errors and not predictions:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
