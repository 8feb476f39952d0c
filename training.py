"""Training the region pool (doc/method.md §5–§6), resumable at any step boundary.

A run saves its whole training state (pool, optimizer, scaler, schedule position, data
order and augmentation RNG states, partial-epoch sums) to ``resume.pt`` after epochs, at
most every ``save_every`` seconds, and when asked to stop (Ctrl-C, SIGTERM). Started again
with the same command it continues from there and ends exactly where an uninterrupted run
would have. A kill (SIGKILL) loses at most the work since the last save.
"""
from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from clip.reference import reference_adamw
from datasets import DatasetSplits, sample_digest, save_list
from features import LiveSource, ReferenceSource, ViewSource, share_rounding
from loss import cosine_logits, raft_loss, reference_loss
from run.checkpoints import load_pool_state, save_checkpoint
from run.config import Config, check_values, describe_changes, settings_differ
import utils
from run.distributed import WORLD
from utils import RaftError, atomic_write, autocast, set_seed, torch_load, torch_save, write_yaml

if TYPE_CHECKING:
    from run.folders import RunPlan
    from run.model import Model
    from run.task import ImageSets, Task

# 1: before the published learning-rate sequence (refused: its run would continue on another one);
# 2: lr_schedule
STATE_FORMAT = 2


class Interrupted(RaftError):
    exit_code = 130


def lr_schedule(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float) -> np.ndarray:
    """The learning rate of every optimizer step (0-based), entry for entry the published
    trainer's: it sets lr 0 before the first step and, after each step, the next entry of
    ``[linspace(0, lr, W) (both ends), cosine from lr towards min_lr over the other T - W]``,
    so step 0 runs at 0, step t > 0 at that list's entry t - 1 (two steps at 0, a slope of
    lr / (W - 1), the cosine one step late). Computed in float64 with numpy, as published.
    Without warm-up (a setting the published code never uses): a plain cosine from the full
    lr at step 0."""
    def cosine(n: int) -> np.ndarray:
        i = np.arange(n)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + np.cos(np.pi * i / len(i)))

    if warmup_steps == 0:
        return cosine(total_steps)
    published = np.concatenate((np.linspace(0, base_lr, warmup_steps), cosine(total_steps - warmup_steps)))
    return np.concatenate(([0.0], published))[:total_steps]


def adamw(params: list, cfg: Config) -> torch.optim.Optimizer:
    """AdamW (eps 1e-4 by default); the fused single-kernel update where this torch has it."""
    kwargs = dict(lr=cfg.lr, eps=cfg.eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict, log) -> None:
    """Load a saved gradient scaler. A state saved by a disabled scaler is empty (a CPU run, or
    amp off): resuming it where the scaler is on starts a fresh scale, and the reverse drops
    the saved one; both are said in the log (the numerics change: float16 autocast vs float32)."""
    if bool(saved) == scaler.is_enabled():
        scaler.load_state_dict(saved)
    elif scaler.is_enabled():
        log.info("resuming with mixed precision a state trained without it (another device, or amp changed): "
                 "a fresh gradient scaler; the numerics change from here on (float16 autocast vs float32)")
    else:
        log.info("resuming without mixed precision a state trained with it (another device, or amp changed): "
                 "its gradient scaler is dropped; the numerics change from here on (float32 vs float16 autocast)")


class StopRequest:
    """Turns the first SIGINT/SIGTERM into a flag checked between steps; a second one
    interrupts at once."""

    def __init__(self):
        self.requested = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class EpochTally:
    """What an epoch adds up, kept on the device so that no step waits for the host: the
    loss terms weighted by batch size, correct predictions, images seen, and the first step
    whose loss was not finite (with its terms). Read once per epoch, or at a save. Under
    torchrun each process adds its own part; reading sums them over the processes (the sums
    carried over from a resumed state sit with rank 0 alone)."""

    TERMS = ("loss", "cls", "bg", "l1", "sep")

    def __init__(self, device: torch.device, progress: dict):
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        sums = progress["sums"] if WORLD.main else {k: 0.0 for k in self.TERMS}
        carried = (progress["correct"], progress["seen"]) if WORLD.main else (0, 0)
        self.sums = torch.tensor([*(sums[k] for k in self.TERMS), *carried], dtype=dtype, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(self.TERMS), dtype=dtype, device=device)

    def add(self, step: int, loss: torch.Tensor, terms: dict, correct: torch.Tensor, weight: int, seen: int) -> None:
        """``weight``: the global batch's size (the loss is this process's share of its mean);
        ``seen``: the images this process trained on."""
        values = torch.stack([loss.detach(), *(terms[k].detach() for k in self.TERMS[1:])]).to(self.sums.dtype)
        self.sums += torch.cat([values * weight, correct.to(self.sums.dtype).view(1), values.new_full((1,), seen)])
        first = ~torch.isfinite(values[0]) & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_values = torch.where(first, values, self.bad_values)

    def into(self, progress: dict) -> None:
        """Copy the sums (over every process) into the (saved, resumable) progress record."""
        values = WORLD.sum_(self.sums.clone()).tolist()
        progress["sums"] = dict(zip(self.TERMS, values[:len(self.TERMS)]))
        progress["correct"], progress["seen"] = int(values[-2]), int(values[-1])

    def mean_loss(self) -> float:
        return (self.sums[0] / self.sums[-1].clamp_min(1)).item()

    def check_finite(self, per_epoch: int, state_path: Path | None) -> None:
        """Stop, naming the step, if any loss so far was NaN or infinite (on any process)."""
        none = torch.iinfo(torch.long).max
        step = int(WORLD.min_(torch.where(self.bad_step < 0, none, self.bad_step)).item())
        if step == none:
            return
        values = dict(zip(self.TERMS, self.bad_values.tolist()))
        kept = f"; the last good state is {state_path}" if state_path and state_path.is_file() else ""
        terms = {k: round(v, 4) for k, v in values.items() if k != "loss"}
        raise RaftError(f"loss became {values['loss']} at epoch {step // per_epoch + 1}, step {step} "
                        f"(terms: {terms}): try a lower lr, or --amp false{kept}")


def load_state(path: Path, cfg: Config) -> dict | None:
    """The saved training state, checked against this run's settings; None when there is none."""
    if not path.is_file():
        return None
    state = torch_load(path, "resume state")
    fields = {"config": dict, "pool": dict, "optimizer": dict, "scaler": dict, "source": dict,
              "torch_rng": torch.Tensor, "progress": dict}
    if isinstance(state, dict) and state.get("format") == 1:
        raise RaftError(f"{path} was saved by a version whose learning rates ran one step ahead of the published "
                        f"code's (doc/method.md §6): rerun with --force to train on the published sequence")
    if (not isinstance(state, dict) or state.get("format") != STATE_FORMAT
            or not all(isinstance(state.get(k), kind) for k, kind in fields.items())):
        raise RaftError(f"{path} is not a resume state of this version; delete it or use --force")
    check_values(state["config"], f"resume state {path}")
    changed = settings_differ(state["config"], cfg)
    if changed:
        raise RaftError(f"an unfinished run with other settings is in {path.parent} ({describe_changes(changed)}); "
                        f"rerun with its settings to resume, or pass --force to start over")
    return state


def train_pool(pool: torch.nn.Module, text: torch.Tensor, source, cfg: Config, device: torch.device, log,
               state_path: Path | None = None) -> dict:
    """AdamW over the region pool only, learning rate set per iteration (doc/method.md §6).

    ``source`` yields ``(feature map, v0, labels)`` batches for an epoch — computed on the fly
    (faithful mode) or read from cached views — and can save and restore its RNG state.
    With ``state_path`` the run resumes from, and saves to, that file.
    """
    # float16_reference: float16 weights updated in place by torch's default AdamW, the loss on
    # float16 logits, no autocast and no loss scaling (clip/reference.py)
    world = WORLD
    reference = cfg.pool_precision == "float16_reference"
    if reference and world.many and not cfg.dist_exact:
        raise RaftError("pool_precision float16_reference trains as the published code does, in one process: "
                        "run it without torchrun, or with --dist_exact true (otherwise its float16 gradients "
                        "would be summed across processes)")
    use_amp = cfg.amp and device.type == "cuda" and not reference
    exact = world.many and cfg.dist_exact   # every process steps on the whole global batch (no gradient sum)
    params = [p for p in pool.parameters() if p.requires_grad]
    optimizer = reference_adamw(params, cfg.lr, cfg.eps, cfg.weight_decay) if reference else adamw(params, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loss_fn = reference_loss if reference else raft_loss
    if reference:
        text = text.half()
    per_epoch = len(source)
    total, warmup = cfg.train_epoch * per_epoch, cfg.warmup_epoch * per_epoch
    rates = lr_schedule(total, warmup, cfg.lr, cfg.min_lr)
    progress = {"epoch": 1, "position": 0, "step": 0, "seconds": 0.0, "history": [], "epoch_began": 0.0,
                "sums": {"loss": 0.0, "cls": 0.0, "bg": 0.0, "l1": 0.0, "sep": 0.0}, "correct": 0, "seen": 0}
    state = load_state(state_path, cfg) if state_path is not None else None
    if state is not None:
        pool.load_state_dict(state["pool"])
        optimizer.load_state_dict(state["optimizer"])
        restore_scaler(scaler, state["scaler"], log)
        source.load_state_dict(state["source"])
        torch.set_rng_state(state["torch_rng"])
        progress = state["progress"]
        log.info(f"resuming from {state_path}: epoch {progress['epoch']}, step {progress['step']} of {total}")

    def save(reason: str) -> None:
        if state_path is None:
            return
        tally.check_finite(per_epoch, state_path)   # never save a state that has seen a NaN
        tally.into(progress)
        if not world.main:  # one writer: the state is the same in every process
            return
        torch_save(state_path, {"format": STATE_FORMAT, "config": dict(cfg), "pool": pool.state_dict(),
                                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                "source": source.state_dict(), "torch_rng": torch.get_rng_state(),
                                "progress": progress})
        log.info(f"training state saved ({reason}): epoch {progress['epoch']}, step {progress['step']}")

    board = tensorboard_writer(cfg, state_path) if world.main else None
    pool.train()
    last_save = time.monotonic()
    clock = time.perf_counter()
    tally = EpochTally(device, progress)
    with StopRequest() as stop:
        while progress["epoch"] <= cfg.train_epoch:
            epoch = progress["epoch"]
            bar = tqdm(source.epoch(epoch, start=progress["position"]), total=per_epoch,
                       initial=progress["position"], desc=f"epoch {epoch}/{cfg.train_epoch}", leave=False,
                       dynamic_ncols=True, disable=None if world.main else True)
            shown = time.monotonic()
            began = progress["position"]
            for fmap, v0, labels in bar:
                if exact:   # the shards, in rank order, are the global batch: one process's tensors exactly
                    fmap, v0, labels = source.whole_batch(fmap, v0, labels)
                lr = float(rates[progress["step"]])
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with autocast(device, use_amp):
                    v_cls, v_bg = pool(fmap)
                # under torchrun: this process's share of the global batch's mean loss (every term a
                # sum over its images divided by the global batch size); the gradients are summed
                # (with dist_exact: the whole batch's loss, the same in every process)
                batch = source.batch_images(progress["position"])
                shared = {} if reference else {"total": batch}
                loss, terms = loss_fn(v_cls, v_bg, v0.to(v_cls.dtype) if reference else v0, text, labels,
                                      tau1=cfg.tau1, tau2=cfg.tau2, lambda1=cfg.lambda1, lambda2=cfg.lambda2,
                                      scale=cfg.logit_scale, **shared)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if not exact:
                    world.sum_grads(params)
                scaler.step(optimizer)
                scaler.update()
                with torch.no_grad():
                    correct = (cosine_logits(v_cls, text[:, :-1]).argmax(1) == labels).sum()
                if world.main or not exact:   # dist_exact: every process saw the whole batch; count it once
                    tally.add(progress["step"], loss, terms, correct, batch, labels.shape[0])
                progress["step"] += 1
                progress["position"] += 1
                if not bar.disable and time.monotonic() - shown > 2.0:  # the bar's loss: a sync every 2 s
                    bar.set_postfix(loss=f"{tally.mean_loss():.3f}", lr=f"{lr:.1e}")
                    shown = time.monotonic()
                if world.any(stop.requested is not None) and progress["position"] < per_epoch:
                    break   # every process stops at the same step
            if progress["position"] == began and progress["position"] < per_epoch and stop.requested is None:
                raise RuntimeError(f"the training source yielded no batch at epoch {epoch}, position "
                                   f"{progress['position']} of {per_epoch}")   # a bug, never a user's input
            progress["seconds"] += time.perf_counter() - clock
            clock = time.perf_counter()
            if progress["position"] >= per_epoch:  # the epoch is complete
                tally.check_finite(per_epoch, state_path)
                tally.into(progress)
                sums = progress["sums"]
                seen = max(1, progress["seen"])
                row = {k: v / seen for k, v in sums.items()} | {
                    "epoch": epoch, "train_acc": 100.0 * progress["correct"] / seen,
                    "lr": float(rates[progress["step"] - 1]),   # the last step's: what it ran at
                    "seconds": progress["seconds"] - progress.get("epoch_began", 0.0)}
                progress["history"].append(row)
                progress["epoch_began"] = progress["seconds"]
                left = (cfg.train_epoch - epoch) * progress["seconds"] / epoch
                log.info(f"epoch {epoch:3d}/{cfg.train_epoch}  loss {row['loss']:.4f}: cls {row['cls']:.3f}, "
                         f"bg {row['bg']:.3f}, l1 {row['l1']:.3f}, sep {row['sep']:.3f}  "
                         f"train acc {row['train_acc']:.2f}%  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
                         + (f", about {clock_time(left)} left" if epoch < cfg.train_epoch else ""))
                if board is not None:
                    for key, value in row.items():
                        if key != "epoch":
                            board.add_scalar(f"train/{key}", value, epoch)
                    board.flush()
                progress.update(epoch=epoch + 1, position=0, correct=0, seen=0,
                                sums={k: 0.0 for k in sums})
                tally = EpochTally(device, progress)
            if world.any(stop.requested is not None):
                reason = stop.requested or "SIGTERM"   # another process got the signal
                save(f"{reason.lower()}")
                raise Interrupted(f"stopped by {reason} at epoch {progress['epoch']}, step "
                                  f"{progress['step']}; run the same command to resume"
                                  + ("" if state_path else " (no state was saved)"))
            due = time.monotonic() - last_save >= cfg.save_every
            if progress["epoch"] <= cfg.train_epoch and world.any(due):
                save("periodic")
                last_save = time.monotonic()
    pool.eval()
    if board is not None:
        board.close()
    return {"history": progress["history"], "steps": progress["step"], "seconds": progress["seconds"]}


def clock_time(seconds: float) -> str:
    """12s, 3m05s, 2h07m: an estimate, shown as a person reads it."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def tensorboard_writer(cfg: Config, state_path: Path | None):
    """``tensorboard: true``: a SummaryWriter into <run folder>/tensorboard (the package is an
    optional dependency: one line when it is missing, before any training)."""
    if not cfg.tensorboard or state_path is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RaftError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(log_dir=str(state_path.parent / "tensorboard"))


HISTORY_COLUMNS = ("epoch", "loss", "cls", "bg", "l1", "sep", "train_acc", "lr", "seconds")


def write_history(path: Path, history: list[dict]) -> None:
    """The training curve, one row per epoch (summarize.py --curves plots it)."""
    lines = [",".join(HISTORY_COLUMNS)] + [",".join(f"{row.get(k, '')}" for k in HISTORY_COLUMNS) for row in history]
    atomic_write(path, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))


def train_or_load(model: Model, cfg: Config, data: DatasetSplits, task: Task, images: ImageSets, plan: RunPlan,
                  device: torch.device, use_amp: bool) -> tuple[float | None, list[dict] | None]:
    """Train the region pool (resuming a saved state), or load the checkpoint's; the training
    seconds and the per-epoch history (a checkpoint's, for one trained before)."""
    log = plan.log
    if not plan.trains:
        load_pool_state(model.pool, plan.ckpt, plan.ckpt_path)
        log.info(f"loaded region pool from {plan.ckpt_path}")
        seconds = plan.ckpt.get("train_seconds") if plan.state_path is not None else None  # None: --eval-only
        return seconds, plan.ckpt.get("history")
    world = WORLD
    if world.main:
        write_yaml(plan.run_dir / "config.yaml", dict(cfg))
        save_list(plan.run_dir / "fewshot.json", images.train, data.root, data.image_root, dataset=data.name,
                  shots=cfg.shots, seed=cfg.seed, train_data_sha256=data.digest(("train",)))
        if images.val_source not in (None, "split"):
            save_list(plan.run_dir / "val_from_train.json", images.val, data.root, dataset=data.name, seed=cfg.seed)
    if world.many and cfg.dist_exact and not cfg.train_views:   # cached views are computed in whole batches
        whole = [cfg.batch_size] + ([len(images.train) % cfg.batch_size] if len(images.train) % cfg.batch_size else [])
        plan.share_rounding = share_rounding(model.clip, whole, world.size, device, use_amp)
        if not plan.share_rounding["exact"]:
            log.warning(f"warning: dist_exact: on this machine the trunk rounds an image differently inside a "
                        f"process's share (sizes {plan.share_rounding['share_sizes']}) than inside the whole batch "
                        f"(max difference {plan.share_rounding['max_difference']:.1e}); the pool's updates stay one "
                        f"process's, its inputs differ in the last bits (doc/distributed.md)")
    set_seed(cfg.seed)
    start = time.perf_counter()
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=device, amp=use_amp, num_workers=cfg.num_workers)
    with utils.CLOCK.section("training images"):
        if cfg.train_views:  # decodes (and checks) the training images when the views are not cached
            source = ViewSource(model.clip, images.train, cfg.train_views, cache_dir=cfg.cache_dir,
                                name=f"{data.name}_train_{cfg.shots}shots_seed{cfg.seed}", **common)
        else:                # decodes every training image up front: a bad one stops the run here
            source = (ReferenceSource if cfg.augment == "reference" else LiveSource)(model.clip, images.train,
                                                                                     **common)
    prepare_seconds = time.perf_counter() - start
    with utils.CLOCK.section("training loop"):
        stats = train_pool(model.pool, model.text, source, cfg, device, log, plan.state_path)
    train_seconds = prepare_seconds + stats["seconds"]
    if world.main:
        write_history(plan.run_dir / "history.csv", stats["history"])
        save_checkpoint(plan.ckpt_path, model.pool, cfg, model.clip, task.train, model.text, train_seconds,
                        sample_digest(images.train, data.image_root or data.root), data.digest(("train",)),
                        history=stats["history"])
        plan.state_path.unlink(missing_ok=True)
    world.barrier()
    log.info(f"trained in {train_seconds:.1f}s; checkpoint {plan.ckpt_path}")
    return train_seconds, stats["history"]
