"""Shared fixtures: the repo on sys.path, the shared fixtures folder, a tiny CLIP, demo data."""
from __future__ import annotations

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
