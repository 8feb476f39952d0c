"""Speed benchmark: this implementation vs the straightforward RAFT pipeline, side by side.

    python bench/bench_speed.py                        # CPU, RN50 sizes, random weights
    python bench/bench_speed.py --backbone ViT-B-16    # RAFT-ViT (doc/method.md §10)
    python bench/bench_speed.py --backbone ViT-B-16-SigLIP2   # the attention-pool head (§11)
    python bench/bench_speed.py --device cuda --batch 64 --shots 16 --classes 10
    python bench/bench_speed.py --quick                # smaller, for a first look

Cost does not depend on weight values, so the backbone is randomly initialised. Everything
runs on one synthetic JPEG dataset in the CoOp layout (generated under --work). Five parts:

1. region pool forward+backward: the folded two-token pool vs the straightforward pool
   (ResNet: multi-head attention over all HW+2 tokens, as the reference computes it; ViT:
   the whole last block on all N+2 tokens; SigLIP: timm's head projecting every token to
   keys and values) — time and FLOPs (torch's FLOP counter);
2. training epochs (medians of 3 each, alternating): faithful mode (decode once, batched
   augmentation prepared in a background thread, the frozen trunk, CLIP's v0 and the pool
   queried for their summary tokens only, no host sync per step) vs the straightforward
   per-step pipeline (DataLoader decoding + PIL augmentation every step, the plain trunk,
   CLIP's pool or last block on all tokens, the all-token pool) — time, the share in the
   trunk, the device's idle share (GPU: kernel time from torch's profiler; CPU: the share
   outside the trunk), and a step's time over the trunk's own forward on the same batch;
3. a 3-run sweep (seeds 1, 2, 3) with and without the cached val/test features;
4. `train_views: 10` vs faithful mode, per epoch and per run (--epochs epochs), plus
   a repeated evaluation on a cached test set vs recomputing it;
5. `augment: published` (the published augmentation: every image read again every epoch, one
   PIL resampling from full resolution) vs the default batched one: epoch time, and how far
   the two lie apart in pixels for the same crop boxes;
6. the methods that train: RAFT's step against CoOp's on the same batch (`--method coop`),
   time, the frozen trunk's share, peak GPU memory, and the ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import clip.backbone as clip_backbone  # noqa: E402
import clip.weights as clip_weights  # noqa: E402
from clip.backbone import FrozenCLIP, load_open_clip  # noqa: E402
from clip.map_pool import map_all_token_forward  # noqa: E402
from clip.region_pool import all_token_forward  # noqa: E402
from clip.vit_pool import vit_all_token_forward  # noqa: E402
from datasets import few_shot, read_coop_dataset  # noqa: E402
from datasets.demo import ensure_demo_dataset  # noqa: E402
from clip.preprocess import INTERPOLATION  # noqa: E402
from datasets.loader import eval_transform, make_loader, read_rgb, train_transform  # noqa: E402
from clip.published import numerics_of  # noqa: E402
from run import engine, evaluation, training  # noqa: E402
from run.config import build_config  # noqa: E402
from run.features import (LiveSource, PublishedSource, ViewSource, augment, crop_params, eval_store,  # noqa: E402
                          live_batches)
from run.features.decode import DECODE_MARGIN, DecodedImage  # noqa: E402
from utils import RaftError, ToolParser, autocast, bounded, run_main, setup_logging  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Accumulates wall-clock time of a wrapped callable (synchronising CUDA around it)."""

    def __init__(self, fn, device):
        self.fn, self.device, self.seconds, self.calls = fn, device, 0.0, 0

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


# --------------------------------------------------------------------------- the straightforward pipeline
# each family's pool computed straightforwardly: (pool, features, visual) -> (v_cls, v_bg)
ALL_TOKENS = {"resnet": lambda pool, x, visual: all_token_forward(pool, x),
              "vit": lambda pool, x, visual: vit_all_token_forward(pool, x),
              "map": lambda pool, x, visual: map_all_token_forward(pool, visual, x)}


class AllTokenPool(nn.Module):
    """The region pool computed straightforwardly: every token's output, then keep two."""

    def __init__(self, pool: nn.Module, clip):
        super().__init__()
        self.pool, self.forward_all = pool, ALL_TOKENS[clip.family]
        self.__dict__["visual"] = clip.model.visual

    def forward(self, features):
        return self.forward_all(self.pool, features, self.visual)


class StraightforwardSource:
    """Per-step decoding + PIL augmentation through a DataLoader, and the plain trunk with
    CLIP's own pooling over all tokens (ResNet: unfused NCHW stages and the attention pool;
    ViT: the blocks, then the last block on all 1+N tokens; MAP: timm's head on all tokens)."""

    def __init__(self, model, items, batch_size, seed, device, amp, num_workers, clip):
        self.visual, self.device, self.amp, self.clip = model.visual.eval(), device, amp, clip
        self.batch_size, self.n = batch_size, len(items)
        self.loader = make_loader(items, train_transform(clip.preprocess), batch_size, shuffle=True,
                                  num_workers=num_workers, seed=seed, device=device)

    def __len__(self):
        return len(self.loader)

    def batch_images(self, position):
        return min(self.batch_size, self.n - position * self.batch_size)

    @torch.no_grad()
    def trunk(self, images):
        v = self.visual
        if self.clip.family == "resnet":
            fmap = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
            return fmap, v.attnpool(fmap)
        tokens = self.clip.trunk(images)                  # no shortcut exists for the ViT blocks
        if self.clip.family == "map":                     # timm's own head, keys and values of every token
            return tokens, v.head(v.trunk.forward_head(tokens))
        z = v.transformer.resblocks[-1](tokens)           # CLIP's last block on all 1+N tokens
        return tokens, v.ln_post(z[:, 0]) @ v.proj

    def epoch(self, epoch, start=0):
        for images, labels, _ in self.loader:
            with autocast(self.device, self.amp):
                fmap, v0 = self.trunk(images.to(self.device, non_blocking=True))
            yield fmap, v0, labels.to(self.device)


def train_epochs(pool, text, source, cfg, device):
    log = setup_logging(None)
    log.disabled = True
    try:
        learner = training.RaftLearner(pool, text, numerics_of(cfg.pool_precision), cfg, device, cfg.amp)
        return timed(lambda: training.train_pool(learner, source, cfg, log), device)[0]
    finally:
        log.disabled = False


# --------------------------------------------------------------------------- parts
def bench_pool(clip, device, batch, reps):
    pool = clip.region_pool().to(device)
    fmap = torch.randn(batch, *clip.feature_shape, device=device)
    fmap = fmap.relu() if clip.family == "resnet" else fmap     # a feature map is post-ReLU
    all_tokens = AllTokenPool(pool, clip)
    fns = {"folded": lambda: pool(fmap), "all-token": lambda: all_tokens(fmap)}

    def step(fn):
        a, b = fn()
        (a.sum() + b.sum()).backward()

    flops, times = {}, {k: [] for k in fns}
    for name, fn in fns.items():
        step(fn)
        with FlopCounterMode(display=False) as counter:
            step(fn)
        flops[name] = counter.get_total_flops() / batch
    for _ in range(reps):  # alternate, so that machine noise hits both alike
        for name, fn in fns.items():
            times[name].append(timed(lambda: step(fn), device)[0])
    t = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "seconds": t, "gflops_per_image": {k: v / 1e9 for k, v in flops.items()},
            "time_ratio": t["all-token"] / t["folded"], "flop_ratio": flops["all-token"] / flops["folded"]}


def bench_methods(clip, text, classnames, cfg, device, amp, batch, reps):
    """RAFT's step against CoOp's on the same batch of images (the frozen trunk's forward, then
    what each trains: RAFT's pool forward and backward; CoOp's prompts through the text encoder,
    once per class, forward and backward): time per step, the trunk's share, peak memory."""
    from types import SimpleNamespace
    from run.methods import CoOpLearner
    from clip.prompts import PromptLearner, text_tower
    images = torch.randn(batch, 3, clip.image_size, clip.image_size, device=device)
    labels = torch.arange(batch, device=device) % len(classnames)
    raft = training.RaftLearner(clip.region_pool().to(device), text, numerics_of("float32"), cfg, device, amp)
    torch.manual_seed(0)
    prompts = PromptLearner(text_tower(clip.model, clip.backbone), clip.tokenizer, classnames).to(device)
    coop = CoOpLearner(prompts, SimpleNamespace(clip=clip), cfg, device, amp, None)

    def trunk():
        with torch.no_grad(), engine_autocast(device, amp):
            return clip.encode_image(images)

    def step(learner):
        fmap, v0 = trunk()
        loss, _, _ = learner.loss(fmap, v0, labels, batch)
        learner.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        learner.optimizer.step()

    out = {}
    for name, learner in (("raft", raft), ("coop", coop)):
        step(learner)   # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds = statistics.median(timed(lambda: step(learner), device)[0] for _ in range(reps))
        trunk_s = statistics.median(timed(trunk, device)[0] for _ in range(reps))
        out[name] = {"step_seconds": seconds, "trunk_share": min(1.0, trunk_s / seconds),
                     "peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    out["coop_over_raft"] = out["coop"]["step_seconds"] / out["raft"]["step_seconds"]
    out["classes"], out["batch"] = len(classnames), batch
    return out


def engine_autocast(device, amp):
    from utils import autocast
    return autocast(device, amp)


def bench_epoch(clip, plain_model, text, items, cfg, device, amp, workers, reps=3):
    """Epochs each way (after a warm-up epoch; ``reps`` of each, alternating, medians), with the
    trunk's share of the time."""
    out = {}
    pool = clip.region_pool().to(device)
    decode_s, live = timed(lambda: LiveSource(clip, items, cfg.batch_size, cfg.seed, device, amp, workers), device)
    ref = StraightforwardSource(plain_model, items, cfg.batch_size, cfg.seed, device, amp, workers, clip)
    ref_pool = AllTokenPool(clip.region_pool().to(device), clip)
    live_watch = Stopwatch(clip.encode_image, device)
    ref_watch = Stopwatch(ref.trunk, device)
    clip.encode_image, ref.trunk = live_watch, ref_watch
    try:
        train_epochs(pool, text, live, cfg, device)
        train_epochs(ref_pool, text, ref, cfg, device)  # warm-ups (workers, allocator, oneDNN)
        runs = {"faithful": [], "straightforward": []}
        for _ in range(reps):  # alternating, so that the machine's slow moments hit both alike
            for name, p, src, watch in (("faithful", pool, live, live_watch),
                                        ("straightforward", ref_pool, ref, ref_watch)):
                watch.seconds = 0.0
                seconds = train_epochs(p, text, src, cfg, device)
                runs[name].append((seconds, watch.seconds))
        for name, measured in runs.items():
            seconds = statistics.median(s for s, _ in measured)
            out[name] = {"epoch_seconds": seconds, "trunk_seconds": statistics.median(t for _, t in measured),
                         "trunk_share": statistics.median(t / s for s, t in measured)}
    finally:
        del clip.encode_image
    for name, p, src in (("faithful", pool, live), ("straightforward", ref_pool, ref)):  # not instrumented
        out[name]["device_idle_share"] = device_idle_share(lambda: train_epochs(p, text, src, cfg, device), device,
                                                           out[name]["trunk_share"])
    out["faithful"]["decode_once_seconds"] = decode_s
    out["epoch_ratio"] = out["straightforward"]["epoch_seconds"] / out["faithful"]["epoch_seconds"]
    out["step_over_trunk"] = step_over_trunk(clip, live, pool, text, cfg, device, amp)
    return out, live


def bench_augment(clip, text, items, cfg, device, amp, workers, reps=3):
    """``augment: published`` (each image read again every epoch, one PIL resampling from full
    resolution, as published) vs the default batched augmentation: epochs of each (medians,
    alternating, after a warm-up each), and how far their pixels lie apart for the same crops."""
    pool = clip.region_pool().to(device)
    sources = {"batched": LiveSource(clip, items, cfg.batch_size, cfg.seed, device, amp, workers),
               "published": PublishedSource(clip, items, cfg.batch_size, cfg.seed, device, amp, workers)}
    for source in sources.values():
        train_epochs(pool, text, source, cfg, device)
    times = {name: [] for name in sources}
    for _ in range(reps):
        for name, source in sources.items():
            times[name].append(train_epochs(pool, text, source, cfg, device))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    return {"epoch_seconds": seconds, "ratio": seconds["published"] / seconds["batched"],
            "pixels": augment_pixel_difference(items, clip.preprocess)}


def augment_pixel_difference(items, pre, crops_per_image: int = 4) -> dict:
    """The same crop boxes (drawn on the full-resolution image) made both ways, in grey levels
    0..255: PIL from full resolution (reference) vs the kept reduced image resized by torch
    (batched: the box scaled to the reduced image)."""
    gen = torch.Generator().manual_seed(0)
    size, mode = pre.size, pre.interpolation
    side = math.ceil(size / DECODE_MARGIN)
    diffs = []
    for d in items:
        full = read_rgb(d.path)
        w, h = full.size
        reduced = DecodedImage([d], side)[0]
        scale = reduced.shape[0] / h
        reduced = torch.from_numpy(reduced).permute(2, 0, 1).float()
        for _ in range(crops_per_image):
            top, left, ch, cw = crop_params(h, w, gen)
            ref = TF.pil_to_tensor(TF.resized_crop(full, top, left, ch, cw, [size, size],
                                                   interpolation=INTERPOLATION[mode])).float()
            t, l, hh, ww = (round(v * scale) for v in (top, left, ch, cw))
            ours = torch.nn.functional.interpolate(reduced[None, :, t:t + hh, l:l + ww], size=(size, size),
                                                   mode=mode, align_corners=False, antialias=True)[0]
            diffs.append((ours.clamp(0, 255) - ref).abs().flatten())
    every = torch.cat(diffs).numpy()
    return {"mean": float(every.mean()), "p99": float(np.percentile(every, 99)), "max": float(every.max()),
            "crops": len(diffs), "reduced_side": side}


def device_idle_share(run, device, trunk_share: float) -> float:
    """The share of ``run``'s wall-clock time the device spends without work. On a GPU: 1 minus
    the time its kernels cover (torch's profiler); on the CPU the cores are busy with the model
    whenever anything runs, so what counts is the share outside the frozen trunk."""
    if device.type != "cuda":
        return 1.0 - trunk_share
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        wall = timed(run, device)[0]
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return max(0.0, 1.0 - busy / wall)


def step_over_trunk(clip, live, pool, text, cfg, device, amp, reps=5) -> float:
    """A training step's time over the trunk's own forward on a batch of the same size (a clean
    epoch over the trunk's time for its images): 1.0 would be a step that costs nothing but the trunk."""
    n = min(cfg.batch_size, len(live.images))
    images = augment(live.images[:n], clip.preprocess, torch.Generator().manual_seed(0), device, amp)

    def forward():
        with torch.no_grad(), autocast(device, amp):
            clip.encode_image(images)

    forward()
    trunk_per_image = statistics.median(timed(forward, device)[0] for _ in range(reps)) / n
    epoch = train_epochs(pool, text, live, cfg, device)
    return epoch / (trunk_per_image * len(live.images))


def bench_views(clip, text, items, cfg, device, amp, workers, cache, epochs, straightforward_epoch, faithful_epoch,
                decode_s):
    pool = clip.region_pool().to(device)
    build_s, views = timed(lambda: ViewSource(clip, items, 10, cfg.batch_size, cfg.seed, cache, "bench_train",
                                              device, amp, workers), device)
    epoch_s = train_epochs(pool, text, views, cfg, device)
    run_cfg = build_config(None, dict(cfg) | {"train_epoch": epochs, "warmup_epoch": min(cfg.warmup_epoch, epochs - 1)})
    run_s = build_s + train_epochs(clip.region_pool().to(device), text, views, run_cfg, device)
    faithful_run = decode_s + epochs * faithful_epoch
    straightforward_run = epochs * straightforward_epoch
    return {"build_views_seconds": build_s, "epoch_seconds": epoch_s, "run_seconds": run_s, "epochs": epochs,
            "faithful_run_seconds": faithful_run, "straightforward_run_seconds": straightforward_run,
            "epoch_ratio_vs_faithful": faithful_epoch / epoch_s,
            "run_ratio_vs_faithful": faithful_run / run_s, "run_ratio_vs_straightforward": straightforward_run / run_s}


def bench_eval(clip, text, items, device, amp, workers, cache, batch):
    pool = clip.region_pool().to(device)
    store = eval_store(clip, items, cache, "bench_eval_timing", batch, workers, device, amp)
    live_s = timed(lambda: evaluation.collect_logits(pool, text, live_batches(clip, items, eval_transform(clip.preprocess),
                                                                         batch, workers, device, amp),
                                                 device, amp, "live", numerics_of("float32")), device)[0]
    cached_s, cached = timed(lambda: evaluation.collect_logits(pool, text, store.batches(batch, device), device, amp,
                                                           "cached", numerics_of("float32")), device)
    return {"images": len(items), "recompute_seconds": live_s, "cached_seconds": cached_s,
            "ratio": live_s / cached_s}


class StandInTokenizer:
    """open_clip's simple tokenizer at the model's context length, ids folded into its
    vocabulary: the text tower's cost without its own tokenizer's files."""

    def __init__(self, backbone: str):
        text_cfg = open_clip.get_model_config(backbone)["text_cfg"]
        self.simple = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
        self.vocab = text_cfg.get("vocab_size", 49408)

    def __call__(self, texts):
        return self.simple(texts) % self.vocab


def text_tokens(backbone: str) -> str:
    """The model's own tokenizer, or (SigLIP's need Hugging Face files, not here offline) a
    stand-in for the sweep's text encoding: cost is measured, not accuracy; said in the output."""
    try:
        clip_weights.tokenizer_for(backbone)
        return "the model's own"
    except RaftError as exc:
        clip_backbone.tokenizer_for = lambda name, weights=None: StandInTokenizer(name)
        clip_weights.tokenizer_packages = lambda name: []   # the stand-in needs no package
        return f"a stand-in (same context length and vocabulary): {exc}"


def bench_sweep(args, data_root, work, device):
    out = {}
    for cached in (False, True):
        cache = work / f"sweep_cache_{cached}"
        total, evals = 0.0, 0.0
        for seed in (1, 2, 3):
            cfg = build_config(None, {
                "dataset": "demo", "data_path": str(data_root), "backbone": args.backbone, "weights": None,
                "shots": args.shots, "seed": seed, "train_epoch": args.sweep_epochs, "warmup_epoch": 0,
                "batch_size": args.batch, "eval_batch_size": args.batch, "num_workers": args.workers,
                "device": str(device), "feature_cache": cached, "cache_dir": str(cache),
                "output_dir": str(work / f"sweep_out_{cached}"), "descriptions": None})
            flags = argparse.Namespace(eval_only=False, checkpoint=None, force=True, debug=False)
            with contextlib.redirect_stdout(io.StringIO()):  # the runs' own logs
                seconds, results = timed(lambda: engine.run(cfg, flags, read_coop_dataset("demo", data_root)), device)
            total += seconds
            evals += results["eval_seconds"]
        out["cached" if cached else "uncached"] = {"total_seconds": total, "eval_seconds": evals}
    out["eval_ratio"] = out["uncached"]["eval_seconds"] / out["cached"]["eval_seconds"]
    out["total_ratio"] = out["uncached"]["total_seconds"] / out["cached"]["total_seconds"]
    return out


def main(argv: list[str] | None = None):
    parser = ToolParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to measure")
    parser.add_argument("--backbone", default="RN50", help="any backbone (random weights: cost does not depend on them)")
    parser.add_argument("--classes", type=bounded(int, 2, 1_000), default=4, help="classes of the synthetic dataset")
    parser.add_argument("--shots", type=bounded(int, 1, 256), default=8, help="training images per class")
    parser.add_argument("--eval-per-class", type=bounded(int, 1, 1_000), default=8, help="val and test images per class")
    parser.add_argument("--batch", type=bounded(int, 1, 4_096), default=32, help="batch size")
    parser.add_argument("--epochs", type=bounded(int, 1, 1_000), default=50, help="epochs of a 'run' in part 4")
    parser.add_argument("--sweep-epochs", type=bounded(int, 1, 1_000), default=1,
                        help="training epochs per sweep run in part 3")
    parser.add_argument("--workers", type=bounded(int, 0, 64), default=2, help="decoding workers")
    parser.add_argument("--reps", type=bounded(int, 1, 100), default=7, help="repetitions of the pool timing")
    parser.add_argument("--image-size", type=bounded(int, 16, 4_096), default=320, help="side of the synthetic JPEGs")
    parser.add_argument("--work", default=None, help="folder for the dataset and caches (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--quick", action="store_true", help="small settings for a first look")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.shots, args.eval_per_class, args.epochs, args.reps = 2, 8, 4, 10, 3
    device = torch.device(args.device)
    amp = device.type == "cuda"
    work = Path(args.work or tempfile.mkdtemp(prefix="raft_bench_"))
    data_root = work / "data"
    ensure_demo_dataset(data_root, per_split=(args.shots, args.eval_per_class, args.eval_per_class),
                        size=args.image_size, num_classes=args.classes)
    data = read_coop_dataset("demo", data_root)
    items = few_shot(data.train, args.shots, 1, data.num_classes)
    cfg = build_config(None, {"dataset": "demo", "data_path": str(data_root), "backbone": args.backbone,
                              "train_epoch": 1, "warmup_epoch": 0, "batch_size": args.batch})
    clip = FrozenCLIP(load_open_clip(args.backbone, None), args.backbone).to(device)
    plain = load_open_clip(args.backbone, None).to(device).eval()
    for p in plain.parameters():
        p.requires_grad_(False)
    text = torch.nn.functional.normalize(torch.randn(clip.embed_dim, data.num_classes + 1, device=device), dim=0)
    tokens = text_tokens(args.backbone)
    machine = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "platform": platform.platform(),
               "backbone": args.backbone, "train_images": len(items), "eval_images": len(data.test),
               "batch": args.batch, "tokenizer": tokens}
    print(f"machine: {machine}")
    results = {"machine": machine}

    results["pool"] = r = bench_pool(clip, device, args.batch, args.reps)
    print(f"\n[1] region pool fwd+bwd, batch {args.batch}: folded {r['seconds']['folded'] * 1e3:.1f} ms vs "
          f"all-token {r['seconds']['all-token'] * 1e3:.1f} ms  -> time ratio {r['time_ratio']:.1f}x; "
          f"FLOPs/image {r['gflops_per_image']['folded']:.3f} vs {r['gflops_per_image']['all-token']:.3f} G "
          f"-> FLOP ratio {r['flop_ratio']:.1f}x")

    results["epoch"], _ = bench_epoch(clip, plain, text, items, cfg, device, amp, args.workers)
    e = results["epoch"]
    print(f"[2] one training epoch ({len(items)} images): faithful {e['faithful']['epoch_seconds']:.2f}s "
          f"(trunk {100 * e['faithful']['trunk_share']:.0f}%) vs straightforward "
          f"{e['straightforward']['epoch_seconds']:.2f}s (trunk {100 * e['straightforward']['trunk_share']:.0f}%) "
          f"-> {e['epoch_ratio']:.2f}x; one-time decode {e['faithful']['decode_once_seconds']:.2f}s")
    print(f"    device idle: {100 * e['faithful']['device_idle_share']:.0f}% of the faithful epoch vs "
          f"{100 * e['straightforward']['device_idle_share']:.0f}% straightforward "
          f"({'kernel time from the profiler' if device.type == 'cuda' else 'CPU: the share outside the trunk'}); "
          f"faithful step = {e['step_over_trunk']:.2f}x the trunk's forward on the same batch")

    results["sweep"] = s = bench_sweep(args, data_root, work, device)
    print(f"[3] 3-run sweep (faithful, {args.sweep_epochs} epoch(s) each): eval {s['uncached']['eval_seconds']:.1f}s "
          f"uncached vs {s['cached']['eval_seconds']:.1f}s cached -> {s['eval_ratio']:.1f}x; whole sweep "
          f"{s['uncached']['total_seconds']:.1f}s uncached vs {s['cached']['total_seconds']:.1f}s cached "
          f"-> {s['total_ratio']:.2f}x")

    results["views"] = v = bench_views(clip, text, items, cfg, device, amp, args.workers, work / "views_cache",
                                       args.epochs, e["straightforward"]["epoch_seconds"],
                                       e["faithful"]["epoch_seconds"], e["faithful"]["decode_once_seconds"])
    print(f"[4] train_views 10: epoch {v['epoch_seconds']:.3f}s ({v['epoch_ratio_vs_faithful']:.1f}x faster than "
          f"faithful); {v['epochs']}-epoch run {v['run_seconds']:.1f}s (views built in {v['build_views_seconds']:.1f}s) "
          f"vs faithful {v['faithful_run_seconds']:.1f}s ({v['run_ratio_vs_faithful']:.1f}x) vs straightforward "
          f"{v['straightforward_run_seconds']:.1f}s ({v['run_ratio_vs_straightforward']:.1f}x)")
    print("    (faithful and straightforward runs = decode + epochs × the measured epoch of part 2)")
    results["augment"] = a = bench_augment(clip, text, items, cfg, device, amp, args.workers)
    print(f"[5] augment: published (PIL from full resolution, every epoch) {a['epoch_seconds']['published']:.2f}s vs "
          f"batched {a['epoch_seconds']['batched']:.2f}s per epoch -> {a['ratio']:.2f}x; same crops differ by "
          f"{a['pixels']['mean']:.2f} grey levels on average (99th percentile {a['pixels']['p99']:.1f}, max "
          f"{a['pixels']['max']:.0f}; {a['pixels']['crops']} crops)")
    results["eval"] = ev = bench_eval(clip, text, data.test, device, amp, args.workers, work / "eval_cache", args.batch)
    print(f"    repeated evaluation of {ev['images']} test images: recompute {ev['recompute_seconds']:.2f}s vs "
          f"cached {ev['cached_seconds']:.3f}s -> {ev['ratio']:.0f}x")
    results["methods"] = mm = bench_methods(clip, text, data.classnames, cfg, device, amp, args.batch, args.reps)
    print(f"[6] one training step, batch {mm['batch']}, {mm['classes']} classes: RAFT {mm['raft']['step_seconds'] * 1e3:.1f} ms "
          f"(trunk {100 * mm['raft']['trunk_share']:.0f}%) vs CoOp {mm['coop']['step_seconds'] * 1e3:.1f} ms (trunk "
          f"{100 * mm['coop']['trunk_share']:.0f}%; its text encoder runs once per class) -> CoOp/RAFT "
          f"{mm['coop_over_raft']:.2f}x" + ("" if device.type != "cuda" else
                                           f"; peak GPU memory RAFT {mm['raft']['peak_gpu_mb']:.0f} MiB, CoOp "
                                           f"{mm['coop']['peak_gpu_mb']:.0f} MiB"))
    if device.type == "cuda":
        results["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        print(f"    peak GPU memory allocated: {results['peak_gpu_mb']:.0f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwork folder: {work}")


if __name__ == "__main__":
    sys.exit(run_main(main))
