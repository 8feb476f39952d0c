#!/usr/bin/env bash
# Base-to-new generalisation (CoCoOp's protocol, doc/protocols.md): train on the base half of
# each dataset's classes, test on base and new classes; 11 datasets × seeds, 16 shots.
#
#   bash scripts/base2new.sh                                  # 11 datasets, seeds 1 2 3
#   bash scripts/base2new.sh "dtd eurosat" 16 "1"
#   DATA=/data bash scripts/base2new.sh --backbone ViT-B-16
#
# Runs go to output/<dataset>/<backbone>_16shots_seed<seed>_base2new/; finished ones are
# skipped. Then: python scripts/summarize.py output/  (the base-to-new table).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
help_on_request "$0" "$@"
split_arguments "$@"
exec bash scripts/sweep.sh "${positional[0]:-${DATASETS:-imagenet $(all_coop)}}" "${positional[1]:-${SHOTS:-16}}" \
  "${positional[2]:-${SEEDS:-1 2 3}}" --protocol base2new "${overrides[@]}"
