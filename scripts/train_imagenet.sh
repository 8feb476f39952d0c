#!/usr/bin/env bash
# Train + evaluate RAFT on ImageNet (and the shift sets listed in configs/imagenet.yaml).
#
#   bash scripts/train_imagenet.sh                 # 16 shots, seed 1
#   bash scripts/train_imagenet.sh "1 2 4 8 16" "1 2 3" --data_path /data/imagenet
#
# Batch size 128, and 64 at 1 shot, as the reference (batch_size_by_shots in the config).
# The loop itself is scripts/sweep.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
help_on_request "$0" "$@"
split_arguments "$@"
exec bash scripts/sweep.sh imagenet "${positional[0]:-${SHOTS:-16}}" "${positional[1]:-${SEEDS:-1}}" "${overrides[@]}"
