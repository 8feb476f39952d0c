# Shared by the scripts: the interpreter, where each config's data lives, help, and the
# bookkeeping of a loop of runs (progress, Ctrl-C, the summary).
#   PYTHON=.venv/bin/python   an interpreter that is not on PATH (default: python)
#   DATA=/data                one root for every dataset: each config's own folder name under it
PYTHON="${PYTHON:-python}"
# The ten CoOp datasets of the benchmark, from the dataset table (datasets/coop.py, BENCHMARK);
# asked for only where no dataset list is given: "${DATASETS:-$(all_coop)}".
all_coop() {
  "$PYTHON" -c 'from datasets import BENCHMARK; print(" ".join(d for d in BENCHMARK if d != "imagenet"))' \
    || { echo "cannot run $PYTHON to read the dataset table (set PYTHON=...)" >&2; exit 2; }
}

# split_arguments "$@": the grid's positional words (positional) and the config overrides from
# the first --key on (overrides), as every wrapper of sweep.sh takes them.
split_arguments() {
  positional=()
  while [[ $# -gt 0 && "$1" != --* ]]; do positional+=("$1"); shift; done
  overrides=("$@")
}

# -h/--help anywhere among the arguments: print the calling script's header comment and exit.
help_on_request() {
  local script="$1"; shift
  local arg
  for arg in "$@"; do
    if [[ "$arg" == -h || "$arg" == --help ]]; then
      sed -n '2,/^[^#]/{/^#/!q;s/^#\( \|$\)//;p}' "$script"   # '#SBATCH' lines shown as they are
      exit 0
    fi
  done
}

# "--data_path $DATA/<folder>" for a config (nothing when DATA is unset): the last
# component of the config's own data_path, under $DATA.
data_args() {
  [[ -z "${DATA:-}" ]] && return
  local folder
  folder=$(sed -n 's/^data_path:[[:space:]]*\([^#[:space:]]*\).*/\1/p' "configs/$1.yaml" | head -n 1)
  echo "--data_path ${DATA%/}/$(basename "${folder:-$1}")"
}

# The entry point of a dataset's runs.
entry_of() {
  if [[ "$1" == imagenet ]]; then echo main_imagenet.py; else echo main.py; fi
}

# ---- a loop of runs: call start_runs TOTAL [ALREADY_FINISHED], then run_one LABEL COMMAND... per run,
# then finish_runs.
# One Ctrl-C (or SIGTERM) stops the whole loop: the run in progress saves and exits (130), no
# further run starts, and the summary (done / failed / not started) is printed.
start_runs() {
  total_runs="$1"; started=0; stopped=0; done_runs=(); failed=(); times=(); already="${2:-0}"
  trap 'stopped=1' INT TERM
}

# Run one command (already started runs count); its exit code decides where it is listed.
run_one() {
  local label="$1"; shift
  started=$((started + 1))
  echo "=== [$started/$total_runs] $label"
  local begin=$SECONDS rc=0
  "$@" || rc=$?
  local took=$((SECONDS - begin))
  times+=("$took")
  case $rc in
    0) done_runs+=("$label") ;;
    130|143) stopped=1; failed+=("$label (stopped)") ;;
    *) failed+=("$label") ;;
  esac
  local sum=0 t
  for t in "${times[@]}"; do sum=$((sum + t)); done
  local left=$((total_runs - started))
  echo "--- [$started/$total_runs] $label: $( ((rc == 0)) && echo done || echo "failed ($rc)") in ${took}s" \
       "$( ((left > 0 && stopped == 0)) && echo "; about $((sum / started * left))s for the $left left" )"
}

# The summary; exit code 130 when stopped, 1 when a run failed, 0 otherwise.
finish_runs() {
  local not_started=$((total_runs - started))
  echo >&2
  echo "${#done_runs[@]} done, ${#failed[@]} failed, $not_started not started$( ((already)) && echo ", $already already finished (left out)")$( ((stopped)) && echo " (stopped by a signal)")" >&2
  if [[ ${#failed[@]} -gt 0 ]]; then
    echo "${#failed[@]} run$( ((${#failed[@]} == 1)) || echo s) failed:" >&2
    printf '  %s\n' "${failed[@]}" >&2
  fi
  ((stopped)) && exit 130
  [[ ${#failed[@]} -gt 0 ]] && exit 1
  exit 0
}

# Stop with the usage line unless the script's first argument is a checkpoint path.
need_checkpoint() {
  local script="$1"; shift
  if [[ $# -lt 1 || "$1" == --* ]]; then
    echo "usage: bash scripts/$script CHECKPOINT [--key value ...]" >&2
    exit 2
  fi
}
