#!/usr/bin/env bash
# Train + evaluate RAFT on ImageNet (and the shift sets listed in configs/imagenet.yaml).
#
#   bash scripts/train_imagenet.sh                 # 16 shots, seed 1
#   bash scripts/train_imagenet.sh "1 2 4 8 16" "1 2 3" --data_path /data/imagenet
#
# The reference uses batch size 128, and 64 at 1 shot.
set -euo pipefail
cd "$(dirname "$0")/.."

positional=()
while [[ $# -gt 0 && "$1" != --* ]]; do positional+=("$1"); shift; done
SHOTS="${positional[0]:-${SHOTS:-16}}"
SEEDS="${positional[1]:-${SEEDS:-1}}"

for shots in $SHOTS; do
  batch=128
  [[ "$shots" == 1 ]] && batch=64
  for seed in $SEEDS; do
    echo "=== imagenet  shots=$shots  seed=$seed  batch=$batch"
    python main_imagenet.py --config configs/imagenet.yaml --shots "$shots" --seed "$seed" \
      --batch_size "$batch" "$@"
  done
done
