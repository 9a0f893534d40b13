"""The ShapesWorld benchmark (docs/design.md §13.7): a detector, GenEval-style scoring, edit accuracy.

The paper reports text-to-image quality on GenEval (Tab. 1), whose six categories — single
object, two objects, counting, colours, position, colour attribution — are scored by running
an object detector on each generated image and checking the prompt's claims. We do the same
in ShapesWorld, where an exact detector is possible: objects are solid, flat-coloured blobs
on white, so connected components, a nearest-palette colour and a fill-ratio shape test
recover the scene. The detector is also strict, so near-misses do not score: a colour must be
close to its palette colour and uniform across the region, and a shape must be filled (no
holes) and unstretched (second moments), else it is "unknown" and matches no prompt. Prompts
naming a held-out (colour, shape) pair (data.HELD_OUT) measure compositional generalisation;
edits (MoS-Edit, Sec. 3.4) are scored against their target scene.

How it connects: prompts and their ground-truth specs come from data.py (one set of
templates, one truth function `data.holds`); images come from sample.py / edit.py; this file
turns images into scores, and says per category why the failed images failed
(`failure_mode`), which a single accuracy hides. `--world emoji` scores EmojiWorld
with emojiworld.detect and emojiworld.holds in the same way (`evaluate_emoji`).

Glossary: S canvas side in pixels; a component is a set of 8-connected non-white pixels.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import numpy as np

import data
from data import Obj

########################################################################################
#                                   The detector                                        #
########################################################################################

# A pixel belongs to an object when its RGB distance from white exceeds this. The lightest
# palette colour (yellow) is ~242 from white, so anything drawn with >= ~20% coverage counts;
# the 1-pixel white gap between boxes stays background.
FOREGROUND_DISTANCE = 48.0
# Components smaller than this fraction of the canvas are specks (sampling noise) and are
# ignored. 1% of S² is 10 px at S = 32, a third of the smallest real object (a side-8 triangle).
MIN_AREA_FRACTION = 0.01
# Anything bigger than a speck must look like an object, or it is junk ("unknown"):
# a bounding-box side within [0.15·S, 0.5·S] (training objects are 0.25–0.375·S) ...
MIN_SIDE_FRACTION, MAX_SIDE_FRACTION = 0.15, 0.5
# ... a roughly square box (all three shapes have square boxes; merged objects do not) ...
MAX_ASPECT = 1.4
# ... and a fill ratio that fits a shape. Ideal fill of the box: square 1, circle π/4 ≈ 0.785,
# triangle 0.5; the thresholds sit halfway between neighbours.
SQUARE_MIN_FILL = 0.89
CIRCLE_MIN_FILL = 0.64
TRIANGLE_MIN_FILL = 0.35
# Vertical centroid of the coverage, as a fraction of box height from the top: 0.5 for
# circles and squares, 2/3 for an upright triangle (mass sits at its base). Halfway is 0.583.
# A blob whose centroid is that far *up* (an upside-down triangle) is junk.
TRIANGLE_MIN_CENTROID = 0.58
# The box and the fill cannot see a stretched shape: a 1.3:1 ellipse has a circle's fill, and
# turned 45° it has a square box. Second moments can. We take the coverage-weighted covariance
# of the pixel centres, rescale the vertical axis so that the shape's ideal covariance is
# round (circle and square are round already; an upright triangle of side s has vertical
# variance s²/18 against horizontal s²/24, so its y axis is scaled by √(3/4)), and call
# the ratio of the principal standard deviations its elongation: 1 for a true shape, 1.3 for a
# 1.3:1 ellipse at any angle. Rendered shapes measure at most ~1.02 at S = 32 (pixel
# staircases and anti-aliasing of the smallest triangles; ~1.04 for boxes off the pixel grid;
# tests/test_eval.py pins the margin). The cap tolerates one pixel of wobble at the smallest
# side, 8 px at S = 32: a circle drawn 8 wide and 7 tall is 8/7 ≈ 1.14, and a partly covered
# edge row adds a few hundredths (a model's squat circle measures ~1.17). Two pixels at that
# side (8/6 ≈ 1.33), a 10 × 8 box (1.25) and the 1.3:1 near-miss are beyond it. 1.2 sits
# between the two.
MAX_ELONGATION = 1.2
_TRIANGLE_Y_SCALE = math.sqrt(3.0 / 4.0)
# A filled shape has no holes: its coverage along any row is one run (each of the three shapes
# is convex), so every background pixel inside its box reaches the box's edge. Background
# pixels the component encloses (reached only by 4-connected steps through background, the
# dual of the objects' 8-connectivity) are a hole, and one such pixel is enough: it is under
# ~20% covered (FOREGROUND_DISTANCE), i.e. white where the shape should be solid.
MAX_HOLE_PIXELS = 0
# Colour: a region is a palette colour only when its colour lies within this RGB distance of
# it. Half the distance between the two closest palette colours (blue and purple, ~114.5):
# the balls of this radius around the six colours do not touch, so a colour inside one is
# unambiguously that colour, and one between them (grey, a faded or muddied tint) is none of
# them. Rendered objects measure 0 (their core pixels are exactly the palette colour). In
# fading terms the cap lets an object's core lose 18% (red, 320 from white) to 24% (yellow,
# 242 from white) of its saturation: a 30%-faint red is ~225 from red and ~168 from yellow,
# far outside either ball, where the nearest palette colour alone calls it yellow.
_PALETTE_RGB = np.array(list(data.PALETTE.values()), dtype=np.float64)  # (6, 3)
_PALETTE_GAP = min(float(np.linalg.norm(a - b)) for a, b in itertools.combinations(_PALETTE_RGB, 2))
COLOR_MAX_DISTANCE = 0.5 * _PALETTE_GAP  # ≈ 57.2
# Uniformity: every pixel of a one-colour object, edges included, lies on the segment from
# white to its colour (an anti-aliased edge is a blend of the two). A pixel farther than
# COLOR_MAX_DISTANCE from that segment is a shade of some other colour. Rendered objects have
# none (rounding puts pixels < 1 off the segment), and pixels within the cap of white can never
# count, so faint anti-aliased rims are safe. More than a tenth of the region off the segment
# means two colours share it, e.g. a red half and a blue half whose median reads as purple;
# a tenth is already a visible patch (3 px of the smallest triangle, 14 of the largest square).
MAX_OFF_COLOR_FRACTION = 0.1
UNKNOWN = "unknown"


def _components(mask: np.ndarray) -> np.ndarray:
    """Label 8-connected components of a boolean (H, W) mask; background gets -1.

    Min-label propagation with pointer jumping, all in numpy (no scipy): every pixel starts
    with its own flat index, repeatedly takes the smallest label among its 8 neighbours, then
    jumps to its label's label. Converges in a handful of sweeps for blobs.
    """
    h, w = mask.shape
    big = h * w  # label of background: larger than any pixel index
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)  # (H, W)
    while True:
        padded = np.pad(labels, 1, constant_values=big)  # (H+2, W+2)
        new = labels
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                new = np.minimum(new, padded[dy:dy + h, dx:dx + w])
        new = np.where(mask, new, big)
        flat = new.ravel()
        # Pointer jumping: a label is the index of a pixel in the same component whose own
        # label is no larger, so adopting it only shortens chains.
        fg = flat < big
        flat[fg] = flat[flat[fg]]
        if np.array_equal(new, labels):
            break
        labels = new
    return np.where(mask, labels, -1)


def _hole_pixels(inside: np.ndarray) -> int:
    """Background pixels of a boolean (h, w) box mask that no 4-connected path through
    background joins to the box's border: the component's holes."""
    outside = np.pad(~inside, 1, constant_values=True)  # (h+2, w+2): a background frame
    reached = np.zeros_like(outside)
    reached[0, :] = reached[-1, :] = reached[:, 0] = reached[:, -1] = True
    while True:
        grown = reached.copy()
        grown[1:, :] |= reached[:-1, :]
        grown[:-1, :] |= reached[1:, :]
        grown[:, 1:] |= reached[:, :-1]
        grown[:, :-1] |= reached[:, 1:]
        grown &= outside
        if np.array_equal(grown, reached):
            return int((outside & ~reached).sum())
        reached = grown


def _elongation(xs: np.ndarray, ys: np.ndarray, alpha: np.ndarray, shape: str) -> float:
    """Ratio of the principal standard deviations of the coverage, relative to the shape's
    ideal (see MAX_ELONGATION): 1 for a true shape at any size."""
    wsum = max(float(alpha.sum()), 1e-6)
    x = xs + 0.5 - float((alpha * (xs + 0.5)).sum()) / wsum  # (n,) pixel centres about the centroid
    y = ys + 0.5 - float((alpha * (ys + 0.5)).sum()) / wsum
    if shape == "triangle":
        y = y * _TRIANGLE_Y_SCALE
    a, b, c = (float((alpha * u * v).sum()) / wsum for u, v in ((x, x), (x, y), (y, y)))
    mid, half = (a + c) / 2, math.hypot((a - c) / 2, b)  # eigenvalues of [[a, b], [b, c]]: mid ± half
    return math.sqrt((mid + half) / max(mid - half, 1e-9))


def _classify(w: int, h: int, fill: float, centroid: float, size: int) -> str:
    """The shape of a component from its box, fill ratio and vertical centroid, or UNKNOWN."""
    side = max(w, h)
    if not MIN_SIDE_FRACTION * size <= side <= MAX_SIDE_FRACTION * size:
        return UNKNOWN
    if side / min(w, h) > MAX_ASPECT:
        return UNKNOWN
    if centroid >= TRIANGLE_MIN_CENTROID:
        return "triangle" if TRIANGLE_MIN_FILL <= fill < CIRCLE_MIN_FILL else UNKNOWN
    if centroid <= 1.0 - TRIANGLE_MIN_CENTROID:
        return UNKNOWN
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    return UNKNOWN


@dataclass(frozen=True)
class Blob:
    """One non-speck component: the object the detector reports, and the measurements behind
    its colour and shape (each compared with its threshold above)."""

    obj: Obj
    color_distance: float  # RGB distance from the region's colour to the nearest palette colour
    off_color: float       # fraction of its pixels off the white -> palette-colour segment
    holes: int             # background pixels it encloses
    elongation: float      # principal-axis ratio relative to its shape's ideal (circle's if unknown)


def measure(img: np.ndarray) -> list[Blob]:
    """Find and measure the components of a uint8 (S, S, 3) image, sorted top-to-bottom,
    left-to-right. `detect` is this without the measurements.

    Colour: the palette entry nearest the median of the strongly coloured pixels, or UNKNOWN
    when that median is farther than COLOR_MAX_DISTANCE from it or more than
    MAX_OFF_COLOR_FRACTION of the pixels are another colour. Shape: `_classify` from the box,
    fill and centroid, then UNKNOWN if the component has a hole or is elongated beyond
    MAX_ELONGATION. (cx, cy, size) from the bounding box, in data.render's pixel convention.
    """
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"detect expects a square RGB image (S, S, 3); got shape {img.shape}.")
    size = img.shape[0]
    deficit = 255.0 - img.astype(np.float64)  # (S, S, 3): how far each channel is from white
    dist = np.sqrt((deficit ** 2).sum(axis=2))  # (S, S)
    labels = _components(dist > FOREGROUND_DISTANCE)
    min_area = MIN_AREA_FRACTION * size * size
    blobs = []
    for label in np.unique(labels[labels >= 0]):
        ys, xs = np.nonzero(labels == label)
        if len(ys) < min_area:
            continue  # a speck
        d = dist[ys, xs]
        # Colour from the strongly coloured pixels only; anti-aliased edges are mixed with white.
        strong = d >= 0.5 * d.max()
        rgb = np.median(img[ys[strong], xs[strong]].astype(np.float64), axis=0)  # (3,)
        nearest = int(np.argmin(((_PALETTE_RGB - rgb) ** 2).sum(axis=1)))
        color_distance = float(np.linalg.norm(_PALETTE_RGB[nearest] - rgb))
        # Distance of each pixel from the segment white -> palette colour, in deficit space
        # (white is the origin there): project onto the segment, clip to it, measure the rest.
        ref = 255.0 - _PALETTE_RGB[nearest]  # (3,)
        along = np.clip(deficit[ys, xs] @ ref / (ref @ ref), 0.0, 1.0)  # (n,)
        off = np.linalg.norm(deficit[ys, xs] - along[:, None] * ref, axis=1)  # (n,)
        off_color = float((off > COLOR_MAX_DISTANCE).mean())
        if color_distance <= COLOR_MAX_DISTANCE and off_color <= MAX_OFF_COLOR_FRACTION:
            color = data.COLORS[nearest]
        else:
            color = UNKNOWN
        # Per-pixel coverage: how far along the white -> object-colour line each pixel is, so a
        # half-covered edge pixel counts one half, and the fill ratio does not depend on how
        # edges were anti-aliased.
        ref = 255.0 - rgb
        alpha = np.clip(deficit[ys, xs] @ ref / max(ref @ ref, 1e-6), 0.0, 1.0)  # (n,)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        w, h = int(x1 - x0), int(y1 - y0)
        fill = float(alpha.sum()) / (w * h)
        centroid = (float((alpha * (ys + 0.5)).sum() / max(alpha.sum(), 1e-6)) - y0) / h
        shape = _classify(w, h, fill, centroid, size)
        holes = _hole_pixels(labels[y0:y1, x0:x1] == label)
        elongation = _elongation(xs, ys, alpha, shape)
        if holes > MAX_HOLE_PIXELS or elongation > MAX_ELONGATION:
            shape = UNKNOWN
        obj = Obj(shape, color, float(x0 + w / 2), float(y0 + h / 2), float(max(w, h)))
        blobs.append(Blob(obj, color_distance, off_color, holes, elongation))
    return sorted(blobs, key=lambda b: (b.obj.cy, b.obj.cx))


def detect(img: np.ndarray) -> list[Obj]:
    """Find the objects in a uint8 (S, S, 3) image, sorted top-to-bottom, left-to-right.

    Each non-speck component becomes an Obj whose colour and shape are UNKNOWN unless it is
    unmistakably one palette colour and one filled, unstretched shape (`measure`).
    """
    return [b.obj for b in measure(img)]


########################################################################################
#                              Text-to-image benchmark                                  #
########################################################################################

CATEGORIES = data.BENCHMARK_KINDS


def _all_specs(category: str) -> list[dict]:
    """Every distinct prompt of a category, in a fixed order (held-out pairs included)."""
    ordered_shapes = list(itertools.permutations(data.SHAPES, 2))  # distinct shapes, ordered
    if category == "single_object":
        return [{"kind": category, "shape": s} for s in data.SHAPES]
    if category == "two_object":
        return [{"kind": category, "shapes": list(p)} for p in ordered_shapes]
    if category == "counting":
        return [{"kind": category, "shape": s, "count": n}
                for n in data.COUNT_WORDS for s in data.SHAPES]
    if category == "colors":
        return [{"kind": category, "color": c, "shape": s} for c in data.COLORS for s in data.SHAPES]
    if category == "position":
        return [{"kind": category, "shapes": list(p), "relation": r}
                for p in ordered_shapes for r in data.RELATIONS]
    if category == "color_attr":
        return [{"kind": category, "objects": [[c1, s1], [c2, s2]]}
                for s1, s2 in ordered_shapes
                for c1, c2 in itertools.permutations(data.COLORS, 2)]
    raise ValueError(f"Unknown category {category!r}; expected one of {CATEGORIES}.")


def benchmark_prompts(seed: int = 0, per_category: int = 50) -> list[dict]:
    """The fixed benchmark: per_category prompts for each of the six categories.

    Each record is {category, prompt, spec, held_out}. A category cycles through a seeded
    shuffle of all its distinct prompts (3 for single_object … 180 for color_attr), so small
    categories repeat prompts — scored per image, as GenEval does — and large ones are a
    sample. Held-out prompts appear where they naturally fall: colors (2 of 18 prompts) and
    color_attr (38 of 180); `held_out` flags them for the compositional-generalisation score.
    """
    if per_category < 1:
        raise ValueError(f"per_category must be at least 1; got {per_category}.")
    rng = np.random.default_rng([seed, 2])  # stream 2: distinct from data's caption and edit streams
    records = []
    for category in CATEGORIES:
        specs = _all_specs(category)
        order = rng.permutation(len(specs))
        for i in range(per_category):
            spec = specs[int(order[i % len(specs)])]
            records.append({"category": category, "prompt": data.caption_for_spec(spec),
                            "spec": spec, "held_out": data.mentions_held_out(spec)})
    return records


def check(spec: dict, objs: list[Obj], size: int) -> bool:
    """Does a detected scene satisfy a prompt? GenEval rules, plus a no-junk rule.

    - every detected component must be a recognised object: one blob of UNKNOWN shape (smeared,
      merged, holed, stretched or the size of the canvas) or UNKNOWN colour (off the palette,
      faded, or two colours in one region) fails the image, so noise and near-misses cannot pass;
    - single_object: an object of that shape; two_object: both shapes;
      counting: exactly that many of the shape (others may be present, as in GenEval);
      colors: an object of that colour and shape; color_attr: both (colour, shape) objects;
      position: an object of shape1 and a different one of shape2 whose centres are in the
      relation with margin 0.1·S. See data.holds.
    """
    if any(UNKNOWN in (o.shape, o.color) for o in objs):
        return False
    return data.holds(spec, objs, size)


def failure_mode(spec: dict, objs: list[Obj], size: int) -> str | None:
    """Why an image fails its prompt (None if it passes), in the first bucket that fits.

    The buckets separate drawing failures from composition failures: a 'junk' blob (smeared or
    merged objects, or an object of no palette colour), too few objects, a named shape missing although enough objects were drawn
    (typically both objects of a two-object prompt given one shape: a binding failure), and
    right shapes in the wrong relation or colours. `eval.py` reports the counts per category.
    """
    if check(spec, objs, size):
        return None
    shapes = [o.shape for o in objs]
    kind = spec["kind"]
    if any(UNKNOWN in (o.shape, o.color) for o in objs):
        return "junk"
    if kind in ("two_object", "position", "color_attr"):
        want = spec["shapes"] if "shapes" in spec else [s for _, s in spec["objects"]]
        if len(objs) < 2:
            return "too_few_objects"
        if not all(s in shapes for s in want):
            return "named_shape_missing"
        return "wrong_colours" if kind == "color_attr" else "wrong_relation"
    if kind == "counting":
        return "too_many" if shapes.count(spec["shape"]) > spec["count"] else "too_few"
    return "wrong_shape_or_colour"


def failure_counts(records: list[dict], size: int) -> dict[str, dict[str, int]]:
    """{category: {failure mode: images}} over graded records (with 'spec' and 'detected')."""
    out: dict[str, dict[str, int]] = {}
    for r in records:
        mode = failure_mode(r["spec"], r["detected"], size)
        if mode is not None:
            modes = out.setdefault(r["category"], {})
            modes[mode] = modes.get(mode, 0) + 1
    return out


def grade(prompts: list[dict], images) -> list[dict]:
    """Detect and check each image against its prompt record; adds 'correct' and 'detected'."""
    if len(prompts) != len(images):
        raise ValueError(f"Got {len(images)} images for {len(prompts)} prompts; they must pair up.")
    records = []
    for rec, img in zip(prompts, images):
        objs = detect(np.asarray(img))
        records.append(rec | {"correct": check(rec["spec"], objs, img.shape[0]), "detected": objs})
    return records


def score(records: list[dict]) -> dict:
    """Accuracies from records with 'category', 'held_out' and 'correct'.

    Returns {category: accuracy for each category present, 'overall': mean of those category
    accuracies (GenEval's convention: categories weigh equally, not prompts), 'held_out':
    accuracy over held-out prompts (None if there are none), 'n': number of records}.
    """
    if not records:
        raise ValueError("score() needs at least one graded record.")
    unknown = {r["category"] for r in records} - set(CATEGORIES)
    if unknown:
        raise ValueError(f"Unknown categories {sorted(unknown)}; expected {CATEGORIES}.")
    out: dict = {}
    for category in CATEGORIES:
        hits = [bool(r["correct"]) for r in records if r["category"] == category]
        if hits:
            out[category] = sum(hits) / len(hits)
    per_category = list(out.values())
    out["overall"] = sum(per_category) / len(per_category)
    held = [bool(r["correct"]) for r in records if r["held_out"]]
    out["held_out"] = sum(held) / len(held) if held else None
    out["n"] = len(records)
    return out


########################################################################################
#                                    Edit accuracy                                      #
########################################################################################

EDIT_TOLERANCE = 0.2  # docs/design.md §13.6: each object within 0.2·S of its place


def edit_benchmark(seed: int = 0, per_kind: int = 20, size: int = 32) -> list[dict]:
    """A fixed set of edits, per_kind of each of data.EDIT_KINDS, as records
    {kind, instruction, source (objects), target (objects)}. Render sources with data.render."""
    records = []
    for k, kind in enumerate(data.EDIT_KINDS):
        for i in range(per_kind):
            edit = data.sample_edit(np.random.default_rng([seed, 3, k, i]), size, kind)
            records.append({"kind": kind, "instruction": edit.instruction,
                            "source": list(edit.source), "target": list(edit.target)})
    return records


def edit_correct(target_objs, detected, size: int) -> bool:
    """Does the detected scene equal the target: the same multiset of (shape, colour), and a
    one-to-one matching that puts every detected object within 0.2·S of its target's centre?
    Junk (UNKNOWN shape or colour) never matches anything, so it fails the edit."""
    target, found = list(target_objs), list(detected)
    key = lambda o: (o.shape, o.color)  # noqa: E731
    if sorted(map(key, target)) != sorted(map(key, found)):
        return False
    radius = EDIT_TOLERANCE * size
    for k in set(map(key, target)):
        want = [o for o in target if key(o) == k]
        got = [o for o in found if key(o) == k]
        # At most four objects per scene, so trying every pairing is cheap and exact.
        if not any(all(math.hypot(a.cx - b.cx, a.cy - b.cy) <= radius for a, b in zip(want, perm))
                   for perm in itertools.permutations(got)):
            return False
    return True


def edit_world(world: str):
    """A world's edit benchmark: (kinds, benchmark, render, detect, edit_correct). ShapesWorld's
    lives in this file and data.py, EmojiWorld's in emojiworld.py; the scoring loop is shared."""
    if world == "emojiworld":
        import emojiworld as E

        return E.EDIT_KINDS, E.edit_benchmark, E.render, E.detect, E.edit_correct
    return data.EDIT_KINDS, edit_benchmark, data.render, detect, edit_correct


def evaluate_edits(model, tower, codec, preset, *, per_kind: int = 20, seed: int = 0, steps: int | None = None,
                   cfg: float | None = None, cfg_interval=None, batch_size: int = 100, device="cpu",
                   save_dir: str | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Edit accuracy (docs/design.md §13.6): render each benchmark source scene, edit it with the model
    (edit.py's machinery), detect the objects of the result, and count the edit only if the
    detected scene equals the target scene (`edit_correct`). Edit i uses noise seed seed + i.

    Returns ({kind: accuracy for each of data.EDIT_KINDS, 'overall': mean over the kinds,
    'n': number of edits}, records with 'correct', 'detected' and the uint8 'image' added).
    """
    from tqdm import tqdm

    from edit import edit_images
    from sample import atomic_save

    size = preset.model.image_size
    kinds, benchmark, render, find, correct = edit_world(preset.train.world)
    records = benchmark(seed=seed, per_kind=per_kind, size=size)
    out_records = []
    bar = tqdm(total=len(records), desc="edit eval", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(records), batch_size):
        chunk = records[s:s + batch_size]
        refs = data.to_tensor(np.stack([render(r["source"], size) for r in chunk]))  # (b, 3, S, S)
        imgs = edit_images(model, tower, codec, preset, refs, [r["instruction"] for r in chunk],
                           seeds=[seed + s + i for i in range(len(chunk))], steps=steps, cfg=cfg,
                           cfg_interval=cfg_interval, device=device)
        for i, (rec, img) in enumerate(zip(chunk, imgs)):
            found = find(np.asarray(img))
            out_records.append(rec | {"correct": correct(rec["target"], found, size), "detected": found,
                                      "image": img})
            if save_dir:
                from PIL import Image

                atomic_save(Image.fromarray(img), os.path.join(save_dir, f"{rec['kind']}-{s + i:03d}.png"))
        bar.update(len(chunk))
    bar.close()
    scores: dict = {}
    for kind in kinds:
        hits = [r["correct"] for r in out_records if r["kind"] == kind]
        if hits:
            scores[kind] = sum(hits) / len(hits)
    scores["overall"] = sum(scores.values()) / len(scores)
    scores["n"] = len(out_records)
    return scores, out_records


def save_edit_strip(records: list[dict], path: str, size: int, per_kind: int = 2, world: str = "shapesworld"):
    """Before/after figure: for `per_kind` edits of each kind, a column of (source, model's
    edit, target), captioned with the instruction and ✓/✗."""
    from PIL import Image, ImageDraw

    from sample import atomic_save

    kinds, _, render, _, _ = edit_world(world)
    chosen = [i for kind in kinds for i in [j for j, r in enumerate(records) if r["kind"] == kind][:per_kind]]
    scale, pad, text_h, col_w = 3, 4, 34, max(3 * size, 120)
    canvas = Image.new("RGB", (len(chosen) * (col_w + pad) + pad + 60, 3 * (size * scale + pad) + text_h + pad), "white")
    d = ImageDraw.Draw(canvas)
    for row, label in enumerate(("source", "edited", "target")):
        d.text((4, text_h + row * (size * scale + pad) + size * scale // 2 - 5), label, fill="black")
    for c, i in enumerate(chosen):
        rec = records[i]
        x = 60 + pad + c * (col_w + pad)
        words = rec["instruction"].split()
        half = (len(words) + 1) // 2
        d.text((x, 2), " ".join(words[:half]), fill="black")
        d.text((x, 13), " ".join(words[half:]) + ("  [ok]" if rec["correct"] else "  [x]"),
               fill=(0, 130, 0) if rec["correct"] else (200, 0, 0))
        tiles = [render(rec["source"], size), np.asarray(rec["image"]), render(rec["target"], size)]
        for row, tile in enumerate(tiles):
            img = Image.fromarray(tile).resize((size * scale, size * scale), Image.NEAREST)
            canvas.paste(img, (x, text_h + row * (size * scale + pad)))
    atomic_save(canvas, path)


########################################################################################
#                            Command line: python eval.py                               #
########################################################################################
# Generates the benchmark images with a checkpoint (sample.py / edit.py) and prints the
# scores above as JSON (docs/design.md §15.4).


def evaluate(model, tower, codec, preset, *, per_category: int = 50, images_per_prompt: int = 2, seed: int = 0,
             steps: int | None = None, cfg: float | None = None, cfg_interval: tuple[float, float] | None = None,
             shift: float = 1.0, schedule: str = "linear", batch_size: int = 100, device="cpu",
             save_dir: str | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate `images_per_prompt` images for every benchmark prompt and score them.

    Image j of prompt i uses noise seed `seed + j·P + i` (P prompts): distinct for every
    (prompt, repeat), and the whole set is fixed by the seed.
    """
    from tqdm import tqdm

    from sample import atomic_save, generate

    prompts = benchmark_prompts(seed=seed, per_category=per_category)
    jobs = [(i, j) for j in range(images_per_prompt) for i in range(len(prompts))]
    records = []
    bar = tqdm(total=len(jobs), desc="eval", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        texts = [prompts[i]["prompt"] for i, _ in chunk]
        seeds = [seed + j * len(prompts) + i for i, j in chunk]
        imgs = generate(model, tower, codec, texts, preset, seeds=seeds, steps=steps, cfg=cfg,
                        cfg_interval=cfg_interval, shift=shift, schedule=schedule, device=device)
        for (i, j), img in zip(chunk, imgs):
            graded = grade([prompts[i]], [img])[0]
            records.append(graded | {"repeat": j})
            if save_dir:
                from PIL import Image

                atomic_save(Image.fromarray(img), os.path.join(save_dir, f"{graded['category']}-{i:03d}-{j}.png"))
        bar.update(len(chunk))
    bar.close()
    size = preset.model.image_size
    return score(records) | {"failures": failure_counts(records, size)}, records


########################################################################################
#                         EmojiWorld benchmark: --world emoji                           #
########################################################################################
# The same GenEval-style scoring on EmojiWorld: emojiworld.detect explains each
# image by the world's own units, and emojiworld.holds is the truth function. Categories are
# the caption kinds (presence = "single"; "wearing_holding" scores under wearing); prompts
# naming a held-out synonym (emojiworld.eval_prompts) are scored apart as "synonyms".

EMOJI_CATEGORIES = ("single", "two", "counting", "position", "holding", "wearing")


def emoji_category(kind: str) -> str:
    return "wearing" if kind == "wearing_holding" else kind


def emoji_check(spec: dict, items, size: int) -> bool:
    """Does a detected EmojiWorld scene satisfy a prompt? Any UNKNOWN component fails the image
    (no junk rule, as `check`); otherwise emojiworld.holds."""
    import emojiworld

    if any(i.key == emojiworld.UNKNOWN for i in items):
        return False
    return emojiworld.holds(spec, items, size)


def emoji_prompts(seed: int = 0, per_category: int = 20, synonyms: int = 40, size: int = 32) -> list[dict]:
    """Training-template prompts, per_category per category (specs drawn as training draws them,
    a stream apart), plus `synonyms` held-out-synonym prompts; records {category, prompt, spec, synonym}."""
    import emojiworld

    rng = np.random.default_rng([seed, 29, 2])  # stream 2: apart from training (0) and eval_prompts (1)
    records = []
    for category in EMOJI_CATEGORIES:
        kinds = ("wearing", "wearing_holding") if category == "wearing" else (category,)
        for i in range(per_category):
            spec = emojiworld.sample_spec(rng, kinds[i % len(kinds)])
            records.append({"category": category, "prompt": emojiworld.caption_for_spec(spec), "spec": spec,
                            "synonym": False})
    for r in emojiworld.eval_prompts(seed, synonyms, size):
        records.append({"category": emoji_category(r["spec"]["kind"]), "prompt": r["prompt"], "spec": r["spec"],
                        "synonym": True})
    return records


def emoji_score(records: list[dict]) -> dict:
    """{category: accuracy over the training-template prompts, 'overall': mean over categories,
    'synonyms': accuracy over the held-out-synonym prompts (None if none), 'synonyms_by_category',
    'n'}."""
    if not records:
        raise ValueError("emoji_score() needs at least one graded record.")
    out: dict = {}
    plain = [r for r in records if not r["synonym"]]
    for category in EMOJI_CATEGORIES:
        hits = [bool(r["correct"]) for r in plain if r["category"] == category]
        if hits:
            out[category] = sum(hits) / len(hits)
    per = [out[c] for c in EMOJI_CATEGORIES if c in out]
    out["overall"] = sum(per) / len(per) if per else None
    syn = [r for r in records if r["synonym"]]
    out["synonyms"] = sum(bool(r["correct"]) for r in syn) / len(syn) if syn else None
    out["synonyms_by_category"] = {c: sum(bool(r["correct"]) for r in syn if r["category"] == c)
                                   / max(1, sum(r["category"] == c for r in syn))
                                   for c in EMOJI_CATEGORIES if any(r["category"] == c for r in syn)}
    out["n"] = len(records)
    return out


def evaluate_emoji(model, tower, codec, preset, *, per_category: int = 20, synonyms: int = 40,
                   images_per_prompt: int = 1, seed: int = 0, steps: int | None = None, cfg: float | None = None,
                   cfg_interval=None, shift: float = 1.0, schedule: str = "linear", batch_size: int = 100,
                   device="cpu", save_dir: str | None = None, progress: bool = True) -> tuple[dict, list[dict]]:
    """Generate images for emoji_prompts with a checkpoint (noise seeds as `evaluate`), detect, score."""
    from tqdm import tqdm

    import emojiworld
    from sample import atomic_save, generate

    size = preset.model.image_size
    prompts = emoji_prompts(seed=seed, per_category=per_category, synonyms=synonyms, size=size)
    jobs = [(i, j) for j in range(images_per_prompt) for i in range(len(prompts))]
    records = []
    bar = tqdm(total=len(jobs), desc="emoji eval", disable=not progress, dynamic_ncols=True)
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s:s + batch_size]
        imgs = generate(model, tower, codec, [prompts[i]["prompt"] for i, _ in chunk], preset,
                        seeds=[seed + j * len(prompts) + i for i, j in chunk], steps=steps, cfg=cfg,
                        cfg_interval=cfg_interval, shift=shift, schedule=schedule, device=device)
        for (i, j), img in zip(chunk, imgs):
            found = emojiworld.detect(emojiworld.at_world_size(np.asarray(img)))  # scored at the world's 32 px
            records.append(prompts[i] | {"repeat": j, "detected": found,
                                         "correct": emoji_check(prompts[i]["spec"], found, emojiworld.SIZE)})
            if save_dir:
                from PIL import Image

                atomic_save(Image.fromarray(img), os.path.join(save_dir, f"emoji-{prompts[i]['category']}-{i:03d}-{j}.png"))
        bar.update(len(chunk))
    bar.close()
    return emoji_score(records), records


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="Score a MoS checkpoint on the ShapesWorld or EmojiWorld benchmark (JSON on stdout).")
    p.add_argument("--ckpt", default=None, help="checkpoint dir or run dir (default: the shipped toy; with --world "
                   "emoji the EmojiWorld checkpoint; with --edit toy_edit)")
    p.add_argument("--per-category", type=int, default=50, help="prompts per category")
    p.add_argument("--images-per-prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="Euler steps (default: the preset's)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the preset's)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("LO", "HI"),
                   help="guide only for t in [LO, HI] (default: the preset's)")
    p.add_argument("--shift", type=float, default=1.0, help="time shift of the sampling schedule (as sample.py)")
    p.add_argument("--schedule", default="linear", choices=["linear", "linear_quadratic"],
                   help="sampling schedule (as sample.py)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--save-images", metavar="DIR", help="also write every generated image here")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--device", default=None)
    p.add_argument("--world", default="shapes", help="benchmark world: shapes (default) or emoji")
    p.add_argument("--synonyms", type=int, default=40, help="with --world emoji: held-out-synonym prompts")
    # MoS-Edit: edit accuracy per kind instead of the text-to-image benchmark.
    p.add_argument("--edit", action="store_true",
                   help="score edit accuracy per kind (default checkpoint: the shipped toy_edit)")
    p.add_argument("--per-kind", type=int, default=40, help="with --edit: edits per kind")
    p.add_argument("--strip", metavar="FILE.png", help="with --edit: also write a before/after strip")
    return p.parse_args(argv)


def main(args) -> int:
    import sys

    import torch

    from gen_tower import check_count
    from sample import DEFAULT_CKPT, TOY_CKPT, load_everything

    # Counts first, one line each, before any weights load.
    for flag in ("steps", "batch_size", "images_per_prompt", "per_category", "per_kind"):
        check_count("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.world not in ("shapes", "emoji"):
        raise ValueError(f"Unknown --world {args.world!r}; expected shapes or emoji.")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.edit:
        return main_edit(args, device)
    if args.world == "emoji":
        model, tower, codec, preset = load_everything(args.ckpt or DEFAULT_CKPT, device)
        scores, _ = evaluate_emoji(model, tower, codec, preset, per_category=args.per_category,
                                   synonyms=args.synonyms, images_per_prompt=args.images_per_prompt,
                                   seed=args.seed, steps=args.steps, cfg=args.cfg, cfg_interval=args.cfg_interval,
                                   shift=args.shift, schedule=args.schedule, batch_size=args.batch_size,
                                   device=device, save_dir=args.save_images)
        return emit(scores | {"world": "emoji", "per_category": args.per_category,
                              "images_per_prompt": args.images_per_prompt}, args.out)
    model, tower, codec, preset = load_everything(args.ckpt or TOY_CKPT, device)
    scores, _ = evaluate(model, tower, codec, preset, per_category=args.per_category,
                         images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
                         cfg=args.cfg, cfg_interval=args.cfg_interval, shift=args.shift, schedule=args.schedule,
                         batch_size=args.batch_size, device=device, save_dir=args.save_images)
    scores |= {"steps": args.steps or preset.train.sample_steps, "shift": args.shift, "schedule": args.schedule,
               "cfg": preset.train.cfg if args.cfg is None else args.cfg,
               "cfg_interval": list(preset.train.cfg_interval if args.cfg_interval is None else args.cfg_interval),
               "images_per_prompt": args.images_per_prompt, "per_category": args.per_category}
    return emit(scores, args.out)


def emit(scores: dict, out: str | None) -> int:
    """Print the scores as JSON and, with --out, write them too (temp file, then rename)."""
    import json

    text = json.dumps(scores, indent=2)
    print(text)
    if out:
        with open(out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(out + ".tmp", out)
    return 0


def main_edit(args, device) -> int:
    """python eval.py --edit [--ckpt DIR]: edit accuracy per kind and overall, as JSON."""

    from checkpoint import read_preset
    from edit import TOY_EDIT_CKPT, load_edit_model
    from sample import DEFAULT_CKPT

    world = {"shapes": "shapesworld", "emoji": "emojiworld"}[args.world]
    default = DEFAULT_CKPT if world == "emojiworld" else TOY_EDIT_CKPT
    trained_on = read_preset(args.ckpt or default)[0].train.world  # checked before any weights load
    if trained_on != world:
        raise ValueError(f"{args.ckpt or default} edits {trained_on or 'real images'}, not the --world "
                         f"{args.world} benchmark")
    model, tower, codec, preset = load_edit_model(args.ckpt or default, device)
    scores, records = evaluate_edits(model, tower, codec, preset, per_kind=args.per_kind, seed=args.seed,
                                     steps=args.steps, cfg=args.cfg, cfg_interval=args.cfg_interval,
                                     batch_size=args.batch_size, device=device, save_dir=args.save_images)
    scores |= {"steps": args.steps or preset.train.sample_steps,
               "cfg": preset.train.cfg if args.cfg is None else args.cfg, "per_kind": args.per_kind,
               "cfg_interval": list(preset.train.cfg_interval if args.cfg_interval is None else args.cfg_interval),
               "seed": args.seed}
    if args.strip:
        save_edit_strip(records, args.strip, preset.model.image_size, world=world)
    return emit(scores, args.out)


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main(parse_args()))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
