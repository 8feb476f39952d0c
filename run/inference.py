"""A finished run, loaded for use (predict.py, visualize.py): nothing but its folder is needed.

The checkpoint carries the region pool, the config it was trained with, the class names and
the text classifier; results.json carries the alpha chosen on validation data.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from clip.backbone import FrozenCLIP
from clip.loss import cosine_logits
from clip.published import make_region_pool
from datasets.base import IMAGE_SUFFIXES
from datasets.loader import eval_transform, read_rgb
from run.checkpoints import load_pool_state, read_checkpoint, read_results
from run.config import Config, build_config
from run.model import frozen_clip
from utils import RaftError, ToolParser, resolve_device


@dataclass
class TrainedRun:
    run_dir: Path
    config: Config
    clip: FrozenCLIP
    pool: torch.nn.Module       # the trained region pool (ResNet or ViT)
    text: torch.Tensor          # D × (C+1): class columns, then the background column
    classnames: list[str]
    alpha: float
    alpha_source: str
    device: torch.device

    @property
    def transform(self):
        return eval_transform(self.clip.preprocess)


def run_arguments(description: str) -> argparse.ArgumentParser:
    """The command-line arguments every tool that uses a finished run shares."""
    parser = ToolParser(description=description)
    parser.add_argument("run_dir", help="a run folder (holds checkpoint.pt and results.json)")
    parser.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--weights", help="where to read the backbone weights from, if not where training did")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    return parser


def load_run(run_dir: str | Path, device: str = "auto", weights: str | None = None) -> TrainedRun:
    """Load ``run_dir`` (a run folder with checkpoint.pt and results.json). ``weights``
    overrides where the backbone's weights are read from (e.g. a local copy)."""
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    if not ckpt_path.is_file():
        raise RaftError(f"{run_dir} holds no checkpoint.pt (not a run folder, or training has not finished)")
    ckpt = read_checkpoint(ckpt_path)
    if not {"classnames", "text"} <= set(ckpt):
        raise RaftError(f"{ckpt_path} lacks the class names and text classifier that prediction needs "
                        f"(written by an older version: run the training again with --force)")
    cfg = build_config(None, ckpt["config"] | ({"weights": weights} if weights else {}))
    results_path = run_dir / "results.json"
    if results_path.is_file():
        results = read_results(results_path)
        alpha, source = float(results["alpha"]), f"chosen on {results.get('alpha_source', 'val')}"
    elif cfg.alpha is not None:
        alpha, source = cfg.alpha, "config"
    else:
        raise RaftError(f"{run_dir} has no results.json yet: its alpha is chosen when it is evaluated")
    dev = resolve_device(device)
    clip = frozen_clip(cfg, ckpt.get("trunk_batchnorm")).to(dev)   # statistics: a random trunk's, measured
    pool = make_region_pool(clip, cfg.mask_bg_in_cls, cfg.pool_precision)
    load_pool_state(pool, ckpt, ckpt_path)
    if ckpt["text"].shape[0] != clip.embed_dim:
        raise RaftError(f"checkpoint {ckpt_path}: its text matrix has {ckpt['text'].shape[0]} rows, "
                        f"{cfg.backbone}'s embedding has {clip.embed_dim}")
    return TrainedRun(run_dir, cfg, clip, pool.to(dev).eval(), ckpt["text"].to(dev), list(ckpt["classnames"]),
                      alpha, source, dev)


def image_files(paths: list[str | Path]) -> list[Path]:
    """The given image files, and the image files under the given folders (recursively, sorted)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                              and not f.name.startswith(".")))
        elif p.exists():
            out.append(p)
        else:
            raise RaftError(f"no such file or folder: {p}")
    if not out:
        raise RaftError(f"no images found in {', '.join(map(str, paths))}")
    return out


def load_images(run: TrainedRun, paths: list[Path]) -> tuple[list[Path], torch.Tensor | None, list[str]]:
    """(readable paths, their batch under the eval transform, 'path: reason' of unreadable ones)."""
    good, tensors, errors = [], [], []
    for p in paths:
        try:
            tensors.append(run.transform(read_rgb(str(p))))
            good.append(p)
        except Exception as exc:  # UnreadableImage, or anything PIL raises on odd files
            errors.append(str(exc))
    return good, (torch.stack(tensors).to(run.device) if tensors else None), errors


@torch.no_grad()
def class_probabilities(run: TrainedRun, images: torch.Tensor) -> torch.Tensor:
    """Softmax over the classes of the fused logits ``alpha·cls + (1-alpha)·clip`` (B × C)."""
    fmap, v0 = run.clip.encode_image(images)
    v_cls, _ = run.pool(fmap)
    num_classes = run.text.shape[1] - 1
    scale = run.config.logit_scale
    logits = (run.alpha * cosine_logits(v_cls, run.text[:, :num_classes], scale)
              + (1 - run.alpha) * cosine_logits(v0, run.text[:, :num_classes], scale))
    return logits.softmax(dim=-1)


@torch.no_grad()
def attention_maps(run: TrainedRun, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Where each summary token attends, averaged over heads, as a probability distribution
    over the H×W grid (the feature map's cells, or a ViT's patches; the weight on the summary
    tokens themselves, where they are keys, is left out and the rest renormalised): the class
    token, the background token, and CLIP's own query (its attention pool, its last block, or
    its attention-pool head's latent)."""
    features, _ = run.clip.encode_image(images)
    b, side = features.shape[0], run.clip.grid
    _, weights = run.pool.attention(features)                      # B, heads, 2, keys
    grid = weights[..., run.pool.summary_keys:].mean(1)           # B, 2, HW
    clip_grid = run.clip.clip_attention(features)[..., run.clip.summary_keys:].mean(1)[:, 0]   # B, HW
    maps = {"class": grid[:, 0], "background": grid[:, 1], "clip": clip_grid}
    return {k: (v / v.sum(-1, keepdim=True)).view(b, side, side).float().cpu() for k, v in maps.items()}
