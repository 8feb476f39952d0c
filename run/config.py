"""A run's configuration: the schema of every key, YAML files, command-line overrides, --help.

Configuration is layered the CoOp way: the schema below holds every valid key with its
default and range, a dataset YAML overrides some of them, ``--key value`` on the command line
overrides those, then the result is type-checked, range-checked, cross-checked and frozen.
"""
from __future__ import annotations

import argparse
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from utils import RaftError, ToolParser, read_text


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
    "backbone": Key((str,), "RN50", "CLIP backbone: any open_clip model name whose image tower RAFT fine-tunes: "
                                    "ResNets (RN50, RN101, RN50x4, ...: the attention pool), ViTs with a class token "
                                    "(ViT-B-32, ViT-B-16, ViT-L-14, ...: the last block's attention, doc/method.md "
                                    "§10), SigLIP/SigLIP2 (ViT-B-16-SigLIP2, ...: the attention-pool head, §11); "
                                    "tiny-rn, tiny-vit, tiny-siglip (random, offline). doc/weights.md lists them"),
    "weights": Key((str,), "openai", "a pretrained tag of the backbone ('openai', 'laion2b_s34b_b79k', 'webli', "
                                     "...: open_clip's list for that model), 'hf-hub:<org>/<repo>', a local "
                                     "checkpoint path, or null for random init (doc/weights.md)", True),
    "quick_gelu": Key((bool,), None, "QuickGELU activations; null = as open_clip records it for the weights "
                                     "(the tag's record; OpenAI's weights need it); resolved when the run starts",
                      True),
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
    "augment": Key((str,), "batched", "faithful mode's augmentation: 'batched' (each image decoded once, at a "
                                      "reduced size; crops resized in batches on the device) or 'reference' (the "
                                      "published code's: each image read again every epoch, one PIL resampling "
                                      "from full resolution; slower, doc/method.md §6)",
                   choices=("batched", "reference")),
    "train_views": Key((int,), None, "null: a fresh augmentation every epoch (faithful); V: V augmented views "
                                     "per image computed once and cycled through the epochs", True,
                       *span(0, 100, True, "each view is a trunk pass and a stored copy of every image's features")),
    "output_dir": Key((str,), "output", "root of the run folders"),
    "tensorboard": Key((bool,), False, "also log each epoch's loss terms, train accuracy, lr and seconds to "
                                       "<run folder>/tensorboard (needs the optional tensorboard package)"),
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
    if values["augment"] == "reference" and values["train_views"]:
        raise RaftError("augment: reference is the faithful mode's augmentation; train_views caches its own views "
                        "(set one of them)")
    check_model(values)
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


def check_model(values: dict) -> None:
    """Before anything is written: the backbone is an open_clip model RAFT applies to, and
    ``quick_gelu: null`` becomes what open_clip records for the weights (a run's settings are
    concrete). The weights themselves are checked when the run knows them: an evaluation
    takes its checkpoint's (run/folders.py)."""
    from clip.backbone import check_backbone
    from clip.weights import recorded_quick_gelu
    family = check_backbone(values["backbone"])
    if values["quick_gelu"] is None:
        values["quick_gelu"] = recorded_quick_gelu(values["backbone"], values["weights"])
    if family == "map" and values["pool_precision"] == "float16_reference":
        raise RaftError(f"pool_precision float16_reference reproduces the published code's float16 step; "
                        f"{values['backbone']}'s attention-pool head has no published code: use float32")


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def dataset_config(dataset: str) -> Path:
    """configs/<dataset>.yaml, or one line naming the closest dataset."""
    path = CONFIG_DIR / f"{dataset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in ("demo", "folder"))
        hint = difflib.get_close_matches(dataset, known, n=1, cutoff=0.0)
        raise RaftError(f"unknown dataset '{dataset}' (did you mean '{hint[0]}'?); known: {', '.join(known)}")
    return path


def data_folder(dataset: str, data_root: str | Path | None = None) -> Path:
    """Where a dataset's files live: its config's data_path, or with one root for all datasets
    (``DATA=`` of the sweeps, ``--data_root``) the config folder's own name under it."""
    configured = Path(str(file_values(dataset_config(dataset))["data_path"] or dataset))
    return Path(data_root) / configured.name if data_root else configured


def check_outside_data(cfg: Config) -> None:
    """Run folders and caches inside the dataset's folder would be read as data next time (a
    folder dataset takes every sub-folder for a class): refuse before anything is written."""
    root = Path(cfg.data_path).resolve()
    for key in ("output_dir", "cache_dir"):
        where = Path(cfg[key]).resolve()
        if where == root or root in where.parents:
            raise RaftError(f"{key} {where} is inside the dataset folder {root}: run from another folder, "
                            f"or set --{key} elsewhere")


def parse_args(argv: list[str] | None, description: str, evaluates: bool = True,
               prog: str | None = None) -> tuple[Config, argparse.Namespace]:
    """Fixed flags plus ``--<config key> <value>`` for every schema key. ``evaluates``: the
    entry point can evaluate a trained checkpoint (--eval-only, --checkpoint)."""
    keys = "\n".join(f"  --{name} (default {key.default!r}): {key.help}" for name, key in SCHEMA.items())
    parser = ToolParser(
        prog=prog, description=description,
        epilog=f"Any config key overrides the YAML: --shots 4 --lr 2e-4 --backbone RN101 ...\n\n"
               f"config keys:\n{keys}",
    )
    parser.add_argument("--config", required=True, help="YAML file with the dataset's settings")
    if evaluates:
        parser.add_argument("--eval-only", action="store_true", help="evaluate a trained region pool, no training")
        parser.add_argument("--checkpoint", help="checkpoint to evaluate (default: the run folder's own)")
    parser.add_argument("--force", action="store_true", help="run again even if results.json exists")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    flags, rest = parser.parse_known_args(argv)
    flags.eval_only, flags.checkpoint = getattr(flags, "eval_only", False), getattr(flags, "checkpoint", None)
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


# --------------------------------------------------------------------------- which settings train
# Keys that do not change what training computes: a run may resume under new values.
NOT_TRAINING_KEYS = {"device", "num_workers", "eval_batch_size", "feature_cache", "bad_images", "save_every",
                     "tensorboard",
                     "cache_dir", "output_dir", "search_low", "search_high", "search_step", "alpha",
                     "shift_sets", "val_per_class", "num_classes", "data_path", "name", "baselines", "dist_timeout",
                     "dist_exact"}


def training_settings(cfg: Config | dict) -> dict:
    return {k: v for k, v in dict(cfg).items() if k not in NOT_TRAINING_KEYS}


def settings_differ(saved: dict, cfg: Config) -> dict:
    """{key: (saved, now)} for the training settings that changed. A key the saved config lacks
    (written before the key existed) counts as its default, which is what that version did."""
    now = training_settings(cfg)
    before = training_settings({name: key.default for name, key in SCHEMA.items()} | dict(saved))
    return {k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)}


def describe_changes(changed: dict, most: int = 4) -> str:
    """'lr: 0.0001 -> 0.0002, lambda2: 0.5 -> 1.0' (the first few)."""
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:most])
    return shown + (f" and {len(changed) - most} more" if len(changed) > most else "")
