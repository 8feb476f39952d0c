"""Training the region pool (doc/method.md §5–§6), resumable at any step boundary.

``train_pool`` is the loop: a learning rate per step (the published schedule), the loss of a
batch, one optimiser step. What a run must keep besides -- resuming, saving, stopping on a
signal, the per-epoch tally, log line, history row and TensorBoard -- is ``Session``'s job.

A run saves its whole training state (pool, optimizer, scaler, schedule position, data order
and augmentation RNG states, partial-epoch sums) to ``resume.pt`` after epochs, at most every
``save_every`` seconds, and when asked to stop (Ctrl-C, SIGTERM). Started again with the same
command it continues from there and ends exactly where an uninterrupted run would have. A
kill (SIGKILL) loses at most the work since the last save.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clip import loss as raft_losses
from clip.published import Numerics
from datasets import save_list, sample_digest
from run.checkpoints import check_finite, load_pool_state, save_checkpoint
from run.config import Config, check_values, require_same_settings
from run.context import Model, RunContext, Trained
from run.distributed import WORLD
from run.features import LiveSource, PublishedSource, ViewSource, share_rounding
from run.methods import COOP, CoOpLearner, training_config
from run.task import FEWSHOT_VAL
from utils import RaftError, amp_dtype, atomic_write, autocast, first_line, set_seed, torch_load, torch_save, write_yaml

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


class RaftLearner:
    """What RAFT trains and the loss of one batch: the region pool, in the run's numerics (its
    optimiser, loss and precision), against the text matrix ``[t_1 … t_C, t_bg]``."""

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(raft_losses.TERMS)

    def __init__(self, pool: torch.nn.Module, text: torch.Tensor, numerics: Numerics, cfg: Config,
                 device: torch.device, amp: bool):
        self.module, self.numerics, self.device = pool, numerics, device
        self.amp = amp and numerics.amp and device.type == "cuda"
        self.text = numerics.text(text)
        self.params = [p for p in pool.parameters() if p.requires_grad]
        self.optimizer = numerics.optimizer(self.params, cfg.lr, cfg.eps, cfg.weight_decay)
        self.weights = dict(tau1=cfg.tau1, tau2=cfg.tau2, lambda1=cfg.lambda1, lambda2=cfg.lambda2,
                            scale=cfg.logit_scale)

    def loss(self, fmap: torch.Tensor, v0: torch.Tensor, labels: torch.Tensor, total: int):
        """(loss, its terms, correct predictions). Under torchrun: this process's share of the global
        batch's mean loss (every term a sum over its images divided by the global batch size)."""
        with autocast(self.device, self.amp):
            v_cls, v_bg = self.module(fmap)
        v0 = self.numerics.clip_feature(self.module, fmap, v0)
        loss, terms = self.numerics.loss(v_cls, v_bg, v0, self.text, labels, total=total, **self.weights)
        with torch.no_grad():
            correct = (raft_losses.cosine_logits(v_cls, self.text[:, :-1]).argmax(1) == labels).sum()
        return loss, terms, correct


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
    loss and its terms weighted by batch size, correct predictions, images seen, and the first
    step whose loss was not finite (with its terms). Read once per epoch, or at a save. Under
    torchrun each process adds its own part; reading sums them over the processes (the sums
    carried over from a resumed state sit with rank 0 alone)."""

    def __init__(self, terms: tuple[str, ...], device: torch.device, progress: dict):
        self.names = ("loss", *terms)
        dtype = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        sums = progress["sums"] if WORLD.main else {}
        carried = (progress["correct"], progress["seen"]) if WORLD.main else (0, 0)
        self.sums = torch.tensor([*(sums.get(k, 0.0) for k in self.names), *carried], dtype=dtype, device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_values = torch.zeros(len(self.names), dtype=dtype, device=device)

    def add(self, step: int, loss: torch.Tensor, terms: dict, correct: torch.Tensor, weight: int, seen: int) -> None:
        """``weight``: the global batch's size (the loss is this process's share of its mean);
        ``seen``: the images this process trained on."""
        values = torch.stack([loss.detach(), *(terms[k].detach() for k in self.names[1:])]).to(self.sums.dtype)
        self.sums += torch.cat([values * weight, correct.to(self.sums.dtype).view(1), values.new_full((1,), seen)])
        first = ~torch.isfinite(values[0]) & (self.bad_step < 0)
        self.bad_step = torch.where(first, step, self.bad_step)
        self.bad_values = torch.where(first, values, self.bad_values)

    def into(self, progress: dict) -> None:
        """Copy the sums (over every process) into the (saved, resumable) progress record."""
        values = WORLD.sum_(self.sums.clone()).tolist()
        progress["sums"] = dict(zip(self.names, values[:len(self.names)]))
        progress["correct"], progress["seen"] = int(values[-2]), int(values[-1])

    def mean_loss(self) -> float:
        return (self.sums[0] / self.sums[-1].clamp_min(1)).item()

    def check_finite(self, per_epoch: int, state_path: Path | None, numerics: Numerics) -> None:
        """Stop, naming the step, if any loss so far was NaN or infinite (on any process)."""
        none = torch.iinfo(torch.long).max
        step = int(WORLD.min_(torch.where(self.bad_step < 0, none, self.bad_step)).item())
        if step == none:
            return
        values = dict(zip(self.names, self.bad_values.tolist()))
        kept = f"; the last good state is {state_path}" if state_path and state_path.is_file() else ""
        terms = {k: round(v, 4) for k, v in values.items() if k != "loss"}
        advice = "a lower lr" + (", or --amp false" if numerics.amp else ", or pool_precision float32")
        raise RaftError(f"loss became {values['loss']} at epoch {step // per_epoch + 1}, step {step} "
                        f"(terms: {terms}): try {advice}{kept}")


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
    require_same_settings(state["config"], cfg, f"an unfinished run with other settings is in {path.parent} ({{}}); "
                                                f"rerun with its settings to resume, or pass --force to start over")
    return state


def check_progress(progress: dict, per_epoch: int, cfg: Config, terms: tuple[str, ...]) -> str | None:
    """What is wrong with a saved progress record for this run (None: nothing): the epoch, the
    position in it and the step count agree with each other and with the run's schedule, the
    history has a row per finished epoch, the sums are finite numbers of the loss's terms."""
    def count(v, low, high) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high

    epoch, position, step = progress.get("epoch"), progress.get("position"), progress.get("step")
    # epoch train_epoch + 1 at position 0: stopped right after the last epoch, before the checkpoint
    if not count(epoch, 1, cfg.train_epoch + (position == 0)):
        return f"its epoch {epoch!r:.20} is not one of this run's {cfg.train_epoch}"
    if not count(position, 0, per_epoch - 1):
        return f"its position {position!r:.20} is not a step of an epoch of {per_epoch}"
    if step != (epoch - 1) * per_epoch + position:
        return f"its step {step!r:.20} is not epoch {epoch}'s step {position}"
    sums, history = progress.get("sums"), progress.get("history")
    if not isinstance(sums, dict) or set(sums) != {"loss", *terms} or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in sums.values()):
        return "its loss sums are not those of this run's loss terms"
    if not isinstance(history, list) or len(history) != epoch - 1 or not all(isinstance(r, dict) for r in history):
        return f"its history has {len(history) if isinstance(history, list) else 'no'} rows for {epoch - 1} epochs"
    for key in ("correct", "seen"):
        if not count(progress.get(key), 0, 1 << 62):
            return f"its '{key}' count is {progress.get(key)!r:.20}"
    for key in ("seconds", "epoch_began"):
        if not isinstance(progress.get(key), (int, float)) or not math.isfinite(progress[key]) or progress[key] < 0:
            return f"its '{key}' is {progress.get(key)!r:.20}"
    return None


class Session:
    """Everything a training run keeps besides the loop: the progress record (resumed from, and
    saved to, ``state_path``), the stop requests, the epoch's tally, the progress bar, the
    epoch's log line and history row, TensorBoard."""

    def __init__(self, learner, source, cfg: Config, log, state_path: Path | None, board_dir: Path | None):
        self.learner, self.source, self.cfg, self.log, self.state_path = learner, source, cfg, log, state_path
        self.per_epoch = len(source)
        self.total = cfg.train_epoch * self.per_epoch
        rates = getattr(learner, "rates", None)   # a method with its own published schedule (run/methods.py)
        self.rates = rates(self.total, self.per_epoch, cfg) if rates else lr_schedule(
            self.total, cfg.warmup_epoch * self.per_epoch, cfg.lr, cfg.min_lr)
        # bfloat16 has float32's exponent range: no loss scaling (and none to save)
        self.scaler = torch.amp.GradScaler("cuda", enabled=learner.amp and amp_dtype() == "float16")
        self.progress = {"epoch": 1, "position": 0, "step": 0, "seconds": 0.0, "history": [], "epoch_began": 0.0,
                         "sums": {k: 0.0 for k in ("loss", *learner.terms)}, "correct": 0, "seen": 0}
        state = load_state(state_path, cfg) if state_path is not None else None
        if state is not None:
            self.resume(state)
        self.board = tensorboard_writer(cfg, board_dir) if WORLD.main else None
        self.stop = StopRequest()
        self.tally = EpochTally(learner.terms, learner.device, self.progress)
        self.last_save, self.clock, self.lr = time.monotonic(), time.perf_counter(), 0.0

    def resume(self, state: dict) -> None:
        """Every value of the saved state is checked against this run before training goes on
        from it: a state that does not fit is refused in one line (--force starts over)."""
        learner, where = self.learner, f"resume state {self.state_path}"
        problem = check_progress(state["progress"], self.per_epoch, self.cfg, learner.terms)
        try:
            if problem is None:
                check_finite(state["pool"], where, "the pool's tensor")
                load_pool_state(learner.module, {"pool": state["pool"]}, self.state_path)
                learner.optimizer.load_state_dict(state["optimizer"])
                check_optimizer_state(learner.optimizer, where)
                restore_scaler(self.scaler, state["scaler"], self.log)
                self.source.load_state_dict(state["source"])
                torch.set_rng_state(state["torch_rng"])
        except RaftError as exc:
            problem = str(exc)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            problem = first_line(exc, 160)
        if problem is not None:
            raise RaftError(f"{self.state_path} does not fit this run ({problem}): delete it, or pass --force to "
                            f"start over")
        self.progress = state["progress"]
        self.log.info(f"resuming from {self.state_path}: epoch {self.progress['epoch']}, step {self.progress['step']} "
                      f"of {self.total}")

    def __enter__(self):
        self.stop.__enter__()
        self.learner.module.train()
        return self

    def __exit__(self, *exc):
        self.stop.__exit__(*exc)
        self.learner.module.eval()
        if self.board is not None:
            self.board.close()
        return False

    # ---- the loop's calls
    def epochs(self):
        while self.progress["epoch"] <= self.cfg.train_epoch:
            yield self.progress["epoch"]

    def batches(self, epoch: int):
        """The epoch's batches from where the progress record stands, with a progress bar."""
        start = self.progress["position"]
        bar = tqdm(self.source.epoch(epoch, start=start), total=self.per_epoch, initial=start,
                   desc=f"epoch {epoch}/{self.cfg.train_epoch}", leave=False, dynamic_ncols=True,
                   disable=None if WORLD.main else True)
        shown, yielded = time.monotonic(), False
        for batch in bar:
            yielded = True
            yield batch
            if not bar.disable and time.monotonic() - shown > 2.0:  # the bar's loss: a sync every 2 s
                bar.set_postfix(loss=f"{self.tally.mean_loss():.3f}", lr=f"{self.lr:.1e}")
                shown = time.monotonic()
            if WORLD.any(self.stop.requested is not None) and self.progress["position"] < self.per_epoch:
                break   # every process stops at the same step
        if not yielded and start < self.per_epoch and self.stop.requested is None:
            raise RuntimeError(f"the training source yielded no batch at epoch {epoch}, position {start} of "
                               f"{self.per_epoch}")   # a bug, never a user's input

    def set_lr(self) -> float:
        self.lr = float(self.rates[self.progress["step"]])
        for group in self.learner.optimizer.param_groups:
            group["lr"] = self.lr
        return self.lr

    def count(self, loss, terms, correct, batch: int, seen: int, counted: bool = True) -> None:
        """The step is done: add it to the tally (``counted`` False: another process counts it)."""
        if counted:
            self.tally.add(self.progress["step"], loss, terms, correct, batch, seen)
        self.progress["step"] += 1
        self.progress["position"] += 1

    def end_epoch(self) -> None:
        """After an epoch's loop: its row when it is complete; then a stop request or a due save."""
        progress = self.progress
        progress["seconds"] += time.perf_counter() - self.clock
        self.clock = time.perf_counter()
        if progress["position"] >= self.per_epoch:
            self.finish_epoch()
        if WORLD.any(self.stop.requested is not None):
            reason = self.stop.requested or "SIGTERM"   # another process got the signal
            self.save(reason.lower())
            raise Interrupted(f"stopped by {reason} at epoch {progress['epoch']}, step {progress['step']}; run the "
                              f"same command to resume" + ("" if self.state_path else " (no state was saved)"))
        if progress["epoch"] <= self.cfg.train_epoch and WORLD.any(time.monotonic() - self.last_save >=
                                                                   self.cfg.save_every):
            self.save("periodic")
            self.last_save = time.monotonic()

    def finish_epoch(self) -> None:
        progress, epoch = self.progress, self.progress["epoch"]
        self.tally.check_finite(self.per_epoch, self.state_path, self.learner.numerics)
        self.tally.into(progress)
        seen = max(1, progress["seen"])
        row = {k: v / seen for k, v in progress["sums"].items()} | {
            "epoch": epoch, "train_acc": 100.0 * progress["correct"] / seen,
            "lr": float(self.rates[progress["step"] - 1]),   # the last step's: what it ran at
            "seconds": progress["seconds"] - progress.get("epoch_began", 0.0)}
        progress["history"].append(row)
        progress["epoch_began"] = progress["seconds"]
        left = (self.cfg.train_epoch - epoch) * progress["seconds"] / epoch
        terms = ", ".join(f"{k} {row[k]:.3f}" for k in self.learner.terms)
        self.log.info(f"epoch {epoch:3d}/{self.cfg.train_epoch}  loss {row['loss']:.4f}: {terms}  "
                      f"train acc {row['train_acc']:.2f}%  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
                      + (f", about {clock_time(left)} left" if epoch < self.cfg.train_epoch else ""))
        if self.board is not None:
            for key, value in row.items():
                if key != "epoch":
                    self.board.add_scalar(f"train/{key}", value, epoch)
            self.board.flush()
        progress.update(epoch=epoch + 1, position=0, correct=0, seen=0, sums={k: 0.0 for k in progress["sums"]})
        self.tally = EpochTally(self.learner.terms, self.learner.device, progress)

    def save(self, reason: str) -> None:
        if self.state_path is None:
            return
        self.tally.check_finite(self.per_epoch, self.state_path, self.learner.numerics)   # never save a NaN's state
        self.tally.into(self.progress)
        if not WORLD.main:  # one writer: the state is the same in every process
            return
        learner = self.learner
        torch_save(self.state_path, {"format": STATE_FORMAT, "config": dict(self.cfg),
                                     "pool": learner.module.state_dict(), "optimizer": learner.optimizer.state_dict(),
                                     "scaler": self.scaler.state_dict(), "source": self.source.state_dict(),
                                     "torch_rng": torch.get_rng_state(), "progress": self.progress})
        self.log.info(f"training state saved ({reason}): epoch {self.progress['epoch']}, step {self.progress['step']}")

    def result(self) -> dict:
        return {"history": self.progress["history"], "steps": self.progress["step"],
                "seconds": self.progress["seconds"]}


def check_optimizer_state(optimizer: torch.optim.Optimizer, where: str) -> None:
    """A loaded optimiser state holds, per parameter, moments of the parameter's shape and finite values."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    if value.shape != p.shape:
                        raise RaftError(f"{where}: the optimiser's '{name}' has shape {tuple(value.shape)}, its "
                                        f"parameter {tuple(p.shape)}")
                    check_finite({name: value}, where, "the optimiser's")


def train_pool(learner, source, cfg: Config, log, state_path: Path | None = None,
               board_dir: Path | None = None) -> dict:
    """AdamW over what ``learner`` trains (RAFT: the region pool only), the learning rate set per
    step (doc/method.md §6). ``source`` yields ``(feature map, v0, labels)`` batches for an
    epoch -- computed on the fly (faithful mode) or read from cached views -- and can save and
    restore its RNG state. With ``state_path`` the run resumes from, and saves to, that file."""
    world = WORLD
    if learner.numerics.one_process and world.many and not cfg.dist_exact:
        raise RaftError(f"pool_precision {learner.numerics.name} trains as the published code does, in one process: "
                        f"run it without torchrun, or with --dist_exact true (otherwise its float16 gradients "
                        f"would be summed across processes)")
    exact = world.many and cfg.dist_exact   # every process steps on the whole global batch (no gradient sum)
    with Session(learner, source, cfg, log, state_path, board_dir) as session:
        for epoch in session.epochs():
            for fmap, v0, labels in session.batches(epoch):
                if exact:   # the shards, in rank order, are the global batch: one process's tensors exactly
                    fmap, v0, labels = source.whole_batch(fmap, v0, labels)
                session.set_lr()
                batch = source.batch_images(session.progress["position"])
                # under torchrun the loss is this process's share and the gradients are summed
                # (dist_exact: the whole batch's loss, the same in every process)
                loss, terms, correct = learner.loss(fmap, v0, labels, batch)
                learner.optimizer.zero_grad(set_to_none=True)
                session.scaler.scale(loss).backward()
                if not exact:
                    world.sum_grads(learner.params)
                session.scaler.step(learner.optimizer)
                session.scaler.update()
                # dist_exact: every process saw the whole batch; it is counted once
                session.count(loss, terms, correct, batch, labels.shape[0], counted=world.main or not exact)
            session.end_epoch()
    return session.result()


def clock_time(seconds: float) -> str:
    """12s, 3m05s, 2h07m: an estimate, shown as a person reads it."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def tensorboard_writer(cfg: Config, folder: Path | None):
    """``tensorboard: true``: a SummaryWriter into ``folder`` (<run folder>/tensorboard; the package
    is an optional dependency: one line when it is missing, before any training)."""
    if not cfg.tensorboard or folder is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise RaftError("tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(log_dir=str(folder))


def history_columns(history: list[dict]) -> list[str]:
    """history.csv's columns: the epoch, the loss and each of its terms (clip/loss.py), train
    accuracy, lr, seconds; any other column a row holds after them."""
    fixed = ["epoch", "loss", *raft_losses.TERMS, "train_acc", "lr", "seconds"]
    return fixed + sorted({k for row in history for k in row} - set(fixed))


def write_history(path: Path, history: list[dict]) -> None:
    """The training curve, one row per epoch (summarize.py --curves plots it)."""
    columns = history_columns(history)
    lines = [",".join(columns)] + [",".join(f"{row.get(k, '')}" for k in columns) for row in history]
    atomic_write(path, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))


def training_source(ctx: RunContext, model: Model, cfg: Config | None = None):
    """The run's training batches: cached views (``train_views``), or a fresh augmentation every
    epoch (batched on the device, or the published code's PIL path); a method inside CLIP with
    its own crops (CoOp: Dassl's)."""
    cfg, images = cfg or ctx.cfg, ctx.images.train
    common = dict(batch_size=cfg.batch_size, seed=cfg.seed, device=ctx.device, amp=ctx.amp,
                  num_workers=cfg.num_workers)
    if cfg.method == "coop":
        return LiveSource(model.clip, images, scale=COOP.crop_scale, **common)
    if cfg.train_views:  # decodes (and checks) the training images when the views are not cached
        return ViewSource(model.clip, images, cfg.train_views, cache_dir=cfg.cache_dir, name=ctx.train_cache_name(),
                          **common)
    # decodes every training image up front: a bad one stops the run here
    return (PublishedSource if cfg.augment == "published" else LiveSource)(model.clip, images, **common)


def learner_for(ctx: RunContext, model: Model, cfg: Config):
    """What the run trains: RAFT's region pool, or a method's own module (run/methods.py)."""
    if cfg.method == "coop":
        return CoOpLearner(model.pool, model, cfg, ctx.device, ctx.amp, ctx.numerics)
    return RaftLearner(model.pool, model.text, ctx.numerics, cfg, ctx.device, ctx.amp)


def train_or_load(ctx: RunContext, model: Model) -> Trained:
    """Train the region pool (resuming a saved state), or load the checkpoint's; the training
    seconds and the per-epoch history (a checkpoint's, for one trained before)."""
    cfg, data, folder, log = ctx.cfg, ctx.data, ctx.folder, ctx.log
    if not folder.trains:
        load_pool_state(model.pool, folder.ckpt, folder.ckpt_path)
        log.info(f"loaded region pool from {folder.ckpt_path}")
        seconds = folder.ckpt.get("train_seconds") if folder.state_path is not None else None  # None: --eval-only
        return Trained(seconds, folder.ckpt.get("history"))
    world, images = WORLD, ctx.images
    if world.main:
        write_yaml(folder.run_dir / "config.yaml", dict(cfg))
        save_list(folder.run_dir / "fewshot.json", images.train, data.root, data.image_root, dataset=data.name,
                  shots=cfg.shots, seed=cfg.seed, train_data_sha256=data.digest(("train",)))
        if images.val_source not in (None, "split"):   # a drawn validation set: which images it holds
            name = "val_fewshot.json" if images.val_source == FEWSHOT_VAL else "val_from_train.json"
            save_list(folder.run_dir / name, images.val, data.root, dataset=data.name, seed=cfg.seed)
    rounding = None
    if world.many and cfg.dist_exact and not cfg.train_views:   # cached views are computed in whole batches
        whole = [cfg.batch_size] + ([len(images.train) % cfg.batch_size] if len(images.train) % cfg.batch_size else [])
        rounding = share_rounding(model.clip, whole, world.size, ctx.device, ctx.amp)
        if not rounding["exact"]:
            log.warning(f"warning: dist_exact: on this machine the trunk rounds an image differently inside a "
                        f"process's share (sizes {rounding['share_sizes']}) than inside the whole batch (max "
                        f"difference {rounding['max_difference']:.1e}); the pool's updates stay one process's, its "
                        f"inputs differ in the last bits (doc/distributed.md)")
    set_seed(cfg.seed)
    start = time.perf_counter()
    trains = training_config(cfg, data.name)   # a method's own published epochs and batch; RAFT's cfg
    with ctx.clock.section("training images"):
        source = training_source(ctx, model, trains)
    prepare_seconds = time.perf_counter() - start
    learner = learner_for(ctx, model, trains)
    with ctx.clock.section("training loop"):
        stats = train_pool(learner, source, trains, log, folder.state_path, folder.run_dir / "tensorboard")
    train_seconds = prepare_seconds + stats["seconds"]
    if world.main:
        write_history(folder.run_dir / "history.csv", stats["history"])
        save_checkpoint(folder.ckpt_path, model.pool, cfg, model.clip, ctx.task.train, model.text, train_seconds,
                        sample_digest(images.train, data.image_root or data.root), data.digest(("train",)),
                        history=stats["history"])
        folder.state_path.unlink(missing_ok=True)
    world.barrier()
    log.info(f"trained in {train_seconds:.1f}s; checkpoint {folder.ckpt_path}")
    return Trained(train_seconds, stats["history"], rounding)
