"""Trunk-feature caches and training sources (features/)."""
import json
import os

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from clip.published import numerics_of
from clip.region_pool import RegionAttentionPool
from datasets import read_coop_dataset
from datasets.loader import eval_transform
from run.evaluation import collect_logits
from run.features import (FeatureStore, LiveSource, ViewSource, augment, build_store, crop_params, eval_store, live_batches)
from utils import RaftError

FLOAT32 = numerics_of("float32")

CPU = torch.device("cpu")


@pytest.fixture()
def counting(tiny_clip, monkeypatch):
    """Count trunk calls (images through the frozen trunk)."""
    calls = []
    original = type(tiny_clip).encode_image

    def encode(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(type(tiny_clip), "encode_image", encode)
    return calls


@pytest.fixture()
def demo(demo_root):
    return read_coop_dataset("demo", demo_root)


def store_of(clip, items, cache, name="t"):
    return eval_store(clip, items, cache, name, batch_size=8, num_workers=0, device=CPU, amp=False)


def test_eval_store_is_computed_once_and_matches_the_trunk(tiny_clip, demo, tmp_path, counting):
    store = store_of(tiny_clip, demo.test, tmp_path)
    assert sum(counting) == len(demo.test)
    again = store_of(tiny_clip, demo.test, tmp_path)
    assert sum(counting) == len(demo.test)            # reused: no new trunk pass
    assert again.path == store.path and len(again) == len(demo.test)
    live = list(live_batches(tiny_clip, demo.test, eval_transform(tiny_clip.image_size), 8, 0, CPU, False))
    fmap = torch.cat([b[0] for b in live])
    cached = torch.cat([b[0] for b in again.batches(8, CPU)])
    assert cached.shape == fmap.shape
    assert torch.allclose(cached, fmap, rtol=2e-3, atol=1e-3)       # float16 storage
    assert torch.equal(torch.cat([b[2] for b in again.batches(8, CPU)]), torch.tensor([d.label for d in demo.test]))
    manifest = json.loads((store.path / "manifest.json").read_text())
    assert manifest["maps_dtype"] == "float16" and manifest["images"] == len(demo.test)


def test_any_changed_input_makes_a_new_cache(tiny_clip, demo, tmp_path, counting):
    base = store_of(tiny_clip, demo.test, tmp_path).path
    assert store_of(tiny_clip, demo.test[:-1], tmp_path).path != base          # image list
    touched = demo.test[0].path
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))             # image file changed
    try:
        assert store_of(tiny_clip, demo.test, tmp_path).path != base
    finally:
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns))
    from clip.backbone import FrozenCLIP, calibrate_batchnorm, load_open_clip
    other = FrozenCLIP(load_open_clip("tiny-rn", None), "tiny-rn")             # weights changed
    calibrate_batchnorm(other, [torch.rand(4, 3, 96, 96)])
    assert store_of(other, demo.test, tmp_path).path != base
    assert store_of(tiny_clip, demo.test, tmp_path).path == base               # the original still serves


def test_a_store_without_matching_manifest_is_rebuilt(tiny_clip, demo, tmp_path, counting):
    path = store_of(tiny_clip, demo.val, tmp_path).path
    n = sum(counting)
    (path / "manifest.json").write_text("{broken")
    store_of(tiny_clip, demo.val, tmp_path)
    assert sum(counting) == 2 * n
    (path / "manifest.json").unlink()                                           # crash before the manifest
    store_of(tiny_clip, demo.val, tmp_path)
    assert sum(counting) == 3 * n and FeatureStore.valid(path, json.loads((path / "manifest.json").read_text())["key"])
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_float16_overflow_falls_back_to_float32(tiny_clip, tmp_path):
    def batches(skipped):
        yield torch.full((2, 256, 3, 3), 1e6), torch.zeros(2, 64), torch.tensor([0, 1])

    store = build_store(tmp_path / "big", {"key": "k"}, 2, batches, tiny_clip, "big")
    assert store.maps.dtype == np.float32 and float(store.maps[0, 0, 0, 0]) == 1e6


def test_shuffled_reads_return_the_requested_rows(tiny_clip, demo, tmp_path):
    store = store_of(tiny_clip, demo.test, tmp_path)
    order = torch.randperm(len(store), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([b[1] for b in store.batches(5, CPU, order)])
    assert torch.equal(rows, torch.from_numpy(np.array(store.pooled))[order])


def test_float16_maps_barely_move_the_logits(tiny_clip, demo, tmp_path):
    """What float16 storage costs: logits from cached maps vs the float32 trunk output."""
    pool = RegionAttentionPool(tiny_clip.attnpool)
    text = torch.nn.functional.normalize(torch.randn(tiny_clip.embed_dim, 5), dim=0)
    cached = collect_logits(pool, text, store_of(tiny_clip, demo.test, tmp_path).batches(8, CPU), CPU, False, "c", FLOAT32)
    live = collect_logits(pool, text, live_batches(tiny_clip, demo.test, eval_transform(96), 8, 0, CPU, False),
                          CPU, False, "l", FLOAT32)
    assert (cached.cls - live.cls).abs().max() < 0.05 and (cached.clip - live.clip).abs().max() < 1e-4
    assert (cached.cls.argmax(1) == live.cls.argmax(1)).float().mean() >= 0.97


def test_crop_sampler_reproduces_random_resized_crop():
    mismatches = 0
    for k, (h, w) in enumerate([(300, 400), (500, 240), (224, 224), (120, 900)] * 50):
        torch.manual_seed(k)
        ref = RandomResizedCrop.get_params(torch.empty(3, h, w), scale=[0.8, 1.0], ratio=[3 / 4, 4 / 3])
        mine = crop_params(h, w, torch.Generator().manual_seed(k))
        mismatches += tuple(ref) != mine
    assert mismatches <= 2   # float32 vs float64 rounding of the aspect ratio, rarely


def test_augment_shapes_range_and_flips():
    gen = torch.Generator().manual_seed(0)
    img = torch.zeros(3, 120, 160, dtype=torch.uint8)
    img[:, :, :80] = 255                           # left half white
    out = augment([img] * 64, 64, gen, CPU)
    assert out.shape == (64, 3, 64, 64)
    left_white = out[:, 0, :, :8].mean((1, 2)) > out[:, 0, :, -8:].mean((1, 2))
    assert 16 < left_white.sum() < 48              # about half the images are flipped
    assert out.min() >= (0 - 0.48145466) / 0.26862954 - 1e-4 and out.max() <= (1 - 0.40821073) / 0.27577711 + 1e-4


def test_live_source_is_seeded_and_fresh_each_epoch(tiny_clip, demo):
    a = LiveSource(tiny_clip, demo.train, batch_size=16, seed=3, device=CPU, amp=False, num_workers=0)
    b = LiveSource(tiny_clip, demo.train, batch_size=16, seed=3, device=CPU, amp=False, num_workers=0)
    assert len(a) == 2
    first = [x[1] for x in a.epoch(1)]
    assert all(torch.equal(x, y[1]) for x, y in zip(first, b.epoch(1)))
    second = [x[1] for x in a.epoch(2)]
    assert not torch.equal(first[0], second[0])


def test_view_source_computes_views_once_and_cycles(tiny_clip, demo, tmp_path, counting):
    kw = dict(views=3, batch_size=16, seed=1, cache_dir=tmp_path, name="v", device=CPU, amp=False, num_workers=0)
    src = ViewSource(tiny_clip, demo.train, **kw)
    n = len(demo.train)
    assert sum(counting) == 3 * n and len(src.store) == 3 * n
    ViewSource(tiny_clip, demo.train, **kw)
    assert sum(counting) == 3 * n                              # cached
    epochs = [torch.cat([b[1] for b in src.epoch(e)]) for e in (1, 2, 4)]
    pooled = torch.from_numpy(np.array(src.store.pooled))
    for e, feats in zip((1, 2, 4), epochs):
        view = pooled[((e - 1) % 3) * n:((e - 1) % 3 + 1) * n]
        assert sorted(feats[:, 0].tolist()) == sorted(view[:, 0].tolist())
    assert not torch.allclose(pooled[:n], pooled[n:2 * n])   # views differ


# --------------------------------------------------------------------------- keeping a GPU busy
@pytest.mark.parametrize("shape,size", [((3, 230, 300), 224), ((3, 50, 70), 96)])   # down- and upsampling
def test_batched_resize_equals_torchs_antialiased_interpolate(shape, size):
    """The batched products (what a GPU runs) compute what F.interpolate does crop by crop."""
    from datasets.augment import prepare_batch
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, shape[1] + 7 * i, shape[2] - 5 * i), dtype=torch.uint8, generator=gen)
              for i in range(8)]
    per_crop = prepare_batch(images, size, torch.Generator().manual_seed(3), CPU).finish(CPU)
    batched = prepare_batch(images, size, torch.Generator().manual_seed(3), CPU, batched=True).finish(CPU)
    assert per_crop.shape == batched.shape == (8, 3, size, size)
    assert (per_crop - batched).abs().max() * 0.27 * 255 < 0.01      # far below one grey level


def test_the_augmentation_draws_what_the_per_image_transform_drew(tiny_clip):
    """Batching changed no random draw: flips first, then each image's crop, in order."""
    from datasets.augment import prepare_batch
    images = [torch.zeros(3, 120 + i, 160, dtype=torch.uint8) for i in range(5)]
    gen = torch.Generator().manual_seed(7)
    batch = prepare_batch(images, 64, gen, CPU)
    ref = torch.Generator().manual_seed(7)
    flips = torch.rand(5, generator=ref) < 0.5
    boxes = [crop_params(img.shape[1], img.shape[2], ref) for img in images]
    assert torch.equal(batch.flips, flips)
    assert batch.sizes.tolist() == [[h, w] for _, _, h, w in boxes]
    assert torch.equal(gen.get_state(), ref.get_state())


def test_training_reads_nothing_back_from_the_device_inside_an_epoch(tiny_clip, demo, monkeypatch):
    """Loss sums, accuracy counts and the NaN check stay on the device: host reads happen per
    epoch (and at saves), not per step."""
    import logging
    from conftest import train_with
    from run.config import build_config
    source = LiveSource(tiny_clip, demo.train, batch_size=4, seed=1, device=CPU, amp=False, num_workers=0)
    text = torch.nn.functional.normalize(torch.randn(tiny_clip.embed_dim, 5), dim=0)
    cfg = build_config(None, {"dataset": "demo", "data_path": "x", "train_epoch": 3, "warmup_epoch": 1,
                              "batch_size": 4})
    import sys
    reads = []

    def counted(real):
        def read(self, *args, **kwargs):   # reads made by the training loop itself (training.py)
            caller = sys._getframe(1)
            if caller.f_code.co_filename.endswith("training.py"):
                reads.append(f"{caller.f_code.co_name}:{caller.f_lineno}")
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    train_with(tiny_clip.region_pool(), text, source, cfg, logging.getLogger("t"))
    steps = 3 * len(source)
    assert steps == 24 and len(reads) <= 2 * 3, reads      # two per epoch (the NaN check, the sums), none per step


@pytest.mark.slow
def test_workers_auto_share_the_cpus_among_torchrun_processes(monkeypatch):
    from utils import available_cpus, resolve_workers
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert resolve_workers(3) == 3 and resolve_workers("auto") == max(1, min(16, available_cpus()))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert resolve_workers("auto") == 1


def test_float16_overflow_under_amp_stops_once_with_the_fix(tiny_clip, tmp_path):
    from run.features import build_store
    calls = []

    def batches(skipped):   # what the trunk returns under autocast when it overflows
        calls.append(1)
        yield torch.full((2, 256, 3, 3), float("inf"), dtype=torch.float16), torch.zeros(2, 64), torch.tensor([0, 1])

    with pytest.raises(RaftError, match="overflow float16 under mixed precision.*--amp false"):
        build_store(tmp_path / "s", {"key": "k"}, 2, batches, tiny_clip, "s")
    assert calls == [1] and not list(tmp_path.iterdir())


@pytest.mark.parametrize("sizes", [(1, 128), (7, 8), (64, 128)])
def test_the_trunks_batch_size_keys_the_caches(tiny_clip, demo, tmp_path, sizes):
    """A batch of one rounds differently in the trunk than a larger one: the stores of two batch
    sizes are two stores, never one read for the other."""
    a, b = (eval_store(tiny_clip, demo.test[:9], tmp_path, "t", size, 0, CPU, False) for size in sizes)
    assert a.path != b.path


@pytest.mark.slow
def test_the_eval_batch_size_is_part_of_a_runs_settings(dtd, tmp_path, capsys):
    from conftest import ROOT, args_for, cli, one_line_error, run_dir
    assert cli(args_for(dtd, tmp_path, "--baselines", "[]"), capsys)[0] == 0
    config = tmp_path / "small.yaml"
    config.write_text((ROOT / "configs" / "dtd.yaml").read_text() + "eval_batch_size: 1\n")
    args = args_for(dtd, tmp_path, "--baselines", "[]")
    code, _, err = cli(["--config", str(config), *args[2:]], capsys)
    one_line_error(code, err, "holds a finished run with other settings", "eval_batch_size: 128 -> 1")
    tagged = [a for a in args if a not in ("--name", "")]
    assert cli([*tagged, "--eval_batch_size", "1"], capsys)[0] == 0
    folders = [p.parent.name for p in run_dir(tmp_path).parent.glob("*/results.json")]
    assert len(folders) == 2 and any("eval_batch_size=1" in f or "more-" in f for f in folders), folders
