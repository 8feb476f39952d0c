"""How far pool_precision: float16_published lies from the published code's float16 steps.

    python bench/published_step.py                     # tiny-rn, 20 steps, batch 32 (seconds)
    python bench/published_step.py --backbone RN50 --steps 5 --batch 8   # minutes on a CPU

Trains the published pool (stated from its facts in tests/test_published_step.py) and this
project's float16_published pool on the same float16 inputs at a constant lr, step by step,
and prints after each of a few steps the share of entries that differ and the largest
difference, for the published operation order (this version) and for the all-token forward
on a transposed view (the version before it). Random weights and features: the sizes of the
differences describe this setting (doc/method.md, Numerics).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clip.backbone import FrozenCLIP, load_open_clip  # noqa: E402
from clip.published import PublishedNumerics, make_region_pool  # noqa: E402
from clip.region_pool import all_token_forward  # noqa: E402
from clip.loss import published_loss  # noqa: E402
from test_published_step import PublishedPool  # noqa: E402
from utils import ToolParser, bounded, run_main  # noqa: E402


def trained(make, forward, batches, text, lr):
    """The pool's tensors after each step (loss and AdamW as float16_published trains)."""
    pool, params = make()
    optimizer = PublishedNumerics().optimizer(params, lr, 1e-4, 0.01) if not isinstance(pool, PublishedPool) else \
        torch.optim.AdamW(pool.parameters(), lr=lr, eps=1e-4)
    states = []
    for fmap, v0, labels in batches:
        v_cls, v_bg = forward(pool, fmap)
        loss, _ = published_loss(v_cls, v_bg, v0, text, labels, tau1=2.0, tau2=3.0, lambda1=0.1, lambda2=0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sd = pool.state_dict() if not hasattr(pool, "pool") else pool.pool.state_dict()
        states.append({k: v.detach().clone() for k, v in sd.items()})
    return states


def main(argv: list[str] | None = None) -> int:
    parser = ToolParser(description=__doc__)
    parser.add_argument("--backbone", default="tiny-rn", help="a ResNet (default tiny-rn)")
    parser.add_argument("--steps", type=bounded(int, 1, 1000), default=20, help="training steps")
    parser.add_argument("--batch", type=bounded(int, 1, 1024), default=32, help="batch size")
    parser.add_argument("--lr", type=bounded(float, 1e-12, 1), default=1e-4, help="constant learning rate")
    args = parser.parse_args(argv)
    clip = FrozenCLIP(load_open_clip(args.backbone, None), args.backbone)
    gen = torch.Generator().manual_seed(0)
    classes = 37
    text = F.normalize(torch.randn(clip.embed_dim, classes + 1, generator=gen), dim=0).half()
    clip_pool = copy.deepcopy(clip.attnpool).half().eval()
    batches = []
    for _ in range(args.steps):
        fmap = torch.randn(args.batch, *clip.feature_shape, generator=gen).relu()
        with torch.no_grad():   # v0 as the published model computes it: CLIP's float16 attention pool
            v0 = clip_pool(fmap.half())
        batches.append((fmap.half(), v0, torch.randint(classes, (args.batch,), generator=gen)))

    def ours():
        pool = make_region_pool(clip, False, "float16_published")
        pool.train()
        return pool, [p for p in pool.parameters() if p.requires_grad]

    def published():
        pool = PublishedPool(clip.attnpool)
        return pool, list(pool.parameters())

    reference = trained(published, lambda p, f: p(f), batches, text, args.lr)
    shown = sorted({1, max(1, args.steps // 2), args.steps})
    print(f"{args.backbone}: {args.steps} float16 steps at lr {args.lr:g}, batch {args.batch}, against the published "
          f"step; per step shown: entries that differ, largest difference")
    for name, forward in (("published order (this version)", lambda p, f: p(f)),
                          ("all-token forward on a transposed view (before)",
                           lambda p, f: all_token_forward(p.pool, f.half()))):
        states = trained(ours, forward, batches, text, args.lr)
        cells = []
        for step in shown:
            a, b = states[step - 1], reference[step - 1]
            share = sum((a[k] != b[k]).sum().item() for k in a) / sum(v.numel() for v in a.values())
            most = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
            cells.append(f"step {step}: {100 * share:.1f}%, {most:.2g} ({most / args.lr:.0f}x lr)")
        print(f"  {name}: " + "; ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
