"""What the phases of a run exchange: the run's context (what every phase reads) and the
results each phase hands to the next. Every phase of ``run.engine.run`` takes the context
(and the model) and returns what it produces; nothing is written into another phase's object.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from clip.backbone import FrozenCLIP
from clip.published import Numerics
from datasets import DatasetSplits, Datum
from run.config import Config
from utils import PhaseClock, RaftError, first_line


@dataclass(frozen=True)
class RunFolder:
    """Where a run reads and writes, and what it starts from (``run.folders.plan_run``)."""
    log: logging.Logger
    run_dir: Path
    results_path: Path
    ckpt_path: Path
    state_path: Path | None = None    # where training saves its resumable state (None: no training)
    ckpt: dict | None = None          # a trained pool to evaluate instead of training one
    transfer_from: str | None = None  # evaluating a pool trained on this other dataset
    trains: bool = True               # False: --eval-only, a finished training, or the baselines alone


@dataclass(frozen=True)
class Task:
    """What a run trains on and what it is scored on (doc/protocols.md). ``train`` is the
    dataset or its base classes (always the first labels, so their labels need no mapping);
    ``targets`` are the class sets whose test images are scored, each with its own text."""
    train: DatasetSplits
    targets: dict[str, DatasetSplits]


@dataclass(frozen=True)
class ImageSets:
    train: list[Datum]    # the few-shot training set (empty for a transfer: nothing is trained or chosen)
    val: list[Datum]
    val_source: str | None


@dataclass(frozen=True)
class Model:
    clip: FrozenCLIP
    text: torch.Tensor           # D × (C+1) of the trained classes: class columns, then the background column
    pool: torch.nn.Module | None  # the region pool (None: the baselines alone, nothing is trained)
    target_text: dict[str, torch.Tensor]   # the same for each scored class set
    text_report: dict | None = None        # what the trained classes' sentences lost to the text window


@dataclass(frozen=True)
class Trained:
    """What training (or loading a trained pool) leaves for the results."""
    seconds: float | None              # None: --eval-only (training happened elsewhere, earlier)
    history: list[dict] | None
    share_rounding: dict | None = None  # dist_exact: whether the processes' trunk shares round as one batch


@dataclass(frozen=True)
class RunContext:
    """What every phase of one run reads."""
    cfg: Config
    data: DatasetSplits
    folder: RunFolder
    device: torch.device
    amp: bool                   # mixed precision for the frozen trunk (CUDA with amp on)
    numerics: Numerics          # the pool's: float32 (amp allowed) or the published float16 step
    clock: PhaseClock
    task: Task | None = None
    images: ImageSets | None = None

    @property
    def log(self) -> logging.Logger:
        return self.folder.log

    @property
    def pool_amp(self) -> bool:
        """Mixed precision for the region pool: where the trunk has it and the numerics allow it."""
        return self.amp and self.numerics.amp

    def phase(self, name: str, fn: Callable, *args, **kwargs):
        """``fn(self, *args)``, timed (wall, CPU, peak memory) under ``name`` in results.json's phases;
        the GPU running out of memory in it becomes one line saying which batch size to lower."""
        try:
            return self.clock.measure(name, fn, self, *args, **kwargs)
        except torch.OutOfMemoryError as exc:
            raise RaftError(out_of_memory(self, name, exc)) from None

    def train_cache_name(self) -> str:
        """The name of this run's few-shot images in the feature caches (their views, their features)."""
        return f"{self.data.name}_train_{self.cfg.shots}shots_seed{self.cfg.seed}"


def out_of_memory(ctx: "RunContext", phase: str, exc: BaseException) -> str:
    """What to do when the device's memory ran out: the batch size of that phase, and how the
    run goes on (a batch size is part of a run's settings: a lower one is a new run)."""
    key = "batch_size" if phase == "train_or_load" else "eval_batch_size"
    what = "training" if key == "batch_size" else "the frozen trunk's features and the evaluation"
    saved = " from its last save" if key == "batch_size" else " (its trained checkpoint is kept)"
    return (f"out of {ctx.device} memory in {phase} ({first_line(exc, 120)}): {what} ran at {key} "
            f"{ctx.cfg[key]}; lower it (--{key} {max(1, ctx.cfg[key] // 2)}; a new run: it is part of a run's "
            f"settings, so give it --name), or free the device's memory and run the same command: it goes on{saved}")
