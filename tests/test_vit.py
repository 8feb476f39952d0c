"""RAFT on CLIP's ViTs (doc/method.md §10): exactness of the folded pool, CLIP's own feature,
loading, bad models, and the pipeline end to end with the tiny random ViT."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock

from clip.backbone import FrozenCLIP, load_open_clip
from clip.vit_pool import ViTRegionPool, clip_vit_forward, vit_all_token_forward
from conftest import ROOT, cli
from utils import RaftError

# (width, heads, patch tokens N, embedding D): ViT-B/16 at 224 px, and tiny sizes
SIZES = [(768, 12, 196, 512), (64, 2, 36, 64)]


def make_visual(width, heads, d, seed=0, layer_scale=None):
    """CLIP's last block and head at the given sizes, as a ViT's image tower holds them."""
    torch.manual_seed(seed)
    block = ResidualAttentionBlock(width, heads, 4.0, ls_init_value=layer_scale, act_layer=QuickGELU,
                                   norm_layer=LayerNorm, batch_first=True)
    for name, p in block.named_parameters():
        if p.dim() > 1:
            nn.init.normal_(p, std=width ** -0.5)
        elif "ls_" in name:
            nn.init.uniform_(p, 0.5, 1.5)
        else:
            nn.init.normal_(p, std=0.02)
    ln_post = LayerNorm(width)
    proj = nn.Parameter(width ** -0.5 * torch.randn(width, d))
    visual = SimpleNamespace(transformer=SimpleNamespace(resblocks=[block.eval()]), ln_post=ln_post, proj=proj)
    return visual


def to(visual, dtype):
    visual.transformer.resblocks[-1].to(dtype)
    visual.ln_post.to(dtype)
    visual.proj = nn.Parameter(visual.proj.detach().to(dtype))
    return visual


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("width,heads,n,d", SIZES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("mask", [False, True])
def test_folded_pool_matches_the_whole_block_on_all_tokens(width, heads, n, d, dtype, tol, mask):
    visual = to(make_visual(width, heads, d, seed=3, layer_scale=None if width > 100 else 1.0), dtype)
    ours = ViTRegionPool(visual, mask)
    ref = ViTRegionPool(visual, mask)
    with torch.no_grad():                       # as after training: the two summary tokens differ
        ours.summary_offsets.normal_(0, 0.3)
    ref.load_state_dict(ours.state_dict())
    torch.manual_seed(4)
    tokens = torch.randn(2, n + 1, width, dtype=dtype)
    weights = torch.randn(2, 2, d, dtype=dtype)
    outs = []
    for pool, fn in ((ours, lambda: ours(tokens)), (ref, lambda: vit_all_token_forward(ref, tokens))):
        v_cls, v_bg = fn()
        ((v_cls * weights[0]).sum() + (v_bg * weights[1]).pow(2).sum()).backward()
        outs.append((v_cls.detach(), v_bg.detach(), dict(pool.named_parameters())))
    assert max_rel(outs[0][0], outs[1][0]) <= tol and max_rel(outs[0][1], outs[1][1]) <= tol
    largest = max(p.grad.abs().max() for p in outs[1][2].values())
    for name, p_ref in outs[1][2].items():
        g, g_ref = outs[0][2][name].grad, p_ref.grad
        if name == "attn.in_proj_bias":   # its key third is provably zero: softmax cancels it, in both
            k = slice(width, 2 * width)
            assert g[k].abs().max() <= tol * largest and g_ref[k].abs().max() <= tol * largest
            g, g_ref = torch.cat([g[:width], g[2 * width:]]), torch.cat([g_ref[:width], g_ref[2 * width:]])
        assert max_rel(g, g_ref) <= tol, name


def test_trainable_parts_are_the_attention_and_two_zero_offsets():
    visual = make_visual(64, 2, 64)
    pool = ViTRegionPool(visual)
    names = {n for n, p in pool.named_parameters() if p.requires_grad}
    assert names == {"summary_offsets", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                     "attn.out_proj.bias"}
    assert torch.equal(pool.summary_offsets, torch.zeros(2, 64))
    block = visual.transformer.resblocks[-1]
    assert torch.equal(pool.attn.in_proj_weight, block.attn.in_proj_weight)
    assert pool.attn.in_proj_weight.data_ptr() != block.attn.in_proj_weight.data_ptr()   # a copy
    assert set(pool.state_dict()) == names                      # CLIP's frozen MLP, norms, proj are not saved


def test_tokens_identical_at_init_and_the_mask_gives_clips_feature(tiny_vit):
    images = torch.randn(3, 3, 96, 96)
    tokens, v0 = tiny_vit.encode_image(images)
    v_cls, v_bg = tiny_vit.region_pool()(tokens)
    assert torch.allclose(v_cls, v_bg, atol=1e-6)
    assert not torch.allclose(v_cls, v0, atol=1e-4)              # the background key shifts it
    masked, _ = tiny_vit.region_pool(mask_bg_in_cls=True)(tokens)
    assert torch.allclose(masked, v0, atol=1e-5)


def test_trunk_and_v0_equal_open_clips_encode_image(tiny_vit):
    images = torch.randn(4, 3, 96, 96)
    tokens, v0 = tiny_vit.encode_image(images)
    assert tokens.shape == (4, 37, 64) and tiny_vit.grid == 6 and tiny_vit.feature_shape == (37, 64)
    with torch.no_grad():
        assert torch.allclose(v0, tiny_vit.model.encode_image(images), atol=1e-5)
        assert torch.allclose(clip_vit_forward(tiny_vit.model.visual, tokens), v0, atol=1e-6)


@pytest.mark.slow
def test_vit_b16_sizes_are_read_from_the_model():
    clip = FrozenCLIP(load_open_clip("ViT-B-16", None), "ViT-B-16")   # random weights: sizes only
    assert (clip.family, clip.feature_channels, clip.embed_dim, clip.grid, clip.image_size) == \
        ("vit", 768, 512, 14, 224)
    assert clip.feature_shape == (197, 768) and clip.region_pool().num_heads == 12


# --------------------------------------------------------------------------- loading and bad models
def test_local_checkpoints_state_dict_and_float16_torchscript(tmp_path, tiny_vit):
    sd = tiny_vit.model.state_dict()
    torch.save(sd, tmp_path / "vit.pt")
    loaded = load_open_clip("tiny-vit", str(tmp_path / "vit.pt"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())
    # OpenAI's ViT-B-16.pt is a float16 TorchScript archive
    import copy
    scripted = torch.jit.script(copy.deepcopy(tiny_vit.model).half())
    scripted.save(str(tmp_path / "vit_jit.pt"))
    loaded = load_open_clip("tiny-vit", str(tmp_path / "vit_jit.pt"))
    assert all(loaded.state_dict()[k].dtype == torch.float32 for k in sd)
    assert all(torch.equal(loaded.state_dict()[k], v.half().float()) for k, v in sd.items())


def test_weights_of_the_other_family_are_named(tmp_path, tiny_vit, tiny_clip):
    torch.save(tiny_vit.model.state_dict(), tmp_path / "vit.pt")
    with pytest.raises(RaftError, match="holds the image tower of a ViT, but tiny-rn is a ResNet"):
        load_open_clip("tiny-rn", str(tmp_path / "vit.pt"))
    torch.save(tiny_clip.model.state_dict(), tmp_path / "rn.pt")
    with pytest.raises(RaftError, match="holds the image tower of a ResNet, but tiny-vit is a ViT"):
        load_open_clip("tiny-vit", str(tmp_path / "rn.pt"))


@pytest.mark.parametrize("change,message", [
    ({"pool_type": "avg"}, "pools its tokens by 'avg'"),
    ({"attentional_pool": True}, "attentional pooler"),
    ({"image_size": [96, 64]}, "patch grid is 6×4"),
])
def test_vits_raft_cannot_pool_are_refused(change, message, tmp_path):
    import open_clip
    cfg = json.loads((ROOT / "clip" / "model_configs" / "tiny-vit.json").read_text())
    cfg["vision_cfg"].update(change)
    name = f"odd-vit-{abs(hash(json.dumps(change))) % 10**8}"
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    model = open_clip.create_model(name, pretrained=None)
    with pytest.raises(RaftError, match=message):
        FrozenCLIP(model, name)


# --------------------------------------------------------------------------- the pipeline
def test_eval_caches_of_a_resnet_and_a_vit_never_mix(tiny_clip, tiny_vit, demo_root, tmp_path):
    from datasets import read_coop_dataset
    from run.features import eval_store
    items = read_coop_dataset("demo", demo_root).test
    rn = eval_store(tiny_clip, items, tmp_path, "t", 16, 0, torch.device("cpu"), False)
    vit = eval_store(tiny_vit, items, tmp_path, "t", 16, 0, torch.device("cpu"), False)
    assert rn.path != vit.path
    assert rn.maps.shape[1:] == (256, 3, 3) and vit.maps.shape[1:] == (37, 64)
    fmap, v0, _ = next(vit.batches(8, torch.device("cpu")))
    with torch.no_grad():
        assert torch.allclose(tiny_vit.pooled(fmap), v0, atol=2e-3)   # v0 again from the float16 cached tokens


FAST = ["--name", "", "--train_epoch", "4", "--warmup_epoch", "1", "--batch_size", "16", "--num_workers", "0",
        "--lr", "3e-3", "--shots", "4", "--backbone", "tiny-vit"]


# a ViT (§10), and an attention-pool head (§11): a random head attends almost uniformly, so its
# two queries need more steps to part
@pytest.mark.slow
@pytest.mark.parametrize("backbone,extra", [
    ("tiny-vit", []),
    ("tiny-siglip", ["--train_epoch", "40", "--shots", "16", "--batch_size", "32", "--warmup_epoch", "8"])])
def test_demo_config_trains_a_tiny_vit_and_tools_use_it(backbone, extra, demo_root, tmp_path, capsys):
    argv = ["--config", str(ROOT / "configs/demo.yaml"), "--data_path", str(demo_root), "--num_classes", "4",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), *FAST[:-1], backbone,
            *extra]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    run = next((tmp_path / "out" / "demo").glob(f"{backbone}_*shots_seed1"))
    results = json.loads((run / "results.json").read_text())
    assert results["backbone"] == backbone and results["test_acc"] > 25.0, results        # chance is 25% here
    code, out, err = cli([*argv, "--eval-only"], capsys)                              # from the checkpoint
    assert code == 0, err
    assert json.loads((run / "results_eval.json").read_text())["test_acc"] == results["test_acc"]
    # train_views with a ViT
    code, out, err = cli([*argv, "--train_views", "2"], capsys)
    assert code == 0, err
    assert (run.parent / f"{run.name}_views2" / "results.json").is_file()
    # predict and visualize: attention over the 6×6 patch grid
    image = next((demo_root / "images" / "red_circle").glob("test_*.jpg"))
    code, out, err = cli([str(run), str(image), "--top-k", "2"], capsys, entry="scripts.predict")
    assert code == 0 and "  1. " in out, err
    from run.inference import attention_maps, load_images, load_run
    loaded = load_run(run, "cpu")
    _, images, _ = load_images(loaded, [image])
    maps = attention_maps(loaded, images)
    assert all(m.shape == (1, 6, 6) and torch.allclose(m.sum(), torch.tensor(1.0)) for m in maps.values())
    code, out, err = cli([str(run), str(image), "--out", str(tmp_path / "vis")], capsys, entry="scripts.visualize")
    assert code == 0 and list((tmp_path / "vis").glob("*.png")), err


def test_a_resnet_checkpoint_is_refused_for_a_vit_run(demo_root, tmp_path, capsys):
    common = ["--config", str(ROOT / "configs/demo.yaml"), "--data_path", str(demo_root), "--num_classes", "4",
              "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), *FAST[:-2]]
    assert cli(common, capsys)[0] == 0                                   # tiny-rn
    ckpt = tmp_path / "out" / "demo" / "tiny-rn_4shots_seed1" / "checkpoint.pt"
    code, _, err = cli([*common, "--backbone", "tiny-vit", "--eval-only", "--checkpoint", str(ckpt)], capsys)
    assert code == 2 and "trained with backbone tiny-rn, this run uses tiny-vit" in err


@pytest.mark.slow
def test_imagenet_with_a_shift_set_and_a_resumed_vit_run(tmp_path, capsys, monkeypatch):
    """main_imagenet.py with a ViT, interrupted by Ctrl-C mid-epoch and resumed: the same
    numbers as an uninterrupted run."""
    import os
    import signal
    import shutil
    from test_end_to_end import build_imagenet
    data = tmp_path / "imagenet"
    data.mkdir()
    build_imagenet(data)
    argv = ["--config", str(ROOT / "configs/imagenet.yaml"), "--data_path", str(data), "--num_classes", "3",
            "--weights", "null", "--val_per_class", "2", "--save_every", "1e9",
            "--shift_sets", f"{{imagenet_sketch: {data / 'sketch_root'}}}", "--output_dir", str(tmp_path / "out"),
            "--cache_dir", str(tmp_path / "cache"), *FAST]
    assert cli(argv, capsys, entry="main_imagenet")[0] == 0
    run = tmp_path / "out" / "imagenet" / "tiny-vit_4shots_seed1"
    expected = json.loads((run / "results.json").read_text())
    assert expected["shift"]["imagenet_sketch"]["size"] == 4
    shutil.rmtree(tmp_path / "out")
    from run import features
    real_epoch, sent = features.LiveSource.epoch, []

    def epoch_with_ctrl_c(self, epoch, start=0):
        for i, batch in enumerate(real_epoch(self, epoch, start)):
            if epoch == 2 and i == 0 and not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)
            yield batch

    monkeypatch.setattr(features.LiveSource, "epoch", epoch_with_ctrl_c)
    assert cli(argv, capsys, entry="main_imagenet")[0] == 130
    monkeypatch.undo()
    code, _, err = cli(argv, capsys, entry="main_imagenet")
    assert code == 0, err
    again = json.loads((run / "results.json").read_text())
    for key in ("test_acc", "zero_shot_acc", "alpha", "val_acc"):
        assert again[key] == expected[key], key
    assert again["shift"] == expected["shift"]
