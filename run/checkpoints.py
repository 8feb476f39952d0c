"""A run's files read back: checkpoints (``checkpoint.pt``) and results (``results.json``).

Both come back from disk, possibly from another version, another machine or a stranger:
each is validated once, here, where it is read, so that a file with the usual keys but
wrong values is one line naming the file, never a traceback three modules later.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from clip.backbone import FrozenCLIP, batchnorm_statistics
from datasets.base import DatasetSplits
from run.config import ADOPTED_KEYS, SOURCE_ONLY_KEYS, Config, check_values, current_values
from utils import RaftError, first_line, printable, read_json, torch_load, torch_save

# 1: the pool, its config, class names and text classifier;
# 2: + the dataset it was trained on and its few-shot sample's SHA-256;
# 3: + the SHA-256 of the data it was trained on (class names and training list, DatasetSplits.digest)
CHECKPOINT_FORMAT = 3


def save_checkpoint(path: Path, pool: torch.nn.Module, cfg: Config, clip: FrozenCLIP, trained: DatasetSplits,
                    text: torch.Tensor, train_seconds: float | None, fewshot_sha256: str | None,
                    train_data_sha256: str | None, imported_from: dict | None = None,
                    history: list[dict] | None = None) -> None:
    """The region pool plus what using it needs without the dataset: the class names and the
    text classifier of the classes it was trained on (predict.py, visualize.py; the base
    classes for base-to-new), the dataset (evaluating it elsewhere is a transfer), and a
    re-estimated trunk's BatchNorm statistics."""
    measured = batchnorm_statistics(clip) if cfg.calibrate_bn else {}
    torch_save(path, {"format": CHECKPOINT_FORMAT, "pool": pool.state_dict(), "config": dict(cfg),
                      "backbone": cfg.backbone, "dataset": trained.name, "num_classes": trained.num_classes,
                      "classnames": list(trained.classnames), "text": text.detach().cpu(),
                      "trunk_batchnorm": measured, "train_seconds": train_seconds,
                      "fewshot_sha256": fewshot_sha256, "train_data_sha256": train_data_sha256,
                      **({"imported_from": imported_from} if imported_from else {}),
                      **({"history": history} if history is not None else {})})


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def tensor_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def check_finite(tensors: dict[str, torch.Tensor], where: str, what: str) -> None:
    """Every floating-point tensor read back holds numbers only: a NaN or infinite pool would
    score every image alike and be reported as a result. One line naming the first bad tensor."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise RaftError(f"{where}: {what} '{name}' holds {bad:,} NaN or infinite value{'s' if bad != 1 else ''} "
                            f"of {tensor.numel():,}: refusing to use it (train it again with --force)")


# --------------------------------------------------------------------------- the published code's checkpoints
PUBLISHED_PREFIX = "attnpool."   # the published MyPooling's state dict: its AttentionPool2d under this name


def is_published_checkpoint(ckpt) -> bool:
    """``{"net": {"attnpool.*": tensors}, "optimizer", "epoch", "lr_scheduler"}``, as the published
    code's ``save_model`` writes it."""
    return (isinstance(ckpt, dict) and isinstance(ckpt.get("net"), dict) and bool(ckpt["net"])
            and all(isinstance(k, str) and k.startswith(PUBLISHED_PREFIX) for k in ckpt["net"]))


def published_pool_state(ckpt: dict, pool: torch.nn.Module, path: Path, backbone: str) -> dict[str, torch.Tensor]:
    """The published pool's tensors under this project's names (the same names without the
    prefix: the published pool is CLIP's attention pool with row 0 of the positional embedding
    duplicated, as ours), checked against ``pool`` (another backbone's does not fit)."""
    state = {k[len(PUBLISHED_PREFIX):]: v for k, v in ckpt["net"].items()}
    expected = pool.state_dict()
    if set(state) != set(expected) or not tensor_dict(state):
        missing = sorted(set(expected) - set(state)) or sorted(set(state) - set(expected))
        raise RaftError(f"{printable(path)} is not a published RAFT pool of a ResNet ({missing[:1]} differs)")
    check_finite(state, printable(path), "the published pool's tensor")
    wrong = [f"{k} {tuple(state[k].shape)} there, {tuple(v.shape)} for {backbone}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise RaftError(f"{printable(path)} holds a published pool of another backbone than {backbone} ({wrong[0]})")
    return state


def validate_checkpoint(ckpt, path: Path) -> dict:
    """Every field a checkpoint may hold, checked for its type and its agreement with the others."""
    where = f"checkpoint {printable(path)}"
    if is_published_checkpoint(ckpt):
        raise RaftError(f"{printable(path)} is a checkpoint of the published RAFT code: import it into a run folder "
                        f"first (python scripts/import_published.py {printable(path)} --config configs/<dataset>.yaml)")
    if not isinstance(ckpt, dict) or "pool" not in ckpt or not isinstance(ckpt.get("config"), dict):
        raise RaftError(f"{printable(path)} is not a RAFT checkpoint (no region-pool state)")
    fmt = ckpt.get("format", 1)
    if not is_int(fmt) or fmt < 1:
        raise RaftError(f"{where}: its format field is {fmt!r:.40}, not a format number")
    if fmt > CHECKPOINT_FORMAT:
        raise RaftError(f"{printable(path)} was written by a newer version of this code (checkpoint format "
                        f"{fmt}, this version reads up to {CHECKPOINT_FORMAT})")

    def bad(field: str, expected: str):
        value = ckpt[field]
        shown = (f"a {str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
                 if isinstance(value, torch.Tensor) else printable(repr(value))[:60])
        raise RaftError(f"{where}: '{field}' is {shown}, expected {expected}")

    if not tensor_dict(ckpt["pool"]) or not ckpt["pool"]:
        bad("pool", "the region pool's state dict (names -> tensors)")
    check_finite(ckpt["pool"], where, "the pool's tensor")
    check_values(ckpt["config"], where)
    ckpt["config"] = current_values(ckpt["config"])
    for field, ok, expected in (
            ("backbone", lambda v: isinstance(v, str), "a backbone name"),
            ("dataset", lambda v: v is None or isinstance(v, str), "a dataset name"),
            ("num_classes", lambda v: is_int(v) and v > 0, "a class count"),
            ("classnames", lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "a list of names"),
            ("text", lambda v: isinstance(v, torch.Tensor) and v.dim() == 2 and v.is_floating_point()
             and bool(torch.isfinite(v).all()), "a finite D × (classes + 1) text matrix"),
            ("trunk_batchnorm", tensor_dict, "BatchNorm statistics (names -> tensors)"),
            ("train_seconds", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)),
             "seconds"),
            ("fewshot_sha256", lambda v: v is None or isinstance(v, str), "a SHA-256"),
            ("train_data_sha256", lambda v: v is None or isinstance(v, str), "a SHA-256"),
            ("imported_from", lambda v: isinstance(v, dict), "where it was imported from"),
            ("history", lambda v: isinstance(v, list) and all(isinstance(r, dict) for r in v), "per-epoch rows")):
        if field in ckpt and not ok(ckpt[field]):
            bad(field, expected)
    if "trunk_batchnorm" in ckpt:
        check_finite(ckpt["trunk_batchnorm"], where, "the trunk's BatchNorm statistic")
    classes = ckpt.get("num_classes")
    if classes is not None and "classnames" in ckpt and len(ckpt["classnames"]) != classes:
        raise RaftError(f"{where}: {len(ckpt['classnames'])} class names for {classes} classes")
    if classes is not None and "text" in ckpt and ckpt["text"].shape[1] != classes + 1:
        raise RaftError(f"{where}: its text matrix has {ckpt['text'].shape[1]} columns, {classes} classes and the "
                        f"background need {classes + 1}")
    return ckpt


def read_checkpoint(path: Path) -> dict:
    """Load a checkpoint (weights_only: no pickled code) and check it is a valid one of ours."""
    return validate_checkpoint(torch_load(path, "checkpoint"), path)


def source_dataset(ckpt: dict) -> str | None:
    """The dataset a checkpoint was trained on. Format 1 recorded only the config's `dataset`,
    which names CoOp datasets but says just 'folder' for your own folders."""
    if ckpt.get("dataset"):
        return ckpt["dataset"]
    name = ckpt["config"].get("dataset")
    return None if name in (None, "folder") else name


def check_checkpoint_backbone(ckpt: dict, path: Path, cfg: Config) -> None:
    if ckpt.get("backbone") != cfg.backbone:
        raise RaftError(f"checkpoint {printable(path)} was trained with backbone {ckpt.get('backbone')}, "
                        f"this run uses {cfg.backbone}")


def check_same_classes(ckpt: dict, path: Path, data: DatasetSplits) -> None:
    if ckpt.get("num_classes") != data.num_classes:
        raise RaftError(f"checkpoint {printable(path)} was trained for {ckpt.get('num_classes')} classes, "
                        f"this dataset has {data.num_classes}")
    stored = ckpt.get("classnames")
    if stored is not None and list(stored) != list(data.classnames):
        i = next(i for i, (a, b) in enumerate(zip(stored, data.classnames)) if a != b)
        raise RaftError(f"checkpoint {printable(path)} was trained on other classes than {data.name} at "
                        f"{printable(data.root)} has (class {i}: '{stored[i]}' there, '{data.classnames[i]}' here)")


def load_pool_state(pool: torch.nn.Module, ckpt: dict, path: Path) -> None:
    try:
        pool.load_state_dict(ckpt["pool"])
    except RuntimeError as exc:
        raise RaftError(f"checkpoint {printable(path)} does not fit this region pool: "
                        f"{first_line(exc)}") from None


def adopt_checkpoint(cfg: Config, flags: argparse.Namespace, ckpt: dict, transfer: bool, log) -> Config:
    """The settings that define the checkpoint's model: its training settings always (not its
    class text, for a transfer), its backbone and weights unless the command line gives them. The
    settings adopted are the schema's ``adopted`` keys (run/config.py): they shape what the pool
    computes or which images it was trained (and its alpha chosen) on."""
    trained, given = ckpt["config"], getattr(flags, "overrides", {})
    keys = [*(k for k in ("backbone", "weights") if k not in given),
            *(k for k in ADOPTED_KEYS if not (transfer and k in SOURCE_ONLY_KEYS))]
    changed = {k: trained[k] for k in keys if k in trained and trained[k] != cfg[k]}
    if "num_classes" not in given and cfg.num_classes is not None:
        changed["num_classes"] = None  # the classes are checked by name against the checkpoint's (or a transfer's own)
    if changed:
        log.info(f"evaluating with the checkpoint's settings: {changed}")
    return Config(dict(cfg) | changed)


# --------------------------------------------------------------------------- results.json
def read_results(path: Path) -> dict:
    """A run's results file, checked for what its readers use (alpha, the accuracies, the run's
    identity); a damaged one is one line naming the file."""
    results = read_json(path, "results file")

    def number(value, low=-math.inf, high=math.inf) -> bool:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and low <= value <= high)

    problems = [key for key, ok in (("alpha", lambda v: number(v, 0, 1)), ("test_acc", lambda v: number(v, 0, 100)),
                                    ("zero_shot_acc", lambda v: number(v, 0, 100)),
                                    ("dataset", lambda v: isinstance(v, str)),
                                    ("backbone", lambda v: isinstance(v, str)), ("shots", is_int),
                                    ("config", lambda v: isinstance(v, dict)))
                if not isinstance(results, dict) or (key in results and not ok(results[key]))
                or (key != "config" and key not in results)]
    if problems:
        raise RaftError(f"results file {printable(path)} is damaged or not a RAFT results file "
                        f"('{problems[0]}' is missing or wrong)")
    if "config" in results:
        check_values(results["config"], f"results file {printable(path)}")
        results["config"] = current_values(results["config"])
    return results


__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "read_checkpoint", "validate_checkpoint", "source_dataset",
           "check_checkpoint_backbone", "check_same_classes", "check_finite", "load_pool_state", "read_results"]
