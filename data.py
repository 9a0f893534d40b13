"""Data for MoS: the embedded ShapesWorld (docs/design.md §13).

ShapesWorld is a procedural text–image world small enough to train a toy MoS on a laptop
CPU in minutes, yet rich enough to measure what the paper measures with GenEval (Tab. 1:
single object, two objects, counting, colours, position, colour attribution) plus
compositional generalisation (two colour+shape pairs never appear in training).

Everything is a pure function of a seed and an example index, so a training run can stop
and resume at any example and see exactly the same stream (`ShapesWorld`, `shapes_batch`).

How it connects:
    data.py  --(image in [-1, 1], caption)-->  train.py  (caption --> und_tower.py, image --> flow.py)
    data.py  --(Obj lists, caption specs)--->  eval.py   (the detector and the benchmark)
    data.py  --(source, instruction, target)-> train.py for the `toy_edit` preset (MoS-Edit, Sec. 3.4)
    data.py  --(feature / latent caches)----->  train.py --features / --latents (App. B.4 producer–consumer)

Captions are generated *spec first*: we first pick what the caption will say (a small dict,
the "spec"), then build a scene for which it is true, then write the words. The same specs
are the benchmark's ground truth in eval.py, so training text and benchmark prompts come from
one set of templates and one truth function, `holds`.

Coordinates: pixel (row y, column x) covers [x, x+1) × [y, y+1); y grows downwards. An `Obj`
is the centre (cx, cy) and side `size` of its axis-aligned bounding box, all in pixels.

Glossary of tensor letters: B batch, S canvas side in pixels, 3 RGB channels.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np
import torch

import emojiworld

########################################################################################
#                                 ShapesWorld (docs/design.md §13)                            #
########################################################################################

# ---------------------------------------------------------------- the world's vocabulary

# docs/design.md §13.1, exactly. Six well-separated colours; yellow is the closest to white (distance
# ~242), which sets how light an anti-aliased edge pixel can be and still count as an object.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 190),
    "cyan": (20, 190, 210),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
WHITE = (255, 255, 255)

# No training image, caption or edit ever contains these (colour, shape) pairs; benchmark
# prompts that ask for them measure compositional generalisation (docs/design.md §13.3).
HELD_OUT: frozenset[tuple[str, str]] = frozenset({("purple", "triangle"), ("cyan", "circle")})
# The (colour, shape) pairs training may use, in a fixed order so sampling is reproducible.
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLORS for s in SHAPES if (c, s) not in HELD_OUT
)

COUNT_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
MAX_OBJECTS = 4  # docs/design.md §13.2: 1–4 objects per image

# A position caption is true when the first object's centre is more than this fraction of S
# beyond the second's along the named axis (docs/design.md §13.5; GenEval uses a similar margin).
POSITION_MARGIN = 0.1
# Training scenes for position captions use a wider margin than the benchmark checks, so the
# relation is never a near-tie the model has to learn to the pixel. Still true by the rule above.
POSITION_TRAIN_MARGIN = 0.15

# Full-scene captions name each object's place by which third of the canvas its centre is in.
_ROW_WORDS = ("top", "", "bottom")
_COL_WORDS = ("left", "", "right")


@dataclass(frozen=True)
class World:
    """What a synthetic world's captions can name, group by group ("shapes": (...), ...). A
    checkpoint records the world it was trained on (train.TrainConfig.world, a key of WORLDS),
    so sample.py can tell a user whose prompt names nothing the model has ever seen what it
    can draw. A new world adds its own entry to WORLDS."""

    name: str
    vocabulary: dict[str, tuple[str, ...]]

    # Function words of the phrases ("to the left of"): they say nothing the model can draw.
    _FUNCTION_WORDS = frozenset({"a", "an", "the", "of", "to", "and", "in", "on", "at"})

    def words(self) -> frozenset[str]:
        """The content words of every phrase: 'circle', 'red', 'two', 'left', 'above', …"""
        return frozenset(w for group in self.vocabulary.values() for phrase in group for w in phrase.split()
                         if w not in self._FUNCTION_WORDS)

    def knows(self, prompt: str) -> bool:
        """Does the prompt use at least one word of this world (a plural 's' allowed: 'squares')?"""
        known = self.words()
        tokens = "".join(ch if ch.isalnum() else " " for ch in prompt.lower()).split()
        return any(t in known or (t.endswith("s") and t[:-1] in known) for t in tokens)

    def describe(self) -> str:
        """'shapes (circle, square, triangle), colours (red, …) and relations (above, …)'."""
        parts = [f"{group} ({', '.join(words)})" for group, words in self.vocabulary.items()]
        return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]


WORLDS: dict[str, World] = {
    "shapesworld": World("ShapesWorld", {"shapes": SHAPES, "colours": COLORS,
                                         "counts": tuple(COUNT_WORDS.values()), "relations": RELATIONS}),
    # EmojiWorld lives in emojiworld.py (docs/design.md §14); importing it is cheap, its font
    # opens on first use. It imports nothing of ours, so this adds no import cycle.
    "emojiworld": World("EmojiWorld", emojiworld.VOCABULARY),
}

# ---------------------------------------------------------------- caption mixture
# What fraction of training captions is of each kind. The six benchmark templates get two
# thirds; the colourful variants (`three red squares`, `a red circle to the left of a
# blue square`) and full-scene descriptions teach colour binding and places, which the
# benchmark templates alone say little about. Sums to 1.
# Two-object captions get a large share (0.20), aimed at the toy's largest failure, shape
# binding across two objects; single objects and colours, which a small model learns first, get
# little. A control with 0.08 / 0.08 / 0.12 / 0.20 for single / two / colours / scene scored the
# same (docs/experiments.md §7), so the exact split is not shown to matter.
CAPTION_MIX: dict[str, float] = {
    "single_object": 0.04,   # a circle
    "two_object": 0.20,      # a circle and a square
    "counting": 0.10,        # three squares
    "colors": 0.08,          # a red circle
    "position": 0.12,        # a circle to the left of a square
    "color_attr": 0.12,      # a red circle and a blue square
    "counting_color": 0.06,  # three red squares
    "position_color": 0.12,  # a red circle to the left of a blue square
    "scene": 0.16,           # a red circle at the top left, a blue square on the right
}
BENCHMARK_KINDS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)

# Independent random streams per purpose, so captions and edits never share draws.
_CAPTION_STREAM = 0
_EDIT_STREAM = 1


@dataclass(frozen=True)
class Obj:
    """One object: centre (cx, cy) and side of its axis-aligned bounding box, in pixels.

    Detected objects (eval.detect) may carry shape "unknown" for blobs that fit no shape.
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) edges of the bounding box."""
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def size_range(size: int) -> tuple[int, int]:
    """Allowed bounding-box sides (inclusive): ceil(0.25·S) … floor(0.375·S) (docs/design.md §13.2)."""
    if size < 16:
        raise ValueError(f"ShapesWorld needs a canvas of at least 16 pixels; got {size}.")
    return math.ceil(0.25 * size), math.floor(0.375 * size)


def separated(a: Obj, b: Obj) -> bool:
    """True when at least one pixel of white lies between the two bounding boxes."""
    al, at, ar, ab = a.box
    bl, bt, br, bb = b.box
    # Boxes sit on the integer pixel grid, so a gap of >= 1 along either axis is a whole white
    # column or row between them.
    return max(bl - ar, al - br, bt - ab, at - bb) >= 1.0


def inside(o: Obj, size: int) -> bool:
    left, top, right, bottom = o.box
    return left >= 0 and top >= 0 and right <= size and bottom <= size


def relation_holds(a: Obj, relation: str, b: Obj, size: int, margin: float = POSITION_MARGIN) -> bool:
    """Is `a {relation} b`? Centres must differ by more than margin·S along the named axis."""
    m = margin * size
    if relation == "to the left of":
        return a.cx < b.cx - m
    if relation == "to the right of":
        return a.cx > b.cx + m
    if relation == "above":  # y grows downwards
        return a.cy < b.cy - m
    if relation == "below":
        return a.cy > b.cy + m
    raise ValueError(f"Unknown relation {relation!r}; expected one of {RELATIONS}.")


def place_of(o: Obj, size: int) -> str:
    """Where an object is, by the third of the canvas its centre falls in: 'at the top left'…"""
    col = min(int(3 * o.cx / size), 2)
    row = min(int(3 * o.cy / size), 2)
    if row == 1 and col == 1:
        return "in the centre"
    if row == 1:
        return f"on the {_COL_WORDS[col]}"
    return " ".join(w for w in ("at the", _ROW_WORDS[row], _COL_WORDS[col]) if w)


# ---------------------------------------------------------------- rendering
# Each object is drawn through a coverage mask ("alpha") over the pixels of its box: the
# fraction of the pixel inside the shape, estimated with SUPERSAMPLE² points per pixel. Masks
# depend only on (shape, side, sub-pixel offset), so they are cached: a 64-image batch is then
# a few hundred small array blends, well under the time of one training step.

SUPERSAMPLE = 8
_MASK_QUANTUM = 64  # offsets and sides are rounded to 1/64 px to keep the mask cache small


@functools.lru_cache(maxsize=4096)
def _coverage(shape: str, side: float, fx: float, fy: float) -> np.ndarray:
    """Alpha mask (h, w) float32 for a shape whose box starts at (fx, fy) inside pixel (0, 0).

    fx, fy ∈ [0, 1) are the sub-pixel offsets of the box's left and top edges.
    """
    w = math.ceil(fx + side - 1e-9)
    h = math.ceil(fy + side - 1e-9)
    k = SUPERSAMPLE
    xs = (np.arange(w * k) + 0.5) / k  # sample points, in pixel units
    ys = (np.arange(h * k) + 0.5) / k
    x = xs[None, :] - fx  # (h·k, w·k) relative to the box's top-left corner, via broadcast
    y = ys[:, None] - fy
    r = side / 2
    if shape == "circle":
        inside_ = (x - r) ** 2 + (y - r) ** 2 <= r * r
    elif shape == "square":
        inside_ = (x >= 0) & (x <= side) & (y >= 0) & (y <= side)
    elif shape == "triangle":
        # Upright: apex at the top centre, base along the bottom edge. At depth y below the
        # apex it is y wide: an isosceles triangle as wide as it is tall, filling half its box.
        inside_ = (y >= 0) & (y <= side) & (np.abs(x - r) <= y / 2)
    else:
        raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")
    alpha = inside_.reshape(h, k, w, k).mean(axis=(1, 3))  # (h, w): average the k×k samples
    return alpha.astype(np.float32)


def render(objs, size: int = 32) -> np.ndarray:
    """Draw objects on a white S×S canvas. Returns uint8 (S, S, 3).

    Solid fill, no outline; edges are anti-aliased by supersampling. Objects whose boxes lie
    on the integer grid (everything `random_scene` makes) have crisp box edges, which the
    detector relies on for exact sizes.
    """
    canvas = np.full((size, size, 3), 255.0, dtype=np.float32)  # (S, S, 3)
    for o in objs:
        if o.color not in PALETTE:
            raise ValueError(f"Unknown colour {o.color!r}; expected one of {COLORS}.")
        if not inside(o, size):
            raise ValueError(f"{o} does not fit inside a {size}×{size} canvas.")
        left, top, _, _ = o.box
        px, py = math.floor(left + 1e-9), math.floor(top + 1e-9)
        q = _MASK_QUANTUM
        alpha = _coverage(o.shape, round(o.size * q) / q, round((left - px) * q) / q % 1.0,
                          round((top - py) * q) / q % 1.0)
        h, w = alpha.shape
        h, w = min(h, size - py), min(w, size - px)  # a box flush with the edge may round over it
        region = canvas[py:py + h, px:px + w]  # (h, w, 3) view into the canvas
        color = np.asarray(PALETTE[o.color], dtype=np.float32)
        region += alpha[:h, :w, None] * (color - region)  # alpha blend over what is there
    return np.rint(canvas).astype(np.uint8)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (..., S, S, 3) -> float32 (..., 3, S, S) in [-1, 1], the pixel-space codec's range.

    Works on one image or a batch. White (255) maps to exactly 1.0.
    """
    # NOTE: done in numpy, not torch: on a busy 2-core CPU, torch's threaded elementwise ops
    # on a 64-image batch took ~30 ms against ~0.3 ms here — most of a data step.
    chw = np.moveaxis(img, -1, -3)  # (..., 3, S, S)
    x = np.ascontiguousarray(chw, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    return torch.from_numpy(x)


# ---------------------------------------------------------------- scenes

def _random_pair(rng: np.random.Generator, allow_held_out: bool, shape: str | None = None,
                 color: str | None = None) -> tuple[str, str]:
    """A random (colour, shape), keeping the shape and/or colour given; held-out pairs only
    if allowed."""
    pairs = [(c, s) for c in COLORS for s in SHAPES
             if (shape is None or s == shape) and (color is None or c == color)
             and (allow_held_out or (c, s) not in HELD_OUT)]
    if not pairs:
        raise ValueError(f"No allowed colour for shape={shape!r}, color={color!r}.")
    return pairs[int(rng.integers(len(pairs)))]


def _place_one(rng: np.random.Generator, color: str, shape: str, others: list[Obj], size: int,
               tries: int = 50) -> Obj | None:
    """Rejection-sample an integer-grid box for one object clear of `others`; None if no luck."""
    lo, hi = size_range(size)
    for _ in range(tries):
        side = int(rng.integers(lo, hi + 1))
        x0 = int(rng.integers(0, size - side + 1))
        y0 = int(rng.integers(0, size - side + 1))
        cand = Obj(shape, color, x0 + side / 2, y0 + side / 2, float(side))
        if all(separated(cand, o) for o in others):
            return cand
    return None


def place_objects(rng: np.random.Generator, items, size: int, accept=None,
                  max_restarts: int = 1000) -> list[Obj]:
    """Place (colour, shape) items one by one by rejection sampling, in the order given.

    `accept(objs) -> bool` is an extra condition on the finished scene (e.g. a position
    relation between objs[0] and objs[1]); scenes failing it are redrawn from scratch.
    """
    if not 1 <= len(items) <= MAX_OBJECTS:
        raise ValueError(f"A scene holds 1 to {MAX_OBJECTS} objects; asked for {len(items)}.")
    for _ in range(max_restarts):
        objs: list[Obj] = []
        for color, shape in items:
            o = _place_one(rng, color, shape, objs, size)
            if o is None:
                break
            objs.append(o)
        if len(objs) == len(items) and (accept is None or accept(objs)):
            return objs
    raise RuntimeError(f"Could not place {items} on a {size}px canvas; is the canvas too small?")


def random_scene(rng: np.random.Generator, size: int = 32, n: int | None = None,
                 allow_held_out: bool = False) -> list[Obj]:
    """1–4 random objects (n of them if given). Held-out pairs only with allow_held_out=True,
    which is for benchmark ground truth, never for training."""
    if n is None:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
    items = [_random_pair(rng, allow_held_out) for _ in range(n)]
    return place_objects(rng, items, size)


# ---------------------------------------------------------------- caption specs
# A spec is a small JSON-able dict saying what a caption claims. Kinds and their keys:
#   single_object  {shape}                       "a circle"
#   two_object     {shapes: [s1, s2]}            "a circle and a square"   (distinct shapes)
#   counting       {shape, count}                "three squares"
#   colors         {color, shape}                "a red circle"
#   position       {shapes: [s1, s2], relation}  "a circle to the left of a square"
#   color_attr     {objects: [[c1, s1], [c2, s2]]}  "a red circle and a blue square"
#   counting_color {color, shape, count}         "three red squares"
#   position_color {objects: [[c1, s1], [c2, s2]], relation}  "a red circle above a blue square"
#   scene          {objects: [[c, s, place], …]} "a red circle at the top left, a blue square …"
# DECISION: position prompts without colours use distinct shapes (as GenEval does), since
# "a circle to the left of a circle" is true of almost any two-circle scene. With colours the
# two objects need only differ in colour or shape ("a red circle above a blue circle").

def spec_pairs(spec: dict) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a spec names explicitly."""
    if "objects" in spec:
        return [(o[0], o[1]) for o in spec["objects"]]
    if "color" in spec:
        return [(spec["color"], spec["shape"])]
    return []


def mentions_held_out(spec: dict) -> bool:
    return any(p in HELD_OUT for p in spec_pairs(spec))


def caption_for_spec(spec: dict) -> str:
    """The words for a spec — the six benchmark templates of docs/design.md §13.5, lowercase, exactly."""
    kind = spec["kind"]
    if kind == "single_object":
        return f"a {spec['shape']}"
    if kind == "two_object":
        s1, s2 = spec["shapes"]
        return f"a {s1} and a {s2}"
    if kind == "counting":
        return f"{COUNT_WORDS[spec['count']]} {spec['shape']}s"
    if kind == "colors":
        return f"a {spec['color']} {spec['shape']}"
    if kind == "position":
        s1, s2 = spec["shapes"]
        return f"a {s1} {spec['relation']} a {s2}"
    if kind == "color_attr":
        (c1, s1), (c2, s2) = spec["objects"]
        return f"a {c1} {s1} and a {c2} {s2}"
    if kind == "counting_color":
        return f"{COUNT_WORDS[spec['count']]} {spec['color']} {spec['shape']}s"
    if kind == "position_color":
        (c1, s1), (c2, s2) = spec["objects"]
        return f"a {c1} {s1} {spec['relation']} a {c2} {s2}"
    if kind == "scene":
        return ", ".join(f"a {c} {s} {place}" for c, s, place in spec["objects"])
    raise ValueError(f"Unknown caption kind {kind!r}; expected one of {tuple(CAPTION_MIX)}.")


def _two_distinct(rng: np.random.Generator, options) -> list:
    i, j = rng.choice(len(options), size=2, replace=False)
    return [options[int(i)], options[int(j)]]


def sample_spec(rng: np.random.Generator, kind: str) -> dict:
    """A random training spec of one kind (not 'scene', which is described from a scene).
    Never names a held-out pair."""
    count = int(rng.integers(2, MAX_OBJECTS + 1))
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if kind == "single_object":
        return {"kind": kind, "shape": shape}
    if kind == "two_object":
        return {"kind": kind, "shapes": _two_distinct(rng, SHAPES)}
    if kind == "counting":
        return {"kind": kind, "shape": shape, "count": count}
    if kind in ("colors", "counting_color"):
        color, shape = TRAIN_PAIRS[int(rng.integers(len(TRAIN_PAIRS)))]
        spec = {"kind": kind, "color": color, "shape": shape}
        return spec | {"count": count} if kind == "counting_color" else spec
    if kind == "position":
        return {"kind": kind, "shapes": _two_distinct(rng, SHAPES), "relation": relation}
    if kind == "color_attr":
        while True:  # distinct shapes and distinct colours (docs/design.md §13.5)
            a, b = _two_distinct(rng, TRAIN_PAIRS)
            if a[0] != b[0] and a[1] != b[1]:
                return {"kind": kind, "objects": [list(a), list(b)]}
    if kind == "position_color":
        a, b = _two_distinct(rng, TRAIN_PAIRS)  # differ in colour, shape, or both
        return {"kind": kind, "objects": [list(a), list(b)], "relation": relation}
    raise ValueError(f"Cannot sample a spec of kind {kind!r}.")


def scene_for_spec(rng: np.random.Generator, spec: dict, size: int = 32,
                   allow_held_out: bool = False) -> list[Obj]:
    """A scene of which the spec is true and which holds nothing else: exactly the objects
    the caption names (so "a circle" is one circle, "three squares" is three squares and
    nothing more). Unnamed colours are random. objs[0], objs[1] are the position pair."""
    if mentions_held_out(spec) and not allow_held_out:
        raise ValueError(f"{caption_for_spec(spec)!r} names a held-out pair; training never does.")
    kind = spec["kind"]

    def any_color(s: str) -> tuple[str, str]:
        return _random_pair(rng, allow_held_out, shape=s)

    def in_relation(objs: list[Obj]) -> bool:
        return relation_holds(objs[0], spec["relation"], objs[1], size, POSITION_TRAIN_MARGIN)

    accept = None
    if kind == "single_object":
        items = [any_color(spec["shape"])]
    elif kind == "two_object":
        items = [any_color(s) for s in spec["shapes"]]
    elif kind == "counting":
        items = [any_color(spec["shape"]) for _ in range(spec["count"])]
    elif kind == "colors":
        items = [(spec["color"], spec["shape"])]
    elif kind == "counting_color":
        items = [(spec["color"], spec["shape"])] * spec["count"]
    elif kind in ("position", "position_color"):
        if kind == "position":
            items = [any_color(s) for s in spec["shapes"]]
        else:
            items = [tuple(o) for o in spec["objects"]]
        accept = in_relation
    elif kind == "color_attr":
        items = [tuple(o) for o in spec["objects"]]
    else:
        raise ValueError(f"scene_for_spec cannot build a scene for kind {kind!r}.")
    return place_objects(rng, items, size, accept)


def reading_order(size: int):
    """Sort key for objects in reading order: top third of the canvas first, then the middle,
    then the bottom; left to right within a third."""
    return lambda o: (min(int(3 * o.cy / size), 2), o.cx)


def describe_scene(objs, size: int) -> dict:
    """A 'scene' spec listing every object with its colour, shape and place, in reading order
    (top row first, left to right), so the same scene always gets the same words."""
    order = sorted(objs, key=reading_order(size))
    return {"kind": "scene", "objects": [[o.color, o.shape, place_of(o, size)] for o in order]}


def holds(spec: dict, objs, size: int, exact: bool = False) -> bool:
    """Is the caption described by `spec` true of these objects?

    GenEval semantics: the named objects must be there (counting: exactly that many of the
    shape; position: some pair in that relation, margin 0.1·S). With exact=True the scene must
    also hold nothing the caption leaves out — the contract of our training captions.
    """
    pairs = [(o.color, o.shape) for o in objs]
    shapes = [o.shape for o in objs]
    kind = spec["kind"]
    if kind == "single_object":
        ok, n = spec["shape"] in shapes, 1
    elif kind == "two_object":
        ok, n = all(s in shapes for s in spec["shapes"]), 2
    elif kind == "counting":
        ok, n = shapes.count(spec["shape"]) == spec["count"], spec["count"]
    elif kind == "counting_color":
        ok, n = pairs.count((spec["color"], spec["shape"])) == spec["count"], spec["count"]
    elif kind == "colors":
        ok, n = (spec["color"], spec["shape"]) in pairs, 1
    elif kind == "color_attr":
        ok, n = all(tuple(p) in pairs for p in spec["objects"]), 2
    elif kind in ("position", "position_color"):
        if kind == "position":
            want = [(None, s) for s in spec["shapes"]]
        else:
            want = [tuple(p) for p in spec["objects"]]

        def matches(o: Obj, w) -> bool:
            return o.shape == w[1] and (w[0] is None or o.color == w[0])

        ok = any(matches(a, want[0]) and matches(b, want[1])
                 and relation_holds(a, spec["relation"], b, size)
                 for a in objs for b in objs if a is not b)
        n = 2
    elif kind == "scene":
        ok = sorted((o.color, o.shape, place_of(o, size)) for o in objs) == sorted(
            tuple(x) for x in spec["objects"])
        n = len(spec["objects"])
    else:
        raise ValueError(f"Unknown caption kind {kind!r}; expected one of {tuple(CAPTION_MIX)}.")
    return ok and (not exact or len(objs) == n)


# DECISION: "and" captions name their two objects in reading order, as scene captions do.
# "a circle and a square" is true whichever side the circle is on, so with a random mention
# order the two objects of one caption are interchangeable and nothing tells a small model
# which of them should take which shape: its most common failure was drawing both with one
# shape (docs/experiments.md §10). A fixed order gives each object an identity (the
# first named is the top/left one). Still true of every image, and benchmark prompts are
# unchanged; position captions keep their order, since their relation word already says it.
# Measured against a random-order control (docs/experiments.md §7): colour
# attribution 0.31 -> 0.47, overall 0.607 -> 0.644 after the same 2000-step fine-tune.
READING_ORDER_KINDS: tuple[str, ...] = ("two_object", "color_attr")


def in_reading_order(spec: dict, objs, size: int) -> dict:
    """The same two-object spec, its objects renamed in the reading order of `objs` (which
    scene_for_spec built in the spec's order: objs[i] is the spec's i-th object)."""
    field = "shapes" if spec["kind"] == "two_object" else "objects"
    key_of = reading_order(size)
    order = sorted(range(len(objs)), key=lambda i: key_of(objs[i]))
    return spec | {field: [spec[field][i] for i in order]}




def sample_example_spec(rng: np.random.Generator, size: int = 32) -> tuple[list[Obj], str, dict]:
    """One training example with its spec: (objects, caption, spec). Kind drawn by CAPTION_MIX."""
    kinds = tuple(CAPTION_MIX)
    # The cumulative table is built per call (9 numbers, beside rendering a scene it is free) so
    # that an experiment can patch CAPTION_MIX alone; min() keeps float round-off in the sum
    # from pushing a draw past the last kind.
    cdf = np.cumsum(list(CAPTION_MIX.values()))  # (kinds,)
    kind = kinds[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(kinds) - 1)]
    if kind == "scene":
        objs = random_scene(rng, size)
        spec = describe_scene(objs, size)
    else:
        spec = sample_spec(rng, kind)
        objs = scene_for_spec(rng, spec, size)
        if kind in READING_ORDER_KINDS:
            spec = in_reading_order(spec, objs, size)
    return objs, caption_for_spec(spec), spec


def sample_example(rng: np.random.Generator, size: int = 32) -> tuple[list[Obj], str]:
    """One training example: (objects, caption); the caption is always true of the scene."""
    objs, caption, _ = sample_example_spec(rng, size)
    return objs, caption


def example_rng(seed: int, index: int, stream: int = _CAPTION_STREAM) -> np.random.Generator:
    """The generator for example `index` of a seeded stream. A pure function of its arguments,
    which is what makes the data resumable at any position without replaying the past."""
    return np.random.default_rng([seed, stream, index])


def shapes_batch(seed: int, start: int, batch_size: int, size: int = 32):
    """Examples start … start+B-1 of stream `seed`: images (B, 3, S, S) float32 in [-1, 1]
    and B captions. Identical to what ShapesWorld(size, seed) yields at those positions."""
    imgs = np.empty((batch_size, size, size, 3), dtype=np.uint8)  # (B, S, S, 3)
    captions = []
    for b in range(batch_size):
        objs, caption = sample_example(example_rng(seed, start + b), size)
        imgs[b] = render(objs, size)
        captions.append(caption)
    return to_tensor(imgs), captions  # (B, 3, S, S), B strings


class ShapesWorld(torch.utils.data.IterableDataset):
    """An endless, seeded stream of {"image": (3, S, S) float32 in [-1, 1], "caption": str}.

    `position` counts examples yielded so far; `ShapesWorld(size, seed, start=p)` (or
    `load_state_dict`) continues exactly where a stream at position p would.
    """

    def __init__(self, size: int = 32, seed: int = 0, start: int = 0):
        super().__init__()
        size_range(size)  # validates the canvas size early, with a readable message
        if start < 0:
            raise ValueError(f"The start position must be >= 0; got {start}.")
        self.size, self.seed, self.position = size, seed, start

    def __iter__(self):
        # NOTE: each DataLoader worker would get a copy of this object and repeat the same
        # stream. Rendering is cheap enough for the main process, so refuse rather than
        # silently train on duplicates.
        if torch.utils.data.get_worker_info() is not None:
            raise ValueError("ShapesWorld is meant for num_workers=0: every worker would repeat "
                             "the same examples. Rendering is fast enough in the main process.")
        while True:
            objs, caption = sample_example(example_rng(self.seed, self.position), self.size)
            self.position += 1
            yield {"image": to_tensor(render(objs, self.size)), "caption": caption}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "size": self.size, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.size, self.position = state["seed"], state["size"], state["position"]


# ---------------------------------------------------------------- edit triplets (toy_edit)

EDIT_KINDS: tuple[str, ...] = ("recolor", "reshape", "add", "remove", "move")
EDGES: tuple[str, ...] = ("left", "right", "top", "bottom")
# A move must carry the object at least this fraction of S, more than eval's 0.2·S match
# radius, so a model that leaves the image unchanged never scores a move as correct.
MIN_MOVE = 0.25


@dataclass(frozen=True)
class Edit:
    """One edit triplet: the source scene, the instruction, and the scene it should produce."""

    kind: str
    source: tuple[Obj, ...]
    instruction: str
    target: tuple[Obj, ...]


def _moved_to_edge(o: Obj, edge: str, size: int) -> Obj:
    """The object slid straight to one edge of the canvas: its box touches that edge."""
    h = o.size / 2
    if edge == "left":
        return replace(o, cx=h)
    if edge == "right":
        return replace(o, cx=size - h)
    if edge == "top":
        return replace(o, cy=h)
    if edge == "bottom":
        return replace(o, cy=size - h)
    raise ValueError(f"Unknown edge {edge!r}; expected one of {EDGES}.")


def sample_edit(rng: np.random.Generator, size: int = 32, kind: str | None = None) -> Edit:
    """A random edit (docs/design.md §13.6). The object named is the only one of its colour and
    shape in the source; every other object keeps its exact place. Never uses held-out pairs."""
    if kind is None:
        kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    if kind not in EDIT_KINDS:
        raise ValueError(f"Unknown edit kind {kind!r}; expected one of {EDIT_KINDS}.")
    for _ in range(1000):
        # Sources and targets both hold 1–4 objects (docs/design.md §13.6): "add" starts from at most
        # three, "remove" from at least two.
        n = int(rng.integers(2 if kind == "remove" else 1, MAX_OBJECTS + (kind != "add")))
        source = random_scene(rng, size, n)
        if kind == "add":
            color, shape = TRAIN_PAIRS[int(rng.integers(len(TRAIN_PAIRS)))]
            new = _place_one(rng, color, shape, source, size)
            if new is None:
                continue
            return Edit(kind, tuple(source), f"add a {color} {shape}", tuple(source + [new]))

        pairs = [(o.color, o.shape) for o in source]
        unique = [i for i, p in enumerate(pairs) if pairs.count(p) == 1]
        if not unique:
            continue
        i = unique[int(rng.integers(len(unique)))]
        o = source[i]
        name = f"the {o.color} {o.shape}"
        others = source[:i] + source[i + 1:]
        if kind == "remove":
            return Edit(kind, tuple(source), f"remove {name}", tuple(others))
        if kind == "recolor":
            color2, _ = _random_pair(rng, False, shape=o.shape)
            if color2 == o.color:
                continue
            new, instruction = replace(o, color=color2), f"make {name} {color2}"
        elif kind == "reshape":
            _, shape2 = _random_pair(rng, False, color=o.color)
            if shape2 == o.shape:
                continue
            # Same box, so the new shape is as clear of its neighbours as the old one was.
            new, instruction = replace(o, shape=shape2), f"turn {name} into a {shape2}"
        else:  # move
            edge = EDGES[int(rng.integers(len(EDGES)))]
            new = _moved_to_edge(o, edge, size)
            far_enough = math.hypot(new.cx - o.cx, new.cy - o.cy) >= MIN_MOVE * size
            if not far_enough or not all(separated(new, x) for x in others):
                continue  # blocked by a neighbour, or already (nearly) there: draw again
            instruction = f"move {name} to the {edge}"
        return Edit(kind, tuple(source), instruction, tuple(source[:i] + [new] + source[i + 1:]))
    raise RuntimeError(f"Could not sample a {kind!r} edit on a {size}px canvas.")


def edit_batch(seed: int, start: int, batch_size: int, size: int = 32):
    """Edit examples start … start+B-1 of stream `seed`: source images (B, 3, S, S),
    instructions (B strings), target images (B, 3, S, S), float32 in [-1, 1]."""
    src = np.empty((batch_size, size, size, 3), dtype=np.uint8)  # (B, S, S, 3)
    tgt = np.empty_like(src)
    instructions = []
    for b in range(batch_size):
        edit = sample_edit(example_rng(seed, start + b, _EDIT_STREAM), size)
        src[b], tgt[b] = render(edit.source, size), render(edit.target, size)
        instructions.append(edit.instruction)
    return to_tensor(src), instructions, to_tensor(tgt)  # (B, 3, S, S), B strings, (B, 3, S, S)


# Real edit data: a JSONL manifest with one {"source": path, "instruction": text, "target": path}
# per line (paths relative to the manifest), as MagicBrush / GEdit-style triplets are usually
# shipped. Both images are resized and centre-cropped to the preset's square size (the edit
# presets train at one resolution; the source and target must share a patch grid, because the
# reference tokens take the target's 2D positions — gen_tower.MoS.forward).


def read_jsonl(spec: str, keys: tuple[str, ...], path_keys: tuple[str, ...]) -> list[dict[str, str]]:
    """The lines of a .jsonl manifest as dicts of `keys` (strings); those in `path_keys` are taken
    relative to the manifest's folder. Blank lines are skipped, a malformed line is one clear
    ValueError (file:line)."""
    import json
    import os

    root, records = os.path.dirname(os.path.abspath(spec)), []
    with open(spec, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                records.append({k: os.path.join(root, item[k]) if k in path_keys else str(item[k]) for k in keys})
            except (ValueError, KeyError, TypeError):
                names = [repr(k) for k in keys]
                raise ValueError(f"{spec}:{n}: expected a JSON object with "
                                 f"{', '.join(names[:-1])} and {names[-1]}") from None
    return records


def read_edit_records(spec: str) -> list[tuple[str, str, str]]:
    """A .jsonl edit manifest → [(source path, instruction, target path)]; one clear ValueError."""
    import os

    if not (os.path.isfile(spec) and spec.endswith(".jsonl")):
        raise ValueError(f"edit data {spec!r} is not a .jsonl manifest of {{'source', 'instruction', 'target'}} lines")
    records = read_jsonl(spec, ("source", "instruction", "target"), path_keys=("source", "target"))
    records = [(r["source"], r["instruction"], r["target"]) for r in records]
    if not records:
        raise ValueError(f"edit data {spec!r} holds no (source, instruction, target) triplets")
    return records


class EditData:
    """Batches of real edit triplets. `batch(step, B)` is a pure function of (seed, step), like
    ImageCaptionData, so resume is exact; unreadable pairs are skipped with a warning."""

    def __init__(self, spec: str, size: int, seed: int = 0):
        self.records, self.size, self.seed = read_edit_records(spec), size, seed

    def __len__(self):
        return len(self.records)

    def batch(self, step: int, batch_size: int):
        """→ sources (B, 3, S, S), B instructions, targets (B, 3, S, S), float32 in [-1, 1]."""
        import warnings

        from PIL import Image

        rng = np.random.default_rng([self.seed, 8, step])
        src, tgt, instructions, bad = [], [], [], 0
        for i in rng.choice(len(self.records), size=batch_size * 2, replace=len(self.records) < batch_size * 2):
            s_path, instruction, t_path = self.records[int(i)]
            try:
                with Image.open(s_path) as a, Image.open(t_path) as b:
                    pair = [np.asarray(resize_center_crop(im, (self.size, self.size))) for im in (a, b)]
            except Exception:  # PIL raises many types for bad files
                bad += 1
                continue
            src.append(pair[0])
            tgt.append(pair[1])
            instructions.append(instruction)
            if len(src) == batch_size:
                break
        if bad:
            warnings.warn(f"skipped {bad} unreadable edit pair(s) in batch {step}")
        if not src:
            raise ValueError(f"batch {step}: no edit pair could be read")
        return to_tensor(np.stack(src)), instructions, to_tensor(np.stack(tgt))


########################################################################################
#                  Real data: image–caption folders and JSONL manifests                 #
########################################################################################
# A folder of images with same-name .txt captions (cat.png + cat.txt), or a JSONL manifest
# with one {"image": path, "caption": text} per line (paths relative to the manifest).
# Images are grouped into aspect-ratio buckets at the preset's pixel area and every batch
# comes from one bucket (App. A, "Bucket-wise Dynamic Resolution Training"), so a batch is
# one tensor and the generation tower's 2D RoPE simply covers that bucket's grid.

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Aspect ratios (w / h) of the buckets; each becomes a (h, w) of about the target area.
BUCKET_RATIOS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)


def read_records(spec: str) -> list[tuple[str, str]]:
    """A folder or a .jsonl manifest → [(image path, caption)]. One clear ValueError if unreadable."""
    import os

    if os.path.isdir(spec):
        try:
            names = sorted(os.listdir(spec))
        except OSError as e:
            raise ValueError(f"cannot read data folder {spec!r}: {e.strerror}") from None
        records = []
        for name in names:
            stem, ext = os.path.splitext(name)
            txt = os.path.join(spec, stem + ".txt")
            if ext.lower() in IMAGE_EXTS and os.path.exists(txt):
                with open(txt, encoding="utf-8", errors="replace") as f:
                    records.append((os.path.join(spec, name), f.read().strip()))
    elif os.path.isfile(spec) and spec.endswith(".jsonl"):
        records = [(r["image"], r["caption"]) for r in read_jsonl(spec, ("image", "caption"), path_keys=("image",))]
    else:
        raise ValueError(f"data {spec!r} is neither a folder of images + .txt captions nor a .jsonl manifest")
    if not records:
        raise ValueError(f"data {spec!r} holds no (image, caption) pairs")
    return records


def make_buckets(area: int, multiple: int, ratios=BUCKET_RATIOS) -> list[tuple[int, int]]:
    """(h, w) per aspect ratio with h·w ≈ area, both multiples of `multiple` (codec × patch)."""
    out = []
    for r in ratios:
        h = max(multiple, round(math.sqrt(area / r) / multiple) * multiple)
        w = max(multiple, round(math.sqrt(area * r) / multiple) * multiple)
        if (h, w) not in out:
            out.append((h, w))
    return out


def resize_center_crop(img, hw: tuple[int, int]):
    """Scale a PIL image so it covers (h, w), then crop the centre."""
    from PIL import Image

    h, w = hw
    scale = max(h / img.height, w / img.width)
    img = img.convert("RGB").resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                                    Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((left, top, left + w, top + h))


class ImageCaptionData:
    """Batches of real (image, caption) pairs in aspect-ratio buckets.

    `batch(step, B)` is a pure function of (seed, step): it picks a bucket with probability
    proportional to its size, then B examples of that bucket — so a resumed run sees exactly
    the batches the uninterrupted run would. Files that cannot be opened are skipped and
    counted (one warning per scan and per batch), never a crash.
    """

    def __init__(self, spec: str, area: int, multiple: int, seed: int = 0):
        import warnings

        from PIL import Image

        self.seed, self.buckets = seed, make_buckets(area, multiple)
        self.members: dict[int, list[tuple[str, str]]] = {}
        self.skipped = 0
        for path, caption in read_records(spec):
            try:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
            except Exception:  # PIL raises many types for bad files
                self.skipped += 1
                continue
            b = min(range(len(self.buckets)), key=lambda i: abs(math.log((w / h) / (self.buckets[i][1] / self.buckets[i][0]))))
            self.members.setdefault(b, []).append((path, caption))
        if self.skipped:
            warnings.warn(f"{spec}: skipped {self.skipped} unreadable image file(s)")
        if not self.members:
            raise ValueError(f"data {spec!r}: none of the images could be read")
        self.keys = sorted(self.members)

    def __len__(self):
        return sum(len(v) for v in self.members.values())

    def batch(self, step: int, batch_size: int, start: int = 0, count: int | None = None):
        """→ images (B, 3, h, w) float32 in [-1, 1], B captions; one bucket per batch.

        start/count: only rows start … start+count-1 of the batch (one process's shard under
        torchrun, distributed.shard_batch): the bucket and the draws are the batch's, so the shards
        of all processes together are exactly the whole batch, and each reads only its files.
        Row p reads draw p, or its spare draw B + p if that file cannot be opened."""
        import warnings

        from PIL import Image

        rng = np.random.default_rng([self.seed, 7, step])
        sizes = np.array([len(self.members[k]) for k in self.keys], dtype=np.float64)
        key = self.keys[int(rng.choice(len(self.keys), p=sizes / sizes.sum()))]
        pool, hw = self.members[key], self.buckets[key]
        draws = rng.choice(len(pool), size=batch_size * 2, replace=len(pool) < batch_size * 2)
        imgs, caps, bad = [], [], 0
        for row in range(start, batch_size if count is None else min(batch_size, start + count)):
            for i in (draws[row], draws[batch_size + row]):
                path, caption = pool[int(i)]
                try:
                    with Image.open(path) as im:
                        imgs.append(np.asarray(resize_center_crop(im, hw)))
                    caps.append(caption)
                    break
                except Exception:
                    bad += 1
        if bad:
            warnings.warn(f"skipped {bad} unreadable image file(s) in batch {step}")
        if not imgs:
            raise ValueError(f"batch {step}: no image of bucket {hw} could be read")
        return to_tensor(np.stack(imgs)), caps


########################################################################################
#             The understanding-feature cache (App. B.4, producer–consumer)             #
########################################################################################
# U is frozen, so its states for a caption never change. A producer runs U once over all
# captions and writes every state S_0..S_{m-1} of every real token to safetensors shards;
# training (the consumer) then reads them instead of running U — the paper's recipe for
# scaling the understanding tower at no training cost. The shards hold fp16 states
# (B_shard, L_max, m, D), the true lengths, and the captions in the file's metadata.


def build_feature_cache(tower, captions, out_dir: str, shard_size: int = 1024, batch_size: int = 64,
                        progress: bool = True) -> int:
    """Encode unique captions with `tower` (an und_tower.UnderstandingTower) into shards."""
    import json
    import os

    from safetensors.torch import save_file
    from tqdm import tqdm

    unique = list(dict.fromkeys(captions))
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(total=len(unique), desc="feature cache", disable=not progress)
    for shard, start in enumerate(range(0, len(unique), shard_size)):
        chunk = unique[start:start + shard_size]
        seqs = []
        for s in range(0, len(chunk), batch_size):
            out = tower(chunk[s:s + batch_size])
            for i in range(out.states.shape[0]):
                seqs.append(out.states[i, : int(out.mask[i].sum())].to(torch.float16))  # (L_i, m, D)
            bar.update(min(batch_size, len(chunk) - s))
        L = max(x.shape[0] for x in seqs)
        states = torch.zeros(len(seqs), L, *seqs[0].shape[1:], dtype=torch.float16)  # (N, L, m, D)
        for i, x in enumerate(seqs):
            states[i, : x.shape[0]] = x
        lengths = torch.tensor([x.shape[0] for x in seqs], dtype=torch.int64)
        path = os.path.join(out_dir, f"features-{shard:05d}.safetensors")
        save_file({"states": states, "lengths": lengths}, path + ".tmp", metadata={"captions": json.dumps(chunk)})
        os.replace(path + ".tmp", path)  # atomic: a shard is complete or absent
    bar.close()
    return len(unique)


def load_feature_cache(cache_dir: str) -> dict[str, torch.Tensor]:
    """All shards → {caption: (L_i, m, D) float32 states}."""
    import glob
    import json
    import os

    from safetensors import safe_open

    paths = sorted(glob.glob(os.path.join(cache_dir, "features-*.safetensors")))
    if not paths:
        raise ValueError(f"feature cache {cache_dir!r} holds no features-*.safetensors shard")
    memo = {}
    for path in paths:
        with safe_open(path, framework="pt") as f:
            captions = json.loads(f.metadata()["captions"])
            states, lengths = f.get_tensor("states"), f.get_tensor("lengths")
        for i, c in enumerate(captions):
            memo[c] = states[i, : int(lengths[i])].float()
    return memo


########################################################################################
#          The latent cache (App. B.4, producer–consumer, on the image side)            #
########################################################################################
# The Wan 2.2 VAE is frozen and kept in fp32 (App. A), so an image's latent never changes
# either. Like the feature cache above, a producer encodes every image once — resized and
# centre-cropped to its aspect-ratio bucket at the stage's pixel area — and writes the
# normalised fp32 latents z0 (what gen_tower.WanVAECodec.encode returns) to safetensors
# shards, one bucket per shard, captions in the metadata. Training (`train.py --latents DIR`)
# then reads z0 and never runs the VAE encoder. A cache belongs to one pixel area, i.e. one
# stage resolution: stages 1 (512²) and 2–3 (1024²) need a cache each.
#
#   shard latents-<h>x<w>-<n>.safetensors: latents (N, C, h/f, w/f) fp32 · metadata captions,
#   area, image_hw, channels. Glossary: N images in the shard, C latent channels, f = 16.


def build_latent_cache(codec, spec: str, out_dir: str, area: int, multiple: int, batch_size: int = 16,
                       shard_size: int = 1024, progress: bool = True) -> int:
    """Encode every readable image of a folder / .jsonl (`read_records`) into bucketed latent
    shards. `codec` is a gen_tower codec (WanVAECodec); `multiple` = codec factor × patch size.
    Returns the number of images cached; unreadable files are skipped with one warning."""
    import json
    import os
    import warnings

    from PIL import Image
    from safetensors.torch import save_file
    from tqdm import tqdm

    source = ImageCaptionData(spec, area=area, multiple=multiple)  # bucket assignment by aspect ratio
    os.makedirs(out_dir, exist_ok=True)
    bar = tqdm(total=len(source), desc="latent cache", disable=not progress)
    done, bad = 0, 0
    for key in source.keys:
        h, w = source.buckets[key]
        members = source.members[key]
        for shard, start in enumerate(range(0, len(members), shard_size)):
            latents, captions = [], []
            chunk = members[start:start + shard_size]
            for s in range(0, len(chunk), batch_size):
                imgs, caps = [], []
                for path, caption in chunk[s:s + batch_size]:
                    try:
                        with Image.open(path) as im:
                            imgs.append(np.asarray(resize_center_crop(im, (h, w))))
                        caps.append(caption)
                    except Exception:  # PIL raises many types for bad files
                        bad += 1
                if imgs:
                    z = codec.encode(to_tensor(np.stack(imgs)))  # (b, C, h/f, w/f) normalised, fp32
                    latents.append(z.float().cpu())
                    captions += caps
                bar.update(len(chunk[s:s + batch_size]))
            if not latents:
                continue
            z = torch.cat(latents)  # (N, C, h/f, w/f)
            meta = {"captions": json.dumps(captions), "area": str(area), "image_hw": json.dumps([h, w]),
                    "channels": str(z.shape[1])}
            path = os.path.join(out_dir, f"latents-{h}x{w}-{shard:05d}.safetensors")
            save_file({"latents": z.contiguous()}, path + ".tmp", metadata=meta)
            os.replace(path + ".tmp", path)  # atomic: a shard is complete or absent
            done += len(captions)
    bar.close()
    if bad:
        warnings.warn(f"{spec}: skipped {bad} unreadable image file(s) while caching latents")
    return done


class LatentCache:
    """The consumer: batches of (z0, captions) from a latent cache, one bucket per batch.

    `batch(step, B)` is a pure function of (seed, step) — a bucket drawn in proportion to its
    size, then B rows of it — so resume stays exact, as with ImageCaptionData. Only the
    shards' headers are read up front; rows are read from disk per batch.
    """

    def __init__(self, cache_dir: str, seed: int = 0):
        import glob
        import json
        import os

        from safetensors import safe_open

        self.seed = seed
        paths = sorted(glob.glob(os.path.join(cache_dir, "latents-*.safetensors")))
        if not paths:
            raise ValueError(f"latent cache {cache_dir!r} holds no latents-*.safetensors shard "
                             "(build one with: python data.py --latents DIR --data SPEC --size S)")
        self.rows: dict[tuple[int, int], list[tuple[str, int, str]]] = {}  # image (h, w) → [(shard, row, caption)]
        areas, channels = set(), set()
        for path in paths:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata()
            hw = tuple(json.loads(meta["image_hw"]))
            areas.add(int(meta["area"]))
            channels.add(int(meta["channels"]))
            self.rows.setdefault(hw, []).extend((path, i, c) for i, c in enumerate(json.loads(meta["captions"])))
        if len(areas) > 1 or len(channels) > 1:
            raise ValueError(f"latent cache {cache_dir!r} mixes pixel areas {sorted(areas)} or channels {sorted(channels)}")
        self.area, self.channels = areas.pop(), channels.pop()
        self.keys = sorted(self.rows)

    def __len__(self):
        return sum(len(v) for v in self.rows.values())

    def check(self, image_size: int, channels: int):
        """One clear error when the cache was built for another stage's resolution or codec."""
        if self.area != image_size * image_size:
            raise ValueError(f"the latent cache holds images of area {self.area} px (≈{round(math.sqrt(self.area))}²) "
                             f"but this run trains at {image_size}²: build a cache per stage resolution")
        if self.channels != channels:
            raise ValueError(f"the latent cache has {self.channels} latent channels, the model expects {channels}")

    def batch(self, step: int, batch_size: int, start: int = 0, count: int | None = None):
        """→ z0 (B, C, h, w) float32 normalised latents, B captions; one bucket per batch.
        start/count: only those rows (one process's shard, as ImageCaptionData.batch)."""
        from safetensors import safe_open

        rng = np.random.default_rng([self.seed, 7, step])
        sizes = np.array([len(self.rows[k]) for k in self.keys], dtype=np.float64)
        pool = self.rows[self.keys[int(rng.choice(len(self.keys), p=sizes / sizes.sum()))]]
        picks = [pool[int(i)] for i in rng.choice(len(pool), size=batch_size, replace=len(pool) < batch_size)]
        picks = picks[start:None if count is None else start + count]
        by_shard: dict[str, list[int]] = {}
        for path, row, _ in picks:
            by_shard.setdefault(path, []).append(row)
        loaded = {}
        for path, rows in by_shard.items():
            with safe_open(path, framework="pt") as f:
                sl = f.get_slice("latents")
                for r in rows:
                    loaded[(path, r)] = sl[r:r + 1]  # (1, C, h, w) read from disk, not the whole shard
        z0 = torch.cat([loaded[(path, row)] for path, row, _ in picks])  # (B, C, h, w)
        return z0, [c for _, _, c in picks]


class PrecomputedLatentCodec(torch.nn.Module):
    """The codec for a run that reads a latent cache: `encode` is the identity (the batch
    already holds normalised z0, so train.training_step runs unchanged), `decode` is the real
    codec's — loaded on first use only, for the sample grids."""

    def __init__(self, name: str, loader=None):
        super().__init__()
        from gen_tower import codec_shape, load_codec

        self.name, self._codec = name, None
        self._loader = loader or (lambda: load_codec(name))
        self.channels, self.factor = codec_shape(name)

    def encode(self, z0: torch.Tensor) -> torch.Tensor:
        return z0

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if self._codec is None:
            self._codec = self._loader().to(z.device)
        return self._codec.decode(z)


########################################################################################
#                      Command line: build a feature cache (producer)                   #
########################################################################################
#   python data.py --cache DIR --data photos/            # captions of a folder / .jsonl
#   python data.py --cache DIR --shapesworld 200000      # captions of the first N examples


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Precompute understanding-tower states (--cache) or Wan VAE latents "
                                            "(--latents) for a data set.")
    p.add_argument("--cache", help="output directory for the feature shards (understanding states)")
    p.add_argument("--latents", metavar="DIR", help="output directory for latent shards (needs --data and --size)")
    p.add_argument("--size", type=int, default=512, help="--latents: the stage resolution; buckets keep its pixel area")
    p.add_argument("--vae", default=None, help="--latents: Wan 2.2 VAE hub id or local folder (default: the hub's)")
    p.add_argument("--patch", type=int, default=2, help="--latents: the preset's patch size (buckets tile f × patch)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a folder of images + .txt captions, or a .jsonl manifest")
    src.add_argument("--shapesworld", type=int, metavar="N", help="captions of ShapesWorld examples 0..N-1")
    p.add_argument("--seed", type=int, default=0, help="ShapesWorld stream seed")
    p.add_argument("--tower", default="minilm", help="und_tower.load_tower name, hub id or path")
    args = p.parse_args(argv)
    if bool(args.cache) == bool(args.latents):
        raise ValueError("give exactly one of --cache DIR (understanding states) or --latents DIR (VAE latents)")
    if args.latents:
        from gen_tower import check_size, codec_shape, load_codec

        if not args.data:
            raise ValueError("--latents encodes images: give --data (a folder or .jsonl), not --shapesworld")
        check_size(args.size, "wan2.2", args.patch)
        codec = load_codec("wan2.2", args.vae)
        n = build_latent_cache(codec, args.data, args.latents, area=args.size ** 2,
                               multiple=codec_shape("wan2.2")[1] * args.patch)
        print(f"cached the latents of {n} images at {args.size}² area in {args.latents}")
        return 0
    from und_tower import load_tower

    if args.data:
        captions = [c for _, c in read_records(args.data)]
    else:
        captions = [sample_example(example_rng(args.seed, i))[1] for i in range(args.shapesworld)]
    n = build_feature_cache(load_tower(args.tower), captions, args.cache)
    print(f"cached the states of {n} unique captions in {args.cache}")
    return 0


if __name__ == "__main__":
    import sys

    try:
        sys.exit(main())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
