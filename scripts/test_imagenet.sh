#!/usr/bin/env bash
# Evaluate a trained region pool on ImageNet (and the configured shift sets), no training.
#
#   bash scripts/test_imagenet.sh output/imagenet/RN50_16shots_seed1/checkpoint.pt
#   bash scripts/test_imagenet.sh CKPT --shift_sets "{imagenet_v2: data/imagenetv2}"
#
# Results go to results_eval.json in the run folder named by the config (dataset, backbone,
# shots, seed); pass the same --shots/--seed as the training run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ $# -lt 1 || "$1" == --* ]]; then
  echo "usage: bash scripts/test_imagenet.sh CHECKPOINT [--key value ...]" >&2
  exit 2
fi
ckpt="$1"; shift
python main_imagenet.py --config configs/imagenet.yaml --eval-only --checkpoint "$ckpt" "$@"
