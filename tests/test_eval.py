"""Alpha search (doc/method.md §7): chosen on validation data, test labels never used to choose."""
import pytest
import torch

from run.evaluation import SplitLogits, accuracy_curve, alpha_grid, choose_alpha, evaluate
from run.config import build_config


def cfg(**kw):
    return build_config(None, {"dataset": "demo", "data_path": "x", **kw})


def logits(n=60, c=5, seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    cls = torch.randn(n, c, generator=g)
    clip = torch.randn(n, c, generator=g)
    cls[torch.arange(n), labels] += 1.0 + bias       # the fine-tuned head is better ...
    clip[torch.arange(n), labels] += 1.0             # ... and both carry signal
    return SplitLogits(cls, clip, labels, 0.5)


def test_grid_endpoints_and_size():
    grid = alpha_grid(0.0, 1.0, 50)
    assert len(grid) == 51 and grid[0] == 0.0 and grid[-1] == 1.0 and grid[1] == pytest.approx(0.02)


def test_accuracy_curve_endpoints_are_zero_shot_and_finetuned():
    t = logits()
    acc = accuracy_curve(t.cls, t.clip, t.labels, [0.0, 1.0])
    assert acc[0] == pytest.approx(100 * (t.clip.argmax(1) == t.labels).float().mean().item())
    assert acc[1] == pytest.approx(100 * (t.cls.argmax(1) == t.labels).float().mean().item())


def test_choose_alpha_takes_the_best_and_the_smallest_on_ties():
    assert choose_alpha([0.0, 0.5, 1.0], [10.0, 30.0, 30.0]) == 0.5


def test_test_labels_never_choose_alpha():
    val, test = logits(seed=1), logits(seed=2, bias=0.5)
    base = evaluate(val, test, cfg())
    shuffled = SplitLogits(test.cls, test.clip, test.labels[torch.randperm(len(test.labels))], 0.5)
    other = evaluate(val, shuffled, cfg())
    assert other["alpha"] == base["alpha"] and base["alpha_source"] == "val"
    # the chosen alpha is what the validation curve says, whatever the test curve prefers
    curve = base["alpha_curve"]
    assert base["alpha"] == choose_alpha(curve["alphas"], curve["val"])
    assert base["test_acc"] == pytest.approx(curve["test"][curve["alphas"].index(base["alpha"])])
    assert base["oracle"]["test_acc"] == max(curve["test"])
    assert "upper bound" in base["oracle"]["note"]


def test_fixed_alpha_and_missing_validation():
    test = logits()
    out = evaluate(None, test, cfg(alpha=0.3))
    assert out["alpha"] == 0.3 and out["alpha_source"] == "config"
    from utils import RaftError
    with pytest.raises(RaftError, match="no validation data"):
        evaluate(None, test, cfg())


def test_restrict_keeps_subset_columns_and_relabels():
    t = SplitLogits(torch.arange(12.0).view(3, 4), torch.zeros(3, 4), torch.tensor([1, 3, 1]), 1.0)
    r = t.restrict([1, 3], 4)
    assert r.cls.tolist() == [[1, 3], [5, 7], [9, 11]] and r.labels.tolist() == [0, 1, 0]
