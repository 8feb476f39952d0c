"""A run's results file (``results.json``): written once evaluation is done, read back by
sweeps, transfers, predict and visualize (``run.checkpoints.read_results``).
"""
from __future__ import annotations

import platform
import time
from pathlib import Path

import torch

from clip.published import never_moved
from datasets.published import published_descriptions
from run.context import Model, RunContext, Trained
from run.distributed import WORLD
from run.model import text_source
from utils import write_json


def validation_record(cfg, evaluation: dict) -> dict:
    """What every choice of the run was made on: the validation rule, its images, and where alpha
    was chosen (summarize never averages runs whose validation differs)."""
    return {"source": cfg.val_source, "images": evaluation["sizes"]["val"], "alpha_on": cfg.alpha_on,
            "per_class": min(cfg.shots, 4) if cfg.val_source == "fewshot" else None}


def pool_record(ctx: RunContext, model: Model, trained: Trained) -> dict:
    """The pool's precision, and per tensor the share of entries training never moved from
    their initial values (a fresh pool: the copy of CLIP's) -- float16 updates can round away;
    for dist_exact, whether the trunk's shares rounded as one process's batches."""
    initial = ctx.numerics.pool(model.clip, ctx.cfg.mask_bg_in_cls).state_dict()
    return {"pool_precision": ctx.cfg.pool_precision, "never_moved": never_moved(initial, model.pool.state_dict()),
            **({"share_rounding": trained.share_rounding} if trained.share_rounding else {})}


def write_results(ctx: RunContext, model: Model, trained: Trained, evaluation: dict, baselines: dict | None) -> dict:
    cfg, data, plan, log, device = ctx.cfg, ctx.data, ctx.folder, ctx.log, ctx.device
    metrics, skipped = evaluation["metrics"], evaluation["skipped"]
    results = {
        "dataset": data.name, "backbone": cfg.backbone, "weights": cfg.weights, "shots": cfg.shots,
        "data_sha256": data.digest(),
        "seed": cfg.seed, "num_classes": data.num_classes, "name": cfg.name or None,
        "sizes": evaluation["sizes"],
        "val_source": evaluation["val_source"],
        "validation": validation_record(cfg, evaluation),
        "text_source": text_source(cfg, data), "lr_schedule": "published",
        **({"text_cut": model.text_report} if model.text_report and model.text_report["cut_sentences"] else {}),
        **({"imported_from": plan.ckpt["imported_from"]} if plan.ckpt and "imported_from" in plan.ckpt else {}),
        **({"history": trained.history} if trained.history else {}),
        **({"split_file": str(data.split_file)} if data.split_file else {}),
        **({"split": data.split_record()} if data.split_record() else {}),
        "protocol": "cross_dataset" if plan.transfer_from is not None else cfg.protocol,
        **({"source": {"dataset": plan.transfer_from, "checkpoint": str(plan.ckpt_path)}}
           if plan.transfer_from is not None else {}),
        "skipped_images": {split: len(files) for split, files in skipped.items()},
        **metrics,
        **({"baselines": baselines["methods"], "baselines_seconds": baselines["seconds"]} if baselines else {}),
        "numerics": pool_record(ctx, model, trained),
        "train_seconds": trained.seconds, "eval_seconds": evaluation["seconds"], "world_size": WORLD.size,
        "checkpoint": str(plan.ckpt_path), "device": str(device), "torch": torch.__version__,
        "host": platform.node(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "config": dict(cfg),
        "provenance": provenance(device), "phases": ctx.clock.phases,
    }
    if any(skipped.values()):
        results["skipped_files"] = {split: files for split, files in skipped.items() if files}
    results["alpha_curve"] = results.pop("alpha_curve")  # the long lists last, for readability
    if not WORLD.main:  # one writer; every process holds the same numbers
        return results
    write_json(plan.results_path, results)
    hm = " HM of base and new" if "base2new" in results else ""
    log.info(f"zero-shot{hm} {results['zero_shot_acc']:.2f}%  fine-tuned only{hm} {results['finetuned_acc']:.2f}%  "
             f"RAFT{hm} {results['test_acc']:.2f}% at alpha={results['alpha']:.2f} from {results['alpha_source']}  "
             f"[oracle {results['oracle']['test_acc']:.2f}% at alpha={results['oracle']['alpha']:.2f}]  "
             f"cos(v_cls, v_bg) {results['cls_bg_cosine']:.4f}")
    for name, r in (results.get("shift", {}) | results.get("base2new", {})).items():
        if isinstance(r, dict):
            log.info(f"{name}: RAFT {r['test_acc']:.2f}%  zero-shot {r['zero_shot_acc']:.2f}%")
    if any(skipped.values()):
        log.warning(f"skipped unreadable images: { {k: len(v) for k, v in skipped.items() if v} }")
    log.info(f"results: {plan.results_path}")
    results["run_dir"] = str(plan.run_dir)
    what = (f"{plan.transfer_from} -> {data.name}" if plan.transfer_from is not None else data.name)
    scores = (f"zero-shot {results['zero_shot_acc']:.2f}% -> RAFT {results['test_acc']:.2f}%"
              if "base2new" not in results else
              "base {0:.2f}% new {1:.2f}% HM {2:.2f}% (zero-shot HM {3:.2f}%)".format(
                  results["base2new"]["base"]["test_acc"], results["base2new"]["new"]["test_acc"],
                  results["test_acc"], results["zero_shot_acc"]))
    print(f"\n{what} {cfg.backbone} {cfg.shots}-shot seed {cfg.seed}{' base-to-new' if 'base2new' in results else ''}: "
          f"{scores} ({alpha_note(results)}){description_note(results, data.name)}; "
          f"results in {plan.results_path}")
    return results


def write_method_results(ctx: RunContext, model: Model, trained: Trained, evaluation: dict) -> dict:
    """results.json of a method that trains inside CLIP (``method`` other than raft): the run's
    record as RAFT's has it, its accuracy and zero-shot CLIP's, no alpha (nothing is blended)."""
    from run.methods import LABELS
    cfg, data, plan = ctx.cfg, ctx.data, ctx.folder
    label = LABELS[cfg.method]
    results = {"dataset": data.name, "backbone": cfg.backbone, "weights": cfg.weights, "shots": cfg.shots,
               "data_sha256": data.digest(), "seed": cfg.seed, "num_classes": data.num_classes,
               "name": cfg.name or None, "method": cfg.method, "protocol": cfg.protocol,
               "sizes": evaluation["sizes"], "val_source": evaluation["val_source"],
               "validation": validation_record(cfg, evaluation), "text_source": text_source(cfg, data),
               **evaluation["metrics"], **({"history": trained.history} if trained.history else {}),
               **({"split_file": str(data.split_file)} if data.split_file else {}),
               "skipped_images": {split: len(files) for split, files in evaluation["skipped"].items()},
               "train_seconds": trained.seconds, "eval_seconds": evaluation["seconds"], "world_size": WORLD.size,
               "checkpoint": str(plan.ckpt_path), "device": str(ctx.device), "config": dict(cfg),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "provenance": provenance(ctx.device),
               "phases": ctx.clock.phases}
    if WORLD.main:
        write_json(plan.results_path, results)
    ctx.log.info(f"zero-shot {results['zero_shot_acc']:.2f}%  {label} {results['test_acc']:.2f}%")
    ctx.log.info(f"results: {plan.results_path}")
    results["run_dir"] = str(plan.run_dir)
    print(f"\n{data.name} {cfg.backbone} {cfg.shots}-shot seed {cfg.seed}: zero-shot {results['zero_shot_acc']:.2f}% "
          f"-> {label} {results['test_acc']:.2f}% (last epoch, as published); results in {plan.results_path}")
    return results


def alpha_note(results: dict) -> str:
    """Where the reported alpha came from, as the summary line says it."""
    if results["alpha_source"] == "test":
        return f"alpha {results['alpha']:.2f} chosen on the test labels, alpha_on: test: an oracle, for comparison only"
    return f"alpha {results['alpha']:.2f} from {results['alpha_source']}"


def write_baselines(ctx: RunContext, evaluation: dict, baselines: dict) -> dict:
    """baselines.json of the methods alone (scripts/run_baselines.py), in the run's folder."""
    cfg, data = ctx.cfg, ctx.data
    results = {"dataset": data.name, "backbone": cfg.backbone, "weights": cfg.weights, "shots": cfg.shots,
               "seed": cfg.seed, "protocol": cfg.protocol, "num_classes": data.num_classes,
               "sizes": evaluation["sizes"], "val_source": evaluation["val_source"],
               "validation": validation_record(cfg, evaluation),
               "baselines": baselines["methods"], "baselines_seconds": baselines["seconds"], "device": str(ctx.device),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "phases": ctx.clock.phases}
    if WORLD.main:
        write_json(ctx.folder.results_path, results)
    print(f"\n{data.name} {cfg.backbone} {cfg.shots}-shot seed {cfg.seed}: "
          + ", ".join(f"{k} {v['test_acc']:.2f}%" for k, v in baselines["methods"].items())
          + f"; results in {ctx.folder.results_path}")
    return results


def description_note(results: dict, dataset: str) -> str:
    """For a dataset whose description file the published code ships, a run that does not use
    that file says so in its summary line, and how to get it."""
    source = results["text_source"]
    if published_descriptions(dataset) is None or source.get("published"):
        return ""
    used = "templates" if source["kind"] == "templates" else f"descriptions {Path(source['file']).name}"
    return (f"; text: {used}, not the published descriptions (python scripts/get_files.py {dataset} "
            f"fetches them)")


def provenance(device: torch.device) -> dict:
    """What produced the numbers: the code's git commit (and whether the tree had changes), the
    libraries' versions, the threads and the device, the command line."""
    import subprocess
    import sys

    import numpy
    import open_clip
    import PIL
    import torchvision

    root = Path(__file__).resolve().parents[1]

    def git(*args) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if status is not None else None,
            "python": sys.version.split()[0], "torch": torch.__version__, "torchvision": torchvision.__version__,
            "open_clip": open_clip.__version__, "numpy": numpy.__version__, "pillow": PIL.__version__,
            "torch_threads": torch.get_num_threads(),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
            or platform.machine(),
            "command": [sys.executable, *sys.argv]}
