"""RAFT on the ten CoOp datasets (and the offline demo).

    python main.py --config configs/oxford_pets.yaml [--shots 4 --seed 2 ...]
    python main.py --config configs/demo.yaml         # offline, CPU, a couple of minutes
"""
from __future__ import annotations

import sys

import engine
from datasets import read_coop_dataset, read_folder_dataset
from datasets.demo import ensure_demo_dataset
from utils import parse_args, run_main


def main(argv: list[str] | None = None):
    cfg, flags = parse_args(argv, "Train and evaluate RAFT on a CoOp-layout dataset.")
    if cfg.dataset == "demo":
        ensure_demo_dataset(cfg.data_path)  # generated once, offline
    if cfg.dataset == "folder":  # your own images: <data_path>/<class name>/*.jpg
        data = read_folder_dataset(cfg.data_path, cfg.split_fractions, cfg.split_seed, cfg.cache_dir, cfg.templates)
    else:
        data = read_coop_dataset(cfg.dataset, cfg.data_path)
    results = engine.run(cfg, flags, data)
    if results is not None:
        print(f"\n{data.name} {cfg.backbone} {cfg.shots}-shot seed {cfg.seed}: "
              f"zero-shot {results['zero_shot_acc']:.2f}% -> RAFT {results['test_acc']:.2f}% "
              f"(alpha {results['alpha']:.2f} from {results['alpha_source']}); "
              f"results in {results['run_dir']}")


if __name__ == "__main__":
    sys.exit(run_main(main))
