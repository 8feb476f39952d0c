#!/usr/bin/env bash
# Sweep RAFT over datasets × shots × seeds.
#
#   bash scripts/sweep.sh                                   # 10 datasets × shots 1 2 4 8 16 × seeds 1 2 3
#   bash scripts/sweep.sh oxford_pets                       # one dataset, 15 runs
#   bash scripts/sweep.sh "dtd eurosat" "4 16" "1 2" --train_views 10
#   DATASETS=imagenet SHOTS=16 bash scripts/sweep.sh
#   DATA=/data bash scripts/sweep.sh                        # every dataset under one root: /data/<its folder>
#   PYTHON=.venv/bin/python bash scripts/sweep.sh           # an interpreter that is not on PATH
#
# Positional arguments (or DATASETS, SHOTS, SEEDS) choose the grid; arguments starting with
# -- are config overrides passed to every run. A run whose results.json exists is skipped
# (by main.py; pass --force to redo). Val/test trunk features are cached under cache/ on the
# first run of a dataset and reused by every later run of the grid. A failed run does not
# stop the sweep: the failures are listed at the end and the exit code is non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

ALL="caltech101 dtd eurosat fgvc food101 oxford_flowers oxford_pets stanford_cars sun397 ucf101"
positional=()
while [[ $# -gt 0 && "$1" != --* ]]; do positional+=("$1"); shift; done
DATASETS="${positional[0]:-${DATASETS:-$ALL}}"
SHOTS="${positional[1]:-${SHOTS:-1 2 4 8 16}}"
SEEDS="${positional[2]:-${SEEDS:-1 2 3}}"

# The data folder of a config under $DATA: the last component of its data_path.
data_args() {
  [[ -z "${DATA:-}" ]] && return
  local folder
  folder=$(sed -n 's/^data_path:[[:space:]]*\([^#[:space:]]*\).*/\1/p' "configs/$1.yaml" | head -n 1)
  echo "--data_path ${DATA%/}/$(basename "${folder:-$1}")"
}

failed=()
for dataset in $DATASETS; do
  if [[ ! -f "configs/${dataset}.yaml" ]]; then
    echo "no config configs/${dataset}.yaml" >&2; failed+=("$dataset (no config)"); continue
  fi
  entry=main.py; [[ "$dataset" == imagenet ]] && entry=main_imagenet.py
  for shots in $SHOTS; do
    for seed in $SEEDS; do
      echo "=== $dataset  shots=$shots  seed=$seed"
      # shellcheck disable=SC2046  # data_args is empty or two words
      if ! "$PYTHON" "$entry" --config "configs/${dataset}.yaml" --shots "$shots" --seed "$seed" \
          $(data_args "$dataset") "$@"; then
        failed+=("$dataset shots=$shots seed=$seed")
      fi
    done
  done
done

if [[ ${#failed[@]} -gt 0 ]]; then
  echo >&2
  echo "${#failed[@]} run(s) failed:" >&2
  printf '  %s\n' "${failed[@]}" >&2
  exit 1
fi
