"""Download the split and description files a dataset needs, verified, into place.

    python scripts/get_files.py                       # every dataset
    python scripts/get_files.py dtd oxford_pets       # the ones named
    python scripts/get_files.py --data_root /data     # split files into /data/<each config's folder>
    python scripts/get_files.py dtd --base-url http://mirror.example/RA-FT   # a mirror, same paths

Files come from the published RAFT repository (WideStars/RA-FT) at one pinned commit: split
files into each dataset's folder (where its config reads them), class descriptions into
gpt3_file/. Each file is verified against its git blob id before it is moved into place; a
file already there that verifies is skipped, one that differs is reported and kept (--force
replaces it). Exit code 0 when every file is in place and verified, 2 otherwise.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.fetch import TIMEOUT, fetch  # noqa: E402
from datasets.published import PUBLISHED_FILES, RAW_URL  # noqa: E402
from run.config import data_folder, dataset_config  # noqa: E402
from utils import RaftError, ToolParser, bounded, printable, run_main  # noqa: E402

DATASETS = sorted({f.dataset for f in PUBLISHED_FILES})


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__)
    parser.add_argument("datasets", nargs="*", metavar="DATASET", help=f"default: all ({', '.join(DATASETS)})")
    parser.add_argument("--data_root", help="one folder for all datasets (as DATA= of the sweeps); default: each "
                                            "config's data_path")
    parser.add_argument("--base-url", default=RAW_URL, help=f"where the files lie, under their paths in the "
                                                            f"published repository (default: {RAW_URL})")
    parser.add_argument("--descriptions_dir", default=str(ROOT / "gpt3_file"),
                        help="where description files go (default: gpt3_file/, where `descriptions: auto` looks)")
    parser.add_argument("--force", action="store_true", help="replace files that differ from the published ones")
    parser.add_argument("--timeout", type=bounded(float, 0.5, 600), default=TIMEOUT,
                        help=f"seconds to wait for the server (default {TIMEOUT:g})")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    args = parser.parse_args(argv)
    for name in args.datasets:
        dataset_config(name)   # an unknown name: one line with the closest
        if name not in DATASETS:
            raise RaftError(f"the published code ships no files for '{name}'; it does for {', '.join(DATASETS)}")
    if args.data_root and not Path(args.data_root).is_dir():
        raise RaftError(f"--data_root {args.data_root} is not a folder")
    chosen = args.datasets or DATASETS
    files = []
    for f in PUBLISHED_FILES:
        if f.dataset in chosen:
            place = Path(args.descriptions_dir) if f.kind == "descriptions" else data_folder(f.dataset, args.data_root)
            files.append((f, place / f.target_name))
    outcomes = fetch(files, args.base_url, args.force, args.timeout)
    width = max(len(o.file.dataset) for o in outcomes)
    for o in outcomes:
        print(f"{o.file.dataset:<{width}}  {o.status:<10}  {printable(o.target)}" + (f"  ({o.detail})" if o.detail else ""))
    bad = [o for o in outcomes if o.status in ("failed", "differs")]
    done = sum(o.status in ("downloaded", "present") for o in outcomes)
    print(f"{done} of {len(outcomes)} files in place and verified" + (f"; {len(bad)} not:" if bad else ""))
    for o in bad:
        print(f"error: {o.detail}" if o.status == "failed" else f"differs: {printable(o.target)}: {o.detail}",
              file=sys.stderr)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(run_main(main))
