"""RegionAttentionPool: sizes, initialisation (doc/method.md §2), agreement with full attention."""
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d

from clip.region_pool import RegionAttentionPool, all_token_forward

# (grid, E, heads, D): RN50 at 224 px, and tiny sizes
SIZES = [(7, 2048, 32, 1024), (3, 256, 4, 64)]


def make_attnpool(grid, e, heads, d, seed=0):
    torch.manual_seed(seed)
    pool = AttentionPool2d(grid, e, heads, d)
    for lin in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):  # CLIP's init scale
        torch.nn.init.normal_(lin.weight, std=e ** -0.5)
        torch.nn.init.normal_(lin.bias, std=0.02)
    return pool.eval()


@pytest.mark.parametrize("grid,e,heads,d", SIZES)
def test_shapes_and_sizes_come_from_the_attnpool(grid, e, heads, d):
    clip_pool = make_attnpool(grid, e, heads, d)
    pool = RegionAttentionPool(clip_pool)
    assert (pool.num_heads, pool.feature_channels, pool.embed_dim) == (heads, e, d)
    assert pool.positional_embedding.shape == (grid * grid + 2, e)
    v_cls, v_bg = pool(torch.randn(3, e, grid, grid))
    assert v_cls.shape == v_bg.shape == (3, d)


def test_positional_row_zero_is_duplicated_and_weights_copied():
    clip_pool = make_attnpool(3, 256, 4, 64)
    pool = RegionAttentionPool(clip_pool)
    pos, ref = pool.positional_embedding.detach(), clip_pool.positional_embedding.detach()
    assert torch.equal(pos[0], ref[0]) and torch.equal(pos[1], ref[0])
    assert torch.equal(pos[2:], ref[1:])
    for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
        mine, theirs = getattr(pool, name), getattr(clip_pool, name)
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
        assert mine.weight.data_ptr() != theirs.weight.data_ptr()  # a copy, not shared


def test_every_parameter_trains_including_positional_embedding():
    clip_pool = make_attnpool(3, 256, 4, 64)
    for p in clip_pool.parameters():
        p.requires_grad_(False)
    pool = RegionAttentionPool(clip_pool)
    names = {n for n, p in pool.named_parameters() if p.requires_grad}
    assert "positional_embedding" in names and len(names) == len(list(pool.parameters())) == 9


def test_summary_tokens_are_identical_at_init_then_diverge_through_position_rows():
    clip_pool = make_attnpool(3, 256, 4, 64)
    pool = RegionAttentionPool(clip_pool).double()
    fmap = torch.randn(4, 256, 3, 3, dtype=torch.float64)
    v_cls, v_bg = pool(fmap)
    assert torch.allclose(v_cls, v_bg, rtol=0, atol=1e-12)
    # different losses on the two tokens give their positional rows different gradients
    (v_cls.sum() - 2 * v_bg.pow(2).sum()).backward()
    g = pool.positional_embedding.grad
    assert not torch.allclose(g[0], g[1])


@pytest.mark.parametrize("grid,e,heads,d", SIZES)
@pytest.mark.parametrize("mask", [False, True])
def test_two_query_pool_matches_all_token_attention(grid, e, heads, d, mask):
    clip_pool = make_attnpool(grid, e, heads, d)
    pool = RegionAttentionPool(clip_pool, mask_bg_in_cls=mask).double()
    with torch.no_grad():  # make the two summary rows differ, as after training
        pool.positional_embedding[1] += 0.3 * torch.randn(e, dtype=torch.float64)
    fmap = torch.randn(2, e, grid, grid, dtype=torch.float64)
    ours = pool(fmap)
    ref = all_token_forward(pool, fmap)
    for a, b in zip(ours, ref):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


def test_init_is_close_to_clip_and_the_mask_makes_it_exact():
    clip_pool = make_attnpool(3, 256, 4, 64).double()
    fmap = torch.randn(5, 256, 3, 3, dtype=torch.float64)
    v0 = clip_pool(fmap)
    v_cls, _ = RegionAttentionPool(clip_pool)(fmap)
    assert not torch.allclose(v_cls, v0, atol=1e-9)            # the doubled mean key shifts it
    assert torch.nn.functional.cosine_similarity(v_cls, v0).min() > 0.9
    v_cls_masked, _ = RegionAttentionPool(clip_pool, mask_bg_in_cls=True)(fmap)
    assert torch.allclose(v_cls_masked, v0, rtol=1e-10, atol=1e-10)


def test_built_from_a_real_open_clip_model(tiny_clip):
    pool = RegionAttentionPool(tiny_clip.attnpool, mask_bg_in_cls=True)
    images = torch.randn(2, 3, tiny_clip.image_size, tiny_clip.image_size)
    fmap, v0 = tiny_clip.encode_image(images)
    assert fmap.shape == (2, tiny_clip.feature_channels, tiny_clip.grid, tiny_clip.grid)
    assert torch.allclose(pool(fmap)[0], v0, atol=1e-5)
    assert torch.allclose(v0, tiny_clip.model.encode_image(images), atol=1e-5)  # one trunk pass = CLIP's feature


def max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("grid,e,heads,d", SIZES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_folded_pool_matches_full_attention_outputs_and_every_gradient(grid, e, heads, d, dtype):
    clip_pool = make_attnpool(grid, e, heads, d, seed=3)
    ours = RegionAttentionPool(clip_pool).to(dtype)
    with torch.no_grad():
        ours.positional_embedding[1] += 0.5 * torch.randn(e, dtype=dtype)
    ref = RegionAttentionPool(clip_pool).to(dtype)
    ref.load_state_dict(ours.state_dict())
    torch.manual_seed(4)
    fmap = torch.randn(4 if e > 1000 else 8, e, grid, grid, dtype=dtype).relu()
    weights = torch.randn(2, fmap.shape[0], d, dtype=dtype)
    outs = []
    for pool, fn in ((ours, lambda: ours(fmap)), (ref, lambda: all_token_forward(ref, fmap))):
        v_cls, v_bg = fn()
        ((v_cls * weights[0]).sum() + (v_bg * weights[1]).pow(2).sum()).backward()
        outs.append((v_cls.detach(), v_bg.detach(), dict(pool.named_parameters())))
    tol = 1e-4
    assert max_rel(outs[0][0], outs[1][0]) <= tol and max_rel(outs[0][1], outs[1][1]) <= tol
    largest = max(p.grad.abs().max() for p in outs[1][2].values())
    for name, p_ref in outs[1][2].items():
        g, g_ref = outs[0][2][name].grad, p_ref.grad
        if name == "k_proj.bias":   # provably zero: softmax cancels it, in both computations
            assert g.abs().max() <= 1e-5 * largest and g_ref.abs().max() <= 1e-5 * largest
        else:
            assert max_rel(g, g_ref) <= tol, name


@pytest.mark.parametrize("grid,e,heads,d", SIZES)
def test_clip_pooled_feature_queried_for_its_class_token_only(grid, e, heads, d):
    from clip.region_pool import clip_pool_forward
    clip_pool = make_attnpool(grid, e, heads, d).double()
    fmap = torch.randn(3, e, grid, grid, dtype=torch.float64).relu()
    assert torch.allclose(clip_pool_forward(clip_pool, fmap), clip_pool(fmap), rtol=1e-10, atol=1e-10)


def test_fused_trunk_computes_the_original_trunk(tiny_clip):
    v = tiny_clip.model.visual
    images = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = v.layer4(v.layer3(v.layer2(v.layer1(v.stem(images)))))
    assert torch.allclose(tiny_clip.trunk(images), ref, rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_clip._fast_trunk.modules())
