"""pool_precision: float16_published — the published code's float16 training (clip/published.py)."""
import json
import math

import pytest
import torch

from clip.published import Float16Published, PublishedNumerics, make_region_pool, never_moved
from conftest import ROOT, cli, one_line_error


def documented_adamw_step(param, grad, exp_avg, exp_avg_sq, step, lr, eps, weight_decay, betas=(0.9, 0.999)):
    """AdamW as torch documents it, op by op in the tensors' own precision (float16 here)."""
    param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - betas[0])
    exp_avg_sq.mul_(betas[1]).addcmul_(grad, grad, value=1 - betas[1])
    step_size = lr / (1 - betas[0] ** step)
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - betas[1] ** step)).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


@pytest.mark.parametrize("lr", [1e-4, 1e-5, 1e-6])
def test_a_reference_step_is_the_half_precision_adamw_step_bit_for_bit(lr):
    gen = torch.Generator().manual_seed(0)
    weights = (0.02 * torch.randn(64, 64, generator=gen)).half()
    grads = [(1e-3 * torch.randn(64, 64, generator=gen)).half() for _ in range(3)]
    param = torch.nn.Parameter(weights.clone())
    optimizer = PublishedNumerics().optimizer([param], lr=lr, eps=1e-4, weight_decay=0.01)
    mine, exp_avg, exp_avg_sq = weights.clone(), torch.zeros_like(weights), torch.zeros_like(weights)
    for step, grad in enumerate(grads, 1):
        param.grad = grad.clone()
        optimizer.step()
        documented_adamw_step(mine, grad, exp_avg, exp_avg_sq, step, lr, 1e-4, 0.01)
        assert param.dtype == torch.float16 and optimizer.state[param]["exp_avg"].dtype == torch.float16
        assert torch.equal(param.data, mine), f"step {step}"
    frozen = never_moved({"w": weights}, {"w": param.data})["w"]
    assert frozen == (param.data == weights).float().mean().item()


def test_in_float16_small_updates_round_to_nothing():
    """The first step moves every weight by about lr (Adam's normalised step); in float16 a
    weight of magnitude 0.02 moves in steps of ~1.5e-5, so the smaller lr, the more stay put."""
    gen = torch.Generator().manual_seed(1)
    weights = (0.02 * torch.randn(256, 256, generator=gen)).half()
    grad = (1e-2 * torch.randn(256, 256, generator=gen)).half()
    shares = {}
    for lr in (1e-4, 1e-5, 1e-6):
        param = torch.nn.Parameter(weights.clone())
        param.grad = grad.clone()
        PublishedNumerics().optimizer([param], lr=lr, eps=1e-4, weight_decay=0.01).step()
        shares[lr] = never_moved({"w": weights}, {"w": param.data})["w"]
    assert shares[1e-4] < shares[1e-5] < shares[1e-6] and shares[1e-6] > 0.5 and shares[1e-4] < 0.1


def test_never_moved_counts_bit_identical_values():
    before = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.zeros(3)}
    after = {"a": torch.tensor([1.0, 2.5, 3.0, 4.0]).half(), "b": torch.tensor([0.0, 1e-8, 0.0])}
    assert never_moved(before, after) == {"a": 0.75, "b": pytest.approx(2 / 3)}


def test_the_reference_pool_computes_in_float16_over_all_tokens(tiny_clip, tiny_vit):
    for clip in (tiny_clip, tiny_vit):
        pool = make_region_pool(clip, False, "float16_published")
        assert isinstance(pool, Float16Published)
        assert all(p.dtype == torch.float16 for p in pool.parameters())
        assert all(v.dtype == torch.float16 for v in pool.state_dict().values())
        features, _ = clip.encode_image(torch.randn(2, 3, 96, 96))
        v_cls, v_bg = pool(features)
        exact, _ = clip.region_pool()(features)
        assert v_cls.dtype == torch.float16
        assert torch.allclose(v_cls.float(), exact, rtol=0.02, atol=0.02)      # the same function, in float16
        assert all(p.dtype == torch.float32 for p in clip.parameters())      # CLIP's own modules untouched


@pytest.mark.slow
def test_a_float16_published_run_trains_evaluates_and_reloads(demo_root, tmp_path, capsys):
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--data_path", str(demo_root), "--num_classes", "4",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--shots", "4",
            "--train_epoch", "3", "--warmup_epoch", "1", "--batch_size", "16", "--num_workers", "0",
            "--baselines", "[]", "--pool_precision", "float16_published", "--name", "fp16"]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    run = tmp_path / "out" / "demo" / "tiny-rn_4shots_seed1_fp16"
    results = json.loads((run / "results.json").read_text())
    assert results["numerics"]["pool_precision"] == "float16_published"
    assert set(results["numerics"]["never_moved"]) >= {"q_proj.weight", "positional_embedding"}
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["pool_precision"] == "float16_published"
    assert all(v.dtype == torch.float16 for v in ckpt["pool"].values())
    code, _, err = cli([*argv, "--eval-only"], capsys)
    assert code == 0, err
    assert json.loads((run / "results_eval.json").read_text())["test_acc"] == results["test_acc"]
    image = next((demo_root / "images" / "red_circle").glob("test_*.jpg"))
    code, out, err = cli([str(run), str(image)], capsys, entry="scripts.predict")
    assert code == 0 and "  1. " in out, err


def test_a_misspelled_precision_names_the_closest(capsys):
    code, _, err = cli(["--config", str(ROOT / "configs/dtd.yaml"), "--pool_precision", "float16"], capsys)
    one_line_error(code, err, "'pool_precision' must be 'float32' or 'float16_published'",
                   "did you mean 'float16_published'")


@pytest.mark.parametrize("key,value", [("eps", "1e-8"), ("eps", "2e-8"), ("lr", "1e-9")])
def test_values_float16_rounds_to_zero_are_refused_naming_the_smallest(key, value, capsys):
    code, _, err = cli(["--config", str(ROOT / "configs/dtd.yaml"), "--pool_precision", "float16_published",
                        f"--{key}", value, "--min_lr", "0"], capsys)
    one_line_error(code, err, f"{key} {float(value):g} rounds to 0 in float16", "5.96e-08")


def test_the_old_name_of_the_published_precision_is_read_with_a_note(capsys):
    from run.config import build_config, check_values, current_values
    cfg = build_config(None, {"dataset": "d", "data_path": "x", "pool_precision": "float16_reference"})
    assert cfg.pool_precision == "float16_published" and "now called 'float16_published'" in capsys.readouterr().out
    saved = {"pool_precision": "float16_reference", "augment": "reference"}
    check_values(saved, "a checkpoint of an earlier version")
    assert current_values(saved) == {"pool_precision": "float16_published", "augment": "published"}
