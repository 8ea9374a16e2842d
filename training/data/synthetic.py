"""The embedded default dataset: coloured shapes on a light canvas, and its content metric.

Each image holds one or two filled, non-overlapping, unrotated shapes (circle, square,
triangle) in one of seven colours and two sizes. Five captions per image, worded from several
templates, name every object's colour and shape and, with two objects, where the first is
relative to the second. Everything is drawn from `numpy.random.default_rng([seed, index])`,
so image i is the same whatever `num_images` is, and the same seed writes the same bytes.

What varies, so that a drawing from another program still looks familiar: the canvas side
(`image_size: [lo, hi]`), each colour's shade (a range of hue, saturation and value around
the name, wide enough for the named colours of CSS and matplotlib), object sides from 10% to
55% of the canvas, the background (white to light grey, slightly tinted, sometimes noisy) and
the edges (anti-aliased or hard, as a plain ImageDraw call draws them).

`content_correct(caption, scene)` parses a caption back into objects and a relation and checks
them against the scene: the evaluation's content accuracy.
"""

from __future__ import annotations

import colorsys
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from training.data.captions import IMAGES_DIR, SCENES_FILE, write_captions

log = logging.getLogger(__name__)

# A typical shade of each colour; `COLOUR_RANGES` says which shades are drawn.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 150, 55),
    "blue": (35, 75, 215),
    "yellow": (235, 195, 20),
    "purple": (125, 45, 165),
    "orange": (240, 125, 20),
    "black": (25, 25, 25),
}
# (hue in degrees, saturation, value) ranges, each in HSV's [0, 1] but hue. Hues stay >= 7
# degrees apart between colours, and black is darker than any coloured shade; the ranges hold
# CSS's red, green, lime, blue, navy, purple, orange, gold and yellow and matplotlib's tab:*.
COLOUR_RANGES: dict[str, tuple[tuple[float, float], ...]] = {
    "red": ((-12, 6), (0.7, 1.0), (0.55, 1.0)),
    "orange": ((18, 40), (0.8, 1.0), (0.85, 1.0)),
    "yellow": ((47, 60), (0.7, 1.0), (0.85, 1.0)),
    "green": ((100, 145), (0.6, 1.0), (0.4, 1.0)),
    "blue": ((200, 245), (0.55, 1.0), (0.45, 1.0)),
    "purple": ((262, 302), (0.4, 1.0), (0.4, 0.85)),
    "black": ((0, 360), (0.0, 0.25), (0.0, 0.18)),
}
SHAPES = ("circle", "square", "triangle")
# Side of the object's square bounding box as a fraction of the canvas: at 224 px small is
# 22-45 px and large 76-123 px, so even the largest small one is under 0.6 of the smallest large.
SIZES: dict[str, tuple[float, float]] = {"small": (0.10, 0.20), "large": (0.34, 0.55)}
RELATIONS = ("left of", "right of", "above", "below")
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

_MARGIN = 0.03  # of the canvas, kept free at the border
_GAP = 0.04  # of the canvas, at least between the two boxes along the relation's axis
_CROSS_RATIO = 0.4  # off-axis centre offset at most this times the on-axis one (22 deg)
_SUPERSAMPLE = (1, 2, 4)  # draw this many times bigger, then box-filter down (1: hard edges)
_BACKGROUND = (200, 255)  # grey level of the canvas ...
_TINT = 10  # ... plus at most this per channel: light, never saturated
_NOISE = (0.3, 4.0)  # this fraction of images get grey noise of std up to 4 levels

# Wording. Every phrase below must stay parseable by `parse_caption`.
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_REL_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
# "<b> with <a> to its left": the relation of the object named second to the one named first.
_ITS_PHRASES = {
    "left of": ("to its left", "on its left"),
    "right of": ("to its right", "on its right"),
    "above": ("above it",),
    "below": ("below it", "under it"),
}
_ONE_TEMPLATES = (
    "{a}",
    "there is {a}",
    "{a} on a plain background",
    "a picture of {a}",
    "an image of {a}",
    "a single {a_bare}",
    "just {a}",
)
# {a} is scene object 0, {b} object 1; {rel} is how 0 lies relative to 1, {inv} the converse.
_TWO_TEMPLATES = (
    "{a} {rel} {b}",
    "there is {a} {rel} {b}",
    "{a} is {rel} {b}",
    "a picture of {a} {rel} {b}",
    "{b} {inv} {a}",
    "{b} is {inv} {a}",
    "there is {b} {inv} {a}",
    "{b} with {a} {its}",
)
CAPTIONS_PER_IMAGE = 5


@dataclass(frozen=True)
class SyntheticConfig:
    """`data.synthetic` in params.yaml."""

    num_images: int = 5000
    # canvas side in pixels: [lo, hi] draws each image's side from that range; one number fixes it
    image_size: int | list[int] = field(default_factory=lambda: [128, 384])
    seed: int = 0
    one_object_fraction: float = 0.4

    def __post_init__(self) -> None:
        size = self.image_size
        pair = isinstance(size, list) and len(size) == 2 and all(type(v) is int for v in size)
        if type(size) is not int and not pair:
            raise ValueError(
                f"data.synthetic.image_size must be an integer or [lo, hi], got {size!r}"
            )


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; bbox is (x0, y0, x1, y1) in pixels, x1/y1 exclusive."""

    colour: str
    shape: str
    size: str
    bbox: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)


@dataclass(frozen=True)
class Scene:
    """What an image shows: 1 or 2 objects and, for 2, how objects[0] lies relative to [1].

    `canvas` is the image's side in pixels (None: not recorded).
    """

    objects: tuple[SceneObject, ...]
    relation: str | None = None
    canvas: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as stored in scenes.json."""
        return {
            "canvas": self.canvas,
            "objects": [
                {
                    "colour": o.colour,
                    "shape": o.shape,
                    "size": o.size,
                    "bbox": list(o.bbox),
                    "centre": list(o.centre),
                }
                for o in self.objects
            ],
            "relation": self.relation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Scene:
        """Inverse of `to_dict`."""
        objects = tuple(
            SceneObject(o["colour"], o["shape"], o["size"], tuple(o["bbox"]))
            for o in data["objects"]
        )
        return cls(objects, data.get("relation"), data.get("canvas"))

    def mirrored(self) -> Scene:
        """The scene flipped left to right: boxes mirrored, "left of" and "right of" swapped."""
        if self.canvas is None:
            raise ValueError("mirroring a scene needs its canvas size")
        objects = tuple(
            replace(
                o, bbox=(self.canvas - o.bbox[2], o.bbox[1], self.canvas - o.bbox[0], o.bbox[3])
            )
            for o in self.objects
        )
        relation = {"left of": "right of", "right of": "left of"}.get(self.relation, self.relation)
        return Scene(objects, relation, self.canvas)

    def scaled(self, canvas: int) -> Scene:
        """The same scene on a canvas of side `canvas`: every box scaled, kept square."""
        if self.canvas is None:
            raise ValueError("scaling a scene needs its canvas size")
        k = canvas / self.canvas
        objects = []
        for o in self.objects:
            x0, y0 = round(o.bbox[0] * k), round(o.bbox[1] * k)
            side = max(1, round((o.bbox[2] - o.bbox[0]) * k))
            objects.append(replace(o, bbox=(x0, y0, x0 + side, y0 + side)))
        return Scene(tuple(objects), self.relation, canvas)


# ---------------------------------------------------------------------------- generation


def make_scene(rng: np.random.Generator, image_size: int, num_objects: int) -> Scene:
    """Random scene with 1 or 2 distinct objects placed so the relation is unambiguous."""
    first = _random_kind(rng)
    margin = round(_MARGIN * image_size)
    if num_objects == 1:
        size = _side(rng, first[2], image_size)
        x0 = int(rng.integers(margin, image_size - margin - size + 1))
        y0 = int(rng.integers(margin, image_size - margin - size + 1))
        return Scene((SceneObject(*first, (x0, y0, x0 + size, y0 + size)),), None, image_size)
    second = _random_kind(rng)
    while second[:2] == first[:2]:  # same colour and shape: a caption could not tell them apart
        second = _random_kind(rng)
    relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
    room = image_size - 2 * margin - round(_GAP * image_size)
    size_a, size_b = room + 1, 0
    while size_a + size_b > room:  # two large ones must fit side by side: draw again
        size_a, size_b = _side(rng, first[2], image_size), _side(rng, second[2], image_size)
    box_a, box_b = _place_pair(rng, size_a, size_b, relation, image_size)
    return Scene((SceneObject(*first, box_a), SceneObject(*second, box_b)), relation, image_size)


def draw_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Render a scene on a light, slightly tinted background, sometimes with mild grey noise."""
    grey = int(rng.integers(_BACKGROUND[0], _BACKGROUND[1] + 1))
    background = tuple(int(np.clip(grey + rng.integers(-_TINT, _TINT + 1), 0, 255)) for _ in "rgb")
    s = int(rng.choice(_SUPERSAMPLE))
    image = Image.new("RGB", (image_size * s, image_size * s), background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = shade(obj.colour, rng)
        x0, y0, x1, y1 = (v * s for v in obj.bbox)
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:  # upright isosceles triangle filling the box: base at the bottom, apex on top
            draw.polygon(((x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1) / 2, y0)), fill=fill)
    image = image.reduce(s) if s > 1 else image
    if rng.random() < _NOISE[0]:  # grey noise: the same on every channel, so no tint appears
        noise = rng.normal(0, rng.uniform(0.5, _NOISE[1]), (image_size, image_size, 1))
        pixels = np.asarray(image, dtype=np.float32) + noise
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image


def shade(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
    """A random RGB shade of a colour name, from its hue/saturation/value ranges."""
    (h0, h1), (s0, s1), (v0, v1) = COLOUR_RANGES[colour]
    rgb = colorsys.hsv_to_rgb(
        (rng.uniform(h0, h1) % 360) / 360, rng.uniform(s0, s1), rng.uniform(v0, v1)
    )
    return tuple(int(round(255 * c)) for c in rgb)


def make_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five distinct captions in varied wording, each naming every object (and the relation)."""
    templates = _ONE_TEMPLATES if len(scene.objects) == 1 else _TWO_TEMPLATES
    chosen = rng.choice(len(templates), size=CAPTIONS_PER_IMAGE, replace=False)
    captions = []
    for index in chosen:
        with_size = bool(rng.random() < 0.5)
        nouns = [_noun(o, rng, with_size) for o in scene.objects]
        words: dict[str, str] = {"a": _article(nouns[0]), "a_bare": nouns[0]}
        if scene.relation:
            words["b"] = _article(nouns[1])
            words["rel"] = _pick(rng, _REL_PHRASES[scene.relation])
            words["inv"] = _pick(rng, _REL_PHRASES[INVERSE[scene.relation]])
            words["its"] = _pick(rng, _ITS_PHRASES[scene.relation])
        captions.append(templates[index].format(**words))
    return captions


def write_synthetic(
    out_dir: Path,
    num_images: int = SyntheticConfig.num_images,  # its defaults (image_size: the same range)
    image_size: int | Sequence[int] = (128, 384),
    seed: int = SyntheticConfig.seed,
    one_object_fraction: float = SyntheticConfig.one_object_fraction,
) -> int:
    """Write the synthetic dataset in the raw layout (plus scenes.json); returns image count.

    `image_size`: the canvas side, or [lo, hi] to draw each image's side from.
    """
    lo, hi = (image_size, image_size) if isinstance(image_size, int) else image_size
    if num_images < 1 or not 64 <= lo <= hi:
        raise ValueError(
            f"data.synthetic needs num_images >= 1 and image_size >= 64 (one number, or "
            f"[lo, hi] with 64 <= lo <= hi: two large shapes must fit side by side), got "
            f"num_images={num_images}, image_size={image_size}"
        )
    images_dir = out_dir / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    scenes: dict[str, Any] = {}
    rows: list[tuple[str, str]] = []
    for index in tqdm(range(num_images), desc="synthetic images", unit="img"):
        rng = np.random.default_rng([seed, index])
        num_objects = 1 if rng.random() < one_object_fraction else 2
        side = int(rng.integers(lo, hi + 1))
        scene = make_scene(rng, side, num_objects)
        name = f"shapes_{index:05d}.png"
        # PNG: lossless, so pixels are exact everywhere, and flat colours compress to a few KB.
        draw_scene(scene, side, rng).save(images_dir / name, format="PNG")
        scenes[name] = scene.to_dict()
        rows.extend((name, caption) for caption in make_captions(scene, rng))
    write_captions(out_dir, rows)
    (out_dir / SCENES_FILE).write_text(json.dumps(scenes, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %d synthetic images and %d captions to %s", num_images, len(rows), out_dir)
    return num_images


def load_scenes(raw_dir: str | Path) -> dict[str, Scene]:
    """scenes.json of a synthetic raw dataset: image name -> Scene."""
    path = Path(raw_dir) / SCENES_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: content accuracy needs the synthetic dataset "
            "(data.source: synthetic)"
        )
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: Scene.from_dict(scene) for name, scene in data.items()}


def _random_kind(rng: np.random.Generator) -> tuple[str, str, str]:
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = ("small", "large")[int(rng.integers(2))]
    return colour, shape, size


def _side(rng: np.random.Generator, size: str, image_size: int) -> int:
    lo, hi = SIZES[size]
    return int(rng.integers(round(lo * image_size), round(hi * image_size) + 1))


def _place_pair(
    rng: np.random.Generator, size_a: int, size_b: int, relation: str, image_size: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Boxes for objects a and b with `a <relation> b` the only sensible reading.

    Along the relation's axis the boxes are separated by a gap; across it the centres differ
    by at most 0.4 times the along-axis distance, so "left of" is never also "mostly above".
    """
    margin, gap = round(_MARGIN * image_size), round(_GAP * image_size)
    a_first = relation in ("left of", "above")  # a has the smaller coordinate on the axis
    near, far = (size_a, size_b) if a_first else (size_b, size_a)
    hi = image_size - margin
    near_lo = int(rng.integers(margin, hi - (near + gap + far) + 1))
    far_lo = int(rng.integers(near_lo + near + gap, hi - far + 1))
    along = (far_lo + far / 2) - (near_lo + near / 2)
    # Across the axis: far's top-left = near's + shift, shift = centring term + offset. The
    # offset bound keeps |centre difference| <= ratio * along despite the rounding, and the
    # second range keeps both boxes on the canvas (offset 0 always does).
    centring = round((near - far) / 2)
    bound = int(_CROSS_RATIO * along - 0.5)
    lo_off = max(-bound, margin + near - hi - centring)
    hi_off = min(bound, hi - far - margin - centring)
    shift = centring + int(rng.integers(lo_off, hi_off + 1))
    near_cross = int(
        rng.integers(max(margin, margin - shift), min(hi - near, hi - far - shift) + 1)
    )
    far_cross = near_cross + shift
    horizontal = relation in ("left of", "right of")

    def box(lo_along: int, lo_across: int, side: int) -> tuple[int, int, int, int]:
        x, y = (lo_along, lo_across) if horizontal else (lo_across, lo_along)
        return (x, y, x + side, y + side)

    near_box, far_box = box(near_lo, near_cross, near), box(far_lo, far_cross, far)
    return (near_box, far_box) if a_first else (far_box, near_box)


def _noun(obj: SceneObject, rng: np.random.Generator, with_size: bool) -> str:
    words = [obj.colour, obj.shape]
    if with_size:
        words.insert(0, _pick(rng, _SIZE_WORDS[obj.size]))
    return " ".join(words)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


# ------------------------------------------------------------------------ content metric

_SIZE_OF_WORD = {word: size for size, words in _SIZE_WORDS.items() for word in words}
_RELATION_OF_WORD = {
    "left": "left of",
    "right": "right of",
    "above": "above",
    "over": "above",
    "below": "below",
    "under": "below",
    "beneath": "below",
}


@dataclass(frozen=True)
class Mention:
    """A "[size] colour shape" phrase found in a caption; `at` is its colour's word index."""

    at: int
    colour: str
    shape: str
    size: str | None


@dataclass(frozen=True)
class ParsedCaption:
    """Objects and relation words found in a caption; `stray` counts unpaired colour/shape words."""

    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str], ...]  # (word index, relation)
    stray: int


def parse_caption(caption: str) -> ParsedCaption:
    """Find "[size] colour shape" mentions and relation words (left/right/above/below/...)."""
    words = re.findall(r"[a-z]+", caption.lower())
    mentions, relations, stray = [], [], 0
    i = 0
    while i < len(words):
        word = words[i]
        if word in COLOURS and i + 1 < len(words) and words[i + 1] in SHAPES:
            size = _SIZE_OF_WORD.get(words[i - 1]) if i > 0 else None
            mentions.append(Mention(i, word, words[i + 1], size))
            i += 2
            continue
        if word in COLOURS or word in SHAPES:
            stray += 1
        elif word in _RELATION_OF_WORD:
            relations.append((i, _RELATION_OF_WORD[word]))
        i += 1
    return ParsedCaption(tuple(mentions), tuple(relations), stray)


def content_breakdown(caption: str, scene: Scene | Mapping[str, Any]) -> dict[str, bool | None]:
    """Which parts of a caption match the scene: count, colour, shape, objects, relation, size.

    `objects`: exactly the scene's (colour, shape) pairs, each named once, nothing stray.
    `relation`: with two objects, the one relation stated, read in the order the objects are
    named ("a b <rel> a c" is b rel c; "a c with a b to its left" and a relation before both
    names are the converse); with one object, no relation stated. `size` (not part of
    `content_correct`): every size word given is right, None when none is given.
    """
    if not isinstance(scene, Scene):
        scene = Scene.from_dict(scene)
    parsed = parse_caption(caption)
    said, truth = parsed.mentions, scene.objects
    count = len(said) == len(truth) and parsed.stray == 0
    objects = count and {(m.colour, m.shape) for m in said} == {(o.colour, o.shape) for o in truth}
    result: dict[str, bool | None] = {
        "count": count,
        "colour": Counter(m.colour for m in said) == Counter(o.colour for o in truth),
        "shape": Counter(m.shape for m in said) == Counter(o.shape for o in truth),
        "objects": objects,
        "relation": _relation_correct(parsed, scene) if objects else False,
        "size": None,
    }
    if objects and any(m.size for m in said):
        size_of = {(o.colour, o.shape): o.size for o in truth}
        result["size"] = all(m.size in (None, size_of[(m.colour, m.shape)]) for m in said)
    return result


def content_correct(caption: str, scene: Scene | Mapping[str, Any]) -> bool:
    """True when the caption names every object's colour and shape and the right relation."""
    parts = content_breakdown(caption, scene)
    return bool(parts["objects"] and parts["relation"])


def _relation_correct(parsed: ParsedCaption, scene: Scene) -> bool:
    stated = {relation for _, relation in parsed.relations}
    if len(scene.objects) == 1:
        return not stated
    if len(stated) != 1:
        return False  # none, or contradicting words: not a clear statement
    relation = stated.pop()
    first, second = parsed.mentions
    where = parsed.relations[0][0]
    if not first.at < where < second.at:
        relation = INVERSE[relation]  # "... with <second> to its left", "left of <first> is ..."
    index = {(o.colour, o.shape): i for i, o in enumerate(scene.objects)}
    if index[(first.colour, first.shape)] == 0:
        return relation == scene.relation
    return relation == INVERSE[scene.relation]
