"""One command for a machine with a GPU: every CUDA check and measurement, one table.

    python bench/device_check.py                  # on the GPU (cuda): under 10 minutes on one GPU
    python bench/device_check.py --device cpu     # a dry run on the CPU: the same table, CPU figures
    bash bench/device_check.sh                    # the same, from a shell

Offline (random weights, generated data), one GPU at most. In order, each with its own time
limit so that one slow step cannot eat the others' time:

1. the CUDA test tier (``pytest -m cuda``; with ``--device cpu`` the tier's tests run on the CPU
   as a dry run of their plumbing, which checks no CUDA branch);
2. ``bench/bench_speed.py`` at RN50 and ViT-B/16 sizes (random weights; the CPU dry run: the
   tiny ResNet and ViT): the step's time over the trunk's forward, the device's idle share,
   images per second, peak memory;
3. ``bench/bench_scale.py``: 1000 classes and 50 epochs on the GPU (the CPU dry run: 50
   classes, 2 epochs), every method on: the phases' costs and the methods' share of the run.

It writes ``device_check.json`` and ``device_check.md`` (the table, every figure, what failed
and its last lines of output) under ``--out`` and prints the table. doc/performance.md says
where a GPU's table goes.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from utils import ToolParser, bounded, run_main  # noqa: E402


def step(name: str, cmd: list[str], limit: float, env: dict | None = None) -> dict:
    """Run one step; its status, seconds and last lines of output (the whole output beside it)."""
    start = time.perf_counter()
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, cwd=ROOT,
                              env=dict(os.environ, **(env or {})))
        status, output = ("passed" if proc.returncode == 0 else f"failed ({proc.returncode})"), proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"stopped after {limit:.0f}s"
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
    seconds = time.perf_counter() - start
    print(f"   {status} in {seconds:.0f}s", flush=True)
    return {"step": name, "status": status, "seconds": round(seconds, 1), "tail": output[-3000:], "output": output}


def pytest_counts(output: str) -> str:
    last = [line for line in output.splitlines() if " passed" in line or " failed" in line or " skipped" in line]
    return last[-1].strip("= ") if last else "no summary"


def speed_figures(path: Path) -> dict:
    if not path.is_file():
        return {}
    r = json.loads(path.read_text())
    e = r.get("epoch", {})
    faithful = e.get("faithful", {})
    figures = {"step / trunk forward": e.get("step_over_trunk"), "device idle": faithful.get("device_idle_share"),
               "trunk share": faithful.get("trunk_share"),
               "images/s": r["machine"]["train_images"] / faithful["epoch_seconds"] if faithful.get("epoch_seconds")
               else None, "peak GPU MiB": r.get("peak_gpu_mb")}
    return {k: round(v, 3) for k, v in figures.items() if v is not None}


def scale_figures(output: str) -> dict:
    lines = [line.strip() for line in output.splitlines() if "ratio" in line]
    return {"ratios": lines}


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__)
    parser.add_argument("--device", default="cuda", help="cuda (the GPU, default) or cpu (a dry run)")
    parser.add_argument("--out", default=None, help="folder for the table and the outputs (default: "
                                                    "device_check_<time>/ here)")
    parser.add_argument("--minutes", type=bounded(float, 1, 120), default=None,
                        help="the whole check's time budget (default: 9.5 on the GPU, 5 on the CPU)")
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    if gpu:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device (torch.cuda.is_available() is False); "
                             "use --device cpu for the dry run")
    out = Path(args.out or f"device_check_{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    budget = 60 * (args.minutes or (9.5 if gpu else 5.0))
    share = {"tier": 0.30, "speed": 0.35, "scale": 0.35}
    py = sys.executable
    steps = []
    tier_env = {} if gpu else {"RAFT_CUDA_TIER": "cpu"}
    tier = step("CUDA test tier" + ("" if gpu else " (dry run on the CPU)"),
                [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-x" if not gpu else "-q"],
                budget * share["tier"], tier_env)
    tier["figures"] = {"tests": pytest_counts(tier["output"])}
    steps.append(tier)
    # the GPU: RN50 and ViT-B/16 sizes; the CPU dry run: the tiny models of the same families (RN50 on
    # two cores takes minutes for a first look)
    for backbone in ("RN50", "ViT-B-16") if gpu else ("tiny-rn", "tiny-vit"):
        path = out / f"speed_{backbone}.json"
        extra = [] if gpu else ["--quick"]
        s = step(f"bench_speed {backbone}", [py, "bench/bench_speed.py", "--device", args.device, "--backbone", backbone,
                                             "--json", str(path), *extra], budget * share["speed"] / 2)
        s["figures"] = speed_figures(path)
        steps.append(s)
    scale = ["--classes", "1000", "--epochs", "50"] if gpu else ["--classes", "50", "--epochs", "2"]
    s = step("bench_scale", [py, "bench/bench_scale.py", *scale, "--device", args.device, "--work", str(out / "scale"),
                             "--json", str(out / "scale.json")], budget * share["scale"])
    s["figures"] = scale_figures(s["output"])
    steps.append(s)

    import torch
    machine = {"device": args.device, "name": torch.cuda.get_device_name() if gpu else "CPU",
               "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    for s in steps:
        (out / f"{s['step'].split()[0]}_{len(s['step'])}.log").write_text(s.pop("output"))
    (out / "device_check.json").write_text(json.dumps({"machine": machine, "steps": steps}, indent=2))
    lines = [f"# Device check: {machine['name']} ({machine['device']}), torch {machine['torch']}, CUDA "
             f"{machine['cuda']}", "", "| step | status | seconds | figures |", "|---|---|---|---|"]
    for s in steps:
        figures = "; ".join(f"{k}: {v}" for k, v in s["figures"].items()) or "–"
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {figures} |")
    failed = [s for s in steps if s["status"] != "passed"]
    for s in failed:
        lines += ["", f"## {s['step']}: {s['status']}", "", "```", s["tail"][-1500:], "```"]
    (out / "device_check.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[:4 + len(steps)]))
    print(f"\nwritten: {out / 'device_check.md'} and {out / 'device_check.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_main(main)
