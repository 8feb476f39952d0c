"""RAFT on ImageNet, and evaluation of a trained pool on ImageNet and its shifted variants.

    python main_imagenet.py --config configs/imagenet.yaml                 # train + test
    python main_imagenet.py --config configs/imagenet.yaml --eval-only --checkpoint PATH
"""
from __future__ import annotations

import sys

import engine
from datasets import read_imagenet, read_shift_set
from datasets.imagenet import read_classnames
from utils import check_outside_data, parse_args, run_main


def main(argv: list[str] | None = None):
    cfg, flags = parse_args(argv, "Train and evaluate RAFT on ImageNet (CoOp layout).")
    check_outside_data(cfg)
    data = read_imagenet(cfg.data_path)
    wnids, names = read_classnames(data.root)
    for kind, path in cfg.shift_sets.items():  # ImageNet-V2 / -Sketch / -A / -R, tested with ImageNet's classes
        data.shift_sets[kind] = read_shift_set(kind, path, wnids, names)
    engine.run(cfg, flags, data)

if __name__ == "__main__":
    sys.exit(run_main(main))
