"""Check datasets before training: every file a run will read is there and readable.

    python scripts/check_data.py                    # every dataset, at each config's data_path
    python scripts/check_data.py dtd eurosat        # the ones named
    python scripts/check_data.py --data_root /data  # all under one root (as DATA= of the sweeps)
    python scripts/check_data.py imagenet --full    # decode every image, not a sample
    python scripts/check_data.py --json             # for scripts
    python scripts/check_data.py --folder ~/photos/birds   # your own images (dataset: folder), anywhere

Per dataset: the folder, the split file (and whether it is the published one), the folder
layout recognised, the class count against the config, every image the split lists (all
missing ones counted per split, the first few named, the folder looked in), and a sample of
the images decoded (``--full``: all of them). Exit code 0 when everything is there and
readable, 1 when anything is missing or unreadable, 2 for a wrong command.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets import BENCHMARK  # noqa: E402
from datasets.check import check_dataset, check_folder, split_counts  # noqa: E402
from run.config import data_folder, dataset_config, file_values  # noqa: E402
from utils import RaftError, ToolParser, bounded, printable, run_main  # noqa: E402

DATASETS = list(BENCHMARK)


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__)
    parser.add_argument("datasets", nargs="*", metavar="DATASET", help=f"default: all ({', '.join(DATASETS)})")
    parser.add_argument("--data_root", help="one folder for all datasets; default: each config's data_path")
    parser.add_argument("--full", action="store_true", help="decode every image (default: a sample)")
    parser.add_argument("--sample", type=bounded(int, 0, 1_000_000), default=200,
                        help="images decoded per dataset without --full (default 200)")
    parser.add_argument("--folder", action="append", default=[], metavar="PATH",
                        help="also check a folder of your own images (one sub-folder per class, or train/ val/ test/ "
                             "of them), as configs/folder.yaml reads it; repeatable")
    parser.add_argument("--json", action="store_true", help="print the reports as JSON")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    names = args.datasets or ([] if args.folder else DATASETS)
    configs = {name: dataset_config(name) for name in names}   # unknown names: one line, the closest named
    if args.data_root and not Path(args.data_root).is_dir():
        raise RaftError(f"--data_root {args.data_root} is not a folder")
    classes_of = {p.stem: file_values(p)["num_classes"] for p in (ROOT / "configs").glob("*.yaml")
                  if file_values(p)["num_classes"]}
    sample = None if args.full else args.sample
    reports = [check_dataset(name, data_folder(name, args.data_root), file_values(configs[name])["num_classes"],
                             sample, classes_of) for name in names]
    folder_cfg = file_values(ROOT / "configs" / "folder.yaml")
    reports += [check_folder(Path(os.path.expanduser(f)), sample, folder_cfg["split_fractions"], folder_cfg["split_seed"])
                for f in args.folder]
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=2, ensure_ascii=False))
    else:
        header = ["dataset", "status", "split file", "layout", "classes", "train", "val", "test", "opened", "folder"]
        rows = [[r.dataset, r.status, r.split_file, r.layout, r.classes, *split_counts(r),
                 f"{r.opened - len(r.unreadable)}/{r.opened}", printable(r.folder)] for r in reports]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for row in (header, *rows):
            print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip())
        for r in reports:
            for text in r.problems:
                print(f"{r.dataset}: {text}")
        print("train/val/test: images present / listed; opened: decoded / tried"
              + ("" if args.full else f" (a sample of {args.sample}; --full for all)"))
    return 0 if all(r.status == "ok" for r in reports) else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
