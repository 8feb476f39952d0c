"""Per-iteration learning rate: the published trainer's sequence, entry for entry (doc/method.md §6)."""
import math

import numpy as np
import pytest

from run.training import lr_schedule

BASE, MIN = 1e-4, 1e-6


def published_sequence(epochs: int, per_epoch: int, warmup_epochs: int, lr: float, final: float) -> list[float]:
    """The learning rate each optimizer step of the published trainer runs at, stated from its
    facts: lr 0 before the first step; after every step the next entry of linspace(0, lr, W)
    (both ends) followed by the cosine over the remaining T - W iterations."""
    warm_iters = warmup_epochs * per_epoch
    warm = np.linspace(0, lr, warm_iters) if warmup_epochs > 0 else np.array([])
    rest = np.arange(epochs * per_epoch - warm_iters)
    entries = np.concatenate((warm, final + 0.5 * (lr - final) * (1 + np.cos(np.pi * rest / len(rest)))))
    current, used = 0.0, []
    for t in range(epochs * per_epoch):
        used.append(current)            # optimizer.step() at the current rate
        current = entries[t]            # then the scheduler's step
    return used


@pytest.mark.parametrize("epochs,per_epoch,warmup", [(50, 1, 10), (50, 10, 10), (20, 7, 3), (3, 1, 1), (10, 16, 2),
                                                     (2, 5, 1)])
def test_the_whole_sequence_is_the_published_one(epochs, per_epoch, warmup):
    ours = lr_schedule(epochs * per_epoch, warmup * per_epoch, BASE, MIN)
    assert len(ours) == epochs * per_epoch
    assert [float(x) for x in ours] == published_sequence(epochs, per_epoch, warmup, BASE, MIN)   # bit for bit


def test_its_shape_two_zero_steps_then_the_slope_and_a_late_cosine():
    warm, total = 10, 50
    lrs = lr_schedule(total, warm, BASE, MIN)
    assert lrs[0] == lrs[1] == 0.0 and lrs[2] == pytest.approx(BASE / (warm - 1))
    assert lrs[warm] == BASE and lrs[warm + 1] == BASE                   # the warm-up's end, then cosine(0)
    assert all(a < b for a, b in zip(lrs[1:warm], lrs[2:warm + 1]))
    assert all(a >= b for a, b in zip(lrs[warm + 1:], lrs[warm + 2:])) and lrs[-1] > MIN


def test_no_warmup_is_a_plain_cosine_from_the_full_rate():
    lrs = lr_schedule(10, 0, BASE, MIN)
    assert lrs[0] == BASE
    assert lrs[5] == pytest.approx(MIN + 0.5 * (BASE - MIN) * (1 + math.cos(math.pi / 2)))


def test_a_resumed_run_reads_the_same_rates():
    """The sequence is a function of (steps, warm-up, lr, min_lr) alone: a run resumed at any step
    continues on the entries an uninterrupted run would have used."""
    whole = lr_schedule(120, 24, BASE, MIN)
    assert all(lr_schedule(120, 24, BASE, MIN)[k:].tolist() == whole[k:].tolist() for k in (0, 1, 2, 23, 24, 25, 119))
