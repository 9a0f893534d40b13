"""train.py: preset sizes on meta, a tiny MoS overfits, exact resume, non-finite stop, checkpoints."""

import copy
import json
import math
import os
import shutil

import pytest
import torch

import checkpoint
import presets
import sizing
import train
from checkpoint import build_model, load_checkpoint, save_checkpoint
from gen_tower import GenConfig
from presets import apply_overrides, get_preset
from router import RouterConfig
from sizing import dry_run
from train import lr_at


@pytest.mark.parametrize("name, gen, router", [
    ("ablation", 1.0e9, None),  # Sec. 4.1: "a 1B transformer for the generation tower"
    ("mos_s", 3.0e9, 100e6),  # Sec. 3.5: 3B generation tower, 100M router
    ("mos_l", 5.0e9, 100e6),  # Sec. 3.5: 5B generation tower, 100M router
])
def test_full_presets_on_meta_match_the_paper_within_10_percent(name, gen, router):
    sizes = dry_run(get_preset(name))
    assert abs(sizes["generation_tower"] / gen - 1) < 0.10, sizes
    if router:
        assert abs(sizes["router"] / router - 1) < 0.10, sizes


def test_presets_carry_the_true_tower_shapes():
    from und_tower import tower_shape

    for name in ("toy", "ablation", "mos_s", "mos_l"):
        m = get_preset(name).model
        assert (m.und_states, m.und_dim) == tower_shape(m.tower), name


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown preset 'mos_xl'; choose one of"):
        get_preset("mos_xl")


def test_lr_schedule_warmup_then_cosine_to_floor():
    cfg = get_preset("toy").train
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / cfg.warmup)
    assert lr_at(cfg.warmup - 1, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps, cfg) == pytest.approx(cfg.lr_min)
    lrs = [lr_at(s, cfg) for s in range(cfg.warmup, cfg.steps)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def tiny_preset(steps=4):
    p = get_preset("toy")
    p.model.gen = GenConfig(dim=32, depth=2, heads=2, patch_size=8)
    p.model.router = RouterConfig(dim=16, heads=2)
    p.train.steps, p.train.batch_size, p.train.warmup = steps, 4, 2
    p.train.ckpt_every, p.train.sample_every, p.train.log_every = 2, 0, 1
    return p


@pytest.fixture(scope="module")
def minilm():
    from und_tower import load_tower

    return load_tower("minilm")


def test_tiny_mos_overfits_a_fixed_batch(minilm):
    """Embedded MiniLM + a small generation tower memorise 8 image–caption pairs.

    The batch is fully fixed — images, captions, noise z1 and timesteps t — so the target is a
    deterministic function of the inputs and the loss can go to ~0; a 10× drop shows that the
    whole path (tower states → router → mixing → Proj → blocks → head) learns.
    """
    import data

    torch.manual_seed(0)
    p = get_preset("toy")
    p.model.gen = GenConfig(dim=64, depth=3, heads=4, patch_size=4)
    p.model.router = RouterConfig(dim=32, heads=2)
    model = build_model(p.model)
    images, captions = data.shapes_batch(seed=0, start=0, batch_size=8, size=32)
    out = minilm(captions)
    states, mask = out.states, out.mask
    g = torch.Generator().manual_seed(0)
    t = torch.rand(8, generator=g)
    z1 = torch.randn(images.shape, generator=g)
    z_t = (1 - t.view(-1, 1, 1, 1)) * images + t.view(-1, 1, 1, 1) * z1
    target = z1 - images
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(300):
        loss = (model(z_t, t, states, mask, model.routing_draws(*mask.shape)) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_resume_gives_the_same_next_loss(tmp_path, minilm, monkeypatch):
    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    full = train.train(tiny_preset(steps=4), str(tmp_path / "full"), quiet=True)
    part = train.train(tiny_preset(steps=4), str(tmp_path / "part"), quiet=True, stop_at=2)
    resumed = train.train(tiny_preset(steps=4), str(tmp_path / "part"), resume=str(tmp_path / "part"), quiet=True)
    assert [s for s, _ in part] == [0, 1] and [s for s, _ in resumed] == [2, 3]
    assert part[1][1] == full[1][1]
    assert resumed[0][1] == full[2][1]  # the loss at step s+1 after a resume, bit for bit
    assert resumed[1][1] == full[3][1]


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path, minilm, monkeypatch):
    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    real_step = train.training_step

    def poisoned(model, batch, *a, **k):
        loss, per, t = real_step(model, batch, *a, **k)
        return (loss * float("nan") if a[-2] == 3 else loss), per, t

    monkeypatch.setattr(train, "training_step", poisoned)
    with pytest.raises(FloatingPointError, match=r"non-finite loss nan at step 3.*step-000002"):
        train.train(tiny_preset(steps=6), str(tmp_path / "run"), quiet=True)
    model, _, ckpt = load_checkpoint(str(tmp_path / "run"))
    assert ckpt.endswith("step-000002")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bad_counts_are_one_line_errors_before_anything_is_built(tmp_path, monkeypatch):
    """Issue #27: a non-positive step count or batch size, from a flag or from --set, is one
    ValueError line (train.py's entry point prints it as `error: …`, exit 2), raised before
    any model, tower or run directory exists."""
    real_train = train.train

    def no_train(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "train", no_train)
    cases = [(["--steps", "-1"], "--steps must be a positive integer, got -1"),
             (["--steps", "0"], "--steps must be a positive integer, got 0"),
             (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
             (["--micro-batch", "-1"], "--micro-batch must be an integer >= 0, got -1"),
             (["--threads", "0"], "--threads must be a positive integer, got 0"),
             (["--set", "train.batch_size=0"], "train.batch_size must be a positive integer, got 0"),
             (["--set", "train.steps=-5"], "train.steps must be a positive integer, got -5"),
             (["--set", "train.ckpt_every=0"], "train.ckpt_every must be a positive integer, got 0"),
             (["--set", "train.log_every=0"], "train.log_every must be a positive integer, got 0"),
             (["--set", "train.sample_every=-1"], "train.sample_every must be an integer >= 0, got -1")]
    for argv, message in cases:
        with pytest.raises(ValueError) as e:
            train.main(train.parse_args(["--preset", "toy", "--out", str(tmp_path / "run"), *argv]))
        assert str(e.value) == message
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="train.steps must be a positive integer, got 0"):  # train() checks too
        real_train(tiny_preset(steps=0), str(tmp_path / "run"), quiet=True)


def test_check_can_train_names_what_a_full_preset_lacks(monkeypatch):
    """A full preset needs CUDA GPUs and its tower's and VAE's weights (local, or a network to
    fetch them); --features / --latents replace the tower / VAE. The toy needs nothing."""
    mos_s = get_preset("mos_s")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sizing, "hub_cached", lambda repo, *files: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    sizing.check_can_train(get_preset("toy"), "preset toy", "cpu")
    with pytest.raises(ValueError) as e:
        sizing.check_can_train(mos_s, "preset mos_s", "cpu")
    assert str(e.value) == (
        "preset mos_s needs CUDA GPUs and the weights of facebook/Perception-LM-8B and Wan-AI/Wan2.2-TI2V-5B-Diffusers; "
        "this machine has no CUDA GPU, and facebook/Perception-LM-8B and Wan-AI/Wan2.2-TI2V-5B-Diffusers are not in "
        "the local Hugging Face cache (HF_HUB_OFFLINE is set) — run `python train.py --preset toy` instead, or add "
        "`--dry-run` to size it without weights")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(sizing, "hub_cached", lambda repo, *files: repo != "OpenGVLab/InternVL3-14B-hf")
    with pytest.raises(ValueError, match=r"^preset mos_l needs CUDA GPUs and the weights of OpenGVLab/InternVL3-14B-hf "
                                         r"and Wan-AI/Wan2\.2-TI2V-5B-Diffusers; OpenGVLab/InternVL3-14B-hf is not in"):
        sizing.check_can_train(get_preset("mos_l"), "preset mos_l", "cuda")
    sizing.check_can_train(get_preset("mos_l"), "preset mos_l", "cuda", features="cache/")  # no tower needed
    with pytest.raises(ValueError, match="needs CUDA GPUs; --device is cpu — run"):
        sizing.check_can_train(get_preset("mos_l"), "preset mos_l", "cpu", features="f/", latents="l/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: the weights can still be fetched
    sizing.check_can_train(get_preset("mos_l"), "preset mos_l", "cuda")


def test_hub_cached_reads_the_local_cache_only(tmp_path):
    snap = tmp_path / "models--org--tower" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--tower" / "refs").mkdir()
    (tmp_path / "models--org--tower" / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text("{}")
    kw = dict(cache_dir=str(tmp_path))
    assert not sizing.hub_cached("org/tower", "config.json", "model.safetensors.index.json|model.safetensors", **kw)
    (snap / "model.safetensors").write_bytes(b"")
    assert sizing.hub_cached("org/tower", "config.json", "model.safetensors.index.json|model.safetensors", **kw)
    assert not sizing.hub_cached("org/other", "config.json", **kw)


def test_checkpoints_record_their_world(tmp_path, minilm, monkeypatch):
    """config.json says which world the data came from (sample.py's vocabulary note): the
    ShapesWorld name, "" for real image–caption data; older configs are inferred from the codec."""
    from PIL import Image

    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    p = tiny_preset(steps=1)
    p.train.world = "something else"  # train() records what it really trained on
    train.train(p, str(tmp_path / "shapes"), quiet=True)
    assert checkpoint.read_preset(str(tmp_path / "shapes"))[0].train.world == "shapesworld"
    for i in range(2):
        Image.new("RGB", (32, 32), (90 * i, 40, 200)).save(tmp_path / f"im{i}.png")
        (tmp_path / f"im{i}.txt").write_text(f"a photo {i}")
    train.train(tiny_preset(steps=1), str(tmp_path / "real"), quiet=True, data_spec=str(tmp_path))
    assert checkpoint.read_preset(str(tmp_path / "real"))[0].train.world == ""
    for name, world in (("toy", "shapesworld"), ("mos_s", "")):
        d = get_preset(name).to_dict()
        del d["train"]["world"]
        assert presets.Preset.from_dict(d).train.world == world


def test_checkpoint_roundtrip_and_corrupt_checkpoint_errors(tmp_path):
    p = tiny_preset()
    model = build_model(p.model)
    ckpt = save_checkpoint(str(tmp_path), 7, model, model, p, state=None)
    assert not any(d.endswith(".tmp") for d in os.listdir(tmp_path))  # atomic: no temp left
    loaded, preset, path = load_checkpoint(str(tmp_path))
    assert path == ckpt and preset.model == p.model
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)
    with open(os.path.join(ckpt, "ema.safetensors"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="missing or corrupt"):
        load_checkpoint(ckpt)
    with open(os.path.join(ckpt, "config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="unreadable config.json"):
        load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope"))


def test_set_overrides_change_typed_fields_and_reject_typos():
    from presets import apply_overrides

    p = apply_overrides(get_preset("toy"), ["model.gen.depth=8", "train.lr=2e-3", "train.betas=0.9,0.99",
                                            "model.router.mode=last"])
    assert p.model.gen.depth == 8 and p.train.lr == 2e-3 and p.train.betas == (0.9, 0.99)
    assert p.model.router.mode == "last"
    with pytest.raises(ValueError, match="no field 'dpeth'"):
        apply_overrides(get_preset("toy"), ["model.gen.dpeth=8"])
    with pytest.raises(ValueError, match="not a valid int"):
        apply_overrides(get_preset("toy"), ["model.gen.depth=eight"])
    with pytest.raises(ValueError, match="router mode"):
        apply_overrides(get_preset("toy"), ["model.router.mode=xattn"])


def test_fused_adamw_resumes_a_for_loop_checkpoint_as_fused_with_the_same_update():
    """Checkpoints written before train.py used the fused AdamW (and by FSDP2) hold the for-loop
    kind's state; loading must keep the optimiser fused (load_state_dict alone would not) and
    the next update must equal the for-loop one."""
    torch.manual_seed(0)
    cfg = get_preset("toy").train
    model = build_model(tiny_preset().model)
    x = [p for p in model.parameters()]

    def step(opt):
        opt.zero_grad()
        sum((p.float() ** 2).sum() * (i + 1) for i, p in enumerate(x)).backward()
        opt.step()

    loop = train.make_optimizer(model, cfg)
    step(loop)
    saved = copy.deepcopy(loop.state_dict())  # state_dict() and load_state_dict() share the moments
    before = [p.detach().clone() for p in x]
    fused = train.make_optimizer(model, cfg, fused=True)
    checkpoint.keep_optimizer_kind(fused, lambda: fused.load_state_dict(copy.deepcopy(saved)))
    assert all(g["fused"] for g in fused.param_groups)
    step(fused)
    after_fused = [p.detach().clone() for p in x]
    with torch.no_grad():
        for p, b in zip(x, before):
            p.copy_(b)
    loop.load_state_dict(saved)
    step(loop)
    for a, b in zip(after_fused, x):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-7)


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, minilm, monkeypatch):
    """train.compile wraps only the training forward: the losses are eager's (aot_eager runs
    the same ATen ops, no C compiler needed) and the checkpoint keys are the plain module's.
    And it is ONE graph, compiled once: the ε-greedy draws come in from outside (a per-sample
    generator loop inside would break the graph) and the caption length, which changes between
    these steps, is symbolic from the start (else a recompile when it first changes)."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    eager = train.train(tiny_preset(steps=3), str(tmp_path / "eager"), quiet=True)
    p = tiny_preset(steps=3)
    p.train.compile = "aot_eager"
    counters.clear()
    widths, mark = [], torch._dynamo.maybe_mark_dynamic
    monkeypatch.setattr(torch._dynamo, "maybe_mark_dynamic", lambda x, d: (widths.append(x.shape[d]), mark(x, d))[1])
    compiled = train.train(p, str(tmp_path / "compiled"), quiet=True)
    assert len(set(widths)) > 1, widths  # L did change, so "compiled once" covers a new caption length
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["total"] == 1, dict(counters["stats"])
    for (s1, a), (s2, b) in zip(eager, compiled):
        assert s1 == s2 and abs(a - b) <= 1e-5 * abs(a), (s1, a, b)
    keys = set(load_file(str(tmp_path / "compiled" / "step-000003" / "model.safetensors")))
    assert keys == set(load_file(str(tmp_path / "eager" / "step-000003" / "model.safetensors")))


def test_unknown_compile_backend_is_a_clear_error(tmp_path, minilm, monkeypatch):
    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    p = tiny_preset(steps=1)
    p.train.compile = "turbo"
    with pytest.raises(ValueError, match="unknown train.compile backend 'turbo'; choose one of"):
        train.train(p, str(tmp_path / "run"), quiet=True)


def test_bf16_weights_load_into_the_fp32_model_and_grow(tmp_path):
    """A checkpoint may ship its EMA weights cast to bf16 (half the bytes, under the 20 MB
    limit for a deeper toy): sampling loads them into the fp32 model as the rounded values,
    and --init-from (here growing 3 → 4 blocks) reads them too."""
    from safetensors.torch import load_file, save_file

    p = tiny_preset()
    p.model.gen.depth = 3
    model = build_model(p.model)
    with torch.no_grad():
        for q in model.parameters():
            q.normal_(0, 0.2)
    ckpt = save_checkpoint(str(tmp_path), 1, model, model, p, state=None)
    f = os.path.join(ckpt, "ema.safetensors")
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(f).items()}, f)
    loaded, _, _ = load_checkpoint(ckpt)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype, name
        assert torch.equal(b, a.to(torch.bfloat16).float()), name
    assert not torch.equal(loaded.gen.blocks[0].qkv.weight, model.gen.blocks[0].qkv.weight)  # really rounded
    deeper = tiny_preset()
    deeper.model.gen.depth = 4
    grown = build_model(deeper.model)
    checkpoint.init_weights(grown, ckpt)
    assert grown.gen.blocks[0].qkv.weight.dtype == torch.float32
    assert torch.equal(grown.gen.blocks[0].qkv.weight, loaded.gen.blocks[0].qkv.weight)


@pytest.mark.parametrize("name", ["toy", "toy_edit", "emoji"])
def test_shipped_checkpoints_fit_the_repository_and_load(name):
    """The issue's limit: a shipped checkpoint is at most 20 MB, and it loads as it is."""
    ckpt = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints", name)
    if not os.path.exists(ckpt):
        pytest.skip(f"no shipped {name} checkpoint")
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(ckpt) for f in fs)
    assert size <= 20e6, f"checkpoints/{name} is {size / 1e6:.1f} MB"
    model, preset, _ = load_checkpoint(ckpt)
    assert all(q.dtype == torch.float32 and torch.isfinite(q).all() for q in model.parameters())


def test_init_from_a_shallower_checkpoint_grows_the_tower_without_changing_its_output(tmp_path):
    """grow_depth: a 3-block checkpoint loaded into a 5-block model computes the same v̂ (the
    inserted copies are identities: output projections zeroed), the copies start from their
    source blocks' weights and routing rows, and their zeroed projections get gradient."""
    torch.manual_seed(0)
    small, big = tiny_preset(), tiny_preset()
    small.model.gen.depth, big.model.gen.depth = 3, 5
    model = build_model(small.model)
    with torch.no_grad():  # random everything, the zero-initialised head too
        for p in model.parameters():
            p.normal_(0, 0.2)
    ckpt = save_checkpoint(str(tmp_path), 1, model, model, small, state=None)
    grown = build_model(big.model)
    checkpoint.init_weights(grown, ckpt)
    B, L, m, Du = 2, 5, small.model.und_states, small.model.und_dim
    x_t, t = torch.randn(B, 3, 32, 32), torch.tensor([0.3, 0.9])
    states, mask = torch.randn(B, L, m, Du), torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    with torch.no_grad():
        ref = model(x_t, t, states, mask)
    out = grown(x_t, t, states, mask)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5), (out - ref).abs().max()
    # 3 → 5: blocks 1 and 2 are copied, so the new order is old 0, 1, 1', 2, 2'
    g, o = grown.gen.blocks, model.gen.blocks
    for j_new, j_old, copy_ in [(0, 0, False), (1, 1, False), (2, 1, True), (3, 2, False), (4, 2, True)]:
        assert torch.equal(g[j_new].qkv.weight, o[j_old].qkv.weight)
        assert torch.equal(g[j_new].out.weight == 0, torch.full_like(g[j_new].out.weight, copy_, dtype=torch.bool))
        assert (g[j_new].ffn.w_down.weight == 0).all() == copy_
        logits_rows = grown.router.head.weight.view(5, m, -1)[j_new]
        assert torch.equal(logits_rows, model.router.head.weight.view(3, m, -1)[j_old])
    out.square().mean().backward()
    assert g[2].out.weight.grad.abs().sum() > 0 and g[4].ffn.w_down.weight.grad.abs().sum() > 0
    too_deep = tiny_preset()
    too_deep.model.gen.depth = 7
    with pytest.raises(ValueError, match="can grow a 3-block tower to 4..6 blocks, not 7"):
        checkpoint.init_weights(build_model(too_deep.model), ckpt)


def test_phased_recipe_grows_exports_and_resumes(tmp_path, minilm, monkeypatch):
    """A recipe in phases (the toy's form, here 2 → 3 blocks): phase 2 starts from phase 1's
    export grown by one block; the export holds the last EMA in bf16 and a config.json that
    records the command and each phase; it loads for sampling; and a run interrupted mid-phase-2,
    continued by calling again (what `--resume runs/toy` does) after phase 1's step folders are
    deleted, exports the very same weights."""
    from safetensors.torch import load_file

    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    p = tiny_preset(steps=2)
    p.train.export_dtype = "bfloat16"
    p.phases = [[], ["model.gen.depth=3", "train.steps=3", "train.seed=1"]]
    export = train.train_phases(p, str(tmp_path / "full"), "python train.py --preset tiny", quiet=True)
    weights = load_file(os.path.join(export, "ema.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert "gen.blocks.2.out.weight" in weights and "gen.blocks.3.out.weight" not in weights
    with open(os.path.join(export, "config.json")) as f:
        config = json.load(f)
    recipe = config["recipe"]
    assert recipe["command"] == "python train.py --preset tiny" and recipe["trained_steps"] == 5
    assert [r["depth"] for r in recipe["phases"]] == [2, 3] and all(r["wall_s"] > 0 for r in recipe["phases"])
    model, preset, _ = load_checkpoint(export)
    assert preset.model.gen.depth == 3 and preset.train.init_from == ""
    # phase 2 really started from phase 1: its first checkpoint's copied block is block 1's
    grown = load_file(str(tmp_path / "full" / "phase-2" / "step-000002" / "ema.safetensors"))
    assert set(grown) == set(weights)

    part = train.train_phases(p, str(tmp_path / "part"), "python train.py --preset tiny", quiet=True, stop_at=1)
    assert part == ""  # phase 1 stopped at step 1 of 2: nothing exported
    assert not os.path.exists(tmp_path / "part" / "export")
    again = train.train_phases(p, str(tmp_path / "part"), "python train.py --preset tiny", quiet=True, stop_at=2)
    assert again == ""  # phase 1 finished, phase 2 stopped at step 2 of 3
    # a finished phase is its export: without its step folders the run still continues
    phase1 = tmp_path / "part" / "phase-1"
    assert {v.dtype for v in load_file(str(phase1 / "export" / "ema.safetensors")).values()} == {torch.bfloat16}
    for d in phase1.glob("step-*"):
        shutil.rmtree(d)
    again = train.train_phases(p, str(tmp_path / "part"), "python train.py --preset tiny", quiet=True)
    resumed = load_file(os.path.join(again, "ema.safetensors"))
    for k, v in weights.items():
        assert torch.equal(resumed[k], v), k


def test_toy_preset_is_one_command(tmp_path, monkeypatch):
    """`python train.py --preset toy` runs the toy's phases (6 → 12 → 18 → 18 blocks, exported in
    bf16); `--steps N` trains the base setting alone; a finished or started phased run is
    continued with --resume, not overwritten."""
    p = get_preset("toy")
    depths = [apply_overrides(copy.deepcopy(p), a).model.gen.depth for a in p.phases]
    assert depths == [6, 12, 18, 18] and p.train.export_dtype == "bfloat16"
    calls = []
    monkeypatch.setattr(train, "train_phases", lambda preset, out, command, *a, **k: calls.append(
        ("phases", len(preset.phases), out, command)) or "x")
    monkeypatch.setattr(train, "train", lambda preset, out, **k: calls.append(("train", preset.train.steps, out)))
    out = str(tmp_path / "toy")
    assert train.main(train.parse_args(["--preset", "toy", "--out", out])) == 0
    assert train.main(train.parse_args(["--preset", "toy", "--out", out, "--steps", "7"])) == 0
    assert calls == [("phases", 4, out, f"python train.py --preset toy --out {out}"), ("train", 7, out)]
    os.makedirs(out)
    open(os.path.join(out, "recipe.json"), "w").write("{}")
    with pytest.raises(ValueError, match="already holds a phased run: continue it with --resume"):
        train.main(train.parse_args(["--preset", "toy", "--out", out]))


def test_emojiworld_trains_and_records_its_world(tmp_path, minilm, monkeypatch):
    """--data emojiworld feeds emojiworld.emoji_batch to the same loop (a loss that is finite and
    checkpoints that record the world, so sample.py's vocabulary note lists EmojiWorld's words);
    an edit model gets EmojiWorld's edit triplets, mixed with text-to-image steps when asked."""
    import data
    import emojiworld

    monkeypatch.setattr("und_tower.load_tower", lambda *a, **k: minilm)
    p = tiny_preset(steps=2)
    history = train.train(p, str(tmp_path / "emoji"), quiet=True, data_spec="emojiworld")
    assert [step for step, _ in history] == [0, 1] and all(math.isfinite(loss) for _, loss in history)
    assert checkpoint.read_preset(str(tmp_path / "emoji"))[0].train.world == "emojiworld"
    batch_fn = train.make_data("emojiworld", p.model, seed=0)
    images, captions = batch_fn(3, 4)
    expected = emojiworld.emoji_batch(0, 12, 4, p.model.image_size)
    assert torch.equal(images, expected[0]) and captions == expected[1]  # step 3 holds examples 12..15
    assert any("dog" in words for words in data.WORLDS["emojiworld"].vocabulary.values())
    p.model.gen.ref = True
    tgt, instructions, src = train.make_data("emojiworld", p.model, seed=0)(3, 4)
    want_src, want_ins, want_tgt = emojiworld.edit_batch(0, 12, 4, p.model.image_size)
    assert torch.equal(tgt, want_tgt) and torch.equal(src, want_src) and instructions == want_ins
    mixed = train.make_data("emojiworld", p.model, seed=0, t2i_fraction=0.5)
    kinds = [len(mixed(step, 2)) for step in range(12)]  # 2 = (images, captions), 3 = an edit triplet
    assert set(kinds) == {2, 3}
    p.train.steps = 2
    history = train.train(p, str(tmp_path / "emoji_edit"), quiet=True, data_spec="emojiworld")
    assert all(math.isfinite(loss) for _, loss in history)


def test_emoji_preset_draws_and_edits_in_one_command(monkeypatch, tmp_path):
    """`python train.py --preset emoji` trains on EmojiWorld without --data: text to image, then
    an edit model (reference tokens) that keeps training text to image half the time."""
    p = get_preset("emoji")
    assert p.train.world == "emojiworld"
    last = apply_overrides(copy.deepcopy(p), p.phases[-1])
    assert last.model.gen.ref and 0 < last.train.t2i_fraction < 1
    assert not apply_overrides(copy.deepcopy(p), p.phases[0]).model.gen.ref
    seen = []
    monkeypatch.setattr(train, "train_phases", lambda preset, out, command, device, data_spec: seen.append(data_spec) or "x")
    assert train.main(train.parse_args(["--preset", "emoji", "--out", str(tmp_path / "e")])) == 0
    assert seen == ["emojiworld"]
