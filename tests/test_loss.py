"""Each loss term against a case small enough to check by hand (doc/method.md §4–§5)."""
import math

import torch

from clip.loss import cosine_logits, raft_loss

# D = 2, C = 2 classes + background column. Columns: class 0 = x, class 1 = y, bg = (x+y)/2 (norm < 1).
T = torch.tensor([[1.0, 0.0, 0.5],
                  [0.0, 1.0, 0.5]])
KW = dict(tau1=2.0, tau2=3.0, lambda1=0.1, lambda2=0.5, scale=100.0)


def terms(v_cls, v_bg, v0, labels, **kw):
    _, t = raft_loss(v_cls, v_bg, v0, T, labels, **(KW | kw))
    return {k: v.item() for k, v in t.items()}


def ce(logits, target):
    return -logits[target] + math.log(sum(math.exp(z) for z in logits))


def test_cosine_logits_normalise_the_features_only():
    out = cosine_logits(torch.tensor([[3.0, 0.0]]), T)
    assert torch.allclose(out, torch.tensor([[100.0, 0.0, 50.0]]))


def test_class_term_is_cross_entropy_with_temperature_tau1():
    v = torch.tensor([[1.0, 0.0]])   # cls logits (100, 0)
    t = terms(v, v, v, torch.tensor([1]))
    assert math.isclose(t["cls"], ce([50.0, 0.0], 1), rel_tol=1e-6)   # = 50 + log(1 + e^-50)


def test_background_term_targets_the_last_column_with_tau2():
    v_bg = torch.tensor([[0.0, 1.0]])   # bg logits (0, 100, 50)
    t = terms(torch.tensor([[1.0, 0.0]]), v_bg, v_bg, torch.tensor([0]))
    assert math.isclose(t["bg"], ce([0.0, 100 / 3, 50 / 3], 2), rel_tol=1e-6)


def test_l1_term_is_lambda2_times_mean_absolute_logit_gap():
    v_cls = torch.tensor([[1.0, 0.0], [0.0, 1.0]])   # logits (100,0), (0,100)
    v0 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])      # logits (70.71,70.71), (0,100)
    t = terms(v_cls, v_cls, v0, torch.tensor([0, 1]))
    r = 100 / math.sqrt(2)
    expected = 0.5 * ((100 - r) + r + 0 + 0) / 4
    assert math.isclose(t["l1"], expected, rel_tol=1e-6)


def test_separation_term_is_lambda1_times_mean_cosine_minus_one():
    v_cls = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v_bg = torch.tensor([[0.0, 2.0], [1.0, 1.0]])    # cosines 0 and 1/sqrt2
    t = terms(v_cls, v_bg, v_cls, torch.tensor([0, 0]))
    assert math.isclose(t["sep"], 0.1 * ((0 + 1 / math.sqrt(2)) / 2 - 1), rel_tol=1e-6)
    same = terms(v_cls, v_cls, v_cls, torch.tensor([0, 0]))
    assert abs(same["sep"]) < 1e-7 and abs(same["l1"]) < 1e-7


def test_total_is_the_sum_and_gradients_skip_the_frozen_feature():
    v_cls = torch.randn(4, 2, requires_grad=True)
    v_bg = torch.randn(4, 2, requires_grad=True)
    v0 = torch.randn(4, 2, requires_grad=True)
    total, t = raft_loss(v_cls, v_bg, v0, T, torch.tensor([0, 1, 1, 0]), **KW)
    assert torch.allclose(total, sum(t.values()))
    total.backward()
    assert v0.grad is None and v_cls.grad is not None and v_bg.grad is not None
