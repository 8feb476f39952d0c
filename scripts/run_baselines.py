"""Run only the other methods of a setting (zero-shot CLIP, the linear probe, Tip-Adapter(-F), ...:
the registry in baselines/) without training RAFT: the comparison table first.

    python scripts/run_baselines.py --config configs/oxford_pets.yaml --shots 16 --seed 1
    python scripts/run_baselines.py --config configs/imagenet.yaml --baselines "[zero_shot, tip_adapter]"

Same command line as main.py / main_imagenet.py (any config key). It runs the engine's own
phases with training left out: the same run folder, few-shot images, feature caches and
validation data as the RAFT run of the setting, and writes baselines.json there (summarize.py
reads it).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from run.config import check_outside_data, parse_args  # noqa: E402
from utils import run_main  # noqa: E402


def main(argv: list[str] | None = None):
    cfg, flags = parse_args(argv, __doc__, evaluates=False, prog="scripts/run_baselines.py")
    check_outside_data(cfg)
    from datasets import load_dataset
    from run import engine
    engine.run(cfg, flags, load_dataset(cfg), trains=False)


if __name__ == "__main__":
    sys.exit(run_main(main))
