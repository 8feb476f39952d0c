"""main.py and main_imagenet.py as a user runs them, on generated images with the tiny CLIP."""
import json
import random
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

# --name "": the plain run-folder name although these settings differ from the config file
FAST = ["--name", "", "--train_epoch", "4", "--warmup_epoch", "1", "--batch_size", "16", "--num_workers", "0",
        "--lr", "3e-3", "--shots", "4"]


def run(script, *args, cwd):
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    return proc


@pytest.fixture(scope="module")
def demo_run(demo_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    args = ["--config", str(ROOT / "configs/demo.yaml"), "--data_path", str(demo_root), "--num_classes", "4",
            "--output_dir", "out", "--cache_dir", "cache", *FAST]
    proc = run("main.py", *args, cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, args, proc


@pytest.mark.slow
def test_main_writes_a_complete_run_folder(demo_run):
    work, _, proc = demo_run
    run_dir = work / "out" / "demo" / "tiny-rn_4shots_seed1"
    results = json.loads((run_dir / "results.json").read_text())
    for key in ("dataset", "backbone", "shots", "seed", "sizes", "zero_shot_acc", "finetuned_acc", "alpha",
                "test_acc", "oracle", "train_seconds", "eval_seconds"):
        assert key in results, key
    assert results["sizes"] == {"train": 16, "val": 16, "test": 32}
    assert results["alpha_source"] == "val" and 0.0 <= results["alpha"] <= 1.0
    assert results["oracle"]["test_acc"] >= results["test_acc"]
    assert results["train_seconds"] > 0 and results["eval_seconds"] > 0
    curve = results["alpha_curve"]
    assert len(curve["alphas"]) == 51 and curve["test"][0] == results["zero_shot_acc"]
    assert curve["test"][-1] == results["finetuned_acc"]
    fewshot = json.loads((run_dir / "fewshot.json").read_text())
    assert len(fewshot["items"]) == 16 and fewshot["seed"] == 1
    assert "epoch   4/4" in (run_dir / "log.txt").read_text()
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["backbone"] == "tiny-rn" and ckpt["num_classes"] == 4 and ckpt["config"]["shots"] == 4
    assert "positional_embedding" in ckpt["pool"]
    assert (run_dir / "config.yaml").is_file()
    assert "RAFT" in proc.stdout and list((work / "cache" / "text").glob("demo_tiny-rn_*.pt"))


@pytest.mark.slow
def test_rerun_is_skipped_and_eval_only_reproduces_the_numbers(demo_run):
    work, args, _ = demo_run
    again = run("main.py", *args, cwd=work)
    assert again.returncode == 0 and "already finished" in again.stdout
    run_dir = work / "out" / "demo" / "tiny-rn_4shots_seed1"
    evaluated = run("main.py", *args, "--eval-only", "--checkpoint", str(run_dir / "checkpoint.pt"), cwd=work)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    a = json.loads((run_dir / "results.json").read_text())
    b = json.loads((run_dir / "results_eval.json").read_text())
    assert (b["test_acc"], b["alpha"], b["zero_shot_acc"]) == (a["test_acc"], a["alpha"], a["zero_shot_acc"])
    assert b["train_seconds"] is None
    assert "BatchNorm statistics restored from" in (run_dir / "log.txt").read_text()   # not re-measured


@pytest.mark.slow
def test_missing_dataset_names_the_expected_layout(tmp_path):
    proc = run("main.py", "--config", str(ROOT / "configs/oxford_pets.yaml"), "--data_path", "nowhere", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "data_path nowhere does not exist" in proc.stderr and "split_zhou_OxfordPets.json" in proc.stderr


def build_imagenet(root, classes=3, train=10, val=3):
    from datasets.demo import DEMO_CLASSES, draw_image
    rng = random.Random(0)
    wnids = [f"n0{i:07d}" for i in range(classes)]
    (root / "classnames.txt").write_text("".join(f"{w} {DEMO_CLASSES[i][0]}\n" for i, w in enumerate(wnids)))
    for split, n in (("train", train), ("val", val)):
        for i, w in enumerate(wnids):
            folder = root / "images" / split / w
            folder.mkdir(parents=True)
            for k in range(n):
                draw_image(DEMO_CLASSES[i][2], DEMO_CLASSES[i][1], 96, rng).save(folder / f"{k}.JPEG")
    sketch = root / "sketch_root" / "sketch"
    for i, w in enumerate(wnids[:2]):       # a 2-class variant, like ImageNet-A/R's subsets
        (sketch / w).mkdir(parents=True)
        for k in range(2):
            draw_image(DEMO_CLASSES[i][2], DEMO_CLASSES[i][1], 96, rng).save(sketch / w / f"{k}.jpg")
    return wnids


@pytest.mark.slow
def test_imagenet_train_then_test_from_checkpoint(tmp_path):
    data = tmp_path / "imagenet"
    data.mkdir()
    build_imagenet(data)
    args = ["--config", str(ROOT / "configs/imagenet.yaml"), "--data_path", str(data), "--num_classes", "3",
            "--backbone", "tiny-rn", "--weights", "null", "--calibrate_bn", "true", "--val_per_class", "2",
            "--shift_sets", f"{{imagenet_sketch: {data / 'sketch_root'}}}", "--output_dir", "out", *FAST]
    proc = run("main_imagenet.py", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "out" / "imagenet" / "tiny-rn_4shots_seed1"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["sizes"] == {"train": 12, "val": 6, "test": 9}
    assert results["val_source"] == "train images outside the few-shot set" and results["alpha_source"] == "val"
    assert results["shift"]["imagenet_sketch"]["size"] == 4
    val = json.loads((run_dir / "val_from_train.json").read_text())["items"]
    shots = json.loads((run_dir / "fewshot.json").read_text())["items"]
    assert not {v[0] for v in val} & {s[0] for s in shots}
    # test_imagenet.sh's command: evaluation only, from the checkpoint, settings from the checkpoint
    proc = run("main_imagenet.py", *args, "--shots", "2", "--val_per_class", "3", "--eval-only", "--checkpoint",
               str(run_dir / "checkpoint.pt"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    evaluated = json.loads((run_dir / "results_shift.json").read_text())     # with shift sets: their own file
    assert evaluated["shots"] == 4 and evaluated["sizes"] == results["sizes"]      # the run's own val images
    assert (evaluated["alpha"], evaluated["test_acc"]) == (results["alpha"], results["test_acc"])
    assert "imagenet tiny-rn 4-shot seed 1" in proc.stdout
    assert evaluated["shift"]["imagenet_sketch"] == results["shift"]["imagenet_sketch"]


@pytest.mark.slow
def test_sweep_script_skips_finished_runs_and_reuses_eval_features(demo_root, tmp_path):
    overrides = ["--data_path", str(demo_root), "--num_classes", "4", "--output_dir", str(tmp_path / "out"),
                 "--cache_dir", str(tmp_path / "cache"), "--calibrate_bn", "false", *FAST]
    cmd = ["bash", str(ROOT / "scripts/sweep.sh"), "demo", "4", "1 2", *overrides]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted((tmp_path / "out" / "demo").iterdir())
    assert [r.name for r in runs] == ["tiny-rn_4shots_seed1", "tiny-rn_4shots_seed2"]
    assert all((r / "results.json").is_file() for r in runs)
    second_log = (runs[1] / "log.txt").read_text()
    assert "demo_val: cached trunk features" in second_log and "demo_test: cached trunk features" in second_log
    stores = [p.name for p in (tmp_path / "cache" / "features").iterdir() if p.name.startswith(("demo_val", "demo_test"))]
    assert len(stores) == 2      # val + test, once for the sweep (each run's baselines cache its few-shot images too)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "2 of 2 runs already finished: left out" in again.stderr   # no run started
