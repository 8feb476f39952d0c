"""Run only the baselines of a setting — zero-shot CLIP, linear probe, Tip-Adapter,
Tip-Adapter-F — without training RAFT: the comparison table first.

    python baselines/run.py --config configs/oxford_pets.yaml --shots 16 --seed 1
    python baselines/run.py --config configs/imagenet.yaml --baselines "[zero_shot, tip_adapter]"

Same command line as main.py / main_imagenet.py (any config key). It uses the same run
folder, few-shot images, feature caches and validation data as the RAFT run of the setting,
and writes baselines.json there (summarize.py reads it).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from baselines.measure import baselines_only  # noqa: E402
from datasets import load_dataset  # noqa: E402
from run.config import check_outside_data, parse_args  # noqa: E402
from utils import run_main  # noqa: E402


def main(argv: list[str] | None = None):
    cfg, flags = parse_args(argv, __doc__, evaluates=False, prog="baselines/run.py")
    check_outside_data(cfg)
    baselines_only(cfg, flags, load_dataset(cfg))


if __name__ == "__main__":
    sys.exit(run_main(main))
