"""Per-iteration learning rate: linear warm-up from 0, cosine to min_lr (doc/method.md §6)."""
import math

import pytest

from training import lr_at

BASE, MIN = 1e-4, 1e-6


def test_endpoints():
    total, warm = 500, 100
    assert lr_at(0, total, warm, BASE, MIN) == 0.0
    assert lr_at(warm, total, warm, BASE, MIN) == pytest.approx(BASE)
    assert lr_at(total, total, warm, BASE, MIN) == pytest.approx(MIN)
    assert lr_at(warm // 2, total, warm, BASE, MIN) == pytest.approx(BASE / 2)
    assert lr_at(warm + (total - warm) // 2, total, warm, BASE, MIN) == pytest.approx((BASE + MIN) / 2)


def test_shape_is_rising_then_falling():
    total, warm = 300, 60
    lrs = [lr_at(i, total, warm, BASE, MIN) for i in range(total + 1)]
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert min(lrs[warm:]) >= MIN and max(lrs) == pytest.approx(BASE)


def test_no_warmup():
    assert lr_at(0, 10, 0, BASE, MIN) == pytest.approx(BASE)
    assert lr_at(5, 10, 0, BASE, MIN) == pytest.approx(MIN + 0.5 * (BASE - MIN) * (1 + math.cos(math.pi / 2)))
