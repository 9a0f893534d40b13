"""The paper's scale without a download: presets, stages, the Wan 2.2 VAE path, the
latent cache, dynamic resolution, the --dry-run FLOPs share and self-CoT.

Paper Sec. 3.5 (stages, MoS-S / MoS-L), App. A (recipe), App. B.4 (producer–consumer), Sec. 4.4
(self-CoT). The full presets' towers are the real transformers / diffusers classes built from
tiny random configs (LlamaForCausalLM, PerceptionLM, InternVL, AutoencoderKLWan); sizes are
checked on the meta device. Preset sizes of the generation tower / router are pinned in
tests/test_train.py; this file adds the understanding towers and the rest of the recipe.
"""

import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import presets
import sizing
import train
from gen_tower import GenConfig, MoS, WanVAECodec, apply_rope, patchify, rope_2d, unpatchify
from router import RouterConfig
from test_und_tower import tiny_tower  # tiny random towers of the real classes (no network)
from und_tower import UnderstandingTower

#################################################################################
#                   Tiny random towers and VAE of the real classes              #
#################################################################################


def tiny_wan_vae(z_dim: int = 48):
    """AutoencoderKLWan in the Wan 2.2 layout (residual, 2×2 patchify inside, 12 channels after
    it, three downsamples: ×16 in all) with the real 48 latent channels, at width 8."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_spatial=16, latents_mean=(torch.randn(z_dim, generator=g) * 0.3).tolist(),
        latents_std=(torch.rand(z_dim, generator=g) + 0.5).tolist(),
    )


def write_images(folder, sizes):
    """Random RGB images of the given (w, h) with word captions → folder/NNN.png + .txt."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["a red circle", "a blue square and a green triangle", "a green circle above a red square"]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(folder, f"{i:03d}.png"))
        with open(os.path.join(folder, f"{i:03d}.txt"), "w") as f:
            f.write(words[i % len(words)])
    return str(folder)


#################################################################################
#                      Presets: the paper's recipe, sizes on meta               #
#################################################################################


@pytest.mark.parametrize("name, tower, nominal", [
    ("ablation", "llama-3.2-3b", 3.2e9),  # Sec. 4.1: LLaMA-3.2-3B
    ("mos_s", "plm-8b", 8.0e9),  # Sec. 3.5: PLM-8B
    ("mos_l", "internvl-14b", 14e9),  # Sec. 3.5: InternVL-14B
])
def test_full_presets_carry_the_paper_recipe_and_tower_sizes(name, tower, nominal):
    from und_tower import tower_param_count, tower_shape

    p = presets.get_preset(name)
    m, t = p.model, p.train
    assert m.tower == tower and (m.und_states, m.und_dim) == tower_shape(tower)
    # the tower's language model, on meta from its published config, is the paper's size
    assert abs(tower_param_count(tower) / nominal - 1) < 0.10
    # App. A: k = 2, ε = 0.05, AdamW 1e-4 / wd 0.01 / betas (0.9, 0.95), 4k warm-up, cosine to
    # 1.5e-5, global batch in 1024–2048, logit-normal t at 512², bf16 tower; Wan 2.2 + patch 2
    assert (m.router.k, m.router.eps) == (2, 0.05)
    assert (t.lr, t.weight_decay, t.betas, t.warmup, t.lr_min) == (1e-4, 0.01, (0.9, 0.95), 4000, 1.5e-5)
    assert 1024 <= t.batch_size <= 2048
    assert (m.codec, m.gen.patch_size, m.image_size, t.t_sampler, t.stage) == ("wan2.2", 2, 512, "logit_normal", 1)
    assert t.tower_dtype == "bfloat16" and m.gen.registers == 4
    model = checkpoint.build_model(m, device="meta")
    block = model.gen.blocks[0]  # QK-norm and the modality-specific context norm exist
    assert block.q_norm is not None and block.k_norm is not None and block.norm_ctx is not block.norm1


def test_tower_param_count_minilm_equals_the_loaded_model():
    from und_tower import load_tower, tower_param_count

    assert tower_param_count("minilm") == sum(p.numel() for p in load_tower("minilm").parameters())
    with pytest.raises(ValueError, match="no published config"):
        tower_param_count("org/some-model")


#################################################################################
#                                Stages (Sec. 3.5)                              #
#################################################################################


def test_stage_presets_set_resolution_sampler_and_budget():
    base = presets.get_preset("mos_s")
    want = {1: (512, "logit_normal", 1.0, 400_000), 2: (1024, "mode", 3.0, 400_000),
            3: (1024, "mode", 3.0, 50_000), 4: (2048, "mode", 3.0, 50_000)}
    for stage, (size, sampler, shift, steps) in want.items():
        p = presets.stage_preset(base, stage)
        assert (p.model.image_size, p.train.t_sampler, p.train.t_shift, p.train.steps) == (size, sampler, shift, steps)
        assert p.train.stage == stage and p.train.mode_scale == 0.8 and p.train.lr == 1e-4
        assert p.model.gen == base.model.gen and p.model.router == base.model.router  # same weights fit every stage
        assert f"stage {stage}" in p.about
    assert base.model.image_size == 512 and base.train.stage == 1  # a copy: the base is untouched
    with pytest.raises(ValueError, match="--stage must be one of 1, 2, 3, 4"):
        presets.stage_preset(base, 5)
    with pytest.raises(ValueError, match="full presets"):
        presets.stage_preset(presets.get_preset("toy"), 2)


def test_cli_stage_and_init_from_set_the_preset(tmp_path, capsys):
    args = train.parse_args(["--preset", "ablation", "--stage", "4", "--init-from", str(tmp_path), "--dry-run"])
    assert train.main(args) == 0
    out = capsys.readouterr().out
    assert "stage 4: 2048²" in out  # the preset line names the stage
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d\s+\d+²", line)]  # the stage table
    assert [r[:3] for r in rows] == [["1", "512²", "256"], ["2", "1024²", "1024"], ["3", "1024²", "1024"],
                                     ["4", "2048²", "4096"]]
    # a stage-1 checkpoint resumes as stage 1 only; stage 2 is a new run that --init-from's it
    p = presets.stage_preset(presets.get_preset("ablation"), 1)
    p.model.gen, p.model.router = GenConfig(dim=32, depth=2, heads=2), RouterConfig(dim=16, heads=2)
    checkpoint.save_checkpoint(str(tmp_path), 1, checkpoint.build_model(p.model), checkpoint.build_model(p.model), p, state=None)
    with pytest.raises(ValueError, match=r"--resume continues the checkpoint's own stage \(1\)"):
        train.main(train.parse_args(["--preset", "ablation", "--stage", "2", "--resume", str(tmp_path)]))
    with pytest.raises(SystemExit):  # argparse: not a stage
        train.parse_args(["--preset", "mos_s", "--stage", "7"])


#################################################################################
#                      --dry-run: the router's FLOPs share                      #
#################################################################################


def test_flops_estimate_counts_the_router_exactly_on_a_tiny_config():
    """FlopCounterMode's router count equals the matmul FLOPs written out by hand."""
    p = presets.get_preset("toy")
    p.model.gen = GenConfig(dim=32, depth=2, heads=2, patch_size=4)
    p.model.router = RouterConfig(dim=16, heads=2, t_freq_dim=8)
    L, size = 5, (32, 48)  # non-square: 8 × 12 patches
    est = sizing.flops_estimate(p, size, context_len=L)
    N = (32 // 4) * (48 // 4)
    assert est["image_tokens"] == N == 96
    D, Dg, Du, n, m = 16, 32, p.model.und_dim, 2, p.model.und_states
    F = 64 * ((int(2 * 4.0 * D / 3) + 63) // 64)  # SwiGLU hidden width (kernels.SwiGLU)
    S = 1 + N + L  # [t; z_t tokens; c tokens]
    block = 2 * S * D * 3 * D + 2 * S * D * D + 2 * S * D * 2 * F + 2 * S * F * D + 4 * S * S * D
    router = 2 * (8 * D + D * D) + 2 * N * Dg * D + 2 * L * Du * D + 2 * block + 2 * L * D * n * m
    assert est["router_flops"] == router
    assert 0 < est["router_share"] < 1 and est["router_flops"] < est["step_flops"]


def test_mos_s_router_is_at_most_3_percent_of_a_step_at_1024():
    est = sizing.flops_estimate(presets.stage_preset(presets.get_preset("mos_s"), 2), 1024)
    assert est["image_tokens"] == 1024
    assert 0.01 < est["router_share"] <= 0.03, est


#################################################################################
#          Wan 2.2 VAE end to end, dynamic resolution, RoPE per bucket          #
#################################################################################


def test_wan_path_images_to_tokens_and_back_for_a_non_square_bucket():
    p = presets.get_preset("mos_s")
    codec = WanVAECodec(tiny_wan_vae())
    x = torch.rand(2, 3, 64, 96) * 2 - 1  # a 2:3 bucket
    z = codec.encode(x)  # normalised fp32 latents
    assert z.dtype == torch.float32 and z.shape == (2, 48, 4, 6)
    tokens = patchify(z, p.model.gen.patch_size)  # (B, N, p·p·C)
    assert tokens.shape == (2, sizing.image_tokens(p.model, (64, 96)), 2 * 2 * 48) == (2, 6, 192)
    assert torch.equal(unpatchify(tokens, 2, 4, 6), z)
    img = codec.decode(unpatchify(tokens, 2, 4, 6))
    assert img.shape == x.shape and img.dtype == torch.float32 and img.abs().max() <= 1
    # the whole MoS (generation tower + router) runs on that latent grid
    p.model.gen = GenConfig(dim=32, depth=2, heads=2, patch_size=2)
    p.model.router = RouterConfig(dim=16, heads=2)
    p.model.und_states, p.model.und_dim = 3, 32
    model = MoS(p.model, in_channels=48)
    v = model(z, torch.rand(2), torch.randn(2, 4, 3, 32), torch.ones(2, 4, dtype=torch.bool))
    assert v.shape == z.shape


def test_rope_follows_the_patch_grid_of_a_non_square_bucket():
    gh, gw, hd = 3, 5, 8
    cos, sin = rope_2d(gh, gw, hd)
    freqs = 10000.0 ** (-torch.arange(hd // 4) / (hd // 4))
    # a single non-zero patch at grid (r, c) is token r·gw + c, which RoPE rotates by (r·f, c·f)
    for r, c in [(0, 4), (2, 1), (1, 3)]:
        z = torch.zeros(1, 1, gh * 2, gw * 2)
        z[0, 0, 2 * r, 2 * c] = 1
        token = int(patchify(z, 2)[0].abs().sum(-1).argmax())
        assert token == r * gw + c
        angles = torch.cat([r * freqs, c * freqs])
        assert torch.allclose(cos[token], angles.cos()) and torch.allclose(sin[token], angles.sin())
    # scores depend on the (Δrow, Δcol) offset only, on the non-square grid too
    q, k = torch.randn(1, 1, 1, hd), torch.randn(1, 1, 1, hd)
    qr = apply_rope(q.expand(1, gh * gw, 1, hd), cos, sin)[0, :, 0]
    kr = apply_rope(k.expand(1, gh * gw, 1, hd), cos, sin)[0, :, 0]
    pos = lambda r, c: r * gw + c  # noqa: E731
    assert torch.allclose(qr[pos(0, 0)] @ kr[pos(1, 3)], qr[pos(1, 1)] @ kr[pos(2, 4)], atol=1e-5)
    assert not torch.allclose(qr[pos(0, 0)] @ kr[pos(1, 3)], qr[pos(0, 0)] @ kr[pos(3 - 2, 1)], atol=1e-3)


#################################################################################
#                 The latent cache (App. B.4 producer–consumer)                 #
#################################################################################


def test_latent_cache_holds_exactly_the_codec_latents_per_bucket(tmp_path):
    codec = WanVAECodec(tiny_wan_vae())
    folder = write_images(tmp_path / "imgs", [(64, 64), (70, 64), (100, 50), (64, 128)])
    n = data.build_latent_cache(codec, folder, str(tmp_path / "lat"), area=64 * 64, multiple=32, progress=False)
    assert n == 4
    cache = data.LatentCache(str(tmp_path / "lat"), seed=3)
    assert len(cache) == 4 and cache.area == 64 * 64 and cache.channels == 48
    assert set(cache.keys) == {(64, 64), (64, 96), (96, 64)}  # aspect-ratio buckets at 64² area (×32 grid)
    # each cached row is the codec's latent of its image, resized and centre-cropped to its bucket
    from safetensors import safe_open

    source = data.ImageCaptionData(folder, area=64 * 64, multiple=32)
    for key in source.keys:
        hw = source.buckets[key]
        for i, (img_path, caption) in enumerate(source.members[key]):
            path, row, cached_caption = cache.rows[hw][i]
            with Image.open(img_path) as im:
                want = codec.encode(data.to_tensor(np.asarray(data.resize_center_crop(im, hw))[None]))
            with safe_open(path, framework="pt") as f:
                got = f.get_slice("latents")[row:row + 1]  # (1, 48, h/16, w/16)
            assert cached_caption == caption and got.shape == (1, 48, hw[0] // 16, hw[1] // 16)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # batches: one bucket each, a pure function of (seed, step)
    z, caps = cache.batch(5, 3)
    z2, caps2 = cache.batch(5, 3)
    assert torch.equal(z, z2) and caps == caps2 and z.dtype == torch.float32 and len(caps) == 3
    assert z.shape[:2] == (3, 48) and (z.shape[2] * 16, z.shape[3] * 16) in cache.keys
    cache.check(64, 48)
    with pytest.raises(ValueError, match="build a cache per stage resolution"):
        cache.check(1024, 48)
    with pytest.raises(ValueError, match="holds no latents"):
        data.LatentCache(str(tmp_path))


def test_data_cli_builds_a_latent_cache_and_rejects_bad_requests(tmp_path, monkeypatch, capsys):
    import gen_tower

    monkeypatch.setattr(gen_tower, "load_codec", lambda name, path=None: WanVAECodec(tiny_wan_vae()))
    folder = write_images(tmp_path / "imgs", [(64, 64), (96, 48)])
    assert data.main(["--latents", str(tmp_path / "lat"), "--data", folder, "--size", "64"]) == 0
    assert "cached the latents of 2 images at 64² area" in capsys.readouterr().out
    assert len(data.LatentCache(str(tmp_path / "lat"))) == 2
    with pytest.raises(ValueError, match="exactly one of --cache"):
        data.main(["--data", folder])
    with pytest.raises(ValueError, match="give --data"):
        data.main(["--latents", str(tmp_path / "l2"), "--shapesworld", "4"])
    with pytest.raises(ValueError, match="cannot be tiled"):
        data.main(["--latents", str(tmp_path / "l3"), "--data", folder, "--size", "100"])


#################################################################################
#       One real training step per full preset (the same train() code path)     #
#################################################################################


def scaled_down(name: str, stage: int, image_size: int, **train_fields):
    """The full preset at `stage`, with a tiny generation tower / router for the m = 3, D = 32
    tiny towers and a CPU-sized resolution. Tower name, codec, tower dtype, sampler stay."""
    p = presets.stage_preset(presets.get_preset(name), stage)
    p.model.gen = GenConfig(dim=32, depth=2, heads=2, patch_size=2)
    p.model.router = RouterConfig(dim=16, heads=2, k=2, eps=0.05)
    p.model.und_states, p.model.und_dim, p.model.image_size = 3, 32, image_size
    p.train.steps, p.train.batch_size, p.train.warmup = 1, 2, 1
    p.train.ckpt_every, p.train.sample_every, p.train.log_every = 1, 0, 1
    for k, v in train_fields.items():
        setattr(p.train, k, v)
    return p


@pytest.fixture
def fake_hub(monkeypatch):
    """load_tower / load_codec return tiny random models of the real classes; records calls."""
    import gen_tower
    import und_tower

    calls = []

    def load_tower(name, *, dtype=None, device="cpu", max_length=77, init="pretrained"):
        assert init == "pretrained"  # the full presets' towers are the published ones
        calls.append(("tower", name, dtype))
        return tiny_tower(name, dtype=dtype)

    def load_codec(name, path=None):
        calls.append(("codec", name))
        assert name == "wan2.2"
        return WanVAECodec(tiny_wan_vae())

    monkeypatch.setattr(und_tower, "load_tower", load_tower)
    monkeypatch.setattr(gen_tower, "load_codec", load_codec)
    return calls


@pytest.mark.parametrize("name", ["ablation", "mos_s", "mos_l"])
def test_one_training_step_of_each_full_preset(name, tmp_path, fake_hub):
    from safetensors.torch import load_file

    folder = write_images(tmp_path / "imgs", [(64, 64), (96, 48), (64, 64)])
    p = scaled_down(name, stage=1, image_size=64)
    history = train.train(p, str(tmp_path / "run"), quiet=True, data_spec=folder)
    assert len(history) == 1 and np.isfinite(history[0][1])
    assert fake_hub == [("tower", p.model.tower, torch.bfloat16), ("codec", "wan2.2")]  # bf16 tower (App. A)
    weights = load_file(str(tmp_path / "run" / "step-000001" / "model.safetensors"))
    assert weights["gen.head.weight"].abs().max() > 0  # zero-init head moved: the loss reached G
    torch.manual_seed(p.train.seed)
    fresh = checkpoint.build_model(p.model)
    assert not torch.equal(weights["router.head.weight"], fresh.router.head.weight)  # and the router
    with open(tmp_path / "run" / "step-000001" / "config.json") as f:
        assert json.load(f)["train"]["stage"] == 1


def test_next_stage_starts_from_the_previous_stage_weights_and_latent_cache(tmp_path, fake_hub):
    """Stage 1 → stage 2 with --init-from (weights only) and --latents: with lr 0 the stage-2
    step leaves the weights as loaded, so they must equal stage 1's EMA exactly."""
    from safetensors.torch import load_file

    folder = write_images(tmp_path / "imgs", [(64, 64), (96, 48), (64, 64)])
    train.train(scaled_down("mos_s", 1, 64), str(tmp_path / "s1"), quiet=True, data_spec=folder)
    data.build_latent_cache(WanVAECodec(tiny_wan_vae()), folder, str(tmp_path / "lat"), area=64 * 64, multiple=32,
                            progress=False)
    p2 = scaled_down("mos_s", 2, 64, lr=0.0, lr_min=0.0, init_from=str(tmp_path / "s1"))
    assert (p2.train.t_sampler, p2.train.t_shift) == ("mode", 3.0)
    fake_hub.clear()
    history = train.train(p2, str(tmp_path / "s2"), quiet=True, latents=str(tmp_path / "lat"))
    assert np.isfinite(history[0][1])
    assert ("codec", "wan2.2") not in fake_hub  # latents read from the cache: the VAE never loaded
    s1 = load_file(str(tmp_path / "s1" / "step-000001" / "ema.safetensors"))
    s2 = load_file(str(tmp_path / "s2" / "step-000001" / "model.safetensors"))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)
    state = torch.load(tmp_path / "s2" / "step-000001" / "state.pt", weights_only=False)
    assert state["step"] == 1  # a fresh run: step 0 → 1, not stage 1's step count
    with pytest.raises(ValueError, match="build a cache per stage resolution"):
        train.train(scaled_down("mos_s", 2, 128), str(tmp_path / "s3"), quiet=True, latents=str(tmp_path / "lat"))


#################################################################################
#                               Self-CoT (Sec. 4.4)                             #
#################################################################################


def greedy_reference(tower, prompt: str, n: int) -> str:
    """Greedy decoding by hand (argmax of the LM's logits, one token at a time): the reference
    self_cot's `generate` call must reproduce."""
    from und_tower import SELF_COT_TEMPLATE

    tok = tower.tokenizer
    ids = tok(SELF_COT_TEMPLATE.format(prompt=prompt), return_tensors="pt")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(n):
            nxt = tower.model(input_ids=ids).logits[0, -1].argmax()
            if nxt.item() == tok.eos_token_id:
                break
            new.append(nxt.item())
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return " ".join(tok.decode(new, skip_special_tokens=True).split())


def test_self_cot_rewrites_with_the_tower_lm_and_the_rewrite_is_encoded(tmp_path, monkeypatch):
    import sample
    import und_tower

    tower = tiny_tower("llama-3.2-3b")
    # Zero the (tied) embedding rows of <unk>, <s>, </s>: their logits are then 0 while some word
    # scores above 0, so the random LM writes words rather than stopping or writing <unk>.
    with torch.no_grad():
        tower.model.get_input_embeddings().weight[:3] = 0
    prompts = ["a red circle", "a blue square and a green triangle"]
    rewritten = und_tower.self_cot(tower, prompts, max_new_tokens=6)
    assert rewritten == [greedy_reference(tower, p, 6) for p in prompts]
    assert all(r and r != p for r, p in zip(rewritten, prompts))

    # sample.py --self-cot: the rewrite, not the user's prompt, is what U encodes
    p = presets.get_preset("toy")
    p.model.tower, p.model.und_states, p.model.und_dim = "llama-3.2-3b", 3, 32
    p.model.gen = GenConfig(dim=32, depth=2, heads=2, patch_size=8)
    p.model.router = RouterConfig(dim=16, heads=2)
    model = checkpoint.build_model(p.model)
    checkpoint.save_checkpoint(str(tmp_path / "ckpt"), 1, model, model, p, state=None)
    encoded = []
    real_forward = UnderstandingTower.forward

    def spy(self, texts, images=None):
        encoded.extend(texts)
        return real_forward(self, texts, images)

    monkeypatch.setattr(UnderstandingTower, "forward", spy)
    monkeypatch.setattr(und_tower, "load_tower", lambda *a, **k: tower)
    args = sample.parse_args([prompts[0], "--ckpt", str(tmp_path / "ckpt"), "--self-cot", "--cot-tokens", "6",
                              "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert sample.main(args) == 0
    assert rewritten[0] in encoded and prompts[0] not in encoded
    assert os.path.exists(tmp_path / "x.png")


@pytest.mark.parametrize("name", ["plm-8b", "internvl-14b"])
def test_self_cot_with_the_vlm_towers_is_their_lm_greedy_rewrite(name):
    import und_tower

    tower = tiny_tower(name)
    with torch.no_grad():
        tower.model.get_input_embeddings().weight[:3] = 0  # no <unk> / <s> / </s> (see above)
    prompts = ["a red circle", "a blue square and a green triangle"]  # different lengths: left padding
    rewritten = und_tower.self_cot(tower, prompts, max_new_tokens=5)
    assert rewritten == [greedy_reference(tower, p, 5) for p in prompts]
    assert all(r and r != p for r, p in zip(rewritten, prompts))


def test_self_cot_on_the_toy_minilm_is_a_clear_error():
    import sample

    with pytest.raises(ValueError, match="no language-model head .*MiniLM"):
        sample.main(sample.parse_args(["a red circle", "--self-cot", "--steps", "1"]))
