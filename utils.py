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
import math
import os
import pickle
import queue
import random
import socket
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml


class RaftError(Exception):
    """An error caused by the user's input: printed as one line, without a traceback."""


# --------------------------------------------------------------------------- text from files and names
def read_text(path: str | Path, what: str = "file") -> str:
    """A text file a user or a third party brings: UTF-8, a byte-order mark dropped, CRLF and CR
    line ends read as LF. Anything else (Latin-1, UTF-16, a binary file) is refused in one line
    naming the file, the line and the byte, never guessed at."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise RaftError(f"{what} not found: {printable(path)}") from None
    except IsADirectoryError:
        raise RaftError(f"{what} {printable(path)} is a folder, not a file") from None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RaftError(f"{what} {printable(path)} is not UTF-8 text: line {line} holds the byte "
                        f"0x{data[exc.start]:02x} (at byte {exc.start}; save it as UTF-8)") from None
    if "\x00" in text:
        line = text.count("\n", 0, text.index("\x00")) + 1
        raise RaftError(f"{what} {printable(path)} is a binary file, not text (a NUL byte on line {line})")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    """A JSON file through ``read_text``; malformed JSON is one line naming the file and line."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as exc:
        raise RaftError(f"{what} {printable(path)} is not valid JSON: {exc}") from None


def printable(value: Any) -> str:
    """A path or name as text that any terminal, log or JSON file takes: names that are not
    valid UTF-8 (Python keeps their bytes as lone surrogates) show those bytes as \\xNN escapes."""
    return str(value).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """A message on one line, whatever it quotes (a multi-line value, a library's error)."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def name_bytes(text: str) -> bytes:
    """A string as the bytes it stands for (a file name that is not UTF-8 included): what hashes read."""
    return text.encode("utf-8", "surrogatepass")


class ToolParser(argparse.ArgumentParser):
    """argparse whose usage errors are ``RaftError``s: one line, exit code 2, like every other
    error of the tools (argparse itself prints the usage and its own message)."""

    def error(self, message: str):
        raise RaftError(f"{message} (see {self.prog} --help)")


def bounded(kind: type, low: float, high: float) -> Callable[[str], Any]:
    """An argparse ``type`` for a number in [low, high] (the tools' numeric options)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"must be between {low:g} and {high:g}, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


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


def span(low: float | None, high: float | None, strict_low: bool = False,
         why: str = "") -> tuple[Callable[[Any], bool], str]:
    """(check, rule) of a number range: every number a run reads has one (doc/robustness.md);
    ``why`` says what the upper bound protects against."""
    def check(v) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((low is None or (v > low if strict_low else v >= low)) and (high is None or v <= high))

    def shown(v) -> str:
        return str(v) if isinstance(v, int) else f"{v:g}"

    parts = ([f"{'>' if strict_low else '>='} {shown(low)}"] if low is not None else []) + \
            ([f"<= {shown(high)}"] if high is not None else [])
    return check, " and ".join(parts) + (f" ({why})" if why else "")


POSITIVE = span(0, None, strict_low=True)
SEED_MAX = 2 ** 32 - 1    # numpy's seed range; torch and random take it too
SEED = span(0, SEED_MAX, why="a seed must fit 32 bits")
IMAGES_IN_MEMORY = "a batch's images are held in memory at once"

SCHEMA: dict[str, Key] = {
    # what to run on
    "dataset": Key((str,), None, "dataset name: one of datasets/coop.py's LAYOUTS, 'imagenet', or 'folder' (your own images)"),
    "data_path": Key((str,), None, "root folder of the dataset (CoOp layout)"),
    "split_fractions": Key((list,), [0.5, 0.2, 0.3], "dataset: folder only: train/val/test fractions of each "
                                                     "class folder when no train/ val/ test/ subfolders exist"),
    "split_seed": Key((int,), 1, "dataset: folder only: seed of that split", False, *SEED),
    "num_classes": Key((int,), None, "expected number of classes (checked against the data)", True,
                       *span(0, 1_000_000, True)),
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
    "shots": Key((int,), 16, "training images per class (at most the largest class's training images, or 16: "
                             "more would repeat every image)", False,
                 *span(0, 10_000, True, "few-shot; the data bounds it further")),
    "seed": Key((int,), 1, "seed of the few-shot sample, the data order and the augmentations", False, *SEED),
    "val_per_class": Key((int,), 4, "datasets without a val split (ImageNet, folders without val/): "
                                    "validation images per class drawn from train images outside the few-shot set "
                                    "(0: use the fixed `alpha`)", False, *span(0, 100_000)),
    # optimisation
    "lr": Key((float,), 1e-4, "AdamW learning rate", False, *span(0, 10, True)),
    "min_lr": Key((float,), 1e-6, "learning rate at the end of the cosine decay (at most lr)", False, *span(0, 10)),
    "eps": Key((float,), 1e-4, "AdamW epsilon", False, *span(0, 1, True)),
    "weight_decay": Key((float,), 0.01, "AdamW weight decay", False, *span(0, 10)),
    "train_epoch": Key((int,), 50, "training epochs", False, *span(0, 100_000, True)),
    "warmup_epoch": Key((int,), 10, "epochs of linear learning-rate warm-up (fewer than train_epoch)", False,
                        *span(0, 100_000)),
    "batch_size": Key((int,), 64, "training batch size", False, *span(0, 65_536, True, IMAGES_IN_MEMORY)),
    "batch_size_by_shots": Key((dict,), {}, "batch size for particular shot counts, e.g. {1: 64} (the reference's "
                                            "ImageNet 1-shot batch); a --batch_size on the command line wins"),
    "eval_batch_size": Key((int,), 128, "evaluation batch size", False, *span(0, 4_096, True, IMAGES_IN_MEMORY)),
    # loss (a negative weight would reward what the term penalises: refused)
    "lambda1": Key((float,), 0.1, "weight of the class/background separation term (>= 0; 0 turns it off)", False,
                   *span(0, 1_000)),
    "lambda2": Key((float,), 0.5, "weight of the L1 consistency term with zero-shot CLIP (>= 0; 0 turns it off)",
                   False, *span(0, 1_000)),
    "tau1": Key((float,), 2.0, "temperature of the class cross-entropy", False, *span(0.001, 1_000)),
    "tau2": Key((float,), 3.0, "temperature of the background cross-entropy", False, *span(0.001, 1_000)),
    "logit_scale": Key((float,), 100.0, "scale of the cosine logits", False, *span(0, 1_000, True)),
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
    # evaluation (alpha blends alpha·fine-tuned + (1-alpha)·zero-shot: outside [0, 1] it is no blend)
    "search_low": Key((float,), 0.0, "lowest alpha of the search grid (in [0, 1])", False, *span(0, 1)),
    "search_high": Key((float,), 1.0, "highest alpha of the search grid (in [0, 1])", False, *span(0, 1)),
    "search_step": Key((int,), 50, "number of intervals of the alpha grid", False,
                       *span(0, 1_000, True, "each grid point scores every val and test image")),
    "alpha": Key((float,), None, "fixed blending weight in [0, 1]; null = choose on validation data", True,
                 *span(0, 1)),
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
                                      "epoch; 0 = after every epoch; 1e9 = only when stopped)", False,
                      *span(0, 1e12)),
    "device": Key((str,), "auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ..."),
    "amp": Key((bool,), True, "mixed precision (used on CUDA only)"),
    "num_workers": Key((int, str), "auto", "image-decoding worker processes: an integer up to 64, or 'auto' (the "
                                           "CPUs this process may use, shared among the processes of a torchrun "
                                           "run, at most 16; none for fewer than 256 images)", False,
                       lambda v: v == "auto" or (isinstance(v, int) and 0 <= v <= 64),
                       ">= 0 and <= 64 (each worker is a process holding a copy of the loader), or 'auto'"),
    "cache_dir": Key((str,), "cache", "folder for the text and trunk-feature caches"),
    "dist_timeout": Key((float,), 1800.0, "torchrun runs: seconds a collective may wait for the other processes "
                                          "before the run stops (doc/distributed.md)", False,
                        *span(0, 604_800, True, "a week")),
    "dist_exact": Key((bool,), False, "torchrun runs: every process runs the region pool on the whole global "
                                      "batch (the trunk's features gathered), so the update is one process's bit "
                                      "for bit, instead of summing the processes' gradients (equal up to float "
                                      "rounding); costs a feature gather per step (doc/distributed.md)"),
    "feature_cache": Key((bool,), True, "cache val/test trunk features on disk and reuse them across runs"),
    "train_views": Key((int,), None, "null: a fresh augmentation every epoch (faithful); V: V augmented views "
                                     "per image computed once and cycled through the epochs", True,
                       *span(0, 100, True, "each view is a trunk pass and a stored copy of every image's features")),
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


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, first: int, again: int):
        super().__init__(f"key '{key}' is given twice (lines {first} and {again})" if first != again
                         else f"key '{key}' is given twice (line {first})")


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a mapping that names a key twice is an error: PyYAML would keep
    the last value silently, and a config whose `lr` is set twice means two things."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            line = key_node.start_mark.line + 1
            try:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise DuplicateKey(key, seen[key], line)
                seen[key] = line
            except TypeError:   # an unhashable key: the base class explains it
                continue
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str):
    """YAML text (a config file, a command-line value) with the checks of ``UniqueKeyLoader``."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except DuplicateKey as exc:
        raise RaftError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RaftError(f"{source} is not valid YAML{where}") from None


def check_values(values: dict, source: str) -> None:
    """Type- and range-check the known keys of a config read back from a file (a checkpoint's,
    a results file's); keys this version does not know are left alone."""
    for name, value in values.items():
        if name in SCHEMA:
            _coerce(name, value, source)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RaftError(f"config file not found: {path}")
    data = parse_yaml(read_text(path, "config file"), f"config file {path}")
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
    if not all(isinstance(k, int) and not isinstance(k, bool) and SCHEMA["shots"].check(k) and isinstance(v, int)
               and not isinstance(v, bool) and SCHEMA["batch_size"].check(v) for k, v in by_shots.items()):
        raise RaftError(f"config key 'batch_size_by_shots' must map shot counts to batch sizes, e.g. {{1: 64}}; "
                        f"got {by_shots!r}")
    if values["shots"] in by_shots and "batch_size" not in overrides:
        values["batch_size"] = by_shots[values["shots"]]
    for required in ("dataset", "data_path"):
        if not values[required]:
            raise RaftError(f"config key '{required}' is required (set it in the YAML or with --{required})")
    if values["min_lr"] > values["lr"]:
        raise RaftError(f"min_lr ({values['min_lr']:g}) is larger than lr ({values['lr']:g}): the cosine schedule "
                        f"decays from lr to min_lr; set --min_lr lower")
    if values["search_low"] > values["search_high"]:
        raise RaftError(f"empty alpha search range: search_low={values['search_low']} > "
                        f"search_high={values['search_high']}")
    if values["warmup_epoch"] >= values["train_epoch"] and values["warmup_epoch"] > 0:
        raise RaftError(f"warmup_epoch ({values['warmup_epoch']}) must be smaller than "
                        f"train_epoch ({values['train_epoch']}); set --warmup_epoch lower")
    fractions = values["split_fractions"]
    if (len(fractions) != 3 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0
                                       and math.isfinite(f) for f in fractions)
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
    parser = ToolParser(
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
        overrides[name] = parse_yaml(value, f"--{name} {value!r}") if value != "" else ""
    cfg = build_config(flags.config, overrides)
    # what the command line changed relative to the config file (run-folder names, --eval-only)
    flags.file_values = file_values(flags.config)
    flags.overrides = {name: cfg[name] for name in overrides}
    return cfg, flags


def run_main(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run an entry point: user errors become one line on stderr and exit code 2."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    for stream in (sys.stdout, sys.stderr):   # a file name that is not UTF-8 prints as \xNN, never fails
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        code = main(argv)
    except RaftError as exc:
        if debug:
            raise
        print(f"error: {one_line(printable(exc))}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except OSError as exc:  # the environment: a full disk, permissions, a vanished mount
        if debug:
            raise
        what = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {what}{printable(where)}; nothing was left half-written", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
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
    """Stable hash of JSON-serialisable parts (used as cache keys); names that are not valid
    UTF-8 hash as their bytes."""
    blob = name_bytes(json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str))
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


def json_bytes(obj: Any) -> bytes:
    """JSON as UTF-8; a name that is not valid UTF-8 is written as \\udcNN escapes, which read
    back as the same name (``json.loads``)."""
    return json.dumps(obj, indent=2, ensure_ascii=False).encode("utf-8", "backslashreplace")


def write_json(path: str | Path, obj: Any) -> None:
    data = json_bytes(obj)
    atomic_write(path, lambda fh: fh.write(data))


def write_yaml(path: str | Path, obj: Any) -> None:
    data = yaml.safe_dump(obj, sort_keys=False, allow_unicode=True).encode("utf-8", "backslashreplace")
    atomic_write(path, lambda fh: fh.write(data))


def torch_save(path: str | Path, obj: Any) -> None:
    """Serialise in memory first: torch's zip writer reports a full disk as an opaque
    RuntimeError, a plain file write reports it as ENOSPC."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()))


def torch_load(path: str | Path, what: str = "file") -> Any:
    """Load tensors/plain containers only (``weights_only=True``): no pickled code runs. A file
    that names Python code to run while loading is refused as such, whatever words torch uses."""
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RaftError(f"{what} not found: {printable(path)}") from None
    except IsADirectoryError:
        raise RaftError(f"{what} {printable(path)} is a folder, not a file") from None
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "unsupported global" in str(exc).lower():
            raise RaftError(f"refusing to load {what} {printable(path)}: it needs pickled Python code to load "
                            f"(only tensors and plain containers are accepted)") from None
        raise RaftError(f"cannot read {what} {printable(path)}: not a torch file or corrupt") from None
    except Exception as exc:  # truncated, corrupt, or some other format
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise RaftError(f"cannot read {what} {printable(path)}: truncated, corrupt or not a torch file "
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
        fh = logging.FileHandler(log_file, mode="a", encoding="utf-8", errors="backslashreplace")
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


class PeerFailure(RaftError):
    """Another process of the torchrun run died or stopped answering."""
    exit_code = 3


@contextmanager
def collective():
    """Around every collective: another process's death or hang (gloo's RuntimeError, NCCL's
    DistError, a timeout) becomes the documented one line and exit code 3, not a traceback."""
    try:
        yield
    except RaftError:
        raise
    except Exception as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise PeerFailure(f"process {os.environ.get('RANK', '?')}: a collective with the other torchrun processes "
                          f"failed ({detail}); run the same command again to resume") from None


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
            with collective():
                torch.distributed.barrier()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the processes, in place (the gradients, the epoch's tallies)."""
        if self.many:
            with collective():
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.Tensor]) -> None:
        """Sum the parameters' gradients over the processes, in one collective. Each process's
        loss is its share of the global batch's mean, so the sum is the one-process gradient."""
        if not self.many:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        with collective():
            torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        start = 0
        for p in params:
            p.grad = flat[start:start + p.numel()].view_as(p).clone()
            start += p.numel()

    def min_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.many:
            with collective():
                torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one (a stop request, a failed check)."""
        if not self.many:
            return flag
        value = torch.tensor([int(flag)])
        with collective():
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows, concatenated in rank order, on every process (rows may differ
        in number between processes)."""
        if not self.many:
            return tensor
        counts = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(counts) for _ in range(self.size)]
        with collective():
            torch.distributed.all_gather(sizes, counts)
        sizes = [int(s.item()) for s in sizes]
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.size)]
        with collective():
            torch.distributed.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def gather_objects(self, obj) -> list:
        if not self.many:
            return [obj]
        out = [None] * self.size
        with collective():
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
