"""A run's folder: its name and tag, and what is already in it when the run starts.

``output/<dataset>/<backbone>_<shots>shots_seed<seed>[_views<V>][_<protocol>][_<tag>]/`` holds
one run: its config, few-shot list, log, resume state, checkpoint and results. ``plan_run``
decides where a run reads and writes and what it starts from -- finished (and finished with
these settings, on this data), trained but not evaluated, resumable, or new.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import sys
from pathlib import Path

from clip.weights import check_weights_available
from datasets import DatasetSplits
from run.checkpoints import (adopt_checkpoint, check_checkpoint_backbone, read_checkpoint, read_results,
                             source_dataset)
from run.config import (NAMED_KEYS, NOT_TRAINING_KEYS, SCHEMA, Config, check_outside_data, load_yaml,
                        require_same_settings)
from run.context import RunFolder
from run.distributed import WORLD
from utils import RaftError, check_component, printable, remove_temporaries, setup_logging


MAX_TAG = 64  # longer tags keep their first settings and a hash of all of them


def short_value(value) -> str:
    """A setting as it appears in a folder name: 0.0002, true, a file's name, none."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if value is None:
        return "none"
    if isinstance(value, (list, dict)):
        return "list" + hashlib.sha256(repr(value).encode()).hexdigest()[:6]
    return Path(str(value)).name.replace(" ", "-") or "empty"


def run_tag(cfg: Config, flags: argparse.Namespace) -> str:
    """The tag after <backbone>_<shots>shots_seed<seed>: an explicit --name, or else the config
    file's own `name` followed by the training settings that the command line changed."""
    overrides = getattr(flags, "overrides", {})
    if "name" in overrides:
        return cfg.name or ""
    file_values = getattr(flags, "file_values", {})
    changed = [f"{k}={short_value(overrides[k])}" for k in SCHEMA  # schema order: same name for any argument order
               if k in overrides and k not in NAMED_KEYS and k not in NOT_TRAINING_KEYS
               and overrides[k] != file_values.get(k)]
    if len("_".join(changed)) > MAX_TAG:  # readable head, and a hash of all of them for uniqueness
        digest = hashlib.sha256("_".join(changed).encode()).hexdigest()[:6]
        head = []
        while changed and len("_".join(head + changed[:1])) <= MAX_TAG - 20:
            head.append(changed.pop(0))
        changed = head + [f"and{len(changed)}more-{digest}"]
    return "_".join(([cfg.name] if cfg.name else []) + changed)


def run_name(cfg: Config) -> str:
    """<backbone>_<shots>shots_seed<seed>, then what makes its numbers another protocol's: cached
    views, base-to-new, another validation, alpha on test; then the tag."""
    views = f"_views{cfg.train_views}" if cfg.train_views else ""  # cached views: not the paper's protocol
    protocol = "" if cfg.protocol == "fewshot" else f"_{cfg.protocol}"
    validation = "" if cfg.get("val_source", "split") == "split" else f"_val-{cfg.val_source}"
    oracle = "_alpha-on-test" if cfg.get("alpha_on", "val") == "test" else ""
    method = method_suffix(cfg)
    tag = f"_{cfg.name}" if cfg.name else ""
    return check_component(f"{cfg.backbone}_{cfg.shots}shots_seed{cfg.seed}{views}{protocol}{validation}{oracle}"
                           f"{method}{tag}", "the run's name")


def method_suffix(cfg: Config) -> str:
    """A method other than RAFT is spelled out (its run folder never RAFT's), with its options
    that are not the published defaults: ``_coop``, ``_coop-ctx4-csc-middle-init-a-photo-of-a``."""
    method = cfg.get("method", "raft")
    if method == "raft":
        return ""
    parts = [method]
    if method == "coop":
        if cfg.coop_ctx_init:
            parts.append("init-" + "-".join(cfg.coop_ctx_init.replace("_", " ").split()))
        elif cfg.coop_n_ctx != 16:
            parts.append(f"ctx{cfg.coop_n_ctx}")
        if cfg.coop_class_specific:
            parts.append("csc")
        if cfg.coop_position != "end":
            parts.append(cfg.coop_position)
    return "_" + "-".join(parts)


def run_dir_of(cfg: Config, dataset: str) -> Path:
    """output_dir/<dataset>/<run name>: two names, each a plain folder name (never a path that
    leaves output_dir)."""
    return Path(cfg.output_dir) / check_component(dataset, "the dataset's name") / run_name(cfg)


class FolderLock:
    """A run folder belongs to one run at a time: an OS lock on ``<folder>/.lock`` held for the
    whole run (released when the run ends or its process dies). Under torchrun rank 0 holds it
    for every process of the run."""

    def __init__(self, run_dir: Path):
        self.path, self.fd = run_dir / ".lock", None

    def acquire(self) -> None:
        failed = None
        if WORLD.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(self.fd, 0)
                os.write(self.fd, f"{os.getpid()}\n".encode())
            except BlockingIOError:
                holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
                self.release()
                failed = holder
        if WORLD.any(failed is not None):
            raise RaftError(f"another run (process {failed or 'of rank 0'}) is using {printable(self.path.parent)}: "
                            f"wait for it to end, or give this run its own folder with --name TAG")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)   # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


LOCKS: dict[Path, FolderLock] = {}   # the folders this process's runs hold (one run at a time per process)


def lock_folder(run_dir: Path) -> None:
    lock = FolderLock(run_dir)
    lock.acquire()
    LOCKS[run_dir] = lock


def release_folder(run_dir: Path) -> None:
    lock = LOCKS.pop(run_dir, None)
    if lock is not None:
        lock.release()


def plan_run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits,
             trains: bool = True) -> tuple[Config, RunFolder] | None:
    """Decide the run folder and what it starts from; None when the run has already finished.
    ``trains`` False: the methods alone (scripts/run_baselines.py), written to baselines.json in
    the run's folder. A folder a run writes in is locked for that run (``FolderLock``)."""
    cfg = Config(dict(cfg) | {"name": check_component(run_tag(cfg, flags), "--name", allow_empty=True)})
    check_outside_data(cfg)
    if not trains:
        run_dir = run_dir_of(cfg, data.name)
        lock_folder(run_dir)
        return cfg, RunFolder(setup_logging(run_dir / "log.txt"), run_dir, run_dir / "baselines.json",
                              run_dir / "checkpoint.pt", trains=False)
    if flags.eval_only:  # results go next to the checkpoint, under its training settings
        ckpt_path = Path(flags.checkpoint) if flags.checkpoint else run_dir_of(cfg, data.name) / "checkpoint.pt"
        ckpt = read_checkpoint(ckpt_path)
        source = source_dataset(ckpt)
        same = source == data.name if source is not None else ckpt.get("classnames") == data.classnames
        if source is None and not same:
            raise RaftError(f"checkpoint {ckpt_path} records no dataset it was trained on (written by an older "
                            f"version): it can only be evaluated on its own classes; train it again to transfer it")
        run_dir = ckpt_path.parent
        log = setup_logging(run_dir / ("log.txt" if same else f"log_transfer_{data.name}.txt"))   # a transfer: its own
        cfg = adopt_checkpoint(cfg, flags, ckpt, transfer=not same, log=log)
        check_checkpoint_backbone(ckpt, ckpt_path, cfg)
        if same:  # its classes are checked against the task's (make_task); each purpose its own file
            purpose = "results_shift.json" if cfg.shift_sets else "results_eval.json"
            return cfg, RunFolder(log, run_dir, run_dir / purpose, ckpt_path, ckpt=ckpt, trains=False)
        log.info(f"cross-dataset transfer: a pool trained on {source}, evaluated on {data.name}")
        return cfg, RunFolder(log, run_dir, run_dir / f"transfer_{data.name}.json", ckpt_path, ckpt=ckpt,
                              transfer_from=source, trains=False)
    run_dir = run_dir_of(cfg, data.name)
    results_path, ckpt_path, state_path = run_dir / "results.json", run_dir / "checkpoint.pt", run_dir / "resume.pt"
    if results_path.is_file() and not flags.force and finished_here(results_path, cfg, data):
        print(f"{printable(results_path)} exists: run already finished (use --force to run it again; "
              f"--eval-only evaluates it again under other evaluation settings)")
        return None
    check_weights_available(cfg.backbone, cfg.weights)   # missing weights: one line, nothing written
    lock_folder(run_dir)
    try:
        return cfg, open_folder(cfg, flags, run_dir, results_path, ckpt_path, state_path)
    except BaseException:
        release_folder(run_dir)
        raise


def open_folder(cfg: Config, flags: argparse.Namespace, run_dir: Path, results_path: Path, ckpt_path: Path,
                state_path: Path) -> RunFolder:
    """The locked folder of a training run made ready: its log, no stale temporaries, with
    --force no old state; a checkpoint of a run that stopped before its results is evaluated."""
    log = setup_logging(run_dir / "log.txt")
    world = WORLD
    if world.main:
        remove_temporaries(run_dir)  # left by a process killed while writing
        if flags.force:
            state_path.unlink(missing_ok=True)
            ckpt_path.unlink(missing_ok=True)
    world.barrier()  # every process sees the folder as rank 0 left it
    ckpt = None
    if not flags.force and ckpt_path.is_file():  # trained, but stopped before its results were written
        ckpt = read_checkpoint(ckpt_path)
        check_checkpoint_backbone(ckpt, ckpt_path, cfg)
        require_same_settings(ckpt["config"], cfg, f"{printable(ckpt_path)} was trained with other settings ({{}}); "
                                                   f"use --force to train again")
        log.info(f"training already finished ({ckpt_path}): evaluating")
    return RunFolder(log, run_dir, results_path, ckpt_path, state_path, ckpt=ckpt, trains=ckpt is None)


def finished_here(results_path: Path, cfg: Config, data: DatasetSplits) -> bool:
    """Whether the run folder's results.json answers for this run: made with these training
    settings (the ones written in config files too, not only the folder name's) on this data.
    A damaged results file is not an answer: the run is evaluated or trained again. Results of
    other settings or other data are refused, never reported as this run's."""
    run_dir = results_path.parent
    try:
        results = read_results(results_path)
    except RaftError as exc:
        print(f"warning: {exc}: evaluating the run again", file=sys.stderr)
        return False
    saved = results.get("config")
    if saved is None and (run_dir / "config.yaml").is_file():   # results of versions that did not record it
        saved = load_yaml(run_dir / "config.yaml")
    if saved is not None:
        require_same_settings(saved, cfg, f"{printable(run_dir)} holds a finished run with other settings ({{}}): "
                                          f"give this one its own folder with --name TAG, or --force to replace it")
    check_same_data(results.get("data_sha256"), data, run_dir)
    return True


def check_same_data(stored: str | None, data: DatasetSplits, where: Path,
                    splits: tuple[str, ...] = ("train", "val", "test")) -> None:
    """A run folder made on other data (another data_path, an edited split file, other class
    folders) is named as such, not mistaken for an older version's. ``splits``: what the
    record covers (a trained pool: the class names and the training list)."""
    now = data.digest(splits)
    if stored and stored != now:
        listed = "training images" if splits == ("train",) else "images its splits list"
        raise RaftError(f"{where} was made on other data than {data.name} at {printable(data.root)} holds now (its "
                        f"class names or the {listed} differ; SHA-256 {stored[:12]}… then, {now[:12]}… now): point "
                        f"--data_path at that data, or use --force to start over on this one")
