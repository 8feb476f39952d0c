#!/usr/bin/env bash
# Run one line of a run list per SLURM array task (doc/distributed.md).
#
#   bash scripts/sweep.sh --list "dtd eurosat oxford_pets" > runs.txt   # pending runs, one per line
#   sbatch --array=1-$(wc -l < runs.txt) scripts/slurm_array.sh runs.txt
#   sbatch --array=1-$(wc -l < runs.txt)%8 scripts/slurm_array.sh runs.txt   # at most 8 at a time
#
# Each line is a complete command (it starts with `cd` into the repository), so the job's
# working directory does not matter. A run that is already finished when its task starts
# exits at once; a task killed by the scheduler resumes when resubmitted. Adapt the
# resources below to your cluster (one GPU per run is enough for every backbone).
#SBATCH --job-name=raft
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=32G
#SBATCH --time=08:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
[[ "${1:-}" == -h || "${1:-}" == --help ]] && { sed -n '2,/^[^#]/{/^#/!q;s/^#\( \|$\)//;p}' "$0"; exit 0; }
list="${1:?usage: sbatch --array=1-N scripts/slurm_array.sh RUNS.txt}"
task="${SLURM_ARRAY_TASK_ID:?run this through sbatch --array (SLURM_ARRAY_TASK_ID is not set)}"
line=$(sed -n "${task}p" "$list")
if [[ -z "$line" ]]; then
  echo "no line $task in $list" >&2
  exit 2
fi
echo "task $task: $line"
exec bash -c "$line"
