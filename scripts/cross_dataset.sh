#!/usr/bin/env bash
# Cross-dataset transfer (doc/protocols.md): a pool trained on ImageNet, evaluated unchanged,
# at its own run's alpha, on the test split of each of the ten other datasets with their own
# classes and text. Results: transfer_<dataset>.json beside the checkpoint.
#
#   bash scripts/cross_dataset.sh output/imagenet/RN50_16shots_seed1/checkpoint.pt
#   DATA=/data TARGETS="dtd eurosat" bash scripts/cross_dataset.sh CHECKPOINT [--key value ...]
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
need_checkpoint cross_dataset.sh "$@"
ckpt="$1"; shift
failed=()
for target in ${TARGETS:-$ALL_COOP}; do
  echo "=== $target"
  # shellcheck disable=SC2046
  if ! "$PYTHON" main.py --config "configs/${target}.yaml" --eval-only --checkpoint "$ckpt" \
      $(data_args "$target") "$@"; then
    failed+=("$target")
  fi
done
report_failures
