#!/usr/bin/env bash
# One command on a machine with a GPU: the CUDA test tier, bench_speed at RN50 and ViT-B/16 sizes,
# bench_scale at 1000 classes and 50 epochs; one table (bench/device_check.py says what it writes).
#   bash bench/device_check.sh                 # the GPU
#   bash bench/device_check.sh --device cpu    # a dry run on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
exec python bench/device_check.py "$@"
