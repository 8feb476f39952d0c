# Shared by the scripts: the interpreter and where each config's data lives.
#   PYTHON=.venv/bin/python   an interpreter that is not on PATH (default: python)
#   DATA=/data                one root for every dataset: each config's own folder name under it
PYTHON="${PYTHON:-python}"
ALL_COOP="caltech101 dtd eurosat fgvc food101 oxford_flowers oxford_pets stanford_cars sun397 ucf101"

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

# Print the failures collected in the array named failed, and exit non-zero if there are any.
report_failures() {
  if [[ ${#failed[@]} -gt 0 ]]; then
    echo >&2
    echo "${#failed[@]} run(s) failed:" >&2
    printf '  %s\n' "${failed[@]}" >&2
    exit 1
  fi
}

# Stop with the usage line unless the script's first argument is a checkpoint path.
need_checkpoint() {
  local script="$1"; shift
  if [[ $# -lt 1 || "$1" == --* ]]; then
    echo "usage: bash scripts/$script CHECKPOINT [--key value ...]" >&2
    exit 2
  fi
}
