"""The engine shared by main.py, main_imagenet.py and scripts/run_baselines.py: one run, as a
short sequence of named phases. Each takes the run's context (and the model) and returns what
it produces; each lives in the module that owns its job:

    open_run           torchrun's processes, the run folder and what is in it,    run/folders.py,
                       this process's device, the pool's numerics                 run/distributed.py
    make_task          the classes trained on and scored on (protocol)            run/task.py
    sample_images      the few-shot training set and the validation set            run/task.py
    build_model        frozen CLIP, text classifiers, region pool                  run/model.py
    train_or_load      train the pool (resuming a saved state), or load it         run/training.py
    evaluate_run       logits once per split, alpha from validation data           run/evaluation.py
    measure_baselines  the other methods on the same images, features and text     run/measure.py
    write_results      results.json (results_eval.json, transfer_<dataset>.json)   run/results.py

The methods alone (``trains=False``) run the same phases with training left out, and write
baselines.json.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from clip.published import numerics_of
from datasets import DatasetSplits
from run.config import Config
from run.context import RunContext
from run.distributed import check_global_batch, choose_device, start_processes
from run.evaluation import evaluate_run
from run.folders import plan_run, release_folder
from run.measure import measure_baselines
from run.model import build_model
from run.results import write_baselines, write_method_results, write_results
from run.task import make_task, sample_images
from run.training import train_or_load
from utils import PhaseClock, RaftError


def open_run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits, trains: bool) -> RunContext | None:
    """The run's context: its processes, folder, device and numerics; None when it has finished."""
    check_global_batch(cfg, start_processes(cfg.device, cfg.dist_timeout))
    clock = PhaseClock()   # each phase's time and memory (results.json → phases)
    planned = clock.measure("plan_run", plan_run, cfg, flags, data, trains)
    if planned is None:
        return None
    cfg, folder = planned
    try:
        device, amp = choose_device(cfg, folder)
    except BaseException:
        release_folder(folder.run_dir)
        raise
    return RunContext(cfg, data, folder, device, amp, numerics_of(cfg.pool_precision), clock)


def run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits, trains: bool = True) -> dict | None:
    """The whole protocol for one (dataset, backbone, shots, seed); returns the results dict.
    ``trains`` False: the other methods alone (baselines.json), RAFT neither trained nor scored.

    Safe to kill at any moment: started again with the same command it resumes training
    from its last saved state (run/training.py), or evaluates the finished checkpoint."""
    if not trains and not cfg.baselines:
        raise RaftError("`baselines` is empty: nothing to run")
    ctx = open_run(cfg, flags, data, trains)
    if ctx is None:
        return None
    try:
        ctx = replace(ctx, task=ctx.phase("make_task", make_task))
        ctx = replace(ctx, images=ctx.phase("sample_images", sample_images))
        model = ctx.phase("build_model", build_model, pool=trains)
        trained = ctx.phase("train_or_load", train_or_load, model) if trains else None
        evaluation = ctx.phase("evaluate_run", evaluate_run, model)
        baselines = ctx.phase("measure_baselines", measure_baselines, model, evaluation)
        if not trains:
            return write_baselines(ctx, evaluation, baselines)
        if ctx.cfg.method != "raft":   # a method inside CLIP: its own results (run/methods.py)
            return write_method_results(ctx, model, trained, evaluation)
        return write_results(ctx, model, trained, evaluation, baselines)
    finally:
        release_folder(ctx.folder.run_dir)
