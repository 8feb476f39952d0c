"""Import a checkpoint of the published RAFT code (WideStars/RA-FT) into a run folder, and evaluate it.

    python scripts/import_published.py checkpoint/s16_oxford_pets_RN50/default_title_last.pth \\
        --config configs/oxford_pets.yaml [--shots 16 --seed 1 --data_path ... (any config key)]

The published trainer saves its pool as ``{"net": {"attnpool.*": float16 tensors}, "optimizer",
"epoch", "lr_scheduler"}``: no class names, no text classifier, no settings. This writes a run
folder (``<backbone>_<shots>shots_seed<seed>_published`` unless --name says otherwise) holding
a checkpoint of this project -- the published pool's tensors under this project's names,
evaluated with the published numerics (``pool_precision: float16_published`` unless given),
the dataset's class names and text classifier, and where it came from (``imported_from``) --
then evaluates it there like a trained run (results.json). Predict, visualize, eval-only and
cross-dataset transfer then work on that folder as on any run.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402

from clip.published import make_region_pool  # noqa: E402
from datasets import load_dataset  # noqa: E402
from datasets.published import REPOSITORY  # noqa: E402
from run import engine  # noqa: E402
from run.checkpoints import is_published_checkpoint, published_pool_state, save_checkpoint  # noqa: E402
from run.config import Config, check_outside_data, parse_args  # noqa: E402
from run.folders import run_dir_of, run_tag  # noqa: E402
from run.model import build_text, frozen_clip  # noqa: E402
from utils import RaftError, ToolParser, printable, run_main, setup_logging, torch_load, write_yaml  # noqa: E402


def main(argv: list[str] | None = None):
    parser = ToolParser(description=__doc__, usage="import_published.py CHECKPOINT --config FILE [--key value ...]",
                        epilog="Every config key of main.py is accepted (python main.py --help lists them); two have "
                               "their own defaults here: --name (default: published), --pool_precision (default: "
                               "float16_published).")
    parser.add_argument("checkpoint", help="a .pth file written by the published code's save_model")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args, rest = parser.parse_known_args(argv)
    given = {token[2:].split("=")[0].replace("-", "_") for token in rest if token.startswith("--")}
    rest = [*rest, *(["--name", "published"] if "name" not in given else []),
            *(["--pool_precision", "float16_published"] if "pool_precision" not in given else [])]
    cfg, flags = parse_args(rest, "Import a checkpoint of the published RAFT code.")
    check_outside_data(cfg)
    path = Path(args.checkpoint)
    published = torch_load(path, "checkpoint")
    if not is_published_checkpoint(published):
        raise RaftError(f"{printable(path)} is not a checkpoint of the published code ({{'net': {{'attnpool.*': ...}}}});"
                        f" a checkpoint of this project needs no import (--eval-only --checkpoint)")
    data = load_dataset(cfg)
    cfg = Config(dict(cfg) | {"name": run_tag(cfg, flags)})
    run_dir = run_dir_of(cfg, data.name)
    target = run_dir / "checkpoint.pt"
    if target.exists() and not flags.force:
        raise RaftError(f"{target} exists: give another --name, or --force to replace it")
    log = setup_logging(run_dir / "log.txt")
    clip = frozen_clip(cfg)
    if clip.family != "resnet":
        raise RaftError(f"the published code fine-tunes a ResNet's attention pool; {cfg.backbone} is a "
                        f"{clip.spec.label}")
    pool = make_region_pool(clip, cfg.mask_bg_in_cls, cfg.pool_precision)
    pool.load_state_dict(published_pool_state(published, pool, path, cfg.backbone))
    text, _ = build_text(clip, data, cfg, log)
    origin = {"code": REPOSITORY, "path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
              "epoch": published.get("epoch")}
    write_yaml(run_dir / "config.yaml", dict(cfg))
    for stale in ("results.json", "resume.pt"):   # --force: the earlier import's numbers and any training state
        (run_dir / stale).unlink(missing_ok=True)
    save_checkpoint(target, pool, cfg, clip, data, text, None, None, None, imported_from=origin)
    log.info(f"imported {printable(path)} ({REPOSITORY}) into {target}; evaluating")
    # evaluate the imported pool: never --force here, which would train a new pool over it
    engine.run(cfg, argparse.Namespace(**{**vars(flags), "force": False}), data)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
