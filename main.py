"""RAFT on the ten CoOp datasets, on your own image folders, and on the offline demo.

    python main.py --config configs/oxford_pets.yaml [--shots 4 --seed 2 ...]
    python main.py --config configs/demo.yaml         # offline, CPU, under a minute
    python main.py --config configs/folder.yaml --data_path data/my_images
"""
from __future__ import annotations

import sys

from run.config import check_outside_data, parse_args
from utils import RaftError, run_main


def main(argv: list[str] | None = None):
    cfg, flags = parse_args(argv, "Train and evaluate RAFT on a CoOp-layout dataset.")
    check_outside_data(cfg)
    if cfg.dataset == "imagenet":
        raise RaftError("ImageNet runs through main_imagenet.py (python main_imagenet.py --config configs/imagenet.yaml)")
    from datasets import load_dataset   # the heavy libraries, once the command line is known to be right
    from run import engine
    engine.run(cfg, flags, load_dataset(cfg))


if __name__ == "__main__":
    sys.exit(run_main(main))
