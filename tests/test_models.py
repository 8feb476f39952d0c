"""The CLIP models RAFT runs on (doc/weights.md, doc/method.md §11): families decided from the
built model, pretrained tags and hub repositories found offline, each model's own
preprocessing everywhere an image is prepared, SigLIP's attention-pool head, and the bad
inputs of each kind refused in one line before anything is written."""
import json

import open_clip
import pytest
import torch
from open_clip.pretrained import _pcfg

from clip.backbone import FrozenCLIP, backbone_family, load_open_clip
from clip.map_pool import MapRegionPool, map_all_token_forward
from clip.weights import parse_weights, recorded_quick_gelu
from conftest import ROOT, cli, one_line_error
from utils import RaftError

HALF = (0.5, 0.5, 0.5)


@pytest.fixture(scope="module")
def tiny_siglip():
    return FrozenCLIP(load_open_clip("tiny-siglip", None), "tiny-siglip")


# --------------------------------------------------------------------------- families, from the model
@pytest.mark.parametrize("name,family", [
    ("tiny-rn", "resnet"), ("RN50", "resnet"), ("RN50x4", "resnet"),                 # ModifiedResNet
    ("tiny-vit", "vit"), ("ViT-B-32", "vit"), ("ViT-L-14-336", "vit"), ("ViT-B-16-quickgelu", "vit"),
    ("ViT-H-14", "vit"),                                                             # not in any list of ours
    ("tiny-siglip", "map"), ("ViT-B-16-SigLIP2", "map"), ("ViT-SO400M-14-SigLIP-384", "map"),
])
def test_the_family_is_read_off_the_built_model(name, family):
    assert backbone_family(name) == family


@pytest.mark.parametrize("name,why", [
    ("convnext_base", "timm ConvNeXt) has no attention-pool head"),
    ("MobileCLIP-S1", "timm FastVit) pools by 'avg'"),
    ("EVA02-B-16", "timm Eva) pools by 'token'"),
    ("ViT-H-14-CLIPA", "pools its tokens by 'avg'"),
    ("coca_ViT-B-32", "attentional pooler"),
    ("ViTamin-B", "timm VisionTransformer) pools by 'avg'"),
])
def test_towers_without_an_attention_pool_are_refused_saying_which_work(name, why):
    with pytest.raises(RaftError, match="RAFT") as err:
        backbone_family(name)
    assert why in str(err.value) and "\n" not in str(err.value)


def test_tiny_siglip_is_built_like_siglip(tiny_siglip):
    visual = tiny_siglip.model.visual
    assert type(visual.trunk.attn_pool).__name__ == "AttentionPoolLatent" and visual.trunk.num_prefix_tokens == 0
    assert (tiny_siglip.family, tiny_siglip.feature_shape, tiny_siglip.grid, tiny_siglip.embed_dim) == \
        ("map", (36, 64), 6, 64)
    assert hasattr(tiny_siglip.model, "logit_bias") and not tiny_siglip.quick_gelu   # SigLIP's config: GELU


# --------------------------------------------------------------------------- the attention-pool head
def test_map_pool_starts_as_clips_own_head_and_trains_only_the_attention(tiny_siglip):
    images = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    tokens, v0 = tiny_siglip.encode_image(images)
    with torch.no_grad():
        reference = tiny_siglip.model.encode_image(images)
        v_cls, v_bg = tiny_siglip.region_pool()(tokens)
    assert torch.allclose(v0, reference, atol=1e-6) and torch.allclose(v_cls, reference, atol=1e-6)
    assert torch.equal(v_cls, v_bg)                                   # both latents start as the head's
    pool = tiny_siglip.region_pool(mask_bg_in_cls=True)               # nothing to mask: the queries are no keys
    assert torch.allclose(pool(tokens)[0], reference, atol=1e-6)
    trainable = {name for name, p in pool.named_parameters() if p.requires_grad}
    assert trainable == {"latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias"}
    assert pool.latent.shape == (2, 64) and set(pool.state_dict()) == trainable       # LN, MLP: CLIP's, frozen


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_folded_map_pool_matches_timms_head_outputs_and_gradients(tiny_siglip, dtype, tol):
    import copy
    visual = copy.deepcopy(tiny_siglip.model.visual).to(dtype)
    ours = MapRegionPool(visual)
    with torch.no_grad():                        # as after training: the two latents differ
        ours.latent.add_(0.3 * torch.randn(ours.latent.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    ref = MapRegionPool(visual)
    ref.load_state_dict(ours.state_dict())
    tokens = torch.randn(4, 36, 64, generator=torch.Generator().manual_seed(2)).to(dtype)
    mine, theirs = ours(tokens), map_all_token_forward(ref, visual, tokens)
    weights = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    ((mine[0] * weights[0]).sum() + (mine[1] * weights[1]).sum()).backward()
    ((theirs[0] * weights[0]).sum() + (theirs[1] * weights[1]).sum()).backward()
    for a, b in zip(mine, theirs):
        assert (a - b).abs().max() <= tol * b.abs().max()
    assert not torch.allclose(mine[0], mine[1])
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert (p.grad - q.grad).abs().max() <= tol * q.grad.abs().max().clamp_min(1e-30), name


def test_heads_the_fold_does_not_cover_are_refused(tiny_siglip):
    import copy
    from torch import nn
    for change, why in ((lambda h: setattr(h, "q_norm", nn.LayerNorm(16)), "normalises queries and keys"),
                        (lambda h: setattr(h, "latent_len", 4), "pools 4 latents"),
                        (lambda h: setattr(h, "pos_embed", nn.Parameter(torch.zeros(36, 64))), "positional")):
        model = copy.deepcopy(tiny_siglip.model)
        change(model.visual.trunk.attn_pool)
        with pytest.raises(RaftError, match=why):
            FrozenCLIP(model, "tiny-siglip")


# --------------------------------------------------------------------------- tags, hub repositories, files
@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: what a laptop on a train has."""
    import huggingface_hub.constants as constants
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return cache


def put_in_hub_cache(cache, repo: str, files: dict[str, bytes]) -> None:
    """Files as huggingface_hub leaves a download: models--org--repo/snapshots/<rev>/, refs/main."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0" * 40)
    snapshot = folder / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def safetensors_of(model) -> bytes:
    from safetensors.torch import save
    return save({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture()
def tagged(hub_cache, monkeypatch, tiny_siglip):
    """Two pretrained tags of tiny-siglip, registered as open_clip registers its own (its
    table of tags), with one set of weights in the hub cache: 'squashed' records SigLIP's
    preprocessing and QuickGELU, 'plain' open_clip's defaults."""
    import open_clip.pretrained as pretrained
    tags = {"squashed": _pcfg(hf_hub="raft-test/tiny-siglip-squashed/", mean=HALF, std=HALF, resize_mode="squash",
                              quick_gelu=True),
            "plain": _pcfg(hf_hub="raft-test/tiny-siglip-plain/")}
    monkeypatch.setitem(pretrained._PRETRAINED, "tiny-siglip", tags)
    for tag in tags:
        put_in_hub_cache(hub_cache, f"raft-test/tiny-siglip-{tag}",
                         {"open_clip_model.safetensors": safetensors_of(tiny_siglip.model)})
    return tags


def test_a_tag_is_found_offline_with_its_preprocessing_and_quick_gelu(tagged, tiny_siglip):
    squashed = FrozenCLIP(load_open_clip("tiny-siglip", "squashed"), "tiny-siglip", "squashed")
    plain = FrozenCLIP(load_open_clip("tiny-siglip", "plain"), "tiny-siglip", "plain")
    assert (squashed.preprocess.mean, squashed.preprocess.resize_mode, squashed.quick_gelu) == (HALF, "squash", True)
    assert (plain.preprocess.mean, plain.preprocess.resize_mode, plain.quick_gelu) == \
        (open_clip.OPENAI_DATASET_MEAN, "shortest", False)
    assert (recorded_quick_gelu("tiny-siglip", "squashed"), recorded_quick_gelu("tiny-siglip", "plain")) == (True, False)
    sd = tiny_siglip.model.state_dict()
    assert all(torch.equal(squashed.model.state_dict()[k], v) for k, v in sd.items())
    # the same tensors, other preprocessing and activation: never the same cache key
    assert len({squashed.fingerprint(), plain.fingerprint(), tiny_siglip.fingerprint()}) == 3
    assert parse_weights("tiny-siglip", "SQUASHED").value == "squashed"          # open_clip's tags are lower case


def test_a_hub_repository_is_found_offline_and_checked_against_the_backbone(hub_cache, tiny_siglip, tiny_vit):
    config = {"model_cfg": json.loads((ROOT / "clip/model_configs/tiny-siglip.json").read_text()),
              "preprocess_cfg": {"mean": HALF, "std": HALF, "resize_mode": "squash"}}
    put_in_hub_cache(hub_cache, "raft-test/tiny-siglip-hub", {"open_clip_config.json": json.dumps(config).encode(),
                                                              "open_clip_model.safetensors": safetensors_of(tiny_siglip.model)})
    clip = FrozenCLIP(load_open_clip("tiny-siglip", "hf-hub:raft-test/tiny-siglip-hub"), "tiny-siglip",
                      "hf-hub:raft-test/tiny-siglip-hub")
    assert clip.preprocess.mean == HALF and clip.preprocess.resize_mode == "squash"
    assert all(torch.equal(clip.model.state_dict()[k], v) for k, v in tiny_siglip.model.state_dict().items())
    assert clip.encode_text(["a photo of a dog."]).shape == (1, 64)
    with pytest.raises(RaftError, match="holds the image tower of a SigLIP-style ViT .*, but tiny-vit is a ViT"):
        load_open_clip("tiny-vit", "hf-hub:raft-test/tiny-siglip-hub")


def model_args(demo_root, tmp_path, *extra):
    return ["--config", str(ROOT / "configs/demo.yaml"), "--data_path", str(demo_root), "--num_classes", "4",
            "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache"), "--name", "",
            "--train_epoch", "3", "--warmup_epoch", "1", "--shots", "4", "--num_workers", "0", *extra]


@pytest.mark.parametrize("extra,fragments", [
    (["--backbone", "ViT-B-16-SigLP2"], ["unknown backbone 'ViT-B-16-SigLP2'", "ViT-B-16-SigLIP2"]),
    (["--backbone", "RN50", "--weights", "laion2b_s34b_b79k"],
     ["not a pretrained tag of RN50 (it is a tag of", "ViT-B-32", "its tags: openai, yfcc15m, cc12m"]),
    (["--backbone", "ViT-B-16", "--weights", "laion2b_s34b_b99k"], ["not a pretrained tag of ViT-B-16;",
                                                                     "laion2b_s34b_b88k"]),
    (["--backbone", "tiny-rn", "--weights", "openai"], ["not a pretrained tag of tiny-rn", "it has no pretrained tags"]),
    (["--backbone", "ViT-B-32", "--weights", "hf-hub:laion"], ["not a hub repository"]),
    (["--backbone", "ViT-B-32", "--weights", "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"],
     ["the weights of hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K are not in the local cache", "HF_HUB_OFFLINE"]),
    (["--backbone", "ViT-B-32", "--weights", "datacomp_xl_s13b_b90k"],
     ["the datacomp_xl_s13b_b90k ViT-B-32 weights are not in the local cache"]),
    (["--backbone", "convnext_base", "--weights", "null"], ["no attention-pool head"]),
    (["--backbone", "tiny-siglip", "--weights", "null", "--pool_precision", "float16_published"],
     ["attention-pool head has no published code"]),
])
def test_bad_models_and_weights_are_one_line_before_anything_is_written(extra, fragments, hub_cache, demo_root,
                                                                         tmp_path, capsys):
    code, _, err = cli(model_args(demo_root, tmp_path, *extra), capsys)
    one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_weights_of_another_family_are_refused_in_one_line(tmp_path, demo_root, capsys, tiny_siglip, tiny_vit,
                                                           tiny_clip):
    for mine, theirs, family in (("tiny-vit", tiny_siglip, "SigLIP-style ViT"), ("tiny-siglip", tiny_vit, "a ViT"),
                                 ("tiny-siglip", tiny_clip, "a ResNet"), ("tiny-rn", tiny_siglip, "SigLIP-style")):
        path = tmp_path / f"{theirs.backbone}.safetensors"
        path.write_bytes(safetensors_of(theirs.model))
        code, _, err = cli(model_args(demo_root, tmp_path, "--backbone", mine, "--weights", str(path)), capsys)
        one_line_error(code, err, "holds the image tower of", family, f"but {mine} is")
        assert not list((tmp_path / "out").rglob("checkpoint.pt"))


# --------------------------------------------------------------------------- preprocessing everywhere
def test_the_models_preprocessing_reaches_augmentation_evaluation_and_caches(tagged, demo_root, tmp_path):
    from datasets import read_coop_dataset
    from datasets.augment import prepare_batch
    from datasets.loader import eval_transform
    from run.features import eval_store
    squashed = FrozenCLIP(load_open_clip("tiny-siglip", "squashed"), "tiny-siglip", "squashed")
    plain = FrozenCLIP(load_open_clip("tiny-siglip", "plain"), "tiny-siglip", "plain")
    # evaluation: SigLIP squashes the image to the square; OpenAI's CLIP crops its centre
    names = [type(t).__name__ for t in eval_transform(squashed.preprocess).transforms]
    assert names == ["Resize", "ToTensor", "Normalize"] and eval_transform(squashed.preprocess).transforms[-1].mean == HALF
    assert [type(t).__name__ for t in eval_transform(plain.preprocess).transforms][:2] == ["Resize", "CenterCrop"]
    # training: the same crops, normalised with each model's statistics
    image = (torch.arange(3 * 80 * 120) % 251).to(torch.uint8).view(3, 80, 120)
    a = prepare_batch([image], squashed.preprocess, torch.Generator().manual_seed(0), torch.device("cpu"))
    b = prepare_batch([image], plain.preprocess, torch.Generator().manual_seed(0), torch.device("cpu"))
    x, y = a.finish(torch.device("cpu")), b.finish(torch.device("cpu"))
    mean_a, std_a = torch.tensor(HALF).view(3, 1, 1), torch.tensor(HALF).view(3, 1, 1)
    mean_b = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
    std_b = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)
    assert torch.allclose(x[0] * std_a + mean_a, y[0] * std_b + mean_b, atol=1e-5)    # same pixels
    assert not torch.allclose(x, y)
    # caches: two tags of one architecture never share one, and their features differ
    items = read_coop_dataset("demo", demo_root).test[:12]
    stores = [eval_store(c, items, tmp_path, "t", 8, 0, torch.device("cpu"), False) for c in (squashed, plain)]
    assert stores[0].path != stores[1].path
    assert not torch.allclose(torch.tensor(stores[0].pooled[:]), torch.tensor(stores[1].pooled[:]))


def test_bilinear_models_resize_as_torch_does_on_every_path():
    import torch.nn.functional as F
    from datasets.augment import resize_weights
    crop = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(0)) * 255
    for mode in ("bilinear", "bicubic"):
        for out in (32, 96):                               # down and up
            rows = resize_weights(torch.tensor([50]), out, 50, mode)
            cols = resize_weights(torch.tensor([70]), out, 70, mode)
            dense = rows[0] @ crop[0] @ cols[0].T
            expected = F.interpolate(crop, size=(out, out), mode=mode, align_corners=False, antialias=True)[0]
            assert (dense - expected).abs().max() < 1e-3, (mode, out)


# --------------------------------------------------------------------------- the pipeline on SigLIP
def test_base_to_new_and_baselines_on_tiny_siglip(dtd, tmp_path, capsys):
    from conftest import args_for
    argv = [a if a != "tiny-rn" else "tiny-siglip" for a in args_for(dtd, tmp_path, "--protocol", "base2new")]
    code, _, err = cli(argv, capsys)
    assert code == 0, err
    results = json.loads(next((tmp_path / "out").rglob("results.json")).read_text())
    assert results["backbone"] == "tiny-siglip" and results["config"]["quick_gelu"] is False
    assert {"base", "new"} <= set(results["base2new"]) and set(results["baselines"]) >= {"zero_shot", "tip_adapter"}


def test_openai_archives_load_without_torch_jit_and_print_nothing(tmp_path, tiny_vit, monkeypatch, capsys):
    import copy
    import warnings
    path = tmp_path / "ViT-tiny.pt"          # as OpenAI ships them: a float16 TorchScript archive
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # torch.jit.script itself is deprecated: the test's side, not ours
        torch.jit.script(copy.deepcopy(tiny_vit.model).half()).save(str(path))
    capsys.readouterr()

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load called")

    monkeypatch.setattr(torch.jit, "load", no_jit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_open_clip("tiny-vit", str(path))
    assert not caught and capsys.readouterr() == ("", "")
    assert all(torch.equal(model.state_dict()[k], v.half().float()) for k, v in tiny_vit.model.state_dict().items())


@pytest.mark.slow
def test_a_run_from_a_tag_predicts_with_that_tags_preprocessing(tagged, demo_root, tmp_path, capsys):
    from run.inference import load_run
    code, _, err = cli(model_args(demo_root, tmp_path, "--backbone", "tiny-siglip", "--weights", "squashed"), capsys)
    assert code == 0, err
    run_dir = next((tmp_path / "out" / "demo").glob("tiny-siglip_*"))
    results = json.loads((run_dir / "results.json").read_text())
    assert results["weights"] == "squashed" and results["config"]["quick_gelu"] is True   # the tag's record
    run = load_run(run_dir, "cpu")
    fit, *_, normalize = run.transform.transforms
    assert type(fit).__name__ == "Resize" and fit.size == (96, 96) and normalize.mean == HALF
    image = next((demo_root / "images").rglob("test_*.jpg"))
    code, out, err = cli([str(run_dir), str(image), "--top-k", "1"], capsys, entry="scripts.predict")
    assert code == 0 and "  1. " in out, err


@pytest.mark.parametrize("backbone", ["ViT-B-16-SigLIP2", "ViT-B-16-SigLIP", "ViT-B-16-SigLIP-i18n-256"])
def test_a_tokenizer_that_needs_packages_says_so_before_anything_is_written(backbone, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("transformers", "sentencepiece") else real(name, *a))
    code, _, err = cli(["--config", str(ROOT / "configs/demo.yaml"), "--backbone", backbone, "--weights", "null",
                        "--output_dir", str(tmp_path / "out"), "--cache_dir", str(tmp_path / "cache")], capsys)
    one_line_error(code, err, backbone, "transformers and sentencepiece", "requirements-optional.txt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()
