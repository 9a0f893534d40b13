"""gen_tower.py: the context-KV block equals concat-run-drop, RoPE, patches, MoS forward, codecs."""

import pytest
import torch

from gen_tower import (
    GenBlock, GenConfig, ModelConfig, MoS, PixelCodec, WanVAECodec, apply_rope, check_size, patchify,
    rope_2d, unpatchify,
)
from router import RouterConfig


def tiny_cfg(mode="mos", m=7, und_dim=24, depth=3, dim=32):
    return ModelConfig(und_states=m, und_dim=und_dim, gen=GenConfig(dim=dim, depth=depth, heads=2, patch_size=2),
                       router=RouterConfig(dim=16, heads=2, mode=mode))


def test_patchify_roundtrip():
    x = torch.randn(2, 3, 8, 12)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 24, 12)
    assert torch.equal(tokens[0, 1], x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))  # row-major grid
    assert torch.equal(unpatchify(tokens, 2, 8, 12), x)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_2d(6, 6, 16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    q_all, k_all = q.expand(1, 36, 1, 16), k.expand(1, 36, 1, 16)
    qr, kr = apply_rope(q_all, cos, sin)[0, :, 0], apply_rope(k_all, cos, sin)[0, :, 0]  # (36, 16)
    pos = lambda r, c: r * 6 + c
    # same (Δrow, Δcol) = (1, 2) at two places in the grid → same score
    s1 = qr[pos(0, 0)] @ kr[pos(1, 2)]
    s2 = qr[pos(3, 1)] @ kr[pos(4, 3)]
    assert torch.allclose(s1, s2, atol=1e-5)
    assert torch.allclose(qr.norm(dim=-1), q.norm().expand(36), atol=1e-5)  # a rotation


@pytest.mark.parametrize("L", [1, 6])
def test_efficient_block_equals_naive_concat_run_drop(L):
    torch.manual_seed(0)
    cfg = GenConfig(dim=32, heads=4, depth=1)
    block = GenBlock(cfg)
    for p in block.parameters():  # non-trivial norm gains so modality norms matter
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    R, gh, gw = 4, 3, 5
    x = torch.randn(2, R + gh * gw, 32)
    ctx = torch.randn(2, L, 32) * 3
    mask = torch.ones(2, L, dtype=torch.bool)
    mask[1, L // 2 + 1:] = False
    rope = rope_2d(gh, gw, 8)
    fast = block(x, ctx, mask, rope, R)
    naive = block.forward_naive(x, ctx, mask, rope, R)
    assert (fast - naive).abs().max() <= 1e-5


def test_mos_forward_shapes_zero_init_and_routing_outputs():
    cfg = tiny_cfg()
    model = MoS(cfg, in_channels=3)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    S, mask = torch.randn(2, 5, 7, 24), torch.ones(2, 5, dtype=torch.bool)
    v = model(x, t, S, mask)
    assert v.shape == x.shape
    assert torch.equal(v, torch.zeros_like(v))  # zero-initialised head: v̂ = 0 at step 0
    idx, w, logits = model.routing(t, model.gen.embed(x), S, mask)
    assert idx.shape == w.shape == (2, 5, 3, 2) and logits.shape == (2, 5, 3, 7)


def trained_ish(cfg):
    torch.manual_seed(0)
    model = MoS(cfg, in_channels=3)
    torch.nn.init.normal_(model.gen.head.weight, std=0.1)  # make the output non-trivial
    return model


def test_projected_states_path_equals_paper_order():
    model = trained_ish(tiny_cfg())
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    S, mask = torch.randn(2, 5, 7, 24), torch.ones(2, 5, dtype=torch.bool)
    a = model(x, t, S, mask)
    b = model(x, t, S, mask, projected=model.project_states(S))
    assert torch.allclose(a, b, atol=1e-5)


def test_padding_does_not_change_the_prediction():
    model = trained_ish(tiny_cfg())
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    S, mask = torch.randn(2, 5, 7, 24), torch.ones(2, 5, dtype=torch.bool)
    S2 = torch.cat([S, 50 * torch.randn(2, 4, 7, 24)], 1)
    mask2 = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], 1)
    assert torch.allclose(model(x, t, S, mask), model(x, t, S2, mask2), atol=1e-5)


@pytest.mark.parametrize("mode", ["mos", "sample", "last", "hand", "static"])
def test_routing_draws_made_beforehand_give_the_same_choices(mode):
    """MoS.routing_draws (what train.py hands a compiled forward) draws exactly what routing would
    draw inside from the same per-sample generators: same routes, same prediction."""
    from train import sample_generators

    model = trained_ish(tiny_cfg(mode=mode, m=5, und_dim=20, depth=4))
    x, t = torch.randn(3, 3, 8, 8), torch.rand(3)
    S, mask = torch.randn(3, 6, 5, 20), torch.ones(3, 6, dtype=torch.bool)
    model.cfg.router.eps = 0.5  # explore often, so a mismatch in the draws would show in the indices
    tokens = model.gen.embed(x)
    # Reference: route() drawing inside from the same per-sample generators.
    logits = None if mode in ("last", "hand") else model.router(t, tokens, S[:, :, 0], mask)
    inside = (model.routing(t, tokens, S, mask)[0] if logits is None else
              model.router.select(logits, 0.5, sample_generators(0, 7, range(3)))[0])
    draws = model.routing_draws(3, 6, sample_generators(0, 7, range(3)))
    before = model.routing(t, tokens, S, mask, draws)[0]
    assert torch.equal(inside, before)
    if mode in ("last", "hand"):
        assert draws is None  # static routing draws nothing
    else:
        assert draws.shape == (3, 1 if mode == "sample" else 6, 4, 6)  # (B, L|1, n, m+1)
        greedy = model.routing(t, tokens, S, mask)[0]
        assert not torch.equal(greedy, before)  # the draws do matter here...
        assert torch.equal(model(x, t, S, mask, draws), model(x, t, S, mask, draws))  # ...and fix the forward
        model.cfg.router.eps = 0.0
        assert model.routing_draws(3, 6, None) is None  # ε = 0: top-k only
        model.cfg.router.eps = 0.5
        with pytest.raises(ValueError, match="precomputed routing draws have shape"):
            model(x[:2], t[:2], S[:2], mask[:2], draws)  # draws made for a batch of 3


@pytest.mark.parametrize("mode", ["mos", "sample", "last", "hand", "static"])
def test_every_routing_mode_trains(mode):
    model = trained_ish(tiny_cfg(mode=mode, m=5, und_dim=20, depth=4))  # asymmetric: m=5, n=4
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    S, mask = torch.randn(2, 3, 5, 20), torch.ones(2, 3, dtype=torch.bool)
    loss = model(x, t, S, mask, model.routing_draws(*mask.shape)).pow(2).mean()
    loss.backward()
    assert model.gen.ctx_proj.weight.grad.abs().sum() > 0
    if mode in ("mos", "sample"):
        assert model.router.head.weight.grad.abs().sum() > 0  # gradient reaches the router
        # ...and through it the shared patch embedding gets the router's gradient too
    if mode == "static":
        assert model.router.static_logits.grad.abs().sum() > 0  # the learned mix learns


def test_generation_tower_has_no_timestep_input():
    # t only reaches G through the router: with static routing, t must not matter at all.
    model = trained_ish(tiny_cfg(mode="last"))
    x, S, mask = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 7, 24), torch.ones(2, 5, dtype=torch.bool)
    assert torch.equal(model(x, torch.zeros(2), S, mask), model(x, torch.ones(2), S, mask))


def test_size_checks_are_readable():
    check_size(32, "pixel", 2)
    check_size(512, "wan2.2", 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        check_size(500, "wan2.2", 2)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        MoS(tiny_cfg(), 3).gen.embed(torch.randn(1, 3, 7, 8))


def test_pixel_codec_is_identity_with_clamp():
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    c = PixelCodec()
    assert torch.equal(c.decode(c.encode(x)), x)
    assert c.decode(torch.full((1, 3, 2, 2), 5.0)).max() == 1


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    # The Wan 2.2 layout (residual, 2×2 patchify inside the VAE, 12 channels after it) at a
    # toy width. Spatial factor = 2 (patchify) · 2^3 (three downsamples) = 16, as the real one.
    z = 4
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2,
        in_channels=12, out_channels=12, scale_factor_spatial=16,
        latents_mean=[0.5, -0.2, 0.1, 0.0], latents_std=[2.0, 1.5, 0.5, 1.0],
    )


def test_wan_vae_codec_shapes_and_latent_normalisation():
    codec = WanVAECodec(tiny_wan_vae())
    assert codec.channels == 4 and codec.factor == 16
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (1, 4, 2, 3)
    # normalisation round trip: decode undoes exactly the encode's (z - mean) / std
    raw = codec.vae.encode(x.unsqueeze(2)).latent_dist.mode().squeeze(2)
    assert torch.allclose(z * codec.std + codec.mean, raw, atol=1e-5)
    img = codec.decode(z)
    assert img.shape == x.shape and img.abs().max() <= 1
    assert not any(p.requires_grad for p in codec.parameters())


def test_x_prediction_returns_the_velocity_of_the_predicted_clean_image():
    cfg = tiny_cfg()
    cfg.gen.prediction = "x"
    model = trained_ish(cfg)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.01])
    S, mask = torch.randn(2, 5, 7, 24), torch.ones(2, 5, dtype=torch.bool)
    v = model(x, t, S, mask)
    cfg.gen.prediction = "v"
    x0_hat = model(x, t, S, mask)  # the same head output, read as ẑ0
    t_used = t.clamp(min=cfg.gen.t_min).view(2, 1, 1, 1)  # t = 0.01 is floored at t_min
    assert torch.allclose(v, (x - x0_hat) / t_used, atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        GenConfig(prediction="eps")
