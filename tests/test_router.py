"""router.py: Eq. 3 softmax axis, ε-greedy top-k, Eq. 4 mixing, masks, baselines."""

import pytest
import torch

from router import MoSRouter, RouterConfig, fixed_routing, mix_states, route

B, L, n, m = 3, 5, 4, 7


def test_softmax_is_over_the_m_axis_and_weights_are_the_softmax_values():
    logits = torch.randn(B, L, n, m)
    idx, w = route(logits, k=2, eps=0.0)
    probs = logits.softmax(-1)
    assert torch.allclose(probs.sum(-1), torch.ones(B, L, n))  # sums to 1 over m, per (b, token, block)
    assert idx.shape == w.shape == (B, L, n, 2)
    assert torch.allclose(w, probs.gather(-1, idx))  # not renormalised (Eq. 4)
    assert (w.sum(-1) <= 1 + 1e-6).all()


@pytest.mark.parametrize("eps", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_distinct_indices(eps, k):
    idx, w = route(torch.randn(B, L, n, m), k=k, eps=eps, generator=torch.Generator().manual_seed(0))
    assert idx.shape == (B, L, n, k)
    assert ((idx >= 0) & (idx < m)).all()
    srt = idx.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()  # distinct within every (sample, token, block)


def test_eps_zero_is_topk_and_deterministic():
    logits = torch.randn(B, L, n, m)
    idx1, w1 = route(logits, k=2, eps=0.0)
    idx2, w2 = route(logits, k=2, eps=0.0)
    ref = logits.softmax(-1).topk(2, -1)
    assert torch.equal(idx1, ref.indices) and torch.equal(idx1, idx2) and torch.equal(w1, w2)
    assert torch.allclose(w1, ref.values)


def test_eps_one_is_uniform_over_layers():
    # Logits strongly favour layer 0; with ε = 1 that must not matter at all.
    logits = torch.zeros(2000, 1, n, m)
    logits[..., 0] = 10.0
    idx, _ = route(logits, k=2, eps=1.0, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(idx.flatten(), minlength=m).float()  # 2000·4·2 = 16000 picks
    freq = counts / counts.sum()
    # Expected 1/7 ≈ 0.1429 each; the std of one frequency is ≈ 0.003, so ±0.012 is 4σ.
    assert (freq - 1 / m).abs().max() < 0.012, freq


def test_eps_fraction_of_explored_positions():
    logits = torch.zeros(4000, 1, n, m)
    logits[..., 0], logits[..., 1] = 10.0, 9.0  # top-2 is {0, 1}
    idx, _ = route(logits, k=2, eps=0.25, generator=torch.Generator().manual_seed(2))
    not_top = (idx.sort(-1).values != torch.tensor([0, 1])).any(-1).float().mean()
    # Explored positions draw {0,1} again with prob 1/C(7,2) = 1/21 → 0.25·20/21 ≈ 0.238.
    assert abs(not_top.item() - 0.25 * 20 / 21) < 0.01


def test_mix_states_equals_explicit_loop_over_eq4():
    states = torch.randn(B, L, m, 16)
    idx, w = route(torch.randn(B, L, n, m), k=2, eps=0.5, generator=torch.Generator().manual_seed(3))
    for j in range(n):
        got = mix_states(states, idx[:, :, j], w[:, :, j])
        ref = torch.zeros(B, L, 16)
        for b in range(B):
            for tok in range(L):
                for s in range(2):
                    ref[b, tok] += w[b, tok, j, s] * states[b, tok, idx[b, tok, j, s]]
        assert torch.allclose(got, ref, atol=1e-6)


def make_router(mode="mos", inputs="prompt+latent+t", m=m, n=n, und_dim=24, gen_dim=40):
    torch.manual_seed(0)
    cfg = RouterConfig(dim=32, heads=4, mode=mode, inputs=inputs)
    return MoSRouter(cfg, und_dim=und_dim, num_states=m, gen_dim=gen_dim, num_blocks=n)


def router_inputs(und_dim=24, gen_dim=40, N=9):
    torch.manual_seed(1)
    return torch.rand(B), torch.randn(B, N, gen_dim), torch.randn(B, L, und_dim), torch.ones(B, L, dtype=torch.bool)


def test_router_logit_shape_and_gradient_reaches_every_parameter():
    r = make_router()
    t, z, c, mask = router_inputs()
    logits = r(t, z, c, mask)
    assert logits.shape == (B, L, n, m)
    idx, w = r.select(logits, eps=0.05)
    w.sum().backward()  # gradient flows only through the selected softmax weights
    for name, p in r.named_parameters():
        if name.startswith("type_embed"):
            continue  # rows for absent segments ([CLS]) get no gradient by design
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_padding_tokens_do_not_change_real_tokens():
    r = make_router()
    t, z, c, mask = router_inputs()
    ref = r(t, z, c, mask)
    pad = torch.randn(B, 3, c.shape[-1]) * 100  # garbage in the padding slots
    c2 = torch.cat([c, pad], 1)
    mask2 = torch.cat([mask, torch.zeros(B, 3, dtype=torch.bool)], 1)
    got = r(t, z, c2, mask2)
    assert torch.allclose(got[:, :L], ref, atol=1e-5)


def test_asymmetric_towers():
    # m != n and D_u != D_g != D_r
    r = make_router(m=29, n=6, und_dim=48, gen_dim=80)
    t, z, c, mask = router_inputs(und_dim=48, gen_dim=80)
    logits = r(t, z, c, mask)
    assert logits.shape == (B, L, 6, 29)
    idx, w = r.select(logits, eps=0.0)
    assert idx.shape == (B, L, 6, 2) and idx.max() < 29


def test_router_depends_on_t_and_latent_only_when_asked():
    t, z, c, mask = router_inputs()
    t2, z2 = torch.rand(B), torch.randn_like(z)
    full = make_router(inputs="prompt+latent+t")
    assert not torch.allclose(full(t, z, c, mask), full(t2, z, c, mask))  # timestep-dependent
    assert not torch.allclose(full(t, z, c, mask), full(t, z2, c, mask))  # latent-dependent
    pl = make_router(inputs="prompt+latent")
    assert torch.allclose(pl(t, z, c, mask), pl(t2, z, c, mask))
    assert not torch.allclose(pl(t, z, c, mask), pl(t, z2, c, mask))
    p = make_router(inputs="prompt")
    assert torch.allclose(p(t, z, c, mask), p(t2, z2, c, mask))


def test_sample_wise_router_shares_one_matrix_per_prompt():
    r = make_router(mode="sample")
    t, z, c, mask = router_inputs()
    logits = r(t, z, c, mask)
    assert logits.shape == (B, L, n, m)
    assert torch.equal(logits, logits[:, :1].expand_as(logits))
    idx, w = r.select(logits, eps=1.0)  # even exploration is drawn once per sample
    assert torch.equal(idx, idx[:, :1].expand_as(idx))


def test_static_learned_mix_is_one_matrix_for_every_input_and_learns():
    """mode="static": one learned (n, m) logit matrix, whatever the prompt, token, t or z_t."""
    r = make_router(mode="static")
    assert [name for name, _ in r.named_parameters()] == ["static_logits"]  # no network, no inputs
    t, z, c, mask = router_inputs()
    logits = r(t, z, c, mask)
    assert logits.shape == (B, L, n, m)
    assert torch.equal(logits, r.static_logits.expand(B, L, n, m))  # every sample and token alike
    assert torch.equal(r(torch.rand(B), torch.randn_like(z), torch.randn_like(c), mask), logits)
    assert logits[0, 0].std() > 0  # not all-tied: top-k starts from a varied choice
    idx, w = r.select(logits, eps=0.0)
    assert torch.equal(idx, idx[:1, :1].expand_as(idx))  # without exploration, one choice for all
    idx, w = r.select(logits, eps=1.0)
    assert not torch.equal(idx, idx[:1, :1].expand_as(idx))  # exploration is still per token
    w.sum().backward()
    assert r.static_logits.grad.abs().sum() > 0  # learned through the selected weights


def test_static_baselines():
    idx, w = fixed_routing("last", B, L, n, m)
    assert idx.shape == (B, L, n, 1) and (idx == m - 1).all() and (w == 1).all()
    idx, _ = fixed_routing("hand", B, L, n, m)
    layers = idx[0, 0, :, 0].tolist()
    assert layers == [1, 3, 4, 6]  # evenly spaced from layer 1 to layer m-1 = 6
    assert layers == sorted(layers) and (idx == idx[:1, :1]).all()


def test_bad_config_and_bad_k_raise_clear_errors():
    with pytest.raises(ValueError, match="router mode"):
        RouterConfig(mode="attention")
    with pytest.raises(ValueError, match="router inputs"):
        RouterConfig(inputs="latent")
    with pytest.raises(ValueError, match="cannot select k=8 of m=7"):
        route(torch.randn(1, 1, 1, 7), k=8)
