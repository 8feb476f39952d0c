#!/usr/bin/env bash
# Train + evaluate RAFT on the ten CoOp datasets (16 shots, seed 1 unless told otherwise).
#
#   bash scripts/train_other_datasets.sh                       # all 10 datasets, 16 shots, seed 1
#   bash scripts/train_other_datasets.sh "dtd eurosat" "1 2 4 8 16" "1 2 3"
#   DATASETS=ucf101 SHOTS=4 bash scripts/train_other_datasets.sh --backbone RN101
#
# Positional arguments (or DATASETS, SHOTS, SEEDS) choose what runs; arguments starting with
# -- are config overrides. Finished runs are skipped. The loop itself is scripts/sweep.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
help_on_request "$0" "$@"
split_arguments "$@"
exec bash scripts/sweep.sh "${positional[0]:-${DATASETS:-$(all_coop)}}" "${positional[1]:-${SHOTS:-16}}" \
  "${positional[2]:-${SEEDS:-1}}" "${overrides[@]}"
