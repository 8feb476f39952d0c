"""A run's configuration: the schema of every key, YAML files, command-line overrides, --help.

Configuration is layered the CoOp way: the schema below holds every valid key with its
default, range and role, a dataset YAML overrides some of them, ``--key value`` on the command
line overrides those, then the result is type-checked, range-checked, cross-checked and
frozen. What a key is for is declared once, in its ``Key``: the lists other modules need
(which keys train, which name a run folder, which a checkpoint's evaluation adopts) are
derived from the schema. Nothing here imports torch: a mistyped key is refused at once; the
checks that need the model library (the backbone, the methods) come last (``resolve``).
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from utils import RaftError, ToolParser, check_template, printable, read_text

# What a key is for. trains: changes what training computes (a run resumes or counts as
# finished only under the same values; the command line's changes name the run folder).
# evaluation: changes only how a trained model is scored. machinery: how a run computes,
# never what. data: where the data is and what it is checked against.
ROLES = ("trains", "evaluation", "machinery", "data")
SECTIONS = ("data", "protocol", "optimisation", "loss", "pool", "text", "evaluation", "machinery")


@dataclass(frozen=True)
class Key:
    types: tuple            # accepted Python types (after int -> float promotion)
    default: Any
    help: str
    section: str
    role: str = "trains"
    nullable: bool = False
    check: Callable[[Any], bool] | None = None
    rule: str = ""          # what `check` demands, for the error message
    choices: tuple = ()     # the valid values, when there is a fixed list
    named: bool = False     # spelled out in the run folder's name
    adopted: bool = False   # an evaluated checkpoint's value is used (it shapes the trained model or its images)
    source_only: bool = False   # ... describes the source dataset's classes: a transfer keeps the target's
    path: bool = False      # a file or folder: '~' expanded, a NUL byte refused
    items: str = ""         # lists and mappings: 'text' when their entries are names or paths, taken as written

    @property
    def text(self) -> bool:
        """Whether the value is text (taken as written, never read as a YAML number or boolean)."""
        return self.types[0] is str


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
ALL = "all"   # `baselines: all`: every registered method (resolved into the list when the run starts)


SCHEMA: dict[str, Key] = {
    # ---- data: what to run on
    "dataset": Key((str,), None, "dataset name: one of datasets/coop.py's LAYOUTS, 'imagenet', or 'folder' (your "
                                 "own images)", "data"),
    "data_path": Key((str,), None, "root folder of the dataset (CoOp layout)", "data", "data", path=True),
    "split_fractions": Key((list,), [0.5, 0.2, 0.3], "dataset: folder only: train/val/test fractions of each "
                                                     "class folder when no train/ val/ test/ subfolders exist", "data"),
    "split_seed": Key((int,), 1, "dataset: folder only: seed of that split", "data", check=SEED[0], rule=SEED[1]),
    "num_classes": Key((int,), None, "expected number of classes (checked against the data)", "data", "data", True,
                       *span(0, 1_000_000, True)),
    "backbone": Key((str,), "RN50", "CLIP backbone: any open_clip model name whose image tower RAFT fine-tunes: "
                                    "ResNets (RN50, RN101, RN50x4, ...: the attention pool), ViTs with a class token "
                                    "(ViT-B-32, ViT-B-16, ViT-L-14, ...: the last block's attention, doc/method.md "
                                    "§10), SigLIP/SigLIP2 (ViT-B-16-SigLIP2, ...: the attention-pool head, §11); "
                                    "tiny-rn, tiny-vit, tiny-siglip (random, offline). doc/weights.md lists them",
                    "data", named=True),
    "weights": Key((str,), "openai", "a pretrained tag of the backbone ('openai', 'laion2b_s34b_b79k', 'webli', "
                                     "...: open_clip's list for that model), 'hf-hub:<org>/<repo>', a local "
                                     "checkpoint path, or null for random init (doc/weights.md)", "data",
                   nullable=True),
    "quick_gelu": Key((bool,), None, "QuickGELU activations; null = as open_clip records it for the weights "
                                     "(the tag's record; OpenAI's weights need it); resolved when the run starts",
                      "data", nullable=True, adopted=True),
    "calibrate_bn": Key((bool,), False, "re-estimate the trunk's BatchNorm statistics on the training images "
                                        "(only for randomly initialised backbones)", "data", adopted=True),
    # ---- protocol (doc/protocols.md)
    "method": Key((str,), "raft", "what is trained: 'raft' (the region pool), or a method that trains inside "
                                  "CLIP on the same images and text: 'coop' (CoOp's learned prompts through the "
                                  "frozen text encoder; doc/baselines.md); its run folder ends in _<method>",
                  "protocol", choices=("raft", "coop"), named=True, adopted=True),
    "coop_n_ctx": Key((int,), 16, "CoOp: learned context tokens (its published M = 16; with coop_ctx_init the "
                                  "phrase's token count)", "protocol", check=span(1, 64)[0], rule=span(1, 64)[1], named=True,
                        adopted=True),
    "coop_ctx_init": Key((str,), "", "CoOp: a phrase whose token embeddings start the context ('a photo of a'); "
                                     "'' draws it from N(0, 0.02^2), as published", "protocol", named=True,
                         adopted=True),
    "coop_class_specific": Key((bool,), False, "CoOp: one context per class (its CSC) instead of one for all",
                               "protocol", named=True, adopted=True),
    "coop_position": Key((str,), "end", "CoOp: where the class name sits among the context tokens: 'end', "
                                        "'middle' or 'front'", "protocol", choices=("end", "middle", "front"),
                         named=True, adopted=True),
    "protocol": Key((str,), "fewshot", "'fewshot': train and test on all classes (the paper's protocol); "
                                       "'base2new': train on the base half of the classes, test on base and new "
                                       "classes (CoCoOp's protocol)", "protocol", choices=("fewshot", "base2new"),
                    named=True, adopted=True, source_only=True),
    "shots": Key((int,), 16, "training images per class (at most the largest class's training images, or 16: "
                             "more would repeat every image)", "protocol",
                 check=span(0, 10_000, True, "few-shot; the data bounds it further")[0],
                 rule=span(0, 10_000, True, "few-shot; the data bounds it further")[1], named=True, adopted=True),
    "seed": Key((int,), 1, "seed of the few-shot sample, the data order and the augmentations", "protocol",
                check=SEED[0], rule=SEED[1], named=True, adopted=True),
    "val_per_class": Key((int,), 4, "datasets without a val split (ImageNet, folders without val/): validation "
                                    "images per class drawn from train images outside the few-shot set (0: use "
                                    "the fixed `alpha`)", "protocol", "evaluation", False, *span(0, 100_000),
                         adopted=True),
    "val_source": Key((str,), "split", "what every choice on validation data (RAFT's alpha, each method's "
                                       "hyper-parameters) is made on: 'split' (the whole val split, as the published "
                                       "RAFT code; datasets without one: val_per_class drawn from train), 'fewshot' "
                                       "(CoOp's few-shot validation: min(shots, 4) per class, drawn from the seed) "
                                       "or 'none' (the methods' validation-free rules; RAFT needs a fixed `alpha`)",
                      "protocol", "evaluation", choices=("split", "fewshot", "none"), named=True, adopted=True),
    # ---- optimisation
    "lr": Key((float,), 1e-4, "AdamW learning rate", "optimisation", check=span(0, 10, True)[0],
              rule=span(0, 10, True)[1]),
    "min_lr": Key((float,), 1e-6, "learning rate at the end of the cosine decay (at most lr)", "optimisation",
                  check=span(0, 10)[0], rule=span(0, 10)[1]),
    "eps": Key((float,), 1e-4, "AdamW epsilon", "optimisation", check=span(0, 1, True)[0], rule=span(0, 1, True)[1]),
    "weight_decay": Key((float,), 0.01, "AdamW weight decay", "optimisation", check=span(0, 10)[0],
                        rule=span(0, 10)[1]),
    "train_epoch": Key((int,), 50, "training epochs", "optimisation", check=span(0, 100_000, True)[0],
                       rule=span(0, 100_000, True)[1]),
    "warmup_epoch": Key((int,), 10, "epochs of linear learning-rate warm-up (fewer than train_epoch)",
                        "optimisation", check=span(0, 100_000)[0], rule=span(0, 100_000)[1]),
    "batch_size": Key((int,), 64, "training batch size", "optimisation",
                      check=span(0, 65_536, True, IMAGES_IN_MEMORY)[0],
                      rule=span(0, 65_536, True, IMAGES_IN_MEMORY)[1]),
    "batch_size_by_shots": Key((dict,), {}, "batch size for particular shot counts, e.g. {1: 64} (the "
                                            "reference's ImageNet 1-shot batch); a --batch_size on the command line "
                                            "wins", "optimisation"),
    # ---- loss (a negative weight would reward what the term penalises: refused)
    "lambda1": Key((float,), 0.1, "weight of the class/background separation term (>= 0; 0 turns it off)", "loss",
                   check=span(0, 1_000)[0], rule=span(0, 1_000)[1]),
    "lambda2": Key((float,), 0.5, "weight of the L1 consistency term with zero-shot CLIP (>= 0; 0 turns it off)",
                   "loss", check=span(0, 1_000)[0], rule=span(0, 1_000)[1]),
    "tau1": Key((float,), 2.0, "temperature of the class cross-entropy", "loss", check=span(0.001, 1_000)[0],
                rule=span(0.001, 1_000)[1]),
    "tau2": Key((float,), 3.0, "temperature of the background cross-entropy", "loss", check=span(0.001, 1_000)[0],
                rule=span(0.001, 1_000)[1]),
    "logit_scale": Key((float,), 100.0, "scale of the cosine logits", "loss", check=span(0, 1_000, True)[0],
                       rule=span(0, 1_000, True)[1], adopted=True),
    # ---- region pool (defaults = the published behaviour)
    "mask_bg_in_cls": Key((bool,), False, "mask the background token out of the class token's attention", "pool",
                          adopted=True),
    "pool_precision": Key((str,), "float32", "'float32': float32 weights (mixed-precision compute on CUDA); "
                                             "'float16_published': float16 weights and AdamW state updated in "
                                             "place, as the published code trains (doc/method.md, Numerics)",
                          "pool", choices=("float32", "float16_published"), adopted=True),
    # ---- text classifier
    "renorm_bg_text": Key((bool,), False, "re-normalise the averaged background text embedding", "text",
                          adopted=True),
    "descriptions": Key((str,), "auto", "class descriptions file; 'auto' = gpt3_file/<dataset>_prompt.json "
                                        "when it exists; null = templates only", "text", nullable=True, adopted=True,
                        source_only=True, path=True),
    "templates": Key((list,), None, "hand-written templates, each holding one '{}' (the class name); null = the "
                                    "dataset's own", "text", nullable=True, adopted=True, source_only=True,
                     items="text"),
    # ---- evaluation (alpha blends alpha·fine-tuned + (1-alpha)·zero-shot: outside [0, 1] it is no blend)
    "search_low": Key((float,), 0.0, "lowest alpha of the search grid (in [0, 1])", "evaluation", "evaluation",
                      check=span(0, 1)[0], rule=span(0, 1)[1]),
    "search_high": Key((float,), 1.0, "highest alpha of the search grid (in [0, 1])", "evaluation", "evaluation",
                       check=span(0, 1)[0], rule=span(0, 1)[1]),
    "search_step": Key((int,), 50, "number of intervals of the alpha grid", "evaluation", "evaluation",
                       check=span(0, 1_000, True, "each grid point scores every val and test image")[0],
                       rule=span(0, 1_000, True, "each grid point scores every val and test image")[1]),
    "alpha": Key((float,), None, "fixed blending weight in [0, 1]; null = choose on validation data", "evaluation",
                 "evaluation", True, *span(0, 1)),
    "alpha_on": Key((str,), "val", "where alpha is chosen: 'val' (validation data: the reported protocol) or 'test' "
                                   "(the published code's ImageNet protocol, whose 'val' loader is the test split: "
                                   "an oracle, for comparison with it only; recorded and marked in every table; "
                                   "refused where the alpha feeds other numbers: base2new, shift sets, transfers)",
                    "evaluation", "evaluation", choices=("val", "test"), named=True),
    "shift_sets": Key((dict,), {}, "ImageNet only: distribution-shift test sets {name: path} (imagenet_v2, "
                                   "imagenet_sketch, imagenet_a, imagenet_r)", "evaluation", "evaluation",
                      items="text"),
    "baselines": Key((list, str), ALL, "the methods run on the same few-shot images, features and validation "
                                       "data (doc/baselines.md): 'all' (every one baselines/ registers), a list of "
                                       "their names, or [] for none", "evaluation", "evaluation", items="text"),
    # ---- machinery
    "eval_batch_size": Key((int,), 128, "batch size of the frozen trunk on val/test, few-shot and calibration "
                                        "images (it can change the last bits of the features, so it is part of "
                                        "a run's settings and of the caches' keys)", "machinery",
                           check=span(0, 4_096, True, IMAGES_IN_MEMORY)[0],
                           rule=span(0, 4_096, True, IMAGES_IN_MEMORY)[1]),
    "bad_images": Key((str,), "fail", "an unreadable val/test image: 'fail' (stop, naming it) or 'skip' (leave it "
                                      "out, counted in results.json); training images always fail", "machinery",
                      "machinery", choices=("fail", "skip")),
    "save_every": Key((float,), 60.0, "seconds between saved training states for resuming (saved after an epoch; "
                                      "0 = after every epoch; 1e9 = only when stopped)", "machinery", "machinery",
                      check=span(0, 1e12)[0], rule=span(0, 1e12)[1]),
    "device": Key((str,), "auto", "'auto' (cuda when available), 'cpu', 'cuda', 'cuda:1', ...", "machinery",
                  "machinery"),
    "amp": Key((bool,), True, "mixed precision (used on CUDA only)", "machinery"),
    "amp_dtype": Key((str,), "float16", "the mixed-precision dtype on CUDA: 'float16' (with loss scaling) or "
                                        "'bfloat16' (no scaler; GPUs of compute capability 8.0 and later); part of "
                                        "the feature caches' keys", "machinery", choices=("float16", "bfloat16")),
    "num_workers": Key((int, str), "auto", "image-decoding worker processes: an integer up to 64, or 'auto' (the "
                                           "CPUs this process may use, shared among the processes of a torchrun "
                                           "run, at most 16; none for fewer than 256 images)", "machinery",
                       "machinery", False, lambda v: v == "auto" or (isinstance(v, int) and 0 <= v <= 64),
                       ">= 0 and <= 64 (each worker is a process holding a copy of the loader), or 'auto'"),
    "cache_dir": Key((str,), "cache", "folder for the text and trunk-feature caches", "machinery", "machinery",
                     path=True),
    "dist_timeout": Key((float,), 1800.0, "torchrun runs: seconds a collective may wait for the other processes "
                                          "before the run stops (doc/distributed.md)", "machinery", "machinery",
                        check=span(0, 604_800, True, "a week")[0], rule=span(0, 604_800, True, "a week")[1]),
    "dist_exact": Key((bool,), False, "torchrun runs: every process runs the region pool on the whole global batch "
                                      "(the trunk's features gathered), so the update is one process's bit for bit, "
                                      "instead of summing the processes' gradients (equal up to float rounding); "
                                      "costs a feature gather per step (doc/distributed.md)", "machinery",
                      "machinery"),
    "feature_cache": Key((bool,), True, "cache val/test trunk features on disk and reuse them across runs",
                         "machinery", "machinery"),
    "augment": Key((str,), "batched", "faithful mode's augmentation: 'batched' (each image decoded once, at a "
                                      "reduced size; crops resized in batches on the device) or 'published' (the "
                                      "published code's: each image read again every epoch, one PIL resampling "
                                      "from full resolution; slower, doc/method.md §6)", "machinery",
                   choices=("batched", "published")),
    "train_views": Key((int,), None, "null: a fresh augmentation every epoch (faithful); V: V augmented views per "
                                     "image computed once and cycled through the epochs", "machinery",
                       nullable=True,
                       check=span(0, 100, True, "each view is a trunk pass and a stored copy of every image's "
                                                "features")[0],
                       rule=span(0, 100, True, "each view is a trunk pass and a stored copy of every image's "
                                               "features")[1], named=True),
    "output_dir": Key((str,), "output", "root of the run folders", "machinery", "machinery", path=True),
    "tensorboard": Key((bool,), False, "also log each epoch's loss terms, train accuracy, lr and seconds to "
                                       "<run folder>/tensorboard (needs the optional tensorboard package)",
                       "machinery", "machinery"),
    "name": Key((str,), None, "tag of the run folder after <backbone>_<shots>shots_seed<seed>: null = the training "
                              "settings given on the command line that differ from the config file (e.g. "
                              "_lr=0.0002); '' = no tag", "machinery", "machinery", True, named=True),
}

NOT_TRAINING_KEYS = frozenset(k for k, key in SCHEMA.items() if key.role != "trains")
NAMED_KEYS = frozenset(k for k, key in SCHEMA.items() if key.named)
ADOPTED_KEYS = tuple(k for k, key in SCHEMA.items() if key.adopted)
SOURCE_ONLY_KEYS = frozenset(k for k, key in SCHEMA.items() if key.source_only)

# Values this version renamed: still read (files of older runs, old commands), as the new value.
RENAMED_VALUES = {"pool_precision": {"float16_reference": "float16_published"},
                  "augment": {"reference": "published"}}


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


def unknown_key(name, source: str) -> RaftError:
    return RaftError(f"unknown config key '{printable(name)}' in {source} (did you mean '{closest_key(str(name))}'?)")


def renamed(name: str, value: Any) -> Any:
    """A value this version renamed, as its new name (``RENAMED_VALUES``)."""
    return RENAMED_VALUES.get(name, {}).get(value, value) if isinstance(value, str) else value


def _coerce(name: str, value: Any, source: str) -> Any:
    """Type-check one value against the schema (YAML reads '1e-4' as a string: accept it as a number)."""
    if name not in SCHEMA:
        raise unknown_key(name, source)
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
    ok = isinstance(value, key.types) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        raise RaftError(f"config key '{name}' expects {expected.__name__}, got {printable(repr(value))[:80]} "
                        f"({source}): {key.help}")
    if key.path and isinstance(value, str):
        value = checked_path(name, value, source)
    if key.choices:
        new = renamed(name, value)
        if new != value:
            print(f"note: {name}: '{value}' is now called '{new}' ({source})", flush=True)
            value = new
        if value not in key.choices:
            hint = ([c for c in key.choices if c.startswith(str(value))]             # 'float16' -> 'float16_published'
                    or difflib.get_close_matches(str(value), key.choices, n=1, cutoff=0.0))
            names = [repr(c) for c in key.choices]
            allowed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
            raise RaftError(f"config key '{name}' must be {allowed}, got {printable(repr(value))} ({source}; "
                            f"did you mean {hint[0]!r}?)")
    if key.check is not None and not key.check(value):
        raise RaftError(f"config key '{name}' must be {key.rule}, got {value!r} ({source})")
    return value


def checked_path(name: str, value: str, source: str) -> str:
    """A path as a shell user means it: '~' expanded; a NUL byte (no file system holds one) refused."""
    if "\x00" in value:
        raise RaftError(f"config key '{name}' holds a NUL byte ({source}): not a path any file system can hold")
    return os.path.expanduser(value) if value.startswith("~") else value


# --------------------------------------------------------------------------- YAML as this project reads it
NULL_TAG = "tag:yaml.org,2002:null"
MERGE_TAG = "tag:yaml.org,2002:merge"
MAX_DEPTH = 16          # a config holds mappings and lists a few levels deep
MAX_NODES = 100_000     # values after every alias is expanded (a few hundred bytes of aliases can mean billions)


def compose(text: str, source: str) -> yaml.Node | None:
    """The YAML node graph of ``text`` (the safe loader's composer), checked before anything is
    built from it: not nested deeper than ``MAX_DEPTH``, no node containing itself, at most
    ``MAX_NODES`` values once aliases are expanded."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:
        raise RaftError(f"{source} is nested too deeply to be a config (more than {MAX_DEPTH} levels)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise RaftError(f"{source} is not valid YAML{where}") from None
    if node is not None:
        check_graph(node, source)
    return node


def check_graph(root: yaml.Node, source: str) -> None:
    sizes: dict[int, int] = {}

    def children(node: yaml.Node) -> list[yaml.Node]:
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    def size(node: yaml.Node, path: tuple[int, ...]) -> int:
        if id(node) in path:
            raise RaftError(f"{source} holds a value that contains itself (an alias of its own anchor, line "
                            f"{node.start_mark.line + 1}): not a config")
        if len(path) >= MAX_DEPTH:
            raise RaftError(f"{source} is nested too deeply to be a config (more than {MAX_DEPTH} levels, line "
                            f"{node.start_mark.line + 1})")
        if id(node) not in sizes:
            total = 1
            for child in children(node):
                total += size(child, path + (id(node),))
                if total > MAX_NODES:
                    raise RaftError(f"{source} expands to more than {MAX_NODES:,} values through its aliases "
                                    f"(line {node.start_mark.line + 1}): not a config")
            sizes[id(node)] = total
        return sizes[id(node)]

    size(root, ())


def build(node: yaml.Node, text: bool, source: str, key: str) -> Any:
    """A node as a value: scalars where ``text`` holds are taken as written (``no``, ``010`` and
    ``12:30:00`` stay those words; only a null is None), others as the safe loader reads them;
    a mapping's merge keys (``<<``) are expanded, and a key given twice is refused."""
    if isinstance(node, yaml.ScalarNode):
        if text:
            return None if node.tag == NULL_TAG else node.value
        return yaml.SafeLoader("").construct_object(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return [build(child, text, source, key) for child in node.value]
    out: dict = {}
    for name_node, value_node in merged_pairs(node, source):
        name = build(name_node, text, source, key) if isinstance(name_node, yaml.ScalarNode) else None
        if name is None or isinstance(name, (list, dict)):
            raise RaftError(f"{source}: {key}: line {name_node.start_mark.line + 1} has a key that is not a name")
        out[name] = build(value_node, text, source, key)
    return out


def merged_pairs(node: yaml.MappingNode, source: str) -> list[tuple[yaml.Node, yaml.Node]]:
    """The mapping's (key, value) nodes, merge keys expanded (explicit keys win over merged
    ones, as YAML says); a key written twice is an error (PyYAML would keep the last silently)."""
    explicit, merged, seen = [], [], {}
    for name_node, value_node in node.value:
        if name_node.tag == MERGE_TAG:
            for part in (value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]):
                if not isinstance(part, yaml.MappingNode):
                    raise RaftError(f"{source}: the merge key on line {name_node.start_mark.line + 1} must name "
                                    f"a mapping")
                merged.extend(merged_pairs(part, source))
            continue
        if isinstance(name_node, yaml.ScalarNode):
            line = name_node.start_mark.line + 1
            if name_node.value in seen:
                first = seen[name_node.value]
                raise RaftError(f"{source}: key '{printable(name_node.value)}' is given twice "
                                + (f"(lines {first} and {line})" if first != line else f"(line {line})"))
            seen[name_node.value] = line
        explicit.append((name_node, value_node))
    given = {n.value for n, _ in explicit if isinstance(n, yaml.ScalarNode)}
    return explicit + [(n, v) for n, v in merged if not (isinstance(n, yaml.ScalarNode) and n.value in given)]


def read_key_value(name: str, node: yaml.Node, source: str) -> Any:
    """One key's YAML node as its value: text keys and name lists as written (``Key.text``,
    ``Key.items``), numbers and booleans as YAML reads them."""
    key = SCHEMA[name]
    return build(node, key.text or key.items == "text", source, name)


def load_yaml(path: str | Path) -> dict:
    """A config file (also a pipe: ``--config <(...)``) as {key: value}, keys checked against the schema."""
    path = Path(path)
    source = f"config file {printable(path)}"
    node = compose(read_text(path, "config file", limit=1 << 20, pipe=True), source)
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise RaftError(f"{source} must hold a mapping of key: value")
    values = {}
    for name_node, value_node in merged_pairs(node, source):
        name = name_node.value if isinstance(name_node, yaml.ScalarNode) else None
        if name not in SCHEMA:
            raise unknown_key(name, source) if name is not None else RaftError(
                f"{source}: line {name_node.start_mark.line + 1} has a key that is not a name")
        values[name] = read_key_value(name, value_node, source)
    return values


def parse_value(name: str, text: str, source: str) -> Any:
    """A command-line value: text keys take it as typed (``--name 010`` is '010', ``--output_dir
    12:30:00`` that folder; ``null`` is None where the key may be null); others as YAML."""
    key = SCHEMA[name]
    if key.text:
        return None if key.nullable and text in ("null", "None", "~") else text
    if text == "":
        return ""
    node = compose(text, source)
    return None if node is None else read_key_value(name, node, source)


def check_values(values: dict, source: str) -> None:
    """Type- and range-check the known keys of a config read back from a file (a checkpoint's,
    a results file's); keys this version does not know are left alone."""
    for name, value in values.items():
        if name in SCHEMA:
            _coerce(name, renamed(name, value), source)


def current_values(saved: dict) -> dict:
    """A config read back from a file written by an earlier version, in this version's values."""
    return {k: renamed(k, v) for k, v in saved.items()}


def file_layer(yaml_path: str | Path | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Schema defaults <- YAML, each value type-checked; and where each value came from."""
    values = {name: key.default for name, key in SCHEMA.items()}
    given = {name: "the default" for name in values}
    if yaml_path is not None:
        source = f"config file {printable(yaml_path)}"
        for name, value in load_yaml(yaml_path).items():
            values[name], given[name] = _coerce(name, value, source), source
    return values, given


def file_values(yaml_path: str | Path | None) -> dict[str, Any]:
    """Schema defaults <- YAML (the config file's layer alone)."""
    return file_layer(yaml_path)[0]


def build_config(yaml_path: str | Path | None, overrides: dict[str, Any], resolve_model: bool = True) -> Config:
    """Schema defaults <- YAML <- overrides, each value type-checked, then cross-checked; last, the
    checks that need the model library (``resolve``)."""
    values, given = file_layer(yaml_path)
    for name, value in overrides.items():
        values[name] = _coerce(name, value, f"--{name}")
        given[name] = f"--{name}"
    cross_check(values, given, overrides)
    if resolve_model:
        resolve(values)
    return Config(values)


def cross_check(values: dict, given: dict, overrides: dict) -> None:
    """The checks between keys (every message names the keys and where their values came from)."""
    by_shots = values["batch_size_by_shots"]
    if not all(isinstance(k, int) and not isinstance(k, bool) and SCHEMA["shots"].check(k) and isinstance(v, int)
               and not isinstance(v, bool) and SCHEMA["batch_size"].check(v) for k, v in by_shots.items()):
        raise RaftError(f"config key 'batch_size_by_shots' ({given['batch_size_by_shots']}) must map shot counts to "
                        f"batch sizes, e.g. {{1: 64}}; got {printable(repr(by_shots))[:80]}")
    if values["shots"] in by_shots and "batch_size" not in overrides:
        values["batch_size"] = by_shots[values["shots"]]
    for required in ("dataset", "data_path"):
        if not values[required]:
            raise RaftError(f"config key '{required}' is required (set it in the YAML or with --{required})")
    if values["min_lr"] > values["lr"]:
        raise RaftError(f"min_lr ({values['min_lr']:g}, {given['min_lr']}) is larger than lr ({values['lr']:g}, "
                        f"{given['lr']}): the cosine schedule decays from lr to min_lr; set --min_lr lower")
    if values["search_low"] > values["search_high"]:
        raise RaftError(f"empty alpha search range: search_low={values['search_low']} ({given['search_low']}) > "
                        f"search_high={values['search_high']} ({given['search_high']})")
    if values["warmup_epoch"] >= values["train_epoch"] and values["warmup_epoch"] > 0:
        raise RaftError(f"warmup_epoch ({values['warmup_epoch']}, {given['warmup_epoch']}) must be smaller than "
                        f"train_epoch ({values['train_epoch']}, {given['train_epoch']}); set --warmup_epoch lower")
    fractions = values["split_fractions"]
    if (len(fractions) != 3 or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0
                                       and math.isfinite(f) for f in fractions)
            or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0 or fractions[2] == 0):
        raise RaftError(f"config key 'split_fractions' ({given['split_fractions']}) must be [train, val, test] "
                        f"fractions summing to 1 with train and test > 0, got {printable(repr(fractions))[:80]}")
    if values["augment"] == "published" and values["train_views"]:
        raise RaftError(f"augment: published ({given['augment']}) is the faithful mode's augmentation; train_views "
                        f"({given['train_views']}) caches its own views (set one of them)")
    if values["templates"] is not None:
        if not values["templates"] or not all(isinstance(t, str) for t in values["templates"]):
            raise RaftError(f"config key 'templates' ({given['templates']}) must be a non-empty list of strings, "
                            f"each holding one '{{}}'")
        for template in values["templates"]:
            check_template(template, f"config key 'templates' ({given['templates']})")
    shifts = values["shift_sets"]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in shifts.items()):
        raise RaftError(f"config key 'shift_sets' ({given['shift_sets']}) must map names to folders, e.g. "
                        f"{{imagenet_v2: data/imagenetv2}}")
    values["shift_sets"] = {k: checked_path("shift_sets", v, given["shift_sets"]) for k, v in shifts.items()}
    if values["alpha_on"] == "test" and (values["protocol"] != "fewshot" or values["shift_sets"]):
        leaks = "protocol base2new scores new classes" if values["protocol"] != "fewshot" else \
            "shift_sets score ImageNet's variants"
        raise RaftError(f"alpha_on: test ({given['alpha_on']}) chooses alpha on the test labels it is scored on; here "
                        f"{leaks} at that alpha, a choice made with test labels reported as a result: use alpha_on val")
    if values["method"] != "coop":
        for key in ("coop_n_ctx", "coop_ctx_init", "coop_class_specific", "coop_position"):
            if values[key] != SCHEMA[key].default:
                raise RaftError(f"{key} ({given[key]}) is an option of method coop; this run's method is "
                                f"{values['method']!r} (set --method coop, or leave {key} out)")
    if values["method"] != "raft" and values["protocol"] != "fewshot":
        raise RaftError(f"method {values['method']} ({given['method']}) runs the few-shot protocol; protocol "
                        f"{values['protocol']} is RAFT's here (CoCoOp, the base-to-new prompt method, is not "
                        f"implemented yet)")
    if values["val_source"] == "none" and values["alpha"] is None and values["alpha_on"] == "val" \
            and values["method"] == "raft":
        raise RaftError(f"val_source: none ({given['val_source']}) leaves nothing to choose RAFT's alpha on: set a fixed "
                        f"--alpha (the methods follow their validation-free rules)")
    methods = values["baselines"]
    if isinstance(methods, str) and methods != ALL:
        raise RaftError(f"config key 'baselines' ({given['baselines']}) must be 'all' or a list of methods, got "
                        f"{printable(repr(methods))[:80]}")
    if isinstance(methods, list) and not all(isinstance(m, str) for m in methods):
        raise RaftError(f"config key 'baselines' ({given['baselines']}) must list method names")


def resolve(values: dict) -> None:
    """Before anything is written: the backbone is an open_clip model RAFT applies to, the pool's
    numerics can run it, ``quick_gelu: null`` becomes what open_clip records for the weights, and
    ``baselines`` names registered methods (``all``: every one) -- a run's settings are concrete.
    The weights themselves are checked when the run knows them: an evaluation takes its
    checkpoint's (run/folders.py)."""
    from baselines import METHODS
    from clip.backbone import backbone_family
    from clip.published import numerics_of
    from clip.weights import recorded_quick_gelu, tokenizer_packages
    family = backbone_family(values["backbone"])
    missing = tokenizer_packages(values["backbone"])
    if missing:
        raise RaftError(f"{values['backbone']}'s tokenizer comes from Hugging Face and needs {' and '.join(missing)}, "
                        f"not installed: pip install -r requirements-optional.txt (doc/weights.md)")
    if values["quick_gelu"] is None:
        values["quick_gelu"] = recorded_quick_gelu(values["backbone"], values["weights"])
    numerics_of(values["pool_precision"]).check(values | {"family": family})
    if values["baselines"] == ALL:
        values["baselines"] = list(METHODS)
    for method in values["baselines"]:
        if method not in METHODS:
            hint = difflib.get_close_matches(str(method), list(METHODS), n=1, cutoff=0.0)[0]
            raise RaftError(f"unknown baseline {printable(repr(method))} in `baselines` (did you mean {hint!r}?); "
                            f"known: {', '.join(METHODS)}")


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def dataset_config(dataset: str) -> Path:
    """configs/<dataset>.yaml, or one line naming the closest dataset."""
    path = CONFIG_DIR / f"{dataset}.yaml"
    if os.sep in dataset or "/" in dataset or not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem not in ("demo", "folder"))
        hint = difflib.get_close_matches(dataset, known, n=1, cutoff=0.0)
        raise RaftError(f"unknown dataset '{printable(dataset)}' (did you mean '{hint[0]}'?); known: "
                        f"{', '.join(known)}")
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


def keys_help() -> str:
    """Every key with its default and meaning, in sections (``--help``)."""
    parts = []
    for section in SECTIONS:
        lines = [f"  --{name} (default: {key.default!r}): {key.help}"
                 + (f" [{key.rule}]" if key.rule and key.rule not in key.help else "")
                 for name, key in SCHEMA.items() if key.section == section]
        parts.append(f"{section}:\n" + "\n".join(lines))
    return "\n\n".join(parts)


def parse_args(argv: list[str] | None, description: str, evaluates: bool = True,
               prog: str | None = None) -> tuple[Config, argparse.Namespace]:
    """Fixed flags plus ``--<config key> <value>`` for every schema key. ``evaluates``: the
    entry point can evaluate a trained checkpoint (--eval-only, --checkpoint)."""
    parser = ToolParser(
        prog=prog, description=description,
        epilog=f"Any config key overrides the YAML: --shots 4 --lr 2e-4 --backbone RN101 ...\n\n"
               f"config keys, by section:\n\n{keys_help()}",
    )
    parser.add_argument("--config", required=True, help="YAML file with the dataset's settings")
    if evaluates:
        parser.add_argument("--eval-only", action="store_true", help="evaluate a trained region pool, no training")
        parser.add_argument("--checkpoint", help="checkpoint to evaluate (default: the run folder's own)")
    parser.add_argument("--force", action="store_true", help="run again even if results.json exists")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    flags, rest = parser.parse_known_args(argv)
    flags.eval_only, flags.checkpoint = getattr(flags, "eval_only", False), getattr(flags, "checkpoint", None)
    if flags.checkpoint is not None:
        flags.checkpoint = checked_path("--checkpoint", flags.checkpoint, "the command line")
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--"):
            raise RaftError(f"unexpected argument '{printable(token)}' (overrides are written --key value)")
        name, sep, value = token[2:].partition("=")
        name = name.replace("-", "_")
        if not sep:
            if i + 1 >= len(rest):
                raise RaftError(f"--{name} needs a value")
            value = rest[i + 1]
            i += 1
        i += 1
        if name not in SCHEMA:
            raise unknown_key(name, "the command line")
        overrides[name] = parse_value(name, value, f"--{name} {printable(repr(value))}")
    cfg = build_config(flags.config, overrides)
    # what the command line changed relative to the config file (run-folder names, --eval-only)
    flags.file_values = file_values(flags.config)
    flags.overrides = {name: cfg[name] for name in overrides}
    return cfg, flags


# --------------------------------------------------------------------------- which settings train
def training_settings(cfg: Config | dict) -> dict:
    return {k: v for k, v in dict(cfg).items() if k not in NOT_TRAINING_KEYS}


def settings_differ(saved: dict, cfg: Config) -> dict:
    """{key: (saved, now)} for the training settings that changed. A key the saved config lacks
    (written before the key existed) counts as its default, which is what that version did."""
    now = training_settings(cfg)
    before = training_settings({name: key.default for name, key in SCHEMA.items()} | current_values(saved))
    return {k: (before.get(k), now.get(k)) for k in sorted(set(now) | set(before)) if before.get(k) != now.get(k)}


def require_same_settings(saved: dict, cfg: Config, message: str) -> None:
    """A saved run (a resume state, a checkpoint, a finished results file) is used only under the
    training settings it was made with; else one line, ``message`` with '{}' standing for what
    changed ('lr: 0.0001 -> 0.0002, ...')."""
    changed = settings_differ(saved, cfg)
    if changed:
        raise RaftError(message.format(describe_changes(changed)))


def describe_changes(changed: dict, most: int = 4) -> str:
    """'lr: 0.0001 -> 0.0002, lambda2: 0.5 -> 1.0' (the first few)."""
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:most])
    return shown + (f" and {len(changed) - most} more" if len(changed) > most else "")
