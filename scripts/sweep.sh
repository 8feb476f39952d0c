#!/usr/bin/env bash
# Sweep RAFT over datasets × shots × seeds.
#
#   bash scripts/sweep.sh                                   # 10 datasets × shots 1 2 4 8 16 × seeds 1 2 3
#   bash scripts/sweep.sh oxford_pets                       # one dataset, 15 runs
#   bash scripts/sweep.sh "dtd eurosat" "4 16" "1 2" --train_views 10
#   DATASETS=imagenet SHOTS=16 bash scripts/sweep.sh
#
# Positional arguments (or DATASETS, SHOTS, SEEDS) choose the grid; arguments starting with
# -- are config overrides passed to every run. A run whose results.json exists is skipped
# (by main.py; pass --force to redo). Val/test trunk features are cached under cache/ on the
# first run of a dataset and reused by every later run of the grid.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL="caltech101 dtd eurosat fgvc food101 oxford_flowers oxford_pets stanford_cars sun397 ucf101"
positional=()
while [[ $# -gt 0 && "$1" != --* ]]; do positional+=("$1"); shift; done
DATASETS="${positional[0]:-${DATASETS:-$ALL}}"
SHOTS="${positional[1]:-${SHOTS:-1 2 4 8 16}}"
SEEDS="${positional[2]:-${SEEDS:-1 2 3}}"

for dataset in $DATASETS; do
  if [[ ! -f "configs/${dataset}.yaml" ]]; then
    echo "no config configs/${dataset}.yaml" >&2; exit 2
  fi
  for shots in $SHOTS; do
    for seed in $SEEDS; do
      echo "=== $dataset  shots=$shots  seed=$seed"
      if [[ "$dataset" == imagenet ]]; then
        batch=128; [[ "$shots" == 1 ]] && batch=64          # the reference's ImageNet batch sizes
        python main_imagenet.py --config configs/imagenet.yaml --shots "$shots" --seed "$seed" \
          --batch_size "$batch" "$@"
      else
        python main.py --config "configs/${dataset}.yaml" --shots "$shots" --seed "$seed" "$@"
      fi
    done
  done
done
