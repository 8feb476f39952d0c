"""Shared plumbing: configuration, errors, seeding, atomic file writes, logging, devices.

Configuration is layered the CoOp way: the schema below holds every valid key with its
default, a dataset YAML overrides some of them, ``--key value`` on the command line
overrides those, then the result is type-checked, range-checked and frozen.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import hashlib
import io
import json
import logging
import os
import pickle
import queue
import random
import socket
import sys
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml


class RaftError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


# --------------------------------------------------------------------------- config schema
@dataclass(frozen=True)
class Key:
    types: tuple            # accepted Python types (after int -> float promotion)
    default: Any
    help: str
    nullable: bool = False
    check: Callable[[Any], bool] | None = None
    rule: str = ""          # what `check` demands, for the error message
    choices: tuple = ()     # the valid values, when there is a fixed list


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


SCHEMA: dict[str, Key] = {
    # what to run on
    "dataset": Key((str,), None, "dataset name: one of datasets/coop.py's LAYOUTS, 'imagenet', or 'folder' (your own images)"),
    "data_path": Key((str,), None, "root folder of the dataset (CoOp layout)"),
    "split_fractions": Key((list,), [0.5, 0.2, 0.3], "dataset: folder only: train/val/test fractions of each "
                                                     "class folder when no train/ val/ test/ subfolders exist"),
    "split_seed": Key((int,), 1, "dataset: folder only: seed of that split"),
    "num_classes": Key((int,), None, "expected number of classes (checked against the data)", True, _positive, "> 0"),
    "backbone": Key((str,), "RN50", "CLIP backbone (open_clip's names): ResNets RN50, RN101, RN50x4, RN50x16, "
                                    "RN50x64; ViTs ViT-B-32, ViT-B-16, ViT-L-14, ViT-L-14-336 (RAFT-ViT, this "
                                    "project's extension: doc/method.md §10); tiny-rn, tiny-vit (random, offline)"),
    "weights": Key((str,), "openai", "'openai' (download/cache), a local checkpoint path, or null for random init", True),
    "quick_gelu": Key((bool,), True, "QuickGELU in the text tower; OpenAI weights need it"),
    "calibrate_bn": Key((bool,), False, "re-estimate the trunk's BatchNorm statistics on the training images "
                                        "(only for randomly initialised backbones)"),
    # protocol (doc/protocols.md)
    "protocol": Key((str,), "fewshot", "'fewshot': train and test on all classes (the paper's protocol); "
                                       "'base2new': train on the base half of the classes, test on base and new "
                                       "classes (CoCoOp's protocol)", choices=("fewshot", "base2new")),
    "shots": Key((int,), 16, "training images per class", False, _positive, "> 0"),
    "seed": Key((int,), 1, "seed of the few-shot sample, the data order and the augmentations"),
    "val_per_class": Key((int,), 4, "datasets without a val split (ImageNet, folders without val/): "
                                    "validation images per class drawn from train images outside the few-shot set "
                                    "(0: use the fixed `alpha`)", False, _non_negative, ">= 0"),
    # optimisation
    "lr": Key((float,), 1e-4, "AdamW learning rate", False, _positive, "> 0"),
    "min_lr": Key((float,), 1e-6, "learning rate at the end of the cosine decay", False, _non_negative, ">= 0"),
    "eps": Key((float,), 1e-4, "AdamW epsilon", False, _positive, "> 0"),
    "weight_decay": Key((float,), 0.01, "AdamW weight decay", False, _non_negative, ">= 0"),
    "train_epoch": Key((int,), 50, "training epochs", False, _positive, "> 0"),
    "warmup_epoch": Key((int,), 10, "epochs of linear learning-rate warm-up", False, _non_negative, ">= 0"),
    "batch_size": Key((int,), 64, "training batch size", False, _positive, "> 0"),
    "batch_size_by_shots": Key((dict,), {}, "batch size for particular shot counts, e.g. {1: 64} (the reference's "
                                            "ImageNet 1-shot batch); a --batch_size on the command line wins"),
    "eval_batch_size": Key((int,), 128, "evaluation batch size", False, _positive, "> 0"),
    # loss
    "lambda1": Key((float,), 0.1, "weight of the class/background separation term"),
    "lambda2": Key((float,), 0.5, "weight of the L1 consistency term with zero-shot CLIP"),
    "tau1": Key((float,), 2.0, "temperature of the class cross-entropy", False, _positive, "> 0"),
    "tau2": Key((float,), 3.0, "temperature of the background cross-entropy", False, _positive, "> 0"),
    "logit_scale": Key((float,), 100.0, "scale of the cosine logits", False, _positive, "> 0"),
    # region pool / text variants (defaults = reference behaviour)
    "mask_bg_in_cls": Key((bool,), False, "mask the background token out of the class token's attention"),
    "pool_precision": Key((str,), "float32", "'float32': float32 weights (mixed-precision compute on CUDA); "
                                             "'float16_reference': float16 weights and AdamW state updated in place, "
                                             "as the published code trains (doc/method.md, Numerics)",
                          choices=("float32", "float16_reference")),
    "renorm_bg_text": Key((bool,), False, "re-normalise the averaged background text embedding"),
    "descriptions": Key((str,), "auto", "class descriptions file; 'auto' = gpt3_file/<dataset>_prompt.json "
                                        "when it exists; null = templates only", True),
    "templates": Key((list,), None, "hand-written templates ('{}' = class name); null = the dataset's own", True),
    # evaluation
    "search_low": Key((float,), 0.0, "lowest alpha of the search grid"),
    "search_high": Key((float,), 1.0, "highest alpha of the search grid"),
    "search_step": Key((int,), 50, "number of intervals of the alpha grid", False, _positive, "> 0"),
    "alpha": Key((float,), None, "fixed blending weight; null = choose on validation data", True),
    "shift_sets": Key((dict,), {}, "ImageNet only: distribution-shift test sets {name: path} "
                                   "(imagenet_v2, imagenet_sketch, imagenet_a, imagenet_r)"),
    "baselines": Key((list,), ["zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f"],
                     "baselines run on the same few-shot images, features and validation data (doc/baselines.md): "
                     "any of zero_shot, linear_probe, tip_adapter, tip_adapter_f; [] for none"),
    # machinery
    "bad_images": Key((str,), "fail", "an unreadable val/test image: 'fail' (stop, naming it) or 'skip' "
                                      "(leave it out, counted in results.json); training images always fail",
                      choices=("fail", "skip")),
    "save_every": Key((float,), 60.0, "seconds between saved training states for resuming (saved after an "
                                      "epoch; 0 = after every epoch)", False, _non_negative, ">= 0"),
    "device": Key((str,), "auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ..."),
    "amp": Key((bool,), True, "mixed precision (used on CUDA only)"),
    "num_workers": Key((int, str), "auto", "image-decoding worker processes: an integer, or 'auto' (the CPUs "
                                           "this process may use, shared among the processes of a torchrun run, "
                                           "at most 16; none for fewer than 256 images)", False,
                       lambda v: v == "auto" or (isinstance(v, int) and v >= 0), ">= 0 or 'auto'"),
    "cache_dir": Key((str,), "cache", "folder for the text and trunk-feature caches"),
    "dist_timeout": Key((float,), 1800.0, "torchrun runs: seconds a collective may wait for the other processes "
                                          "before the run stops (doc/distributed.md)", False, _positive, "> 0"),
    "dist_exact": Key((bool,), False, "torchrun runs: every process runs the region pool on the whole global "
                                      "batch (the trunk's features gathered), so the update is one process's bit "
                                      "for bit, instead of summing the processes' gradients (equal up to float "
                                      "rounding); costs a feature gather per step (doc/distributed.md)"),
    "feature_cache": Key((bool,), True, "cache val/test trunk features on disk and reuse them across runs"),
    "train_views": Key((int,), None, "null: a fresh augmentation every epoch (faithful); V: V augmented views "
                                     "per image computed once and cycled through the epochs", True, _positive, "> 0"),
    "output_dir": Key((str,), "output", "root of the run folders"),
    "name": Key((str,), None, "tag of the run folder after <backbone>_<shots>shots_seed<seed>: null = the training "
                              "settings given on the command line that differ from the config file "
                              "(e.g. _lr=0.0002); '' = no tag", True),
}


class Config(dict):
    """A read-only dict with attribute access: ``cfg.lr``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def _readonly(self, *args, **kwargs):
        raise TypeError("the configuration is frozen once validated")

    __setitem__ = __delitem__ = update = pop = setdefault = clear = _readonly  # type: ignore[assignment]


# Names people reach for from other codebases, and the key that means the same here.
KEY_ALIASES = {"learning_rate": "lr", "epochs": "train_epoch", "num_epochs": "train_epoch", "epoch": "train_epoch",
               "max_epoch": "train_epoch", "shot": "shots", "num_shots": "shots", "model": "backbone",
               "arch": "backbone", "root": "data_path", "data_root": "data_path", "dataset_path": "data_path",
               "bs": "batch_size", "wd": "weight_decay", "warmup": "warmup_epoch"}


def closest_key(name: str) -> str:
    """The valid key a mistyped or foreign one most likely means (for error messages)."""
    if name in KEY_ALIASES:
        return KEY_ALIASES[name]
    match = difflib.get_close_matches(name, SCHEMA.keys(), n=1, cutoff=0.6)
    if match:
        return match[0]
    containing = [k for k in SCHEMA if name in k or k in name]
    return containing[0] if containing else difflib.get_close_matches(name, SCHEMA.keys(), n=1, cutoff=0.0)[0]


def _coerce(name: str, value: Any, source: str) -> Any:
    """Type-check one value against the schema (YAML reads '1e-4' as a string: accept it as a number)."""
    if name not in SCHEMA:
        raise RaftError(f"unknown config key '{name}' in {source} (did you mean '{closest_key(name)}'?)")
    key = SCHEMA[name]
    if value is None or (isinstance(value, str) and value.lower() in ("null", "none") and key.nullable):
        if not key.nullable:
            raise RaftError(f"config key '{name}' may not be null ({source})")
        return None
    expected = key.types[0]
    if expected is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if expected is int and isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if expected is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    ok = isinstance(value, key.types) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        raise RaftError(f"config key '{name}' expects {expected.__name__}, got {value!r} ({source}): {key.help}")
    if key.choices and value not in key.choices:
        hint = ([c for c in key.choices if c.startswith(str(value))]             # 'float16' -> 'float16_reference'
                or difflib.get_close_matches(str(value), key.choices, n=1, cutoff=0.0))
        names = [repr(c) for c in key.choices]
        allowed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
        raise RaftError(f"config key '{name}' must be {allowed}, got {value!r} ({source}; did you mean {hint[0]!r}?)")
    if key.check is not None and not key.check(value):
        raise RaftError(f"config key '{name}' must be {key.rule}, got {value!r} ({source})")
    return value


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RaftError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RaftError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RaftError(f"config file {path} must hold a mapping of key: value")
    return data


def file_values(yaml_path: str | Path | None) -> dict[str, Any]:
    """Schema defaults <- YAML, each value type-checked (the config file's layer alone)."""
    values = {name: key.default for name, key in SCHEMA.items()}
    if yaml_path is not None:
        for name, value in load_yaml(yaml_path).items():
            values[name] = _coerce(name, value, str(yaml_path))
    return values


def build_config(yaml_path: str | Path | None, overrides: dict[str, Any]) -> Config:
    """Schema defaults <- YAML <- overrides, each value type-checked, then cross-checked."""
    values = file_values(yaml_path)
    for name, value in overrides.items():
        values[name] = _coerce(name, value, "command line")
    by_shots = values["batch_size_by_shots"]
    if not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 and isinstance(v, int)
               and not isinstance(v, bool) and v > 0 for k, v in by_shots.items()):
        raise RaftError(f"config key 'batch_size_by_shots' must map shot counts to batch sizes, e.g. {{1: 64}}; "
                        f"got {by_shots!r}")
    if values["shots"] in by_shots and "batch_size" not in overrides:
        values["batch_size"] = by_shots[values["shots"]]
    for required in ("dataset", "data_path"):
        if not values[required]:
            raise RaftError(f"config key '{required}' is required (set it in the YAML or with --{required})")
    if values["search_low"] > values["search_high"]:
        raise RaftError(f"empty alpha search range: search_low={values['search_low']} > "
                        f"search_high={values['search_high']}")
    if values["warmup_epoch"] >= values["train_epoch"] and values["warmup_epoch"] > 0:
        raise RaftError(f"warmup_epoch ({values['warmup_epoch']}) must be smaller than "
                        f"train_epoch ({values['train_epoch']}); set --warmup_epoch lower")
    fractions = values["split_fractions"]
    if (len(fractions) != 3 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0
                                       for f in fractions)
            or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0 or fractions[2] == 0):
        raise RaftError(f"config key 'split_fractions' must be [train, val, test] fractions summing to 1 "
                        f"with train and test > 0, got {fractions!r}")
    known = SCHEMA["baselines"].default
    for method in values["baselines"]:
        if method not in known:
            hint = difflib.get_close_matches(str(method), known, n=1, cutoff=0.0)[0]
            raise RaftError(f"unknown baseline {method!r} in `baselines` (did you mean {hint!r}?); known: "
                            f"{', '.join(known)}")
    if values["templates"] is not None:
        if not values["templates"] or not all(isinstance(t, str) and "{}" in t for t in values["templates"]):
            raise RaftError("config key 'templates' must be a non-empty list of strings containing '{}'")
    return Config(values)


def check_outside_data(cfg: Config) -> None:
    """Run folders and caches inside the dataset's folder would be read as data next time (a
    folder dataset takes every sub-folder for a class): refuse before anything is written."""
    root = Path(cfg.data_path).resolve()
    for key in ("output_dir", "cache_dir"):
        where = Path(cfg[key]).resolve()
        if where == root or root in where.parents:
            raise RaftError(f"{key} {where} is inside the dataset folder {root}: run from another folder, "
                            f"or set --{key} elsewhere")


def parse_args(argv: list[str] | None, description: str) -> tuple[Config, argparse.Namespace]:
    """Fixed flags plus ``--<config key> <value>`` for every schema key."""
    keys = "\n".join(f"  --{name} (default {key.default!r}): {key.help}" for name, key in SCHEMA.items())
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Any config key overrides the YAML: --shots 4 --lr 2e-4 --backbone RN101 ...\n\n"
               f"config keys:\n{keys}",
    )
    parser.add_argument("--config", required=True, help="YAML file with the dataset's settings")
    parser.add_argument("--eval-only", action="store_true", help="evaluate a trained region pool, no training")
    parser.add_argument("--checkpoint", help="checkpoint to evaluate (default: the run folder's own)")
    parser.add_argument("--force", action="store_true", help="run again even if results.json exists")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    flags, rest = parser.parse_known_args(argv)
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise RaftError(f"unexpected argument '{token}' (overrides are written --key value)")
        name, sep, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not sep:
            if i + 1 >= len(rest):
                raise RaftError(f"--{name} needs a value")
            value = rest[i + 1]
            i += 1
        i += 1
        if name not in SCHEMA:
            raise RaftError(f"unknown config key '{name}' on the command line (did you mean '{closest_key(name)}'?)")
        try:
            overrides[name] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            raise RaftError(f"--{name}: cannot read the value {value!r}") from None
    cfg = build_config(flags.config, overrides)
    # what the command line changed relative to the config file (run-folder names, --eval-only)
    flags.file_values = file_values(flags.config)
    flags.overrides = {name: cfg[name] for name in overrides}
    return cfg, flags


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point: user errors become one line on stderr and exit code 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        code = main(argv)
    except RaftError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:  # the environment: a full disk, permissions, a vanished mount
        if debug:
            raise
        what = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {what}{where}; nothing was left half-written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except torch.distributed.DistError as exc:  # another process of a torchrun run died or hung
        if debug:
            raise
        rank = os.environ.get("RANK", "?")
        print(f"error: process {rank}: a collective with the other torchrun processes failed "
              f"({str(exc).splitlines()[0][:160]}); run the same command again to resume", file=sys.stderr)
        return 3
    return code if isinstance(code, int) else 0


# --------------------------------------------------------------------------- reproducibility
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """The device to run on, made current when it is a GPU (so that every CUDA context,
    pinned-memory threads' included, opens on it and not on GPU 0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RaftError(f"device '{name}' is not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RaftError(f"device '{name}' requested but CUDA is not available (use --device cpu or auto)")
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise RaftError(f"device '{name}' does not exist: this machine has {count} CUDA device(s) "
                            f"(cuda:0 ... cuda:{count - 1})")
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    return device


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA only (mixed precision); CPU runs in fp32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a SLURM allocation), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


SMALL_JOB = 256  # images: 'auto' decodes fewer in the main process (starting workers costs more)


def resolve_workers(value: int | str, images: int | None = None) -> int:
    """``num_workers``: an integer, or 'auto' = the CPUs available to this process shared among
    the processes torchrun started on this machine (at most 16 each, at least 1), and none for
    a job of fewer than ``SMALL_JOB`` images."""
    if value != "auto":
        return int(value)
    if images is not None and images < SMALL_JOB:
        return 0
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(16, available_cpus() // max(1, processes)))


class background:
    """Iterate ``iterable`` in a daemon thread, ``depth`` items ahead: the next batches are
    read or prepared while the current one is used. Exceptions reach the consumer; leaving
    the loop early (break, an error) stops the thread."""

    _DONE = object()

    def __init__(self, iterable, depth: int = 2):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(iter(iterable),), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, iterator) -> None:
        try:
            for item in iterator:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((False, exc))
            return
        self._put((True, self._DONE))

    def __iter__(self):
        try:
            while True:
                ok, item = self._queue.get()
                if not ok:
                    raise item
                if item is self._DONE:
                    return
                yield item
        finally:
            self._stop.set()
            self._thread.join()


def sha256_text(*parts: Any) -> str:
    """Stable hash of JSON-serialisable parts (used as cache keys)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


# --------------------------------------------------------------------------- atomic writes
def _file_mode() -> int:
    """What open() would give a new file under this process's umask (mkstemp uses 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through ``write(fileobj)`` into a temporary sibling, fsync, then rename over ``path``.

    A crash at any moment leaves either the old complete file or the new complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)  # readable by whoever could read a normally written file
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_temporaries(folder: str | Path) -> None:
    """Delete the temporary files ``atomic_write`` leaves when its process is killed mid-write."""
    for tmp in Path(folder).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=2, ensure_ascii=False), mode="w")


def write_yaml(path: str | Path, obj: Any) -> None:
    atomic_write(path, lambda fh: yaml.safe_dump(obj, fh, sort_keys=False), mode="w")


def torch_save(path: str | Path, obj: Any) -> None:
    """Serialise in memory first: torch's zip writer reports a full disk as an opaque
    RuntimeError, a plain file write reports it as ENOSPC."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def torch_load(path: str | Path, what: str = "file") -> Any:
    """Load tensors/plain containers only (``weights_only=True``): no pickled code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RaftError(f"{what} not found: {path}") from None
    except pickle.UnpicklingError as exc:
        if "Unsupported global" in str(exc):  # the file names Python code to run while loading
            raise RaftError(f"refusing to load {what} {path}: it needs pickled Python code to load "
                            f"(only tensors and plain containers are accepted)") from None
        raise RaftError(f"cannot read {what} {path}: not a torch file or corrupt") from None
    except Exception as exc:  # truncated, corrupt, or some other format
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise RaftError(f"cannot read {what} {path}: truncated, corrupt or not a torch file "
                        f"({type(exc).__name__}{': ' + detail if detail else ''})") from None


# --------------------------------------------------------------------------- logging
def setup_logging(log_file: str | Path | None = None) -> logging.Logger:
    """Log to stdout and (optionally) a file; re-callable for a new run folder."""
    logging.raiseExceptions = False  # a full disk must not turn every log line into a traceback
    logger = logging.getLogger("raft")
    # under torchrun only rank 0 logs (and writes the log file); the others say warnings and errors
    rank = int(os.environ.get("RANK", "0"))
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if rank != 0:
        log_file = None
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    fmt = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="a")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


# --------------------------------------------------------------------------- processes (torchrun)
# Several processes, one code path (doc/distributed.md): under torchrun (WORLD_SIZE > 1 in the
# environment) every process runs the same program on the same data and draws the same random
# numbers; each computes its shard of every global batch and of every evaluation split, and the
# collectives below put the pieces together so that the numbers equal a one-process run's.
# Rank 0 alone writes files. Without torchrun all of it is a no-op (one process, rank 0).
RENDEZVOUS_TIMEOUT = 60.0  # seconds to reach torchrun's rendezvous before giving up with a clear message


class World:
    """This process's place among the run's processes (``WORLD``, set in place by
    ``start_processes``, so that ``from utils import WORLD`` always sees the current one)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, host_group=None):
        self.set(rank, size, local_rank, host_group)

    def set(self, rank: int = 0, size: int = 1, local_rank: int = 0, host_group=None) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.host_group = host_group   # gloo: small host-side flags without touching a GPU stream

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def many(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``n`` items: sizes differ by at most one, in rank order,
        every item in exactly one part (a part may be empty when n < size)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.many:
            torch.distributed.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes, in place (the gradients, the epoch's tallies)."""
        if self.many:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the processes, in one collective. Each process's
        loss is its share of the global batch's mean, so the sum is the one-process gradient."""
        if not self.many:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        start = 0
        for p in params:
            p.grad = flat[start:start + p.numel()].view_as(p).clone()
            start += p.numel()

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.many:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request, a failed check)."""
        if not self.many:
            return flag
        value = torch.tensor([int(flag)])
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows, concatenated in rank order, on every process (rows may differ
        in number between processes)."""
        if not self.many:
            return tensor
        counts = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(counts) for _ in range(self.size)]
        torch.distributed.all_gather(sizes, counts)
        sizes = [int(s.item()) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.size)]
        torch.distributed.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        if not self.many:
            return [obj]
        out = [None] * self.size
        torch.distributed.all_gather_object(out, obj, group=self.host_group)
        return out


WORLD = World()


def wait_for_rendezvous(host: str, port: int, timeout: float = RENDEZVOUS_TIMEOUT) -> None:
    """Fail with one line, within ``timeout``, when the rendezvous address cannot be reached
    (a wrong --master-addr, a node that is not up): instead of a hang."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise RaftError(f"cannot reach the torchrun rendezvous at {host}:{port} within {timeout:.0f}s "
                                f"({exc.strerror or exc}); check --master-addr/--master-port or --rdzv-endpoint, "
                                f"and that the first node is up") from None
            time.sleep(1.0)


def start_processes(device: str, timeout: float) -> World:
    """Join the run's process group when torchrun started this process (NCCL with one GPU per
    process, gloo on CPUs); ``timeout`` bounds every collective. Returns ``WORLD``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or WORLD.many:
        return WORLD
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise RaftError(f"device '{device}' requested but CUDA is not available (use --device cpu or auto)")
        if device not in ("auto", "cuda"):
            raise RaftError(f"under torchrun each process uses the GPU of its local rank: set --device cuda "
                            f"(or auto), not {device}")
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RaftError(f"torchrun started {os.environ.get('LOCAL_WORLD_SIZE', local_rank + 1)} processes on "
                            f"this machine but it has {count} GPU(s): use --nproc_per_node={count} or fewer")
        torch.cuda.set_device(local_rank)
    wait_for_rendezvous(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")))
    try:
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout),
                                device_id=torch.device("cuda", local_rank) if use_cuda else None)
    except Exception as exc:  # the store, a peer that never came
        raise RaftError(f"cannot join the torchrun process group: {str(exc).splitlines()[0][:200]}") from None
    host_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=timeout)) if use_cuda else None
    WORLD.set(rank, size, local_rank, host_group)
    return WORLD
