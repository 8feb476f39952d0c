"""Regenerate every example output the docs show, by running the documented commands.

    python doc/examples/regenerate.py             # offline, CPU; about 10 minutes on 2 cores
    python doc/examples/regenerate.py --keep W    # keep the work folder W (runs, caches)
    python doc/examples/regenerate.py --layout    # only README.md's Layout, from the tree (a second)

Runs in a fresh work folder (the demo data is generated there) and then
- replaces the blocks between ``<!-- example:NAME -->`` and ``<!-- /example -->`` in README.md,
  doc/summarize.md, doc/predict.md, doc/visualize.md and doc/protocols.md with the new outputs;
- rewrites doc/examples/summary*.{md,csv,png} and doc/examples/attention/*.png.
Numbers move when the code or the libraries change; run this instead of editing them by hand.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "doc" / "examples"
PY = sys.executable


def sh(cmd: list[str], cwd: Path) -> tuple[str, float]:
    """Run a command as a user would; its stdout and wall-clock seconds (stops on failure)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout, time.perf_counter() - start


def replace_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``example:name`` markers of ``path``."""
    doc = path.read_text()
    pattern = re.compile(rf"(<!-- example:{re.escape(name)} -->\n)(.*?)(<!-- /example -->)", re.S)
    if not pattern.search(doc):
        sys.exit(f"{path} has no <!-- example:{name} --> block")
    path.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(3), doc))


def final_line(stdout: str) -> str:
    return [line for line in stdout.splitlines() if line.strip()][-1]


def demo_run(work: Path) -> None:
    """The README's quick start, timed from a fresh folder (the images are generated too),
    and the same demo on the tiny ViT and the tiny SigLIP-style model."""
    out, seconds = sh([PY, str(ROOT / "main.py"), "--config", str(ROOT / "configs/demo.yaml")], work)
    replace_block(ROOT / "README.md", "demo-line",
                  f"What the demo prints at the end (measured on a {cpu_count()}-core CPU, {seconds:.0f} s "
                  f"wall-clock including generating the images):\n\n```\n{final_line(out)}\n```")
    out, _ = sh([PY, str(ROOT / "main.py"), "--config", str(ROOT / "configs/demo.yaml"), "--backbone", "tiny-vit"],
                work)
    replace_block(ROOT / "README.md", "demo-vit-line", f"```\n{final_line(out)}\n```")
    out, _ = sh([PY, str(ROOT / "main.py"), "--config", str(ROOT / "configs/demo.yaml"), "--backbone",
                 "tiny-siglip"], work)
    replace_block(ROOT / "README.md", "demo-siglip-line", f"```\n{final_line(out)}\n```")
    # out of output/: the sweep's summary (doc/summarize.md) is of the tiny-rn runs only
    for backbone in ("tiny-vit", "tiny-siglip"):
        shutil.move(work / f"output/demo/{backbone}_16shots_seed1", work / f"{backbone}_demo")


def demo_sweep(work: Path) -> Path:
    """15 demo runs (the quick start's is one of them) and their summary (doc/summarize.md)."""
    common = ["--data_path", str(work / "data/demo"), "--output_dir", str(work / "output"),
              "--cache_dir", str(work / "cache")]
    sh(["bash", str(ROOT / "scripts/sweep.sh"), "demo", "1 2 4 8 16", "1 2 3", *common], work)
    for old in EXAMPLES.glob("summary*"):
        old.unlink()
    sh([PY, str(ROOT / "scripts/summarize.py"), "output/", "--out", str(EXAMPLES)], work)
    replace_block(ROOT / "doc/summarize.md", "demo-summary",
                  "\n".join((EXAMPLES / "summary.md").read_text().splitlines()[2:]))
    return work / "output/demo/tiny-rn_16shots_seed1"


def pick_images(run_dir: Path, work: Path) -> tuple[str, str]:
    """One test image the run classifies correctly and one of another class that it misses."""
    out, _ = sh([PY, str(ROOT / "scripts/predict.py"), str(run_dir.relative_to(work)), "data/demo/images", "--top-k", "1",
                 "--json", "-"], work)
    right = wrong = None
    for p in json.loads(out)["predictions"]:
        if "/test_" not in p["image"]:
            continue
        truth = Path(p["image"]).parent.name.replace("_", " ")
        if p["top"][0]["class"] == truth:
            right = right or p["image"]
        elif wrong is None or Path(wrong).parent == Path(right or "").parent:
            wrong = p["image"]
    return right, wrong


def predict_example(run_dir: Path, work: Path, images: tuple[str, str]) -> None:
    rel = str(run_dir.relative_to(work))
    out, _ = sh([PY, str(ROOT / "scripts/predict.py"), rel, *images, "--top-k", "3", "--json", "predictions.json"], work)
    replace_block(ROOT / "doc/predict.md", "predict",
                  f"```\n$ python scripts/predict.py {rel} {images[0]} \\\n      {images[1]} --top-k 3 "
                  f"--json predictions.json\n{out.rstrip()}\n```")


def visualize_example(run_dir: Path, work: Path, images: tuple[str, str]) -> None:
    target = EXAMPLES / "attention"
    shutil.rmtree(target, ignore_errors=True)
    sh([PY, str(ROOT / "scripts/visualize.py"), str(run_dir.relative_to(work)), *images, "--out", str(target)], work)
    sys.path.insert(0, str(ROOT))
    from inference import attention_maps, load_images, load_run
    run = load_run(run_dir, "cpu")
    lines = []
    for kind, image in zip(("classified correctly", "missed"), images):
        # visualize keeps the images' folders below their common one: <class>/<stem>.png here
        png = next(target.rglob(f"{Path(image).parent.name}/{Path(image).stem}.png"))
        final = target / f"{Path(image).parent.name}_{'correct' if kind.endswith('correctly') else 'missed'}.png"
        png.rename(final)
        png.parent.rmdir()
        _, batch, _ = load_images(run, [work / image])
        maps = attention_maps(run, batch)
        peak = {k: 100 * float(v[0].max()) for k, v in maps.items()}
        lines.append(f"![{Path(image).parent.name.replace('_', ' ')}, {kind}](examples/attention/{final.name})\n\n"
                     f"{kind.capitalize()} ({image}): the class token's most-attended cell holds "
                     f"{peak['class']:.0f}% of its attention, the background token's {peak['background']:.0f}%, "
                     f"CLIP's pool's {peak['clip']:.0f}% (uniform would be {100 / maps['clip'][0].numel():.0f}%).\n")
    replace_block(ROOT / "doc/visualize.md", "visualize", "\n".join(lines))


def protocols_example(work: Path) -> None:
    """doc/protocols.md: base-to-new on the demo (3 seeds), and the demo's pools transferred to
    a folder dataset of the same shapes split anew (transfer_shapes.json)."""
    proto = work / "protocols"
    common = ["--data_path", str(work / "data/demo"), "--output_dir", str(proto), "--cache_dir", str(work / "cache")]
    sh(["bash", str(ROOT / "scripts/sweep.sh"), "demo", "16", "1 2 3", "--protocol", "base2new", *common], work)
    sh(["bash", str(ROOT / "scripts/sweep.sh"), "demo", "16", "1 2 3", *common], work)
    shapes = work / "data" / "shapes"
    if not shapes.exists():
        shutil.copytree(work / "data/demo/images", shapes)
    for seed in (1, 2, 3):
        sh([PY, str(ROOT / "main.py"), "--config", str(ROOT / "configs/folder.yaml"), "--data_path", str(shapes),
            "--eval-only", "--checkpoint", str(proto / f"demo/tiny-rn_16shots_seed{seed}/checkpoint.pt"),
            "--cache_dir", str(work / "cache")], work)
    out, _ = sh([PY, str(ROOT / "scripts/summarize.py"), str(proto), "--out", str(work / "protocols_summary"), "--no-plot"],
                work)
    tables = [block for block in out.split("### ")[1:] if "base-to-new" in block or "cross-dataset" in block]
    text = "\n".join("### " + block.split("written to")[0].rstrip() + "\n" for block in tables)
    replace_block(ROOT / "doc/protocols.md", "protocols",
                  "`bash scripts/sweep.sh demo 16 \"1 2 3\" --protocol base2new`, the same three few-shot runs, and "
                  "each of their pools evaluated with `--eval-only` on a folder dataset of the same eight shapes "
                  "(`data/shapes`, split anew); then `python scripts/summarize.py`. The tiny CLIP's text encoder is "
                  "random, so new classes stay at chance: what the demo shows is the mechanics.\n\n"
                  + text.replace("#### ", "### "))


LAYOUT_PARTS = ("main.py", "main_imagenet.py", "utils.py", "clip", "datasets", "baselines", "run", "run/features",
                "scripts", "scripts/summary", "gpt3_file")


FOLDERS = {"scripts": "the tools: sweeps (*.sh), data, predict, visualize, summarize, the methods alone",
           "gpt3_file": "class descriptions (CaFo's format) and the script that writes them"}


def summary_line(path: Path) -> str:
    """A module's docstring, first sentence (its first line when the sentence runs on)."""
    import ast
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".")
    return first if len(first) <= 86 else first[:86].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def layout_block() -> str:
    """README.md's Layout: every module of the tree with the first sentence of its docstring."""
    tracked = set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split())
    lines = []
    for part in LAYOUT_PARTS:
        path = ROOT / part
        if path.is_file():
            lines.append(f"{part:<32} {summary_line(path)}")
            continue
        about = summary_line(path / "__init__.py") if (path / "__init__.py").is_file() else FOLDERS[part]
        lines.append(f"{part + '/':<32} {about}")
        for module in sorted(path.glob("*.py")):
            if module.name != "__init__.py" and str(module.relative_to(ROOT)) in tracked:
                lines.append(f"  {module.name:<30} {summary_line(module)}")
    others = "configs/ (one YAML per dataset)  bench/ (speed and scale benchmarks)  doc/  tests/"
    return "```\n" + "\n".join(lines) + "\n" + others + "\n```"


def cpu_count() -> int:
    import os
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="work folder to use and keep (default: a temporary one, removed)")
    parser.add_argument("--layout", action="store_true", help="only README.md's Layout section, from the tree")
    args = parser.parse_args()
    replace_block(ROOT / "README.md", "layout", layout_block())
    if args.layout:
        print("README.md's Layout regenerated")
        return
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="raft_examples_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        demo_run(work)
        run_dir = demo_sweep(work)
        images = pick_images(run_dir, work)
        predict_example(run_dir, work, images)
        visualize_example(run_dir, work, images)
        protocols_example(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("examples regenerated: README.md, doc/summarize.md, doc/predict.md, doc/visualize.md, doc/protocols.md, "
          "doc/examples/")


if __name__ == "__main__":
    main()
