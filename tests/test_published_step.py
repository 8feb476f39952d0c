"""pool_precision: float16_published takes the published code's training steps bit for bit
(doc/method.md, Numerics): the published pool, loss, AdamW and learning rates are stated here
from their facts (WideStars/RA-FT: clip/MyPooling.py, trainer.py, utils.my_scheduler; its v0
from CLIP's own float16 attention pool, open_clip's module being the same code), and 20 steps
on identical float16 trunk outputs must leave identical weights, with float16 products
computed natively on the CPU and emulated as cuBLAS computes them (float32, one rounding)."""
import copy
import logging
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from clip.published import make_region_pool
from run.config import build_config
from conftest import train_with

EPOCHS, PER_EPOCH, WARMUP, BATCH, LR = 10, 2, 2, 6, 1e-3


class PublishedPool(nn.Module):
    """The published pool: CLIP's attention pool with row 0 of the positional embedding
    duplicated, converted to float16; tokens [mean, mean, map] of the map viewed HW×B×C."""

    def __init__(self, attnpool):
        super().__init__()
        self.positional_embedding = nn.Parameter(attnpool.positional_embedding.detach().clone())
        self.k_proj, self.q_proj = copy.deepcopy(attnpool.k_proj), copy.deepcopy(attnpool.q_proj)
        self.v_proj, self.c_proj = copy.deepcopy(attnpool.v_proj), copy.deepcopy(attnpool.c_proj)
        self.num_heads = attnpool.num_heads
        self.positional_embedding = nn.Parameter(torch.cat((self.positional_embedding[:1], self.positional_embedding)))
        self.half()
        self.requires_grad_(True)   # a fresh module of its own, loaded from CLIP's frozen pool

    def forward(self, x):
        x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).permute(2, 0, 1)
        mean_x = x.mean(dim=0, keepdim=True)
        x = torch.cat([mean_x, mean_x, x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        x, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=self.training,
            need_weights=False)
        return x[0], x[1]


def published_run(attnpool, batches, text, num_classes):
    """The published trainer's loop on the given batches: lr 0 before the first step, the
    scheduler stepped after each optimizer step, AdamW(eps 1e-4) on the float16 parameters."""
    pool = PublishedPool(attnpool)
    clip_pool = copy.deepcopy(attnpool).half().eval()   # the published model's float16 CLIP: its v0
    optimizer = torch.optim.AdamW(pool.parameters(), lr=LR, eps=1e-4)
    optimizer.param_groups[0]["lr"] = 0
    warm = WARMUP * PER_EPOCH
    rest = np.arange(EPOCHS * PER_EPOCH - warm)
    schedule = np.concatenate((np.linspace(0, LR, warm), 1e-6 + 0.5 * (LR - 1e-6) * (1 + np.cos(np.pi * rest / len(rest)))))
    pool.train()
    for step, (fmap, _, labels) in enumerate(batches):
        with torch.no_grad():
            v0 = clip_pool(fmap)
        cls, bg = pool(fmap)
        v0, cls, bg = (v / v.norm(dim=-1, keepdim=True) for v in (v0, cls, bg))
        clip_logits, cls_logits, bg_logits = 100. * v0 @ text[:, :-1], 100. * cls @ text[:, :-1], 100. * bg @ text
        con = F.l1_loss(cls_logits, clip_logits)
        ce_cls = F.cross_entropy(cls_logits / 2.0, labels)
        ce_bg = F.cross_entropy(bg_logits / 3.0, torch.tensor([num_classes] * labels.shape[0]).to(labels.dtype))
        diff = -F.cosine_embedding_loss(cls, bg, torch.tensor([1] * cls.shape[0]))
        loss = 0.1 * diff + 0.5 * con + ce_cls + ce_bg
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        optimizer.param_groups[0]["lr"] = schedule[step]
    return {"positional_embedding": pool.positional_embedding, **{f"{p}.{w}": getattr(getattr(pool, p), w)
            for p in ("q_proj", "k_proj", "v_proj", "c_proj") for w in ("weight", "bias")}}


class FixedBatches:
    """The training source of ``train_pool`` over fixed float16 batches (the same ones the
    published loop reads), in order, every epoch its share of them."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return PER_EPOCH

    def batch_images(self, position):
        return BATCH

    def epoch(self, epoch, start=0):
        yield from self.batches[(epoch - 1) * PER_EPOCH + start: epoch * PER_EPOCH]

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class CublasProducts(TorchFunctionMode):
    """float16 matrix products computed as cuBLAS computes them: in float32, rounded once."""
    PRODUCTS = {torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
                F.linear, F.scaled_dot_product_attention}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        halves = [a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.float16]
        if func not in self.PRODUCTS or not halves:
            return func(*args, **kwargs)
        up = lambda a: a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a  # noqa: E731
        return func(*map(up, args), **{k: up(v) for k, v in kwargs.items()}).half()


@pytest.mark.slow
@pytest.mark.parametrize("products", ["native", "cuBLAS-emulated"])
def test_twenty_steps_are_the_published_steps_bit_for_bit(tiny_clip, products):
    gen = torch.Generator().manual_seed(0)
    classes = 5
    text = F.normalize(torch.randn(tiny_clip.embed_dim, classes + 1, generator=gen), dim=0).half()
    batches = []
    for _ in range(EPOCHS * PER_EPOCH):
        fmap = torch.randn(BATCH, *tiny_clip.feature_shape, generator=gen)
        with torch.no_grad():
            v0 = tiny_clip.pooled(fmap)
        batches.append((fmap.half(), v0.half(), torch.randint(classes, (BATCH,), generator=gen)))
    cfg = build_config(None, {"dataset": "d", "data_path": "x", "pool_precision": "float16_published", "lr": LR,
                              "train_epoch": EPOCHS, "warmup_epoch": WARMUP, "batch_size": BATCH, "save_every": 1e9})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with CublasProducts() if products != "native" else nullcontext():
            expected = published_run(tiny_clip.attnpool, batches, text, classes)
            pool = make_region_pool(tiny_clip, False, "float16_published")
            train_with(pool, text.float(), FixedBatches(batches), cfg, logging.getLogger("t"))
    finally:
        torch.set_num_threads(threads)
    ours = pool.state_dict()
    assert set(ours) == set(expected)
    different = {k: (ours[k] != expected[k]).float().mean().item() for k in ours if not torch.equal(ours[k], expected[k])}
    assert not different, different
    moved = sum((ours[k] != make_region_pool(tiny_clip, False, "float16_published").state_dict()[k]).sum().item()
                for k in ours)
    assert moved > 0                                   # training did move the weights


# --------------------------------------------------------------------------- the published code's checkpoints
def published_file(pool_state: dict, path):
    """A checkpoint laid out as the published code's save_model writes it."""
    torch.save({"net": {f"attnpool.{k}": v.half() for k, v in pool_state.items()}, "optimizer": None, "epoch": 0,
                "lr_scheduler": None}, path)


@pytest.mark.slow
def test_a_published_checkpoint_imports_evaluates_and_predicts_as_its_pool(dtd, tmp_path, capsys, tiny_clip):
    import sys
    from conftest import ROOT, args_for, cli, one_line_error
    from run.inference import load_run
    sys.path.insert(0, str(ROOT / "scripts"))
    import import_published  # noqa: E402
    from utils import run_main
    gen = torch.Generator().manual_seed(3)
    source = make_region_pool(tiny_clip, False, "float16_published")
    source.load_state_dict({k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).half()
                            for k, v in source.state_dict().items()})
    path = tmp_path / "s16_dtd_RN50_last.pth"
    published_file(source.state_dict(), path)
    argv = [a for a in args_for(dtd, tmp_path, "--baselines", "[]") if a not in ("--name", "")]
    assert run_main(import_published.main, [str(path), *argv]) == 0, capsys.readouterr().err
    folder = tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1_published"
    results = __import__("json").loads((folder / "results.json").read_text())
    assert results["imported_from"]["code"] == "WideStars/RA-FT" and results["numerics"]["pool_precision"] == \
        "float16_published"
    run = load_run(folder, "cpu")
    fmap, _ = tiny_clip.encode_image(torch.randn(3, 3, tiny_clip.image_size, tiny_clip.image_size))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(run.pool(fmap), source.eval()(fmap)))   # the same logits' inputs
    image = next((dtd / "images" / "red_circle").glob("*.jpg"))
    code, out, err = cli([str(folder), str(image)], capsys, entry="scripts.predict")
    assert code == 0 and "  1. " in out, err
    # given to --eval-only as it is: named, with the command that imports it
    code, _, err = cli(args_for(dtd, tmp_path, "--eval-only", "--checkpoint", str(path)), capsys)
    one_line_error(code, err, "is a checkpoint of the published RAFT code", "scripts/import_published.py")
    # a pool of another backbone: c_proj of another output width
    other = {k: v for k, v in source.state_dict().items()} | {"c_proj.weight": torch.zeros(8, 4).half()}
    published_file(other, tmp_path / "other.pth")
    code = run_main(import_published.main, [str(tmp_path / "other.pth"), *argv, "--name", "other"])
    err = capsys.readouterr().err
    one_line_error(code, err, "holds a published pool of another backbone than tiny-rn", "c_proj.weight")


# --------------------------------------------------------------------------- text source, augmentation
@pytest.mark.slow
def test_every_run_records_its_text_source(dtd, tmp_path, capsys):
    import json
    import shutil
    from conftest import ROOT, args_for, cli, shared_fixture
    import run.model
    assert run.model.GPT3_DIR == ROOT / "gpt3_file"          # where `descriptions: auto` looks
    code, out, _ = cli(args_for(dtd, tmp_path, "--baselines", "[]"), capsys)
    results = json.loads((tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1" / "results.json").read_text())
    assert code == 0 and results["text_source"]["kind"] == "templates"
    assert "text: templates, not the published descriptions (python scripts/get_files.py dtd" in out
    # the published dtd file (its classes are the real DTD's: ours fall back to templates where it has none)
    published = tmp_path / "dtd_prompt.json"
    shutil.copy(shared_fixture("descriptions", "dtd_prompt.json"), published)
    code, out, _ = cli(args_for(dtd, tmp_path, "--baselines", "[]", "--descriptions", str(published), "--output_dir",
                                str(tmp_path / "out2")), capsys)
    results = json.loads((tmp_path / "out2" / "dtd" / "tiny-rn_4shots_seed1" / "results.json").read_text())
    assert code == 0 and results["text_source"] == {"kind": "descriptions", "file": str(published),
                                                    "git_blob": "8d66432094ad7a2ed104d0e722a99708cd8bc29d",
                                                    "published": True}
    assert "not the published descriptions" not in out


def test_the_reference_augmentation_draws_the_batched_ones_crops_from_full_resolution(demo_root, tiny_clip):
    """augment: published draws the same flips and crops from the same generator; on images no
    larger than the batched mode keeps them the boxes are the same, and the pixels differ only
    by the resampling (PIL, rounded to 8 bits, vs torch)."""
    from datasets import few_shot, read_coop_dataset
    from run.features import LiveSource, PublishedSource
    items = few_shot(read_coop_dataset("demo", demo_root).train, 4, 1, 4)
    cpu = torch.device("cpu")
    batched = LiveSource(tiny_clip, items, 8, 1, cpu, False, 0)
    reference = PublishedSource(tiny_clip, items, 8, 1, cpu, False, 0)
    assert reference.images == [tuple(img.shape[1:]) for img in batched.images]     # (height, width), full size
    for idx in (torch.arange(8), torch.arange(8, 16)):
        a = batched.prepare(idx, slice(None)).finish(cpu)
        b = reference.prepare(idx, slice(None)).finish(cpu)
        assert torch.equal(batched.aug_gen.get_state(), reference.aug_gen.get_state())   # the same draws
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1) * 255
        grey_levels = ((a - b).abs() * std)
        assert grey_levels.mean() < 2.0 and grey_levels.max() < 128


@pytest.mark.parametrize("args,fragment", [(["--augment", "publishd"], "did you mean 'published'"),
                                           (["--augment", "published", "--train_views", "2"], "set one of them")])
def test_bad_augment_values(args, fragment, capsys):
    from conftest import ROOT, cli, one_line_error
    one_line_error(*cli(["--config", str(ROOT / "configs/dtd.yaml"), *args], capsys)[::2], fragment)


@pytest.mark.slow
def test_import_again_with_force_replaces_the_pool_with_the_new_import_never_a_trained_one(dtd, tmp_path, capsys,
                                                                                             tiny_clip):
    import json
    import sys
    from conftest import ROOT, args_for
    sys.path.insert(0, str(ROOT / "scripts"))
    import import_published  # noqa: E402
    from utils import run_main
    argv = [a for a in args_for(dtd, tmp_path, "--baselines", "[]") if a not in ("--name", "")]
    folder = tmp_path / "out" / "dtd" / "tiny-rn_4shots_seed1_published"
    imported = []
    for seed, extra in ((1, []), (2, ["--force"])):
        gen = torch.Generator().manual_seed(seed)
        source = make_region_pool(tiny_clip, False, "float16_published")
        source.load_state_dict({k: (v.float() + 0.01 * torch.randn(v.shape, generator=gen)).half()
                                for k, v in source.state_dict().items()})
        path = tmp_path / f"import{seed}.pth"
        published_file(source.state_dict(), path)
        assert run_main(import_published.main, [str(path), *argv, *extra]) == 0, capsys.readouterr().err
        imported.append(source.state_dict())
        ckpt = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert all(torch.equal(ckpt["pool"][k], v) for k, v in imported[-1].items())   # the import, untouched
        results = json.loads((folder / "results.json").read_text())
        assert results["imported_from"]["path"] == str(path.resolve()) and results["train_seconds"] is None
    assert not all(torch.equal(imported[0][k], imported[1][k]) for k in imported[0])
