"""How much of the region pool one float16 AdamW step leaves unchanged (pool_precision: float16_published).

    python bench/first_step_never_moved.py                     # RN50 sizes, random weights, CPU
    python bench/first_step_never_moved.py --backbone ViT-B-16 --lrs 1e-4 1e-5

The published code trains float16 weights in place; an update smaller than half a float16
step rounds away. This builds the real pool of a randomly initialised backbone (sizes as the
real one), feeds it random trunk features of that backbone's shape, computes the reference
loss against a random text classifier, and takes one AdamW step per learning rate from the
same start. It prints, per learning rate, the share of pool entries that did not move
(overall and per tensor). Random features give random-sized gradients: the shares describe
this setting, not a trained run (doc/method.md, Numerics, has the runs). On CPU, where
float16 matrix products are emulated, RN50's three steps take about six minutes.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clip.backbone import FrozenCLIP, load_open_clip  # noqa: E402
from clip.published import PublishedNumerics, make_region_pool, never_moved  # noqa: E402
from clip.loss import published_loss  # noqa: E402
from utils import ToolParser, bounded, run_main  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = ToolParser(description=__doc__)
    parser.add_argument("--backbone", default="RN50", help="backbone whose pool is stepped (random weights)")
    parser.add_argument("--lrs", type=bounded(float, 1e-12, 10), nargs="+", default=[1e-4, 1e-5, 1e-6],
                        help="learning rates, one step each from the same start")
    parser.add_argument("--batch", type=bounded(int, 1, 4_096), default=32, help="batch size")
    parser.add_argument("--classes", type=bounded(int, 1, 100_000), default=100, help="classes of the random text classifier")
    parser.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0, help="seed of the random features")
    args = parser.parse_args(argv)

    clip = FrozenCLIP(load_open_clip(args.backbone, None), args.backbone)
    gen = torch.Generator().manual_seed(args.seed)
    features = torch.randn(args.batch, *clip.feature_shape, generator=gen)   # the trunk's output shape
    with torch.no_grad():
        v0 = clip.pooled(features).half()                                      # CLIP's own pool on them
    text = torch.nn.functional.normalize(torch.randn(clip.embed_dim, args.classes + 1, generator=gen), dim=0)
    labels = torch.randint(args.classes, (args.batch,), generator=gen)
    start = make_region_pool(clip, False, "float16_published").state_dict()
    print(f"{args.backbone} (random weights): trunk features {tuple(clip.feature_shape)}, batch {args.batch}, "
          f"{args.classes} classes; share of pool entries one float16 AdamW step leaves unchanged")
    for lr in args.lrs:
        pool = make_region_pool(clip, False, "float16_published")
        pool.load_state_dict(start)
        v_cls, v_bg = pool(features)
        loss, _ = published_loss(v_cls, v_bg, v0, text.half(), labels, tau1=2.0, tau2=3.0, lambda1=0.1, lambda2=0.5)
        params = [p for p in pool.parameters() if p.requires_grad]
        loss.backward()
        optimizer = PublishedNumerics().optimizer(params, lr=lr, eps=1e-4, weight_decay=0.01)
        optimizer.step()
        shares = never_moved(start, pool.state_dict())
        sizes = {k: v.numel() for k, v in start.items()}
        overall = sum(shares[k] * sizes[k] for k in shares) / sum(sizes.values())
        detail = ", ".join(f"{k} {100 * v:.1f}%" for k, v in shares.items())
        print(f"  lr {lr:g}: {100 * overall:.1f}% overall ({detail})")
        # float16's second moment: (1 - beta2)·g² underflows to 0 for |g| below about 6e-3, and such
        # an entry then moves by lr·g/eps (eps 1e-4), not by at most about lr
        grads = torch.cat([p.grad.flatten().float() for p in params])
        squares = torch.cat([optimizer.state[p]["exp_avg_sq"].flatten() for p in params])
        live = grads != 0
        underflow = (squares == 0) & live
        moved = torch.cat([(p.detach().float() - start_p.float()).flatten().abs()
                           for p, start_p in zip(params, (start[k] for k in pool.state_dict()))])
        print(f"    second moment underflowed to 0 for {100 * underflow.float().sum() / live.float().sum():.1f}% of the "
              f"entries with a gradient (largest such |g| {grads[underflow].abs().max().item() if underflow.any() else 0:.1e}); "
              f"largest move {moved.max().item() / lr:.1f}x lr")


if __name__ == "__main__":
    sys.exit(run_main(main))
