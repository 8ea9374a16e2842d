"""Out-of-distribution check: shapes drawn by a different program, captioned by a checkpoint.

The synthetic dataset's spec (DESIGN.md) drawn with other code and other choices than
training/data/synthetic.py: CSS colour names through PIL's ImageColor, plain ImageDraw calls with
no anti-aliasing, white or near-white backgrounds, equilateral triangles, canvases of 256 to
640 pixels, objects placed by a simple grid layout. Each image is captioned as PNG and as
JPEG (quality 75, Pillow's default), through the model's own `open_image` and caption API, as
a served request would be (params.yaml's default decoding); the table shows content accuracy (and its parts) per variant, the
wrong captions below it.

    .venv/bin/python bench/ood.py --model artifacts/model/model.pth
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageColor, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import Decoding, load, open_image  # noqa: E402
from training.data.synthetic import Scene, SceneObject, content_breakdown, content_correct  # noqa: E402

# What another program would most likely call these colours: CSS names.
CSS = {
    "red": "red",
    "green": "green",
    "blue": "blue",
    "yellow": "gold",
    "purple": "purple",
    "orange": "darkorange",
    "black": "black",
}
BACKGROUNDS = ("white", "white", "whitesmoke", "ivory", "#f0f0f0")
SIDES = (256, 300, 400, 512, 640)
SHAPES = ("circle", "square", "triangle")


def draw(
    kinds: list[tuple[str, str]], relation: str | None, side: int, rng
) -> tuple[Image.Image, Scene]:
    """One or two shapes on a plain canvas; for two, the first is `relation` of the second."""
    image = Image.new("RGB", (side, side), BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))])
    pen = ImageDraw.Draw(image)
    objects = []
    if relation is None:
        size = int(side * rng.uniform(0.25, 0.5))
        centres = [
            (side / 2 + rng.uniform(-0.15, 0.15) * side, side / 2 + rng.uniform(-0.15, 0.15) * side)
        ]
        sizes = [size]
    else:
        sizes = [int(side * rng.uniform(0.15, 0.3)) for _ in kinds]
        near, far = side * 0.28, side * 0.72  # first object at `near` along the axis
        if relation in ("right of", "below"):
            near, far = far, near
        across = side / 2 + rng.uniform(-0.05, 0.05) * side
        horizontal = relation in ("left of", "right of")
        centres = [(near, across), (far, across)] if horizontal else [(across, near), (across, far)]
    for (colour, shape), (cx, cy), size in zip(kinds, centres, sizes):
        fill = ImageColor.getrgb(CSS[colour])
        half = size / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        if shape == "circle":
            pen.ellipse(box, fill=fill)
        elif shape == "square":
            pen.rectangle(box, fill=fill)
        else:  # equilateral, pointing up, centred in its box
            h = size * math.sqrt(3) / 2
            pen.polygon(
                [(cx - half, cy + h / 2), (cx + half, cy + h / 2), (cx, cy - h / 2)], fill=fill
            )
        bbox = tuple(int(v) for v in box)
        objects.append(SceneObject(colour, shape, "large" if size > 0.3 * side else "small", bbox))
    return image, Scene(tuple(objects), relation, side)


def scenes(count_single: int, count_pairs: int, seed: int = 2024):
    """Every colour as a single shape (twice over), then pairs in every relation."""
    rng = np.random.default_rng(seed)
    colours = list(CSS)
    out = []
    for i in range(count_single):
        kind = (colours[i % len(colours)], SHAPES[int(rng.integers(3))])
        out.append(draw([kind], None, SIDES[i % len(SIDES)], rng))
    relations = ("left of", "right of", "above", "below")
    for i in range(count_pairs):
        a = (colours[int(rng.integers(7))], SHAPES[int(rng.integers(3))])
        b = a
        while b == a:
            b = (colours[int(rng.integers(7))], SHAPES[int(rng.integers(3))])
        out.append(draw([a, b], relations[i % 4], SIDES[(i + 2) % len(SIDES)], rng))
    return out


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 75} if fmt == "JPEG" else {}))
    return buffer.getvalue()


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="artifacts/model/model.pth")
    parser.add_argument("--single", type=int, default=14)
    parser.add_argument("--pairs", type=int, default=28)
    parser.add_argument("--save", type=Path, help="write the drawn images (PNG) here")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    captioner = load(args.model)
    drawn = scenes(args.single, args.pairs)
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        for i, (image, _) in enumerate(drawn):
            image.save(args.save / f"ood_{i:02d}.png")
    rows, wrong = [], []
    for fmt in ("PNG", "JPEG"):
        images = [open_image(encoded(im, fmt)) for im, _ in drawn]
        captions = [r.caption for r in captioner.caption(images, Decoding())]
        parts = [content_breakdown(c, s) for c, (_, s) in zip(captions, drawn)]
        correct = [content_correct(c, s) for c, (_, s) in zip(captions, drawn)]
        single = [c for c, (_, s) in zip(correct, drawn) if len(s.objects) == 1]
        pairs = [p["relation"] for p, (_, s) in zip(parts, drawn) if len(s.objects) == 2]
        rows.append(
            (
                fmt,
                np.mean(correct),
                np.mean(single),
                np.mean([p["colour"] for p in parts]),
                np.mean([p["shape"] for p in parts]),
                np.mean(pairs),
            )
        )
        for i, (c, ok, (_, s)) in enumerate(zip(captions, correct, drawn)):
            if not ok:
                truth = " / ".join(f"{o.colour} {o.shape}" for o in s.objects)
                wrong.append(f"{fmt} #{i:02d} ({truth}, {s.relation or '-'}): {c}")
    n = len(drawn)
    print(f"{n} images ({args.single} single shapes, {args.pairs} pairs), model {args.model}\n")
    print("| saved as | content | single shapes | colour | shape | relation (pairs) |")
    print("|---|---:|---:|---:|---:|---:|")
    for fmt, *values in rows:
        print(f"| {fmt} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    print("\nwrong captions:" if wrong else "\nno wrong captions")
    for line in wrong:
        print("  " + line)


if __name__ == "__main__":
    main()
