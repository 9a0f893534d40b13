"""Tests for eval.py — the detector is validated on rendered ground truth (must be 100%) and
on blank and noise images (must be ~0), as docs/design.md §13.7 asks; then the scoring arithmetic and
edit accuracy."""

import itertools
import os
import re

import numpy as np
import pytest

import data
import eval as evaluation  # a bare `eval` would shadow the builtin
from data import Obj
from test_data import BENCHMARK_PATTERNS  # docs/design.md §13.5's six templates, written out independently

S = 32
# Blank and noise images may pass at most this fraction of prompts ("near 0", docs/design.md §13.7).
CHANCE_CEILING = 0.02


@pytest.fixture(scope="module")
def prompts():
    return evaluation.benchmark_prompts(seed=0, per_category=50)


# ------------------------------------------------------------------ the detector

@pytest.mark.parametrize("size", [32, 64])
def test_detect_single_objects_of_every_shape_colour_and_size(size):
    rng = np.random.default_rng(0)
    lo, hi = data.size_range(size)
    for shape, color in itertools.product(data.SHAPES, data.COLORS):
        for side in range(lo, hi + 1):
            x0, y0 = rng.integers(0, size - side + 1, size=2)
            obj = Obj(shape, color, x0 + side / 2, y0 + side / 2, float(side))
            assert evaluation.detect(data.render([obj], size)) == [obj]


def test_detect_recovers_whole_scenes_exactly():
    rng = np.random.default_rng(1)
    for _ in range(300):
        objs = data.random_scene(rng, S, allow_held_out=True)
        key = lambda o: (o.cy, o.cx)  # noqa: E731
        assert evaluation.detect(data.render(objs, S)) == sorted(objs, key=key)


def test_junk_is_reported_as_unknown_and_specks_are_ignored():
    # Two squares with no white between them merge into one wide blob: junk, not a square.
    merged = data.render([Obj("square", "red", 6.0, 16.0, 12.0)], S)
    merged[10:22, 12:24] = data.PALETTE["red"]
    assert [o.shape for o in evaluation.detect(merged)] == [evaluation.UNKNOWN]
    # An upside-down triangle is not one of our shapes.
    tri = data.render([Obj("triangle", "blue", 16.0, 16.0, 12.0)], S)
    assert evaluation.detect(tri)[0].shape == "triangle"
    assert [o.shape for o in evaluation.detect(tri[::-1].copy())] == [evaluation.UNKNOWN]
    # A canvas-sized blob is junk.
    assert [o.shape for o in evaluation.detect(np.zeros((S, S, 3), np.uint8))] == [evaluation.UNKNOWN]
    # Isolated coloured pixels (below the speck area) are ignored altogether.
    specks = np.full((S, S, 3), 255, np.uint8)
    specks[::5, ::5] = data.PALETTE["green"]
    assert evaluation.detect(specks) == []


def test_rendered_scenes_sit_far_inside_every_strictness_threshold():
    # The strict checks must never touch a true object: over many random scenes, every object's
    # colour is exactly its palette colour and uniform, it has no hole, and its elongation is
    # well under the cap, so the thresholds have room for a model's small imperfections.
    rng = np.random.default_rng(2)
    for _ in range(300):
        objs = data.random_scene(rng, S, allow_held_out=True)
        blobs = evaluation.measure(data.render(objs, S))
        assert [b.obj for b in blobs] == sorted(objs, key=lambda o: (o.cy, o.cx))
        for b in blobs:
            assert b.color_distance <= 1.0 and b.off_color == 0.0 and b.holes == 0, b
            assert b.elongation < 1.05 < evaluation.MAX_ELONGATION, b


# Near-misses, built by hand: each must fail the prompt it nearly satisfies, while the correctly
# rendered object passes it.

def _paint(img: np.ndarray, alpha: np.ndarray, rgb) -> np.ndarray:
    """Blend colour rgb over img with coverage alpha (S, S), as data.render does."""
    out = img.astype(np.float64)
    out += alpha[..., None] * (np.asarray(rgb, np.float64) - out)
    return np.rint(out).astype(np.uint8)


def _ellipse_alpha(cx, cy, a, b, angle=0.0, k=8):
    """Supersampled coverage (S, S) of an ellipse with semi-axes a, b turned by angle."""
    g = (np.arange(S * k) + 0.5) / k
    x, y = g[None, :] - cx, g[:, None] - cy
    u = np.cos(angle) * x + np.sin(angle) * y
    v = -np.sin(angle) * x + np.cos(angle) * y
    return ((u / a) ** 2 + (v / b) ** 2 <= 1).reshape(S, k, S, k).mean(axis=(1, 3))


def _passes(spec, img) -> bool:
    return evaluation.check(spec, evaluation.detect(img), S)


def _colors(color, shape):
    return {"kind": "colors", "color": color, "shape": shape}


def test_grey_triangle_is_not_a_purple_triangle():
    # Purple is the nearest palette colour to mid-grey, but ~100 away: no palette colour at all.
    purple = Obj("triangle", "purple", 16.0, 16.0, 10.0)
    red = data.render([Obj("triangle", "red", 16.0, 16.0, 10.0)], S)
    alpha = (255.0 - red[..., 1]) / (255.0 - data.PALETTE["red"][1])  # the triangle's coverage
    grey = _paint(np.full((S, S, 3), 255, np.uint8), alpha, (128, 128, 128))
    assert evaluation.detect(grey)[0].color == evaluation.UNKNOWN
    assert not _passes(_colors("purple", "triangle"), grey)
    assert not _passes({"kind": "single_object", "shape": "triangle"}, grey)  # matches nothing
    assert _passes(_colors("purple", "triangle"), data.render([purple], S))


def test_half_red_half_blue_square_is_not_one_purple_square():
    square = Obj("square", "red", 16.0, 16.0, 12.0)
    blue = data.render([Obj("square", "blue", 16.0, 16.0, 12.0)], S)
    half = data.render([square], S)
    half[:, 16:] = blue[:, 16:]
    for color in ("purple", "red", "blue"):
        assert not _passes(_colors(color, "square"), half), color
    # Uniformity, not only the colour cap: with 70% red the median is exactly red, and the
    # 30% of blue pixels still make it two colours.
    mostly_red = data.render([square], S)
    mostly_red[:, 18:] = blue[:, 18:]
    blob, = evaluation.measure(mostly_red)
    assert blob.color_distance == 0.0 and blob.off_color > evaluation.MAX_OFF_COLOR_FRACTION
    assert not _passes(_colors("red", "square"), mostly_red)
    assert _passes(_colors("red", "square"), data.render([square], S))


def test_faint_red_circle_is_neither_yellow_nor_red():
    circle = Obj("circle", "red", 16.0, 16.0, 12.0)
    full = data.render([circle], S)
    faint = np.rint(255.0 - 0.3 * (255.0 - full)).astype(np.uint8)  # 30% of red over white
    assert not _passes(_colors("yellow", "circle"), faint)  # the nearest palette colour
    assert not _passes(_colors("red", "circle"), faint)
    assert _passes(_colors("red", "circle"), full)


def test_square_with_a_hole_is_no_shape():
    square = Obj("square", "green", 16.0, 16.0, 12.0)
    holed = data.render([square], S)
    holed[14:18, 14:18] = 255  # a 4×4 hole: fill 0.89, which alone reads as a circle
    assert evaluation.measure(holed)[0].holes == 16
    for shape in data.SHAPES:
        assert not _passes({"kind": "single_object", "shape": shape}, holed), shape
    one_pixel = data.render([square], S)
    one_pixel[15, 15] = 255
    assert not _passes({"kind": "single_object", "shape": "square"}, one_pixel)
    assert _passes({"kind": "single_object", "shape": "square"}, data.render([square], S))


@pytest.mark.parametrize("angle", [0.0, np.pi / 4])
def test_stretched_shapes_are_not_circles_or_squares(angle):
    # A 1.3:1 ellipse has a circle's fill; turned 45° it also has a square box. Only its
    # second moments tell it apart.
    white = np.full((S, S, 3), 255, np.uint8)
    ellipse = _paint(white, _ellipse_alpha(16.0, 16.0, 6.5, 5.0, angle), data.PALETTE["red"])
    assert not _passes(_colors("red", "circle"), ellipse)
    assert not _passes({"kind": "single_object", "shape": "circle"}, ellipse)
    rectangle = white.copy()
    rectangle[10:23, 11:21] = data.PALETTE["blue"]  # 13 × 10: a 1.3:1 box, fill 1
    assert not _passes({"kind": "single_object", "shape": "square"}, rectangle)
    circle = Obj("circle", "red", 16.0, 16.0, 12.0)
    assert _passes(_colors("red", "circle"), data.render([circle], S))
    # One pixel of wobble at the smallest size is tolerated: 8 wide and 7 tall is a circle.
    squat = _paint(white, _ellipse_alpha(16.0, 16.0, 4.0, 3.5, angle), data.PALETTE["red"])
    assert _passes(_colors("red", "circle"), squat)


def test_detect_rejects_bad_input():
    with pytest.raises(ValueError, match="square RGB"):
        evaluation.detect(np.zeros((32, 16, 3), np.uint8))


# ------------------------------------------------------------------ the benchmark

def test_benchmark_prompts_use_exactly_the_templates(prompts):
    assert [p["category"] for p in prompts] == [c for c in evaluation.CATEGORIES for _ in range(50)]
    assert evaluation.CATEGORIES == ("single_object", "two_object", "counting", "colors",
                                     "position", "color_attr")
    for p in prompts:
        assert re.fullmatch(BENCHMARK_PATTERNS[p["category"]], p["prompt"]), p["prompt"]
        assert p["prompt"] == data.caption_for_spec(p["spec"])
        assert p["held_out"] == data.mentions_held_out(p["spec"])
    held = {p["category"] for p in prompts if p["held_out"]}
    assert held == {"colors", "color_attr"}
    # Small categories cover every distinct prompt.
    assert len({p["prompt"] for p in prompts if p["category"] == "colors"}) == 18
    assert len({p["prompt"] for p in prompts if p["category"] == "position"}) == 24
    # Fixed given the seed; another seed gives another sample.
    assert evaluation.benchmark_prompts(seed=0, per_category=50) == prompts
    assert evaluation.benchmark_prompts(seed=1, per_category=50) != prompts


def test_detector_scores_rendered_ground_truth_perfectly(prompts):
    rng = np.random.default_rng(0)
    images = [data.render(data.scene_for_spec(rng, p["spec"], S, allow_held_out=True), S)
              for p in prompts]
    scores = evaluation.score(evaluation.grade(prompts, images))
    assert scores["overall"] == 1.0 and scores["held_out"] == 1.0
    assert all(scores[c] == 1.0 for c in evaluation.CATEGORIES)


def test_detector_scores_blank_and_noise_near_zero(prompts):
    rng = np.random.default_rng(0)
    blank = [np.full((S, S, 3), 255, np.uint8)] * len(prompts)
    noise = [rng.integers(0, 256, (S, S, 3), dtype=np.uint8) for _ in prompts]
    # Sparse noise: a white canvas sprinkled with 3% palette-coloured pixels.
    sparse = []
    for _ in prompts:
        img = np.full((S, S, 3), 255, np.uint8)
        hit = rng.random((S, S)) < 0.03
        img[hit] = np.array(list(data.PALETTE.values()))[rng.integers(0, 6, hit.sum())]
        sparse.append(img)
    for images in (blank, noise, sparse):
        scores = evaluation.score(evaluation.grade(prompts, images))
        assert scores["overall"] <= CHANCE_CEILING, scores


def test_check_rules():
    a = Obj("circle", "red", 8.0, 16.0, 8.0)
    b = Obj("square", "blue", 24.0, 16.0, 8.0)
    junk = Obj(evaluation.UNKNOWN, "red", 16.0, 4.0, 8.0)
    left = {"kind": "position", "shapes": ["circle", "square"], "relation": "to the left of"}
    assert evaluation.check(left, [a, b], S)
    assert not evaluation.check(left, [a, b, junk], S)  # junk fails the image
    assert not evaluation.check({**left, "relation": "to the right of"}, [a, b], S)
    two = {"kind": "counting", "shape": "circle", "count": 2}
    assert not evaluation.check(two, [a, b], S)
    assert evaluation.check(two, [a, b, Obj("circle", "green", 16.0, 28.0, 8.0)], S)
    assert not evaluation.check(two, [a, b] + [Obj("circle", "green", 16.0, y, 8.0) for y in (4, 28)], S)
    attr = {"kind": "color_attr", "objects": [["red", "circle"], ["blue", "square"]]}
    assert evaluation.check(attr, [a, b], S)
    assert not evaluation.check({**attr, "objects": [["blue", "circle"], ["red", "square"]]}, [a, b], S)
    assert not evaluation.check({"kind": "single_object", "shape": "triangle"}, [a, b], S)


def test_failure_modes_name_the_first_broken_claim():
    circle_l = Obj("circle", "red", 8.0, 16.0, 8.0)
    square_r = Obj("square", "blue", 24.0, 16.0, 8.0)
    circle_r = Obj("circle", "blue", 24.0, 16.0, 8.0)
    junk = Obj(evaluation.UNKNOWN, "red", 16.0, 4.0, 8.0)
    left = {"kind": "position", "shapes": ["circle", "square"], "relation": "to the left of"}
    mode = evaluation.failure_mode
    assert mode(left, [circle_l, square_r], S) is None
    assert mode(left, [circle_l, square_r, junk], S) == "junk"
    assert mode(left, [circle_l], S) == "too_few_objects"
    assert mode(left, [circle_l, circle_r], S) == "named_shape_missing"  # both drawn as circles
    assert mode({**left, "relation": "to the right of"}, [circle_l, square_r], S) == "wrong_relation"
    attr = {"kind": "color_attr", "objects": [["blue", "circle"], ["red", "square"]]}
    assert mode(attr, [circle_l, square_r], S) == "wrong_colours"
    two = {"kind": "counting", "shape": "circle", "count": 2}
    assert mode(two, [circle_l], S) == "too_few"
    assert mode(two, [circle_l, circle_r, Obj("circle", "green", 16.0, 28.0, 8.0)], S) == "too_many"
    assert mode({"kind": "colors", "color": "green", "shape": "circle"}, [circle_l], S) == "wrong_shape_or_colour"
    records = [{"category": "position", "spec": left, "detected": objs}
               for objs in ([circle_l, square_r], [circle_l, circle_r], [circle_l, circle_r], [circle_l])]
    assert evaluation.failure_counts(records, S) == {
        "position": {"named_shape_missing": 2, "too_few_objects": 1}}


def test_score_arithmetic():
    records = [
        {"category": "single_object", "held_out": False, "correct": True},
        {"category": "single_object", "held_out": False, "correct": False},
        {"category": "colors", "held_out": True, "correct": True},
        {"category": "colors", "held_out": False, "correct": True},
        {"category": "colors", "held_out": False, "correct": True},
        {"category": "color_attr", "held_out": True, "correct": False},
    ]
    for c in ("two_object", "counting", "position"):
        records.append({"category": c, "held_out": False, "correct": True})
    s = evaluation.score(records)
    assert s["single_object"] == 0.5 and s["colors"] == 1.0 and s["color_attr"] == 0.0
    # Mean of the six categories, not of the nine prompts.
    assert s["overall"] == pytest.approx((0.5 + 1 + 1 + 1 + 1 + 0) / 6)
    assert s["held_out"] == 0.5 and s["n"] == 9
    assert evaluation.score(records[:2])["held_out"] is None
    with pytest.raises(ValueError, match="Unknown categories"):
        evaluation.score([{"category": "vibes", "held_out": False, "correct": True}])
    with pytest.raises(ValueError, match="at least one"):
        evaluation.score([])


# ------------------------------------------------------------------ edits

def test_edit_correct_on_rendered_targets_and_sources():
    records = evaluation.edit_benchmark(seed=0, per_kind=20, size=S)
    assert {r["kind"] for r in records} == set(data.EDIT_KINDS)
    for r in records:
        target = evaluation.detect(data.render(r["target"], S))
        source = evaluation.detect(data.render(r["source"], S))
        assert evaluation.edit_correct(r["target"], target, S), r
        assert not evaluation.edit_correct(r["target"], source, S), r


def test_edit_correct_tolerance_and_matching():
    a = Obj("circle", "red", 8.0, 8.0, 8.0)
    b = Obj("circle", "red", 24.0, 24.0, 8.0)
    near = lambda o, d: Obj(o.shape, o.color, o.cx + d, o.cy, o.size)  # noqa: E731
    assert evaluation.edit_correct([a, b], [b, a], S)  # order does not matter
    assert evaluation.edit_correct([a, b], [near(a, 0.19 * S), b], S)
    assert not evaluation.edit_correct([a, b], [near(a, 0.21 * S), b], S)
    assert not evaluation.edit_correct([a, b], [a], S)
    assert not evaluation.edit_correct([a], [a, Obj(evaluation.UNKNOWN, "red", 24.0, 24.0, 8.0)], S)
    assert not evaluation.edit_correct([a], [Obj("circle", "blue", 8.0, 8.0, 8.0)], S)


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--images-per-prompt", "--per-category", "--per-kind"])
def test_eval_cli_rejects_non_positive_counts_in_one_line(flag):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "eval.py", flag, "0", "--ckpt", "/nonexistent"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {flag} must be a positive integer, got 0"  # before any weights load
