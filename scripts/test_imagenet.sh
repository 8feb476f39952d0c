#!/usr/bin/env bash
# Evaluate a trained region pool on ImageNet (and the configured shift sets), no training.
#
#   bash scripts/test_imagenet.sh output/imagenet/RN50_16shots_seed1/checkpoint.pt
#   bash scripts/test_imagenet.sh CKPT --shift_sets "{imagenet_v2: data/imagenetv2}"
#
#   DATA=/data bash scripts/test_imagenet.sh CKPT                  # ImageNet read from /data/imagenet
#
# Results go to results_eval.json next to the checkpoint (results_shift.json with shift sets). The training settings (shots, seed,
# text options, val_per_class, ...) and the backbone come from the checkpoint, so the run's
# own validation images choose alpha; evaluation settings (shift sets, alpha search, a fixed
# --alpha, device) can be changed on the command line.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

help_on_request "$0" "$@"
need_checkpoint test_imagenet.sh "$@"
ckpt="$1"; shift
# shellcheck disable=SC2046  # data_args is empty or two words
"$PYTHON" main_imagenet.py --config configs/imagenet.yaml --eval-only --checkpoint "$ckpt" $(data_args imagenet) "$@"
