"""The methods measured on the same ground as RAFT (doc/baselines.md): the same few-shot images,
the same cached CLIP features and text matrix, and every hyper-parameter chosen on validation
data. One small module per method; this registry is the one list of them: the config's
`baselines`, the run's `baselines` in results.json and summarize's columns all come from it.
"""
from __future__ import annotations

import time

import torch

from utils import PhaseClock, RaftError, first_line, harmonic_mean

from .ape import APE, APET
from .base import Baseline, BaselineData, accuracy, shown
from .clap import CLAP
from .clip_adapter import CLIPAdapter
from .gda import GDA
from .linear_probe import LinearProbe
from .lp_plus_plus import LPPlusPlus
from .prolip import ProLIP
from .task_res import TaskRes
from .tip_adapter import TipAdapter
from .tip_adapter_f import TipAdapterF
from .zero_shot import ZeroShot

METHODS: dict[str, type[Baseline]] = {cls.name: cls for cls in (
    ZeroShot,
    LinearProbe,
    TipAdapter,
    TipAdapterF,
    GDA,
    LPPlusPlus,
    APE,
    APET,
    CLAP,
    ProLIP,
    TaskRes,
    CLIPAdapter,
)}


# The methods that train inside CLIP (run/methods.py; the `method` config key, their own run
# folders): how tables show them, and the 11-dataset averages their papers report.
INSIDE = {
    "coop": ("CoOp", {("RN50", 16): 73.45, ("ViT-B/16", 16): 79.01}),   # Zhou et al., IJCV 2022
}


def label(name: str) -> str:
    """How a method is shown in tables and plots: its own label, else its key (never left out);
    a method inside CLIP with options other than its published ones: its label and them
    (``coop-ctx4-csc`` -> 'CoOp (ctx4-csc)')."""
    method = METHODS.get(name)
    if method is not None:
        return method.label or name
    base, _, options = name.partition("-")
    if base in INSIDE:
        return INSIDE[base][0] + (f" ({options})" if options else "")
    return name


def published(name: str) -> dict:
    """(backbone, shots) -> the average a method's paper reports (doc/baselines.md)."""
    if name in METHODS:
        return METHODS[name].published
    return INSIDE.get(name.partition("-")[0], ("", {}))[1] if "-" not in name else {}


def run_baselines(names: list[str], data: BaselineData,
                  targets: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]], log,
                  clock: PhaseClock | None = None, reuse=None) -> dict:
    """Fit, choose and score each method. ``targets``: name -> (features, labels, text); a
    target's text is None when its classes are the trained ones (every method is scored),
    else the zero-shot classifier of its own classes (base-to-new's new classes: only
    zero-shot CLIP can score them). ``clock``: the run's, timing each method. A method that
    cannot run on this setting is recorded as skipped with its reason, one that fails as
    failed with its error's first line: neither stops the others, neither goes missing.
    ``reuse``: results of earlier runs on the same ground (``get(name)``, ``put(name, result)``;
    run/measure.py's ``ResultStore``), a method found there is not run again."""
    clock = clock or PhaseClock()
    out = {}
    for name in names:
        earlier = reuse.get(name) if reuse is not None else None
        if earlier is not None:
            out[name] = earlier
            log.info(f"baseline {name}: the result of an earlier run on the same ground ({earlier['reused']})")
            continue
        method = METHODS[name]()
        reason = method.skip_reason(data)
        if reason:
            out[name] = {"skipped": reason}
            log.warning(f"baseline {name}: skipped: {reason}")
            continue
        try:
            out[name] = measure_one(name, method, data, targets, clock)
        except (RaftError, RuntimeError, ValueError, ArithmeticError, IndexError) as exc:
            out[name] = {"failed": first_line(exc)}
            log.warning(f"baseline {name}: failed: {first_line(exc)}")
            continue
        result = out[name]
        if reuse is not None:
            reuse.put(name, result)
        log.info(f"baseline {name}: " + ", ".join(f"{k} {v:.2f}%" for k, v in result.items()
                                                  if k not in ("hyper", "seconds", "note"))
                 + f"  {shown(result['hyper'])}  ({result['seconds']:.1f}s)")
    return out


def measure_one(name: str, method: Baseline, data: BaselineData, targets: dict, clock: PhaseClock) -> dict:
    start = time.perf_counter()
    with torch.no_grad(), clock.section(f"baseline {name}"):
        method.fit(data)
        chosen = method.choose(data)
        result = {"hyper": chosen}
        if data.val is not None:
            result["val_acc"] = accuracy(method.score(data, "val", data.val), data.val_labels)
        for target, (features, labels, text) in targets.items():
            if text is None:
                result[target] = accuracy(method.score(data, target, features), labels)
            elif name == "zero_shot":
                result[target] = accuracy(data.scale * features @ text, labels)
    result["seconds"] = time.perf_counter() - start
    if method.note:
        result["note"] = method.note
    if "base_acc" in result and "new_acc" in result:   # base-to-new: zero-shot CLIP has both
        result["hm"] = harmonic_mean(result["base_acc"], result["new_acc"])
    result.setdefault("test_acc", result.get("hm", result.get("base_acc")))
    return result


__all__ = ["INSIDE", "METHODS", "Baseline", "BaselineData", "accuracy", "label", "published", "run_baselines"]
