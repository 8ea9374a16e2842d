"""The synthetic shapes dataset: determinism, the spec DESIGN.md fixes, and content accuracy."""

from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
from PIL import Image, ImageColor

from training.data.captions import read_captions
from training.data.synthetic import (
    COLOUR_RANGES,
    COLOURS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    content_breakdown,
    content_correct,
    load_scenes,
    make_captions,
    make_scene,
    shade,
    write_synthetic,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """200 images: enough to see the 40/60 mix and every colour, shape and relation."""
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(out, num_images=200, image_size=224, seed=11)
    return out


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_same_seed_same_bytes_and_image_i_independent_of_count(tmp_path):
    write_synthetic(tmp_path / "a", num_images=8, seed=5)
    write_synthetic(tmp_path / "b", num_images=8, seed=5)
    write_synthetic(tmp_path / "c", num_images=8, seed=6)
    write_synthetic(tmp_path / "d", num_images=5, seed=5)
    a = files(tmp_path / "a")
    assert a == files(tmp_path / "b")
    assert a["Images/shapes_00000.png"] != files(tmp_path / "c")["Images/shapes_00000.png"]
    d = files(tmp_path / "d")
    assert {k: v for k, v in d.items() if k.startswith("Images/")} == {
        k: v
        for k, v in a.items()
        if k.startswith("Images/shapes_0000") and k < "Images/shapes_00005"
    }


def test_layout_counts_and_mix(dataset):
    scenes = load_scenes(dataset)
    rows = read_captions(dataset)
    assert sorted(p.name for p in (dataset / "Images").iterdir()) == sorted(scenes)
    assert len(rows) == 5 * len(scenes)
    singles = sum(len(s.objects) == 1 for s in scenes.values())
    assert 0.3 < singles / len(scenes) < 0.5  # ~40% one object, ~60% two
    assert {o.colour for s in scenes.values() for o in s.objects} == set(COLOURS)
    assert {o.shape for s in scenes.values() for o in s.objects} == set(SHAPES)
    assert {s.relation for s in scenes.values()} == {None, "left of", "right of", "above", "below"}
    raw = json.loads((dataset / "scenes.json").read_text())
    assert Scene.from_dict(raw["shapes_00000.png"]) == scenes["shapes_00000.png"]


def test_objects_fit_do_not_overlap_and_the_relation_is_unambiguous():
    assert SIZES["large"][1] > 0.5  # two of the largest cannot sit side by side: drawn again
    for index in range(2000):
        rng = np.random.default_rng([1, index])
        size = (64, 224, 384)[index % 3]
        scene = make_scene(rng, size, 2)
        a, b = scene.objects
        assert (a.colour, a.shape) != (b.colour, b.shape)
        for o in (a, b):
            x0, y0, x1, y1 = o.bbox
            assert 0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size and x1 - x0 == y1 - y0
        (ax, ay), (bx, by) = a.centre, b.centre
        horizontal = scene.relation in ("left of", "right of")
        along, across = (bx - ax, by - ay) if horizontal else (by - ay, bx - ax)
        # a lies before b on the axis (left of / above) or after it (right of / below) ...
        sign = 1 if scene.relation in ("left of", "above") else -1
        # ... with the boxes apart along that axis, and the other axis clearly secondary
        lo, hi = (a, b) if sign > 0 else (b, a)
        axis = 0 if horizontal else 1
        assert lo.bbox[axis + 2] < hi.bbox[axis], scene
        assert sign * along > 0 and abs(across) <= 0.4 * abs(along), scene


def test_sizes_are_clearly_different(dataset):
    sides = {"small": [], "large": []}
    for scene in load_scenes(dataset).values():
        for o in scene.objects:
            sides[o.size].append((o.bbox[2] - o.bbox[0]) / scene.canvas)
    assert max(sides["small"]) < 0.6 * min(sides["large"])
    # and they span the ranges: from a tenth of the canvas to over half of it
    assert min(sides["small"]) < 0.11 and max(sides["large"]) > 0.5


def hsv(rgb) -> tuple[float, float, float]:
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    return h * 360, s, v


def colour_of(rgb, slack: float = 0.0) -> list[str]:
    """The colour names whose ranges hold an RGB value (saturation and value +-slack, hue
    +-100 slack degrees)."""
    h, s, v = hsv(rgb)
    names = []
    for name, ((h0, h1), (s0, s1), (v0, v1)) in COLOUR_RANGES.items():
        in_hue = any(h0 - slack * 100 <= hue <= h1 + slack * 100 for hue in (h, h - 360))
        s_slack = slack + 1 / max(1.0, 255 * v)  # 8-bit rounding moves a dark one's saturation
        if in_hue and s0 - s_slack <= s <= s1 + s_slack and v0 - slack <= v <= v1 + slack:
            names.append(name)
    return names


def test_colour_ranges_are_apart_and_hold_what_other_programs_call_these_colours():
    # CSS named colours and matplotlib's default cycle, as another program would draw them
    named = {
        "red": ["red", "firebrick", "crimson", "#d62728"],
        "orange": ["orange", "darkorange", "#ff7f0e"],
        "yellow": ["yellow", "gold"],
        "green": ["green", "lime", "forestgreen", "#2ca02c"],
        "blue": ["blue", "navy", "royalblue", "dodgerblue", "#1f77b4"],
        "purple": ["purple", "indigo", "rebeccapurple", "#9467bd"],
        "black": ["black", "#202020"],
    }
    for colour, names in named.items():
        for name in names:
            assert colour_of(ImageColor.getrgb(name)) == [colour], name
        assert colour_of(COLOURS[colour]) == [colour]
    rng = np.random.default_rng(0)
    for colour in COLOUR_RANGES:  # every shade drawn is unambiguous, even 2% off its range
        for _ in range(300):
            assert colour_of(shade(colour, rng), slack=0.02) == [colour]


def test_canvas_sizes_vary_within_the_range(tmp_path):
    write_synthetic(tmp_path, num_images=30, image_size=[128, 384], seed=2)
    scenes = load_scenes(tmp_path)
    sides = set()
    for name, scene in scenes.items():
        with Image.open(tmp_path / "Images" / name) as image:
            assert image.size == (scene.canvas, scene.canvas)  # square, as scenes.json says
        sides.add(scene.canvas)
        assert all(0 <= v <= scene.canvas for o in scene.objects for v in o.bbox)
    assert min(sides) >= 128 and max(sides) <= 384 and len(sides) > 20


def test_pixels_show_the_scene_on_a_light_background(dataset):
    backgrounds = []
    for name, scene in list(load_scenes(dataset).items())[:60]:
        pixels = np.asarray(Image.open(dataset / "Images" / name).convert("RGB")).astype(int)
        covered = np.zeros(pixels.shape[:2], bool)
        for o in scene.objects:
            x0, y0, x1, y1 = o.bbox
            covered[y0:y1, x0:x1] = True
            # a point inside every shape: for the upright triangle, low in its box
            cx, cy = (x0 + x1) // 2, (y0 + 3 * y1) // 4
            assert colour_of(pixels[cy, cx], slack=0.03) == [o.colour], (name, o, pixels[cy, cx])
        background = pixels[~covered]
        assert np.percentile(background, 1) >= 188  # light (noise aside)
        spread = background.max(axis=1) - background.min(axis=1)
        assert spread.max() <= 2 * 10 + 1  # a tint, never saturated
        backgrounds.append(background.mean())
    assert max(backgrounds) > 250 and min(backgrounds) < 210  # white to light grey


def test_five_distinct_captions_each_naming_everything_and_parsing_back(dataset):
    scenes = load_scenes(dataset)
    by_image: dict[str, list[str]] = {}
    for row in read_captions(dataset):
        by_image.setdefault(row.image, []).append(row.caption)
    for name, captions in by_image.items():
        scene = scenes[name]
        assert len(set(captions)) == 5
        for caption in captions:
            assert caption == caption.lower()
            for o in scene.objects:
                assert o.colour in caption and o.shape in caption
            assert content_correct(caption, scene), (caption, scene)
            assert content_correct(caption, scene.to_dict())  # the JSON form works too
    # and many more scenes than the fixture holds, at every canvas size
    for index in range(1500):
        rng = np.random.default_rng([9, index])
        scene = make_scene(rng, 224, 1 + index % 2)
        for caption in make_captions(scene, rng):
            assert content_correct(caption, scene), (caption, scene)
            assert content_breakdown(caption, scene)["size"] in (None, True)


def test_mirrored_and_scaled_scenes():
    rng = np.random.default_rng(4)
    for index in range(200):
        scene = make_scene(rng, 200, 1 + index % 2)
        mirrored = scene.mirrored()
        assert mirrored.mirrored() == scene
        flip = {"left of": "right of", "right of": "left of"}
        assert mirrored.relation == flip.get(scene.relation, scene.relation)
        for o, m in zip(scene.objects, mirrored.objects):
            assert m.centre == (200 - o.centre[0], o.centre[1])
        big = scene.scaled(500)
        assert big.canvas == 500 and big.relation == scene.relation
        for o, b in zip(scene.objects, big.objects):
            assert abs(b.centre[0] - 2.5 * o.centre[0]) <= 2 and b.bbox[2] <= 500


RED_CIRCLE = SceneObject("red", "circle", "large", (20, 80, 100, 160))
BLUE_SQUARE = SceneObject("blue", "square", "small", (150, 100, 190, 140))
PAIR = Scene((RED_CIRCLE, BLUE_SQUARE), "left of")  # the red circle is left of the blue square
ONE = Scene((RED_CIRCLE,))


@pytest.mark.parametrize(
    "caption",
    [
        "a red circle to the left of a blue square",
        "a large red circle left of a small blue square",
        "there is a blue square to the right of a big red circle",
        "a blue square with a red circle to its left",
        "a red circle with a blue square on its right",
        "to the left of a blue square is a red circle",
        "A Red Circle, left of a blue square.",
    ],
)
def test_correct_captions(caption):
    assert content_correct(caption, PAIR)


@pytest.mark.parametrize(
    ("caption", "wrong"),
    [
        ("a blue circle to the left of a red square", "objects"),  # colours swapped
        ("a red square to the left of a blue circle", "objects"),  # shapes swapped
        ("a red circle to the right of a blue square", "relation"),
        ("a red circle above a blue square", "relation"),
        ("a blue square to the left of a red circle", "relation"),
        ("a blue square with a red circle to its right", "relation"),
        ("a red circle", "count"),  # the square is missing
        ("a red circle left of a blue square and a green triangle", "count"),
        ("a red circle left of a blue", "count"),  # stray colour word
        ("a red circle and a blue square", "relation"),  # no relation given
        ("a red circle left of and above a blue square", "relation"),  # contradicting
    ],
)
def test_wrong_captions(caption, wrong):
    parts = content_breakdown(caption, PAIR)
    assert not content_correct(caption, PAIR)
    assert parts[wrong] is False


def test_breakdown_and_single_object_scenes():
    assert content_breakdown("a big red circle left of a small blue square", PAIR) == {
        "count": True,
        "colour": True,
        "shape": True,
        "objects": True,
        "relation": True,
        "size": True,
    }
    # every colour and shape word is right, but bound to the wrong objects
    swapped = content_breakdown("a red square left of a blue circle", PAIR)
    assert swapped["colour"] and swapped["shape"] and not swapped["objects"]
    wrong_shape = content_breakdown("a red triangle left of a blue square", PAIR)
    assert wrong_shape["colour"] and not wrong_shape["shape"] and not wrong_shape["relation"]
    assert content_breakdown("a tiny red circle left of a blue square", PAIR)["size"] is False
    assert content_correct("a picture of a red circle", ONE)
    assert not content_correct("a red circle to the left", ONE)
    assert not content_correct("a blue circle", ONE)
    assert not content_correct("", ONE)
