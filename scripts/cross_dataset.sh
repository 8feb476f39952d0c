#!/usr/bin/env bash
# Cross-dataset transfer (doc/protocols.md): a pool trained on ImageNet, evaluated unchanged,
# at its own run's alpha, on the test split of each of the ten other datasets with their own
# classes and text. Results: transfer_<dataset>.json beside the checkpoint.
#
#   bash scripts/cross_dataset.sh output/imagenet/RN50_16shots_seed1/checkpoint.pt
#   DATA=/data TARGETS="dtd eurosat" bash scripts/cross_dataset.sh CHECKPOINT [--key value ...]
#
# One Ctrl-C stops it after the current target, with the summary (done / failed / not started).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
help_on_request "$0" "$@"
need_checkpoint cross_dataset.sh "$@"
ckpt="$1"; shift
targets=(${TARGETS:-$(all_coop)})
start_runs "${#targets[@]}"
for target in "${targets[@]}"; do
  [[ $stopped == 1 ]] && break
  # shellcheck disable=SC2046
  run_one "$target" "$PYTHON" main.py --config "configs/${target}.yaml" --eval-only --checkpoint "$ckpt" \
    $(data_args "$target") "$@"
done
finish_runs
