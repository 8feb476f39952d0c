"""RAFT on ImageNet, and evaluation of a trained pool on ImageNet and its shifted variants.

    python main_imagenet.py --config configs/imagenet.yaml                 # train + test
    python main_imagenet.py --config configs/imagenet.yaml --eval-only --checkpoint PATH
"""
from __future__ import annotations

import sys

from run.config import Config, check_outside_data, parse_args
from utils import run_main


def main(argv: list[str] | None = None):
    cfg, flags = parse_args(argv, "Train and evaluate RAFT on ImageNet (CoOp layout).")
    check_outside_data(cfg)
    from datasets import load_dataset   # the heavy libraries, once the command line is known to be right
    from run import engine
    engine.run(cfg, flags, load_dataset(Config(dict(cfg) | {"dataset": "imagenet"})))


if __name__ == "__main__":
    sys.exit(run_main(main))
