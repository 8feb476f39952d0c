#!/usr/bin/env bash
# Domain generalisation (doc/protocols.md): a pool trained on ImageNet, tested on
# ImageNet-V2 and -Sketch (all 1000 classes) and ImageNet-A and -R (their 200-class subsets)
# with ImageNet's classifier, at the run's alpha. Results: results_shift.json beside the
# checkpoint (its own file: a plain --eval-only writes results_eval.json); python
# scripts/summarize.py output/ prints the table.
#
#   bash scripts/domain_generalization.sh output/imagenet/RN50_16shots_seed1/checkpoint.pt
#   DATA=/data bash scripts/domain_generalization.sh CHECKPOINT [--key value ...]
#
# The variants are read from $DATA (default data/): imagenetv2/, imagenet-sketch/,
# imagenet-adversarial/, imagenet-rendition/ (each the dataset's folder or its parent);
# V2=, SKETCH=, A=, R= give another path for one of them.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
help_on_request "$0" "$@"
need_checkpoint domain_generalization.sh "$@"
ckpt="$1"; shift
root="${DATA:-data}"; root="${root%/}"
sets="{imagenet_v2: ${V2:-$root/imagenetv2}, imagenet_sketch: ${SKETCH:-$root/imagenet-sketch}, "
sets+="imagenet_a: ${A:-$root/imagenet-adversarial}, imagenet_r: ${R:-$root/imagenet-rendition}}"
# shellcheck disable=SC2046
exec "$PYTHON" main_imagenet.py --config configs/imagenet.yaml --eval-only --checkpoint "$ckpt" \
  --shift_sets "$sets" $(data_args imagenet) "$@"
