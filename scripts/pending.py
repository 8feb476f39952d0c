"""The sweep's pending runs, one shell command per line (used by sweep.sh --list and GPUS=).

    python scripts/pending.py "dtd eurosat" "1 2 4 8 16" "1 2 3" [--key value ...]
    DATA=/data python scripts/pending.py ...     # each dataset read from /data/<its folder>

A run is pending while its run folder has no results.json. The folder is found as main.py
finds it (the dataset's name, the backbone, shots, seed, protocol and the settings' tag),
without reading the dataset itself.
"""
from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.folder import folder_root  # noqa: E402
from run.config import Config, data_folder, parse_args  # noqa: E402
from run.folders import run_dir_of, run_tag  # noqa: E402
from utils import RaftError, printable, run_main  # noqa: E402


def dataset_name(cfg: Config) -> str:
    """The name a run folder is filed under: your folder's name (as main.py names it), else the
    config's dataset."""
    return folder_root(cfg.data_path).name if cfg.dataset == "folder" else cfg.dataset


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    if len(argv) < 3:
        raise RaftError('usage: python scripts/pending.py "DATASETS" "SHOTS" "SEEDS" [--key value ...]')
    datasets, shots, seeds, overrides = argv[0].split(), argv[1].split(), argv[2].split(), argv[3:]
    python, root = os.environ.get("PYTHON", "python"), os.environ.get("DATA")
    listed = finished = 0
    commands, missing, checked = [], [], set()
    for dataset in datasets:
        entry = "main_imagenet.py" if dataset == "imagenet" else "main.py"
        # DATA=/data: the config's own folder name under it (as scripts/common.sh's data_args)
        where = ["--data_path", str(data_folder(dataset, root))] if root else []
        for shot in shots:
            for seed in seeds:
                args = ["--config", f"configs/{dataset}.yaml", "--shots", shot, "--seed", seed, *where, *overrides]
                cfg, flags = parse_args(args, "")
                cfg = Config(dict(cfg) | {"name": run_tag(cfg, flags)})
                if dataset not in checked:   # its folder, as the runs will read it (the demo is generated)
                    checked.add(dataset)
                    if dataset != "demo" and not Path(cfg.data_path).is_dir():
                        missing.append(f"{dataset} ({printable(cfg.data_path)})")
                listed += 1
                if (run_dir_of(cfg, dataset_name(cfg)) / "results.json").is_file():
                    finished += 1
                else:
                    commands.append(f"cd {shlex.quote(str(ROOT))} && {shlex.join([python, entry, *args])}")
    if missing:   # every dataset checked at once, before any run starts
        raise RaftError(f"no data for {len(missing)} of {len(datasets)} dataset(s): {', '.join(missing)}; "
                        f"python scripts/get_files.py fetches the split and description files, doc/datasets.md says "
                        f"where each dataset's images come from, python scripts/check_data.py checks them (DATA=/root "
                        f"for one root of all datasets)")
    if os.environ.get("PENDING_COUNT"):   # sweep.sh: the runs left out, for its final summary
        print(f"finished {finished}")
    for command in commands:
        print(command)
    if finished:
        print(f"{finished} of {listed} run{'s' if listed != 1 else ''} already finished: left out", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
