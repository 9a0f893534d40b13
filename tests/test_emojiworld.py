"""EmojiWorld (emojiworld.py): the font renders, the glyph table holds the required
concepts, captions are true of their scenes and false of perturbed ones, held-out synonyms never
reach a training caption, batches are deterministic, and accessories sit where the anchors say."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import data
import emojiworld as E

REQUIRED = ("dog", "cat", "sign", "glasses", "sunglasses", "top hat", "apple", "pizza", "car", "tree")


def test_font_loads_and_glyphs_are_colour_images():
    for key in ("dog", "sign", "sunglasses", "tree"):
        g = E.glyph_image(E.BY_KEY[key].codepoint, 32)
        assert g.mode == "RGBA" and max(g.size) == 32
        a = np.asarray(g)
        opaque = a[..., 3] > 128
        assert opaque.mean() > 0.15, key  # cropped to the alpha box: mostly glyph
        rgb = a[opaque][:, :3].astype(int)
        assert np.ptp(rgb, axis=0).max() > 60, key  # more than one colour
    # the dog is orange-ish (red > blue), not a black silhouette: the COLR layers were drawn
    rgb = np.asarray(E.glyph_image(E.BY_KEY["dog"].codepoint, 32))[..., :3].reshape(-1, 3).astype(int)
    assert (rgb[:, 0] - rgb[:, 2] > 80).mean() > 0.2


def test_glyph_table():
    assert len(E.GLYPHS) >= 30 and len(E.BY_KEY) == len(E.GLYPHS)
    assert set(REQUIRED) <= set(E.BY_KEY)
    assert E.BY_KEY["sign"].codepoint == "\U0001FAA7" and E.BY_KEY["sunglasses"].codepoint == "\U0001F576"
    for g in E.GLYPHS:
        assert g.kind in ("animal", "held", "wearable", "other")
        if g.kind == "animal":
            assert g.eyes and g.head and g.hand is not None
            assert all(0 <= f <= 1 for f in (*g.eyes, *g.head, g.hand))
        if g.kind == "wearable":
            assert g.slot in ("eyes", "head")
    # no held-out word is also some glyph's training noun
    assert not E.HELD_OUT_WORDS & {w for g in E.GLYPHS for w in E.words(g.noun + " " + g.plural)}
    for w in ("puppy", "kitty", "signboard", "spectacles", "shades", "automobile"):
        assert w in E.HELD_OUT_WORDS


def test_world_vocabulary_in_data_worlds():
    w = data.WORLDS["emojiworld"]
    assert w.knows("a dog holding a sign") and w.knows("sunglasses") and not w.knows("a purple triangle")


def test_training_captions_true_exact_and_without_synonyms():
    kinds = set()
    for i in range(400):
        items, caption, spec = E.sample_example_spec(E.example_rng(3, i))
        kinds.add(spec["kind"])
        assert E.holds(spec, items, exact=True), (caption, items)
        assert not set(E.words(caption)) & E.HELD_OUT_WORDS, caption
        for it in items:  # every glyph inside the canvas
            assert 0 <= it.x and 0 <= it.y and it.x + it.w <= E.SIZE and it.y + it.h <= E.SIZE
    assert kinds == set(E.CAPTION_MIX)


def _scene(spec, seed=0):
    return E.scene_for_spec(np.random.default_rng(seed), spec)


def test_perturbed_scenes_are_false():
    pos = {"kind": "position", "glyphs": ["dog", "car"], "relation": "to the left of", "template": 0}
    for s in range(10):
        items = _scene(pos, s)
        assert E.holds(pos, items)
        assert not E.holds(pos | {"relation": "to the right of"}, items)
        assert not E.holds(pos | {"glyphs": ["cat", "car"]}, items)  # a cat is not a dog
    cnt = {"kind": "counting", "glyph": "apple", "count": 3, "template": 0}
    items = _scene(cnt)
    assert E.holds(cnt, items) and not E.holds(cnt | {"count": 2}, items)
    assert not E.holds(cnt, items[:2])
    wear = {"kind": "wearing", "animal": "dog", "wearable": "top hat", "template": 0}
    items = _scene(wear)
    animal, hat = items
    assert E.holds(wear, items, exact=True)
    assert not E.holds(wear | {"wearable": "crown"}, items)
    assert not E.holds(wear, [animal, replace(hat, y=hat.y + animal.h // 2)])  # hat off the head
    assert not E.holds(wear, [animal, replace(hat, x=hat.x + animal.w)])  # beside the head
    glasses = {"kind": "wearing", "animal": "cat", "wearable": "sunglasses", "template": 0}
    items = _scene(glasses)
    assert E.holds(glasses, items) and not E.holds(glasses | {"wearable": "glasses"}, items)
    held = {"kind": "holding", "animal": "dog", "held": "sign", "template": 0}
    items = _scene(held)
    animal, sign = items
    assert E.holds(held, items, exact=True)
    assert not E.holds(held | {"held": "apple"}, items)
    assert not E.holds(held, [animal, replace(sign, x=sign.x + 4)])  # a gap: not touching
    assert not E.holds(held, [animal, replace(sign, y=sign.y - animal.h)])  # far above the hand


def test_accessory_placement_follows_the_anchors():
    for a in E.ANIMALS:
        animal = E.item(a, 3, 10, 16)
        g = E.BY_KEY[a]
        tol = 1.0  # px: rounding only
        for w in ("glasses", "sunglasses"):
            acc = E.wear(animal, w)
            assert abs(acc.cy - (animal.y + g.eyes[1] * animal.h)) <= tol  # on the eye line
            assert abs(acc.cx - (animal.x + g.eyes[0] * animal.w)) <= tol
        hat = E.wear(animal, "top hat")
        assert abs(hat.y + hat.h - (animal.y + g.head[1] * animal.h)) <= tol  # bottom on the head top
        sign = E.hold(animal, "sign")
        assert sign.x == animal.x + animal.w  # touches the front (right) edge
        assert abs(sign.cy - (animal.y + g.hand * animal.h)) <= tol


def test_batches_deterministic_and_in_range():
    x, caps = E.emoji_batch(7, 100, 6)
    assert x.shape == (6, 3, E.SIZE, E.SIZE) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < 0.5  # not blank
    y, caps2 = E.emoji_batch(7, 100, 6)
    assert torch.equal(x, y) and caps == caps2
    z, caps3 = E.emoji_batch(7, 103, 3)  # resumable: example i is a function of (seed, i)
    assert torch.equal(z, x[3:]) and caps3 == caps[3:]
    assert E.emoji_batch(8, 100, 6)[1] != caps


def test_eval_prompts_use_held_out_synonyms():
    recs = E.eval_prompts(0, 50)
    assert len(recs) == 50
    for r in recs:
        assert set(E.words(r["prompt"])) & E.HELD_OUT_WORDS, r["prompt"]
        assert r["spec"]["kind"] in E.CAPTION_MIX
    assert recs == E.eval_prompts(0, 50)


@pytest.mark.parametrize("kind", tuple(E.CAPTION_MIX))
def test_rendered_scene_matches_items(kind):
    """The render draws each item inside its box: pixels outside every box are background."""
    items = _scene(E.sample_spec(np.random.default_rng(1), kind), 1)
    img = E.render(items)
    mask = np.zeros(img.shape[:2], bool)
    for it in items:
        mask[it.y:it.y + it.h, it.x:it.x + it.w] = True
    assert (img[~mask] == E.BACKGROUND).all()
    assert (img[mask] != E.BACKGROUND).any(axis=-1).mean() > 0.2


# ---------------------------------------------------------------- edits


def _units_of(items):
    """{animal or lone glyph key: its unit's items} (accessories follow their animal)."""
    out, cur = {}, None
    for i in items:
        if E.BY_KEY[i.key].kind in ("wearable", "held") and cur is not None and (
                E.is_worn(i, cur[0]) or E.is_held(i, cur[0])):
            cur.append(i)
        else:
            cur = [i]
            out[i.key] = cur
    return out


@pytest.mark.parametrize("kind", E.EDIT_KINDS)
def test_edit_triplets_change_only_what_the_instruction_says(kind):
    """Each edit kind's target differs from its source by exactly the edit: the wearable appears
    worn (or disappears), the held object is swapped and held, or one unit slides ≥ MIN_MOVE·S to
    the named edge; every other glyph keeps its exact place; both scenes stay on the canvas."""
    for i in range(25):
        e = E.sample_edit(np.random.default_rng([5, i]), E.SIZE, kind)
        assert e.kind == kind and e.instruction
        for scene in (e.source, e.target):
            assert all(0 <= it.x and it.x + it.w <= E.SIZE and 0 <= it.y and it.y + it.h <= E.SIZE for it in scene)
        src, tgt = _units_of(e.source), _units_of(e.target)
        assert src.keys() == tgt.keys()
        animal = next(k for k in src if E.BY_KEY[k].kind == "animal")
        changed = {k for k in src if src[k] != tgt[k]}
        if kind == "move":
            (k,) = changed
            assert E.BY_KEY[k].noun in e.instruction
            edge = next(x for x in E.EDGES if e.instruction.endswith(x))
            x0, y0, x1, y1 = E._bounds(tgt[k])
            assert {"left": x0 == 0, "right": x1 == E.SIZE, "top": y0 == 0, "bottom": y1 == E.SIZE}[edge]
            assert [it.key for it in src[k]] == [it.key for it in tgt[k]]
            shift = np.hypot(tgt[k][0].x - src[k][0].x, tgt[k][0].y - src[k][0].y)
            assert shift >= E.MIN_MOVE * E.SIZE
            continue
        assert changed == {animal} and src[animal][0] == tgt[animal][0]  # the animal itself stays put
        before = {it.key for it in src[animal][1:]}
        after = {it.key for it in tgt[animal][1:]}
        if kind == "add_wearable":
            (w,) = after - before
            assert E.BY_KEY[w].kind == "wearable" and E.BY_KEY[w].noun in e.instruction
            assert not any(E.BY_KEY[x].kind == "wearable" for x in before)
        elif kind == "remove_wearable":
            (w,) = before - after
            assert E.BY_KEY[w].kind == "wearable" and E.BY_KEY[w].noun in e.instruction
        else:
            (old,), (new,) = before - after, after - before
            assert {E.BY_KEY[old].kind, E.BY_KEY[new].kind} == {"held"}
            assert E.BY_KEY[new].noun in e.instruction


def test_add_glasses_is_in_the_training_instructions():
    """The README's command says just "add glasses": the short form is a training template."""
    seen = {E.sample_edit(np.random.default_rng([6, i]), E.SIZE, "add_wearable").instruction for i in range(200)}
    assert "add glasses" in seen and "add a top hat" in seen


def test_edit_batch_deterministic_and_resumable():
    s, ins, t = E.edit_batch(3, 40, 4)
    assert s.shape == t.shape == (4, 3, E.SIZE, E.SIZE) and len(ins) == 4
    s2, ins2, t2 = E.edit_batch(3, 42, 2)
    assert torch.equal(s[2:], s2) and torch.equal(t[2:], t2) and ins[2:] == ins2
    assert not torch.equal(s, t)


def test_edit_scoring_on_rendered_scenes():
    """The detector reads back rendered sources and targets exactly (edit_correct true), a
    source never passes for its own target (an unchanged image scores 0), and near misses fail:
    a swapped glyph, a missing accessory, an extra glyph, a glyph beyond 0.2·S of its place."""
    for k, kind in enumerate(E.EDIT_KINDS):
        e = E.sample_edit(np.random.default_rng([7, k]), E.SIZE, kind)
        tgt = E.detect(E.render(e.target))
        assert E.edit_correct(e.target, tgt)
        assert not E.edit_correct(e.target, E.detect(E.render(e.source)))
    target = [E.item("dog", 4, 6, 16)]
    target.append(E.wear(target[0], "glasses"))
    assert E.edit_correct(target, [replace(target[0], x=6), replace(target[1], x=target[1].x + 2)])  # within 0.2·S
    assert not E.edit_correct(target, [replace(target[0], x=12), replace(target[1], x=target[1].x + 8)])
    assert not E.edit_correct(target, [replace(target[0], key="cat"), target[1]])
    assert not E.edit_correct(target, target[:1])
    assert not E.edit_correct(target, target + [E.item("tree", 24, 2, 6)])
    assert not E.edit_correct(target, target + [E.Item(E.UNKNOWN, 24, 2, 6, 6, 6)])


def test_examples_folder_holds_the_world_renders(tmp_path):
    """examples/*.png are exactly what `python emojiworld.py --examples examples` writes, and the
    detector reads each back as its scene."""
    from PIL import Image

    E.write_examples(str(tmp_path))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in E.EXAMPLES:
        shipped = np.asarray(Image.open(os.path.join(root, "examples", name)).convert("RGB"))
        assert np.array_equal(shipped, np.asarray(Image.open(tmp_path / name).convert("RGB"))), name
        assert E.edit_correct(E.example_items(name), E.detect(shipped)), name
