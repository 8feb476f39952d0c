"""Shared fixtures: the repo on sys.path, the shared fixtures folder, a tiny CLIP, demo data."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures"


def shared_fixture(*parts: str) -> Path:
    """A file under ../shared/fixtures, or skip the test (with the reason) when absent."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (the project's ../shared folder is absent)")
    return path


@pytest.fixture(scope="session")
def tiny_clip():
    from clip.backbone import FrozenCLIP, load_open_clip
    return FrozenCLIP(load_open_clip("tiny-rn", None), "tiny-rn")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A small generated dataset in the CoOp layout: 4 classes, 8/4/8 images per class."""
    from datasets.demo import ensure_demo_dataset
    root = tmp_path_factory.mktemp("demo")
    ensure_demo_dataset(root, per_split=(8, 4, 8), num_classes=4, size=96)
    return root


# --------------------------------------------------------------------------- a small CoOp-layout dataset
CLASSES = ["red_circle", "blue_square", "green_triangle"]
SPLIT = "split_zhou_DescribableTextures.json"


@pytest.fixture()
def dtd(demo_root, tmp_path):
    """A 3-class dataset in dtd's CoOp layout (images/ + split json), built from demo images."""
    return build_dtd(demo_root, tmp_path / "dtd")


def build_dtd(demo_root, root):
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSES):
        (root / "images" / name).mkdir(parents=True)
        sources = sorted((demo_root / "images" / name).glob("*.jpg"))
        for split_name, count in (("train", 6), ("val", 2), ("test", 3)):
            for _ in range(count):
                src = sources.pop()
                shutil.copy(src, root / "images" / name / src.name)
                split[split_name].append([f"{name}/{src.name}", label, name.replace("_", " ")])
    (root / SPLIT).write_text(json.dumps(split))
    return root


def args_for(root, tmp_path, *extra):
    return ["--config", str(ROOT / "configs/dtd.yaml"), "--data_path", str(root), "--num_classes", "3",
            "--backbone", "tiny-rn", "--weights", "null", "--calibrate_bn", "true", "--descriptions", "null",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--train_epoch", "3",
            "--warmup_epoch", "1", "--batch_size", "8", "--num_workers", "0", "--shots", "4", "--lr", "3e-3",
            "--name", "", *extra]


def cli(argv, capsys, entry="main"):
    """Run an entry point in this process, as its command line would; (exit code, stdout, stderr)."""
    import importlib
    from utils import run_main
    module = importlib.import_module(entry)
    code = run_main(module.main, argv)
    out, err = capsys.readouterr()
    return code, out, err


def run_dir(tmp_path):
    return tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1"


def trained_nothing(tmp_path):
    """Whether the dtd run of ``args_for`` left neither a checkpoint nor a resume state (refused before training)."""
    folder = run_dir(tmp_path)
    return not (folder / "checkpoint.pt").exists() and not (folder / "resume.pt").exists()


def folder_copy(dtd: Path, dest: Path, classes=("red_circle", "blue_square", "green_triangle")) -> Path:
    """The dtd fixture's images as a folder dataset (one folder per class)."""
    for name in classes:
        shutil.copytree(dtd / "images" / name, dest / name)
    return dest


def one_line_error(code, err, *fragments):
    assert code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


def poison_loss_at(monkeypatch, call: int) -> None:
    """Make the call-th training loss NaN, so a run stops there after its last saved state, as a kill would."""
    from clip import loss
    real, calls = loss.raft_loss, []

    def poisoned(*args, **kwargs):
        loss, terms = real(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan"), terms) if len(calls) == call else (loss, terms)

    monkeypatch.setattr(loss, "raft_loss", poisoned)


def train_with(pool, text, source, cfg, log, state_path=None, device="cpu"):
    """``run.training.train_pool`` on RAFT's learner for ``pool`` (the region pool, or a float16
    published one) in the config's numerics."""
    import torch
    from clip.published import numerics_of
    from run.training import RaftLearner, train_pool
    learner = RaftLearner(pool, text, numerics_of(cfg.pool_precision), cfg, torch.device(device), cfg.amp)
    return train_pool(learner, source, cfg, log, state_path)


@pytest.fixture(scope="session")
def tiny_vit():
    from clip.backbone import FrozenCLIP, load_open_clip
    return FrozenCLIP(load_open_clip("tiny-vit", None), "tiny-vit")
