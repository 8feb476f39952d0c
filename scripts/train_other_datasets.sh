#!/usr/bin/env bash
# Train + evaluate RAFT on the ten CoOp datasets.
#
#   bash scripts/train_other_datasets.sh                       # all 10 datasets, 16 shots, seed 1
#   bash scripts/train_other_datasets.sh "dtd eurosat" "1 2 4 8 16" "1 2 3"
#   DATASETS=ucf101 SHOTS=4 bash scripts/train_other_datasets.sh --backbone RN101
#
# Positional arguments (or the variables DATASETS, SHOTS, SEEDS) choose what runs; anything
# starting with -- is passed to main.py (config overrides). Finished runs are skipped by main.py.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL="caltech101 dtd eurosat fgvc food101 oxford_flowers oxford_pets stanford_cars sun397 ucf101"
positional=()
while [[ $# -gt 0 && "$1" != --* ]]; do positional+=("$1"); shift; done
DATASETS="${positional[0]:-${DATASETS:-$ALL}}"
SHOTS="${positional[1]:-${SHOTS:-16}}"
SEEDS="${positional[2]:-${SEEDS:-1}}"

for dataset in $DATASETS; do
  for shots in $SHOTS; do
    for seed in $SEEDS; do
      echo "=== $dataset  shots=$shots  seed=$seed"
      python main.py --config "configs/${dataset}.yaml" --shots "$shots" --seed "$seed" "$@"
    done
  done
done
