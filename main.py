"""RAFT on the ten CoOp datasets, on your own image folders, and on the offline demo.

    python main.py --config configs/oxford_pets.yaml [--shots 4 --seed 2 ...]
    python main.py --config configs/demo.yaml         # offline, CPU, under a minute
    python main.py --config configs/folder.yaml --data_path data/my_images
"""
from __future__ import annotations

import sys

import engine
from datasets import read_coop_dataset, read_folder_dataset
from datasets.demo import ensure_demo_dataset
from utils import check_outside_data, parse_args, run_main


def main(argv: list[str] | None = None):
    cfg, flags = parse_args(argv, "Train and evaluate RAFT on a CoOp-layout dataset.")
    check_outside_data(cfg)
    if cfg.dataset == "demo":
        ensure_demo_dataset(cfg.data_path)  # generated once, offline
    if cfg.dataset == "folder":  # your own images: <data_path>/<class name>/*.jpg
        data = read_folder_dataset(cfg.data_path, cfg.split_fractions, cfg.split_seed, cfg.cache_dir, cfg.templates)
    else:
        data = read_coop_dataset(cfg.dataset, cfg.data_path)
    engine.run(cfg, flags, data)

if __name__ == "__main__":
    sys.exit(run_main(main))
