"""MoS-Edit (Sec. 3.4, Fig. 4, App. B.5): reference tokens in G, image + instruction into a VLM U,
edit data, the toy_edit preset, edit.py's CLI and eval.py's edit accuracy.

Everything is tiny and offline: random generation towers of a few thousand parameters, the
embedded MiniLM where a real tower is needed, tiny random PerceptionLM / InternVL VLMs.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import presets
import train
import und_tower
from gen_tower import GenConfig, ModelConfig, MoS
from router import RouterConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
S = 32


def tiny_cfg(ref=True, prediction="x") -> ModelConfig:
    return ModelConfig(tower="minilm", und_states=3, und_dim=16, image_size=16,
                       gen=GenConfig(dim=32, depth=2, heads=2, patch_size=4, prediction=prediction, ref=ref),
                       router=RouterConfig(dim=16, heads=2, k=2))


def tiny_inputs(B=2, L=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(B, 3, 16, 16, generator=g)
    t = torch.rand(B, generator=g)
    states = torch.randn(B, L, 3, 16, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    return x_t, t, states, mask


def randomise_head(model):
    # The head is zero-initialised (the model starts by predicting 0); give it weights so the
    # output depends on what the blocks computed.
    torch.manual_seed(1)
    torch.nn.init.normal_(model.gen.head.weight, std=0.2)
    return model


# ----------------------------------------------------------------- reference tokens in G


def test_reference_tokens_shape_and_influence():
    model = randomise_head(MoS(tiny_cfg(), in_channels=3)).eval()
    x_t, t, states, mask = tiny_inputs()
    ref_a, ref_b = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    v_a = model(x_t, t, states, mask, ref=ref_a)
    assert v_a.shape == x_t.shape  # only the target tokens come out: no output (so no loss) for ref
    v_b = model(x_t, t, states, mask, ref=ref_b)
    assert (v_a - v_b).abs().max() > 1e-3  # the reference changes the edit
    v_none = model(x_t, t, states, mask)
    assert (v_a - v_none).abs().max() > 1e-3
    # per-sample: changing sample 1's reference leaves sample 0 alone
    ref_c = ref_a.clone()
    ref_c[1] = ref_b[1]
    v_c = model(x_t, t, states, mask, ref=ref_c)
    torch.testing.assert_close(v_c[0], v_a[0])
    assert (v_c[1] - v_a[1]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="target's shape"):
        model(x_t, t, states, mask, ref=ref_a[:, :, :8])


def test_reference_tokens_share_the_targets_positions():
    """Reference tokens sit on the target's own 2D positions; only the type embedding tells them
    apart. With it zeroed and a fixed routing (so the router cannot see which is which), the
    stream [registers; target A; reference B] is the stream [registers; target B; reference A]
    with the two halves exchanged, so the last block's outputs must be exchanged too. With an
    offset position axis for the reference this would fail."""
    cfg = tiny_cfg()
    cfg.router = RouterConfig(dim=16, heads=2, k=2, mode="last")
    model = MoS(cfg, in_channels=3).eval()
    x_t, t, states, mask = tiny_inputs()
    ref = torch.randn_like(x_t)
    outs = []
    model.gen.blocks[-1].register_forward_hook(lambda m, i, o: outs.append(o))
    with torch.no_grad():
        model.gen.ref_type_embed.zero_()
        model(x_t, t, states, mask, ref=ref)
        model(ref, t, states, mask, ref=x_t)
    R, N = cfg.gen.registers, 16
    assert outs[0].shape == (2, R + 2 * N, 32)  # (B, R + N target + N reference, D_g)
    torch.testing.assert_close(outs[0][:, R:R + N], outs[1][:, R + N:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][:, R + N:], outs[1][:, R:R + N], atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # and the type embedding does break the tie
        model.gen.ref_type_embed.normal_()
        model(x_t, t, states, mask, ref=ref)
    assert (outs[2][:, R:R + N] - outs[0][:, R:R + N]).abs().max() > 1e-4


def test_text_to_image_path_unchanged_without_ref():
    """gen.ref only adds a parameter: with ref=None an edit model is exactly the t2i model."""
    torch.manual_seed(0)
    t2i = randomise_head(MoS(tiny_cfg(ref=False), in_channels=3)).eval()
    edit = MoS(tiny_cfg(ref=True), in_channels=3).eval()
    missing, unexpected = edit.load_state_dict(t2i.state_dict(), strict=False)
    assert missing == ["gen.ref_type_embed"] and unexpected == []
    assert "gen.ref_type_embed" not in t2i.state_dict()  # t2i checkpoints keep their exact keys
    x_t, t, states, mask = tiny_inputs()
    torch.testing.assert_close(edit(x_t, t, states, mask), t2i(x_t, t, states, mask), atol=0, rtol=0)
    with pytest.raises(ValueError, match="no reference-image tokens"):
        t2i(x_t, t, states, mask, ref=x_t)


def test_pre_edit_checkpoint_still_loads(tmp_path):
    # A config.json written before MoS-Edit existed has no gen.ref (nor the later train keys):
    # it must rebuild a text-to-image model that loads the shipped weights strictly.
    import shutil

    src = os.path.join(ROOT, "checkpoints", "toy")
    if not os.path.exists(os.path.join(src, "config.json")):
        pytest.skip("no shipped toy checkpoint")
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["gen"].pop("ref", None)
    for key in ("init_from", "t2i_fraction", "cfg_interval", "stage", "tower_dtype", "micro_batch", "act_ckpt"):
        cfg["train"].pop(key, None)
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(cfg))
    shutil.copy(os.path.join(src, "ema.safetensors"), ckpt / "ema.safetensors")
    model, preset, _ = checkpoint.load_checkpoint(str(ckpt))
    assert preset.model.gen.ref is False and not hasattr(model.gen, "ref_type_embed")


def test_training_step_passes_a_clean_reference_and_leaves_t2i_alone():
    cfg = tiny_cfg()
    preset = presets.get_preset("toy_edit")
    preset.model = cfg
    model = MoS(cfg, in_channels=3)
    seen = {}
    forward = model.forward

    def spy(*args, **kw):
        seen.update(kw)
        return forward(*args, **kw)

    model.forward = spy
    tower = lambda caps, images=None: (torch.randn(len(caps), 4, 3, 16), torch.ones(len(caps), 4, dtype=torch.bool))  # noqa: E731
    from gen_tower import PixelCodec

    src, instr, tgt = data.edit_batch(0, 0, 3, 16)
    loss, per_sample, _ = train.training_step(model, (tgt, instr, src), tower, PixelCodec(), preset, step=0)
    assert torch.equal(seen["ref"], src)  # the reference is the clean source: never noised
    assert per_sample.shape == (3,) and torch.isfinite(loss)
    seen.clear()
    train.training_step(model, (tgt, instr), tower, PixelCodec(), preset, step=0)
    assert "ref" not in seen  # a 2-tuple batch is plain text-to-image


def test_init_weights_from_a_t2i_checkpoint(tmp_path):
    from safetensors.torch import save_file

    t2i = MoS(tiny_cfg(ref=False), in_channels=3)
    save_file(t2i.state_dict(), str(tmp_path / "t2i.safetensors"))
    edit = MoS(tiny_cfg(ref=True), in_channels=3)
    checkpoint.init_weights(edit, str(tmp_path / "t2i.safetensors"))
    for k, v in t2i.state_dict().items():
        assert torch.equal(edit.state_dict()[k], v), k
    other = MoS(ModelConfig(und_states=3, und_dim=16, gen=GenConfig(dim=64, depth=2, heads=2, patch_size=4),
                            router=RouterConfig(dim=16, heads=2)), in_channels=3)
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="cannot initialise"):
        checkpoint.init_weights(edit, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint.init_weights(edit, str(tmp_path / "nope.safetensors"))


def test_toy_edit_preset():
    p = presets.get_preset("toy_edit")
    toy = presets.get_preset("toy")
    assert p.model.gen.ref and not toy.model.gen.ref
    # its one-command export fits the repository's 20 MB limit for a shipped checkpoint
    assert p.phases, "a phased recipe: train_phases exports the EMA in train.export_dtype"
    with torch.device("meta"):
        n = sum(q.numel() for q in checkpoint.build_model(p.model).parameters() if q.requires_grad)
    assert n * torch.finfo(getattr(torch, p.train.export_dtype or "float32")).bits // 8 <= 20e6
    assert p.train.init_from.endswith(os.path.join("toy", "ema.safetensors"))
    shipped = os.path.join(ROOT, "checkpoints", "toy", "config.json")
    if not os.path.exists(shipped):
        pytest.skip("no shipped toy checkpoint")
    with open(shipped) as f:
        toy.model = presets.Preset.from_dict(json.load(f)).model
    # the same model as the shipped toy (grown to 18 blocks), plus reference tokens, and it
    # loads the shipped weights (only the reference type embedding starts fresh)
    edit = checkpoint.build_model(p.model)
    checkpoint.init_weights(edit, os.path.join(ROOT, p.train.init_from))
    p.model.gen.ref = False
    assert p.model == toy.model


# ----------------------------------------------------------------- U: image + instruction


def tiny_plm():
    # The tiny random PerceptionLM / InternVL towers of tests/test_und_tower.py (real model classes,
    # offline processors); PLM adds 4 image tokens to the context, InternVL 4 + <img> </img>.
    from test_und_tower import tiny_tower

    return tiny_tower("plm-8b"), 4


def tiny_internvl():
    from test_und_tower import tiny_tower

    return tiny_tower("internvl-14b"), 6


@pytest.mark.parametrize("build", [tiny_plm, tiny_internvl], ids=["perception_lm", "internvl"])
def test_vlm_tower_reads_image_and_instruction(build):
    from und_tower import edit_context

    tower, n_image = build()
    instructions = ["make the red circle blue", "remove the square"]
    src, _, _ = data.edit_batch(0, 0, 2, 16)  # (2, 3, 16, 16) in [-1, 1]
    out = edit_context(tower, instructions, src)
    text_only = tower(instructions)
    assert out.mask.sum(1).tolist() == [n + n_image for n in text_only.mask.sum(1).tolist()]  # image tokens join L
    # the states depend on the image: another reference gives other states for the same text
    other = edit_context(tower, instructions, -src)
    assert (out.states - other.states).abs().max() > 1e-4
    # TowerMemo routes images to the VLM (no per-caption memo: the states depend on the image)
    memo = und_tower.TowerMemo(tower)
    states, mask = memo(instructions, images=src)
    torch.testing.assert_close(states, out.states.float())
    assert torch.equal(mask, out.mask) and not memo.memo


def test_text_only_tower_reads_the_instruction_only():
    from und_tower import edit_context, load_tower

    tower = load_tower("minilm")
    src, instr, _ = data.edit_batch(0, 0, 2, S)
    out = edit_context(tower, instr, src)
    torch.testing.assert_close(out.states, tower(instr).states)
    states, mask = und_tower.TowerMemo(tower)(instr, images=src)  # images ignored, memo used
    torch.testing.assert_close(states, und_tower.TowerMemo(tower)(instr)[0])


# ----------------------------------------------------------------- edit data


def test_edit_kinds_and_templates_match_design():
    assert data.EDIT_KINDS == ("recolor", "reshape", "add", "remove", "move")
    c, s = "(red|green|blue|yellow|purple|cyan)", "(circle|square|triangle)"
    templates = {"recolor": rf"make the {c} {s} {c}", "reshape": rf"turn the {c} {s} into a {s}",
                 "add": rf"add a {c} {s}", "remove": rf"remove the {c} {s}",
                 "move": rf"move the {c} {s} to the (left|right|top|bottom)"}
    for i in range(60):
        kind = data.EDIT_KINDS[i % 5]
        e = data.sample_edit(np.random.default_rng([5, i]), S, kind)
        assert re.fullmatch(templates[kind], e.instruction), e.instruction
        kept = set(e.source) & set(e.target)  # objects left exactly in place
        assert len(kept) == len(e.source) - (kind != "add") and len(e.target) - len(kept) == (kind != "remove")


def test_make_data_for_edit_presets_and_t2i_mixing():
    p = presets.get_preset("toy_edit")
    b = train.make_data("shapesworld", p.model, seed=0)(3, 4)
    src, instr, tgt = data.edit_batch(0, 12, 4, S)
    assert torch.equal(b[0], tgt) and b[1] == instr and torch.equal(b[2], src)  # (targets, instructions, refs)
    mixed = train.make_data("shapesworld", p.model, seed=0, t2i_fraction=0.5)
    sizes = [len(mixed(step, 2)) for step in range(40)]
    assert 5 < sizes.count(2) < 35 and sizes.count(2) + sizes.count(3) == 40


def _write_png(path, size, color=(220, 30, 30)):
    Image.new("RGB", size, color).save(path)


def test_edit_jsonl_reader_and_batches(tmp_path):
    (tmp_path / "img").mkdir()
    _write_png(tmp_path / "img" / "a.png", (40, 40))
    _write_png(tmp_path / "img" / "b.png", (64, 48), (30, 60, 220))
    lines = [{"source": "img/a.png", "instruction": "make the red square blue", "target": "img/b.png"},
             {"source": "img/b.png", "instruction": "make the blue square red", "target": "img/a.png"}]
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    recs = data.read_edit_records(str(tmp_path / "edits.jsonl"))
    assert recs[0] == (str(tmp_path / "img" / "a.png"), "make the red square blue", str(tmp_path / "img" / "b.png"))
    ed = data.EditData(str(tmp_path / "edits.jsonl"), size=S, seed=0)
    src, instr, tgt = ed.batch(0, 4)
    assert src.shape == tgt.shape == (4, 3, S, S) and len(instr) == 4
    for s, i, t in zip(src, instr, tgt):  # each target is the other colour of its own source
        red = torch.tensor([220, 30, 30]) / 127.5 - 1
        assert torch.allclose(s[:, 0, 0], red, atol=0.01) == i.startswith("make the red")
        assert not torch.allclose(s, t)
    torch.testing.assert_close(ed.batch(0, 4)[0], src)  # a pure function of (seed, step)
    (tmp_path / "bad.jsonl").write_text('{"source": "img/a.png", "target": "img/b.png"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: expected a JSON object with 'source', 'instruction'"):
        data.read_edit_records(str(tmp_path / "bad.jsonl"))
    with pytest.raises(ValueError, match="not a .jsonl manifest"):
        data.read_edit_records(str(tmp_path / "img"))


# ----------------------------------------------------------------- edit.py and eval.py --edit


@pytest.fixture(scope="module")
def edit_ckpt(tmp_path_factory):
    """A tiny toy_edit checkpoint (MiniLM tower, random weights) saved the way train.py saves."""
    p = presets.get_preset("toy_edit")
    p.model.gen = GenConfig(dim=32, depth=2, heads=2, patch_size=8, prediction="x", ref=True)
    p.model.router = RouterConfig(dim=16, heads=2)
    p.train.sample_steps, p.train.cfg = 2, 2.0
    torch.manual_seed(0)
    model = randomise_head(checkpoint.build_model(p.model))
    out = tmp_path_factory.mktemp("edit_ckpt")
    return checkpoint.save_checkpoint(str(out), 1, model, model, p, None)


def test_edit_cli_single_and_jsonl(edit_ckpt, tmp_path, capsys, assert_same_image):
    import edit

    img = data.render(data.sample_edit(np.random.default_rng(0), S, "recolor").source, S)
    Image.fromarray(img).save(tmp_path / "src.png")
    Image.fromarray(img).resize((48, 48)).save(tmp_path / "big.png")
    out = tmp_path / "out.png"
    assert edit.main(edit.parse_args([str(tmp_path / "src.png"), "make the red circle blue", "--ckpt", edit_ckpt,
                                      "--out", str(out), "--seed", "3"])) == 0
    single = np.asarray(Image.open(out))
    assert single.shape == (S, S, 3)
    edit.main(edit.parse_args([str(tmp_path / "big.png"), "remove the blue square", "--ckpt", edit_ckpt,
                               "--out", str(tmp_path / "o2.png")]))
    assert "resized to the model's 32x32" in capsys.readouterr().err
    lines = [{"image": "big.png", "instruction": "remove the blue square"},
             {"image": "src.png", "instruction": "make the red circle blue"}]
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    grid = tmp_path / "grid.png"
    assert edit.main(edit.parse_args(["--edits", str(tmp_path / "e.jsonl"), "--outdir", str(tmp_path / "d"),
                                      "--ckpt", edit_ckpt, "--seed", "2", "--grid", str(grid)])) == 0
    assert sorted(os.listdir(tmp_path / "d")) == ["0000.png", "0001.png"]
    # --grid: the sources (as the model saw them) above their edits, each tile ×3 with a 2 px frame
    g = np.asarray(Image.open(grid))
    assert g.shape == (2 * (3 * S + 2) + 2, 2 * (3 * S + 2) + 2, 3)
    tile = lambda r, c: g[2 + r * (3 * S + 2):2 + r * (3 * S + 2) + 3 * S:3, 2 + c * (3 * S + 2):2 + c * (3 * S + 2) + 3 * S:3]  # noqa: E731
    assert np.array_equal(tile(0, 1), img)
    assert np.array_equal(tile(1, 0), np.asarray(Image.open(tmp_path / "d" / "0000.png")))
    assert np.array_equal(tile(1, 1), np.asarray(Image.open(tmp_path / "d" / "0001.png")))
    with pytest.raises(ValueError, match="--grid needs --edits"):
        edit.main(edit.parse_args([str(tmp_path / "src.png"), "add a green triangle", "--grid", str(grid)]))
    # line i with --seed S is the same image as that edit alone with --seed S+i (up to rounding)
    assert_same_image(Image.open(tmp_path / "d" / "0001.png"), single)
    # another instruction gives another picture (CFG on the instruction reaches the output)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "d" / "0000.png")), single)


def test_edit_cli_bad_inputs(edit_ckpt, tmp_path):
    import edit

    # Through the real entry point once: one "error: ..." line and a non-zero exit. The input is
    # checked before the checkpoint loads, so this is quick.
    r = subprocess.run([sys.executable, os.path.join(ROOT, "edit.py"), str(tmp_path / "missing.png"),
                        "make the red circle blue", "--ckpt", edit_ckpt], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode != 0
    assert r.stderr.strip() == f"error: image {str(tmp_path / 'missing.png')!r} does not exist", r.stderr
    # The other bad inputs raise the ValueError that __main__ turns into that one line.
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (S, S), "white").save(tmp_path / "ok.png")
    cases = [([str(tmp_path / "notes.png"), "make the red circle blue"], "is not an image file that can be read"),
             ([str(tmp_path / "ok.png"), "   "], "the instruction is empty"),
             ([str(tmp_path / "ok.png")], "give an image and an instruction"),
             ([str(tmp_path / "ok.png"), "remove the red circle", "--ckpt", str(tmp_path / "nockpt")], "does not exist")]
    for argv, message in cases:
        with pytest.raises(ValueError, match=message):
            edit.main(edit.parse_args(argv + (["--ckpt", edit_ckpt] if "--ckpt" not in argv else [])))
    (tmp_path / "e.jsonl").write_text('{"image": "ok.png", "instruction": ""}\n')
    with pytest.raises(ValueError, match="e.jsonl:1: the instruction is empty"):
        edit.main(edit.parse_args(["--edits", str(tmp_path / "e.jsonl"), "--ckpt", edit_ckpt]))
    t2i = os.path.join(ROOT, "checkpoints", "toy")
    if os.path.exists(os.path.join(t2i, "config.json")):
        with pytest.raises(ValueError, match="text-to-image model"):
            edit.main(edit.parse_args([str(tmp_path / "ok.png"), "remove the red circle", "--ckpt", t2i]))


def test_edit_cli_unreadable_files_and_bad_counts_name_what_is_wrong(edit_ckpt, tmp_path, monkeypatch):
    """Issue #27: a directory given as the image, a non-UTF-8 or unreadable --edits file, a
    non-positive count: one ValueError line naming it, before the checkpoint loads."""
    import edit

    r = subprocess.run([sys.executable, os.path.join(ROOT, "edit.py"), str(tmp_path), "make the red circle blue",
                        "--ckpt", edit_ckpt], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: image {str(tmp_path)!r} is a directory, not an image file", r.stderr

    def no_load(*a, **k):
        raise AssertionError("the checkpoint loaded before the inputs were checked")

    monkeypatch.setattr(edit, "load_edit_model", no_load)
    Image.new("RGB", (S, S), "white").save(tmp_path / "ok.png")
    (tmp_path / "latin1.jsonl").write_bytes('{"image": "ok.png", "instruction": "caf\xe9"}\n'.encode("latin-1"))
    ok = [str(tmp_path / "ok.png"), "make the red circle blue"]
    cases = [(["--edits", str(tmp_path / "latin1.jsonl")],
              f"edit file {str(tmp_path / 'latin1.jsonl')!r} is not UTF-8 text (it holds the byte 0xe9); save it as UTF-8"),
             (["--edits", str(tmp_path)], f"cannot read edit file {str(tmp_path)!r}: Is a directory"),
             (ok + ["--steps", "0"], "--steps must be a positive integer, got 0"),
             (ok + ["--batch-size", "-1"], "--batch-size must be a positive integer, got -1")]
    for argv, message in cases:
        with pytest.raises(ValueError) as e:
            edit.main(edit.parse_args(argv + ["--ckpt", edit_ckpt]))
        assert str(e.value) == message


def test_evaluate_edits_scores_per_kind(edit_ckpt, monkeypatch, tmp_path):
    import edit
    import eval as evaluation
    from sample import load_everything

    model, tower, codec, preset = load_everything(edit_ckpt)
    scores, records = evaluation.evaluate_edits(model, tower, codec, preset, per_kind=1, progress=False)
    assert set(scores) == set(data.EDIT_KINDS) | {"overall", "n"} and scores["n"] == 5
    assert all(0.0 <= scores[k] <= 1.0 for k in data.EDIT_KINDS)
    # An oracle that draws the target scores 1 on every kind; one that returns the source
    # unchanged scores 0 (every kind changes the scene by more than the match tolerance).
    by_instruction = {r["instruction"]: r for r in evaluation.edit_benchmark(per_kind=3, size=S)}

    def oracle(which):
        def fake(model, tower, codec, preset, refs, instructions, **kw):
            return np.stack([data.render(by_instruction[i][which], S) for i in instructions])
        return fake

    monkeypatch.setattr(edit, "edit_images", oracle("target"))
    good, recs = evaluation.evaluate_edits(model, tower, codec, preset, per_kind=3, progress=False)
    assert all(good[k] == 1.0 for k in data.EDIT_KINDS) and good["overall"] == 1.0
    evaluation.save_edit_strip(recs, str(tmp_path / "strip.png"), S, per_kind=1)
    assert Image.open(tmp_path / "strip.png").size[0] > 5 * S
    monkeypatch.setattr(edit, "edit_images", oracle("source"))
    bad, _ = evaluation.evaluate_edits(model, tower, codec, preset, per_kind=3, progress=False)
    assert bad["overall"] == 0.0
