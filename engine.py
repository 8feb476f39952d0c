"""The engine shared by main.py and main_imagenet.py: train the region pool, evaluate, write results.

``run`` is a short sequence of named phases, each in the module that owns its job:

    start_processes    torchrun's processes (nothing in a plain run)      run/distributed.py
    plan_run           which run folder, what is already there           run/folders.py
    choose_device      this process's device (one GPU per torchrun process) and amp   run/distributed.py
    make_task          the classes trained on and scored on (protocol)   run/task.py
    sample_images      the few-shot training set and the validation set   run/task.py
    build_model        frozen CLIP, text classifiers, region pool         run/model.py
    train_or_load      train the pool (resuming a saved state), or load   training.py
    evaluate_run       logits once per split, alpha from validation data  evaluation.py
    pool_numerics      the pool's precision, what training never moved
    measure_baselines  zero-shot, linear probe, Tip-Adapter(-F)           baselines/measure.py
    write_results      results.json (results_eval.json, transfer_<dataset>.json)  run/results.py
"""
from __future__ import annotations

import argparse

import utils
from baselines.measure import measure_baselines
from clip.reference import make_region_pool, never_moved
from datasets import DatasetSplits
from evaluation import evaluate_run
from run.config import Config
from run.distributed import check_global_batch, choose_device, start_processes
from run.folders import RunPlan, plan_run
from run.model import Model, build_model
from run.results import write_results
from run.task import make_task, sample_images
from training import train_or_load
from utils import PhaseClock


def pool_numerics(model: Model, cfg: Config, plan: RunPlan) -> dict:
    """The pool's precision, and per tensor the share of entries training never moved from
    their initial values (a fresh pool: the copy of CLIP's) -- float16 updates can round away;
    for dist_exact, whether the trunk's shares rounded as one process's batches."""
    initial = make_region_pool(model.clip, cfg.mask_bg_in_cls, cfg.pool_precision).state_dict()
    return {"pool_precision": cfg.pool_precision, "never_moved": never_moved(initial, model.pool.state_dict()),
            **({"share_rounding": plan.share_rounding} if plan.share_rounding else {})}


def run(cfg: Config, flags: argparse.Namespace, data: DatasetSplits) -> dict | None:
    """The whole protocol for one (dataset, backbone, shots, seed); returns the results dict.

    Safe to kill at any moment: started again with the same command it resumes training
    from its last saved state (training.py), or evaluates the finished checkpoint."""
    check_global_batch(cfg, start_processes(cfg.device, cfg.dist_timeout))
    clock = utils.CLOCK = PhaseClock()            # each phase's time and memory (results.json → phases)
    plan = clock.measure("plan_run", plan_run, cfg, flags, data)
    if plan is None:
        return None
    cfg = plan.cfg
    device, use_amp = choose_device(cfg, plan)
    task = make_task(cfg, data, plan)
    images = clock.measure("sample_images", sample_images, cfg, data, task, plan)
    model = clock.measure("build_model", build_model, cfg, data, task, images, plan, device)
    train_seconds, history = clock.measure("train_or_load", train_or_load, model, cfg, data, task, images, plan,
                                           device, use_amp)
    evaluation = clock.measure("evaluate_run", evaluate_run, model, cfg, data, task, images, plan, device, use_amp)
    numerics = pool_numerics(model, cfg, plan)
    baselines = clock.measure("measure_baselines", measure_baselines, model, cfg, data, task, images, evaluation,
                              plan, device, use_amp)
    return write_results(cfg, data, plan, evaluation, numerics, baselines, train_seconds, device, history)


