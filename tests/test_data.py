"""Tests for data.py — ShapesWorld (docs/design.md §13): the world's rules, caption truth, held-out
pairs, determinism and exact resume, and edit triplets."""

import itertools
import math
import re

import numpy as np
import pytest
import torch

import data
import eval as evaluation  # the detector; a bare `eval` would shadow the builtin

S = 32


def assert_valid_scene(objs, size=S, held_out_ok=False):
    lo, hi = data.size_range(size)
    assert 1 <= len(objs) <= data.MAX_OBJECTS
    for o in objs:
        assert o.shape in data.SHAPES and o.color in data.PALETTE
        assert lo <= o.size <= hi and o.size == int(o.size)
        assert data.inside(o, size)
        left, top, _, _ = o.box
        assert left == int(left) and top == int(top)  # boxes on the integer pixel grid
        if not held_out_ok:
            assert (o.color, o.shape) not in data.HELD_OUT
    for a, b in itertools.combinations(objs, 2):
        assert data.separated(a, b)


# ------------------------------------------------------------------ the world's rules

def test_palette_and_vocabulary_are_exactly_the_design():
    assert data.PALETTE == {
        "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220),
        "yellow": (235, 200, 20), "purple": (140, 50, 190), "cyan": (20, 190, 210),
    }
    assert data.SHAPES == ("circle", "square", "triangle")
    assert data.HELD_OUT == {("purple", "triangle"), ("cyan", "circle")}
    assert data.size_range(32) == (8, 12)
    assert data.size_range(64) == (16, 24)
    assert math.isclose(sum(data.CAPTION_MIX.values()), 1.0)


def test_size_range_rejects_tiny_canvas():
    with pytest.raises(ValueError, match="at least 16"):
        data.size_range(8)


@pytest.mark.parametrize("size", [16, 32, 64])
def test_random_scenes_follow_the_rules(size):
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(300):
        objs = data.random_scene(rng, size)
        assert_valid_scene(objs, size)
        counts.add(len(objs))
    assert counts == {1, 2, 3, 4}


def test_render_is_white_with_exact_colours_and_crisp_boxes():
    sq = data.Obj("square", "blue", cx=10.0, cy=12.0, size=8.0)  # box x 6..13, y 8..15
    img = data.render([sq], S)
    assert img.dtype == np.uint8 and img.shape == (S, S, 3)
    assert (img[8:16, 6:14] == data.PALETTE["blue"]).all()
    mask = np.ones((S, S), bool)
    mask[8:16, 6:14] = False
    assert (img[mask] == 255).all()
    # Circles and triangles stay inside their box and reach full colour in their interior.
    for shape in ("circle", "triangle"):
        img = data.render([data.Obj(shape, "red", 16.0, 16.0, 12.0)], S)
        assert (img[mask_outside_box(10, 10, 12)] == 255).all()
        assert (img[19, 16] == data.PALETTE["red"]).all()
    # An upright triangle: narrow at the top row of its box, wide at the bottom row.
    tri = data.render([data.Obj("triangle", "green", 16.0, 16.0, 12.0)], S)
    inked = (tri != 255).any(axis=2)
    assert inked[10].sum() <= 2 and inked[21].sum() == 12


def mask_outside_box(x0, y0, side):
    mask = np.ones((S, S), bool)
    mask[y0:y0 + side, x0:x0 + side] = False
    return mask


def test_render_rejects_objects_off_the_canvas_and_unknown_names():
    with pytest.raises(ValueError, match="does not fit"):
        data.render([data.Obj("circle", "red", 2.0, 16.0, 8.0)], S)
    with pytest.raises(ValueError, match="Unknown colour"):
        data.render([data.Obj("circle", "pink", 16.0, 16.0, 8.0)], S)
    with pytest.raises(ValueError, match="Unknown shape"):
        data.render([data.Obj("hexagon", "red", 16.0, 16.0, 8.0)], S)


# ------------------------------------------------------------------ captions

# docs/design.md §13.5's six templates, written out independently of data.caption_for_spec (test_eval
# uses them too).
BENCHMARK_PATTERNS = {
    "single_object": r"a (circle|square|triangle)",
    "two_object": r"a (circle|square|triangle) and a (circle|square|triangle)",
    "counting": r"(two|three|four) (circle|square|triangle)s",
    "colors": r"a (red|green|blue|yellow|purple|cyan) (circle|square|triangle)",
    "position": r"a (circle|square|triangle) (to the left of|to the right of|above|below) "
                r"a (circle|square|triangle)",
    "color_attr": r"a (red|green|blue|yellow|purple|cyan) (circle|square|triangle) and "
                  r"a (red|green|blue|yellow|purple|cyan) (circle|square|triangle)",
}


def test_every_caption_is_true_of_its_scene_and_of_the_rendered_image():
    rng = np.random.default_rng(1)
    kinds = set()
    for _ in range(1500):
        objs, caption, spec = data.sample_example_spec(rng, S)
        kinds.add(spec["kind"])
        assert caption == data.caption_for_spec(spec)
        assert caption == caption.lower()
        assert_valid_scene(objs)
        # True of the ground-truth objects, with nothing extra the caption would deny ...
        assert data.holds(spec, objs, S, exact=True), (caption, objs)
        # ... and of what the detector sees in the rendered image.
        seen = evaluation.detect(data.render(objs, S))
        assert data.holds(spec, seen, S, exact=True), (caption, seen)
        if spec["kind"] in BENCHMARK_PATTERNS:
            assert re.fullmatch(BENCHMARK_PATTERNS[spec["kind"]], caption), caption
        if spec["kind"] in ("two_object", "position"):
            assert spec["shapes"][0] != spec["shapes"][1]
        if spec["kind"] == "color_attr":
            (c1, s1), (c2, s2) = spec["objects"]
            assert c1 != c2 and s1 != s2
    assert kinds == set(data.CAPTION_MIX)


def test_scene_captions_name_every_object_with_its_place():
    objs = [data.Obj("circle", "red", 5.0, 5.0, 8.0), data.Obj("square", "blue", 26.0, 26.0, 10.0),
            data.Obj("triangle", "green", 16.0, 16.0, 8.0)]
    caption = data.caption_for_spec(data.describe_scene(objs, S))
    assert caption == ("a red circle at the top left, a green triangle in the centre, "
                       "a blue square at the bottom right")


def test_and_captions_name_their_objects_in_reading_order():
    # "a circle and a square" is as true with the circle on the right, but a fixed mention
    # order (top row first, then left to right, as in scene captions) tells the model which
    # object is which: the symmetry breaker for the shape-binding failure (docs/experiments.md §7).
    rng = np.random.default_rng(4)
    seen = set()
    for _ in range(600):
        objs, caption, spec = data.sample_example_spec(rng, S)
        if spec["kind"] not in ("two_object", "color_attr"):
            continue
        seen.add(spec["kind"])
        named = spec["shapes"] if spec["kind"] == "two_object" else [o[1] for o in spec["objects"]]
        order = sorted(objs, key=data.reading_order(S))
        assert [o.shape for o in order] == named, (caption, objs)
        if spec["kind"] == "color_attr":
            assert [[o.color, o.shape] for o in order] == spec["objects"], (caption, objs)
    assert seen == {"two_object", "color_attr"}


def test_position_relation_uses_the_margin():
    a = data.Obj("circle", "red", 10.0, 16.0, 8.0)
    assert data.relation_holds(a, "to the left of", data.Obj("square", "red", 13.3, 16.0, 8.0), S)
    assert not data.relation_holds(a, "to the left of", data.Obj("square", "red", 13.1, 16.0, 8.0), S)
    assert data.relation_holds(a, "above", data.Obj("square", "red", 10.0, 19.3, 8.0), S)
    assert data.relation_holds(data.Obj("square", "red", 10.0, 19.3, 8.0), "below", a, S)


def test_held_out_pairs_never_appear_in_training():
    rng = np.random.default_rng(2)
    for _ in range(5000):
        objs, caption = data.sample_example(rng, S)
        assert not any((o.color, o.shape) in data.HELD_OUT for o in objs), objs
        assert "purple triangle" not in caption and "cyan circle" not in caption, caption
    with pytest.raises(ValueError, match="held-out"):
        data.scene_for_spec(rng, {"kind": "colors", "color": "cyan", "shape": "circle"}, S)
    # Benchmark ground truth may ask for them explicitly.
    objs = data.scene_for_spec(rng, {"kind": "colors", "color": "cyan", "shape": "circle"}, S,
                               allow_held_out=True)
    assert [(o.color, o.shape) for o in objs] == [("cyan", "circle")]


# ------------------------------------------------------------------ the stream

def take(stream, n):
    return [next(stream) for _ in range(n)]


def test_stream_is_deterministic_and_resumes_exactly():
    ds = data.ShapesWorld(size=S, seed=7)
    full = take(iter(ds), 12)
    assert ds.position == 12
    again = take(iter(data.ShapesWorld(size=S, seed=7)), 12)
    resumed_ds = data.ShapesWorld(size=S, seed=7, start=5)
    resumed = take(iter(resumed_ds), 7)
    assert resumed_ds.position == 12
    for a, b in zip(full, again):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    for a, b in zip(full[5:], resumed):
        assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])
    # state_dict round trip continues where the first stream stopped.
    ds2 = data.ShapesWorld(size=S, seed=0)
    ds2.load_state_dict(ds.state_dict())
    nxt = take(iter(ds2), 1)[0]
    ref = take(iter(data.ShapesWorld(size=S, seed=7, start=12)), 1)[0]
    assert nxt["caption"] == ref["caption"] and torch.equal(nxt["image"], ref["image"])
    # A different seed is a different stream.
    other = take(iter(data.ShapesWorld(size=S, seed=8)), 12)
    assert [x["caption"] for x in other] != [x["caption"] for x in full]


def test_batch_helper_matches_the_stream_and_tensor_format():
    images, captions = data.shapes_batch(seed=3, start=10, batch_size=16, size=S)
    assert images.shape == (16, 3, S, S) and images.dtype == torch.float32
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert images.max() == 1.0  # the white background
    stream = take(iter(data.ShapesWorld(size=S, seed=3, start=10)), 16)
    assert captions == [x["caption"] for x in stream]
    assert torch.equal(images, torch.stack([x["image"] for x in stream]))
    x = stream[0]["image"]
    assert x.shape == (3, S, S) and x.dtype == torch.float32


# ------------------------------------------------------------------ edits

EDIT_PATTERNS = {
    "recolor": r"make the (\w+) (\w+) (\w+)",
    "reshape": r"turn the (\w+) (\w+) into a (\w+)",
    "add": r"add a (\w+) (\w+)",
    "remove": r"remove the (\w+) (\w+)",
    "move": r"move the (\w+) (\w+) to the (left|right|top|bottom)",
}


def pairs(objs):
    return [(o.color, o.shape) for o in objs]


def test_edits_do_what_the_instruction_says_and_nothing_else():
    rng = np.random.default_rng(4)
    kinds = set()
    for _ in range(600):
        e = data.sample_edit(rng, S)
        kinds.add(e.kind)
        m = re.fullmatch(EDIT_PATTERNS[e.kind], e.instruction)
        assert m, e.instruction
        src, tgt = list(e.source), list(e.target)
        assert_valid_scene(src)
        assert_valid_scene(tgt)
        if e.kind == "add":
            assert tgt[:-1] == src and pairs(tgt[-1:]) == [(m[1], m[2])]
            continue
        named = (m[1], m[2])
        assert pairs(src).count(named) == 1  # the instruction is unambiguous
        i = pairs(src).index(named)
        others_src = src[:i] + src[i + 1:]
        if e.kind == "remove":
            assert tgt == others_src
            continue
        assert tgt[:i] + tgt[i + 1:] == others_src  # everyone else stays exactly put
        old, new = src[i], tgt[i]
        if e.kind == "recolor":
            assert new == data.Obj(old.shape, m[3], old.cx, old.cy, old.size) and m[3] != old.color
        elif e.kind == "reshape":
            assert new == data.Obj(m[3], old.color, old.cx, old.cy, old.size) and m[3] != old.shape
        else:  # move: the box now touches that edge, same size, moved far enough
            left, top, right, bottom = new.box
            edge = {"left": left == 0, "right": right == S, "top": top == 0, "bottom": bottom == S}
            assert edge[m[3]]
            assert (new.color, new.shape, new.size) == (old.color, old.shape, old.size)
            if m[3] in ("left", "right"):
                assert new.cy == old.cy
            else:
                assert new.cx == old.cx
            assert math.hypot(new.cx - old.cx, new.cy - old.cy) >= data.MIN_MOVE * S
    assert kinds == set(data.EDIT_KINDS)


def test_edit_batch_is_deterministic():
    a = data.edit_batch(seed=1, start=0, batch_size=4, size=S)
    b = data.edit_batch(seed=1, start=0, batch_size=4, size=S)
    assert a[1] == b[1] and torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    assert a[0].shape == (4, 3, S, S) and not torch.equal(a[0], a[2])


def test_caption_kind_follows_a_patched_caption_mix(monkeypatch):
    # Experiments (docs/experiments.md §7) patch data.CAPTION_MIX alone; the draw
    # must read the dict itself, not a table cached at import.
    mix = {k: 0.0 for k in data.CAPTION_MIX} | {"counting": 1.0}
    monkeypatch.setattr(data, "CAPTION_MIX", mix)
    rng = np.random.default_rng(0)
    assert {data.sample_example_spec(rng)[2]["kind"] for _ in range(40)} == {"counting"}


def test_world_vocabulary_comes_from_the_world_definition():
    """data.WORLDS["shapesworld"] is built from SHAPES, COLORS, COUNT_WORDS and RELATIONS (no
    second copy), knows plurals and ignores case and function words ("to the", "of")."""
    w = data.WORLDS["shapesworld"]
    assert w.vocabulary == {"shapes": data.SHAPES, "colours": data.COLORS,
                            "counts": tuple(data.COUNT_WORDS.values()), "relations": data.RELATIONS}
    assert {"circle", "cyan", "three", "left", "below"} <= w.words()
    assert not {"a", "the", "to", "of"} & w.words()
    assert w.knows("Three SQUARES") and w.knows("a purple thing") and w.knows("what is above?")
    assert not w.knows("a dog holding a sign") and not w.knows("next to the sea") and not w.knows("")
    assert w.describe() == ("shapes (circle, square, triangle), colours (red, green, blue, yellow, purple, cyan), "
                            "counts (two, three, four) and relations (to the left of, to the right of, above, below)")
    # every training caption names something the world knows
    rng = np.random.default_rng(0)
    assert all(w.knows(data.sample_example(rng)[1]) for _ in range(200))
