"""Where the model looked for each word: the image once, then one panel per WordPiece with its
relevance over the encoder grid (model/relevance.py) upsampled and blended over the image.

`render_attention` draws any number of captioned images into one PNG (the evaluate stage's
reports/attention.png, the CLI's --attention files); `evaluate_attention` picks the test images
and decodes them for the stage.
"""

from __future__ import annotations

import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from model import CaptionPipeline, Decoding, open_image  # noqa: E402
from training.data.captions import IMAGES_DIR, SCENES_FILE  # noqa: E402
from training.data.synthetic import load_scenes  # noqa: E402
from training.evaluation.samples import save_png  # noqa: E402

log = logging.getLogger(__name__)

DPI = 100
PANEL = 1.25  # inches per panel (square)
LINE = PANEL + 0.18  # a line of panels with their titles
COLUMNS = 8  # panels per line: the image, then its words
HEADER = 0.4  # inches: the file name and caption above each image's panels
TITLE_H = 0.7
MARGIN = 0.1  # inches left of the panels
THUMB = 224  # px: panels are shown at ~120 px
CMAP = "jet"
ALPHA = 0.75  # opacity of the heat-map where the weight is highest
EVAL_IMAGES = 4  # test images in reports/attention.png


@dataclass(frozen=True)
class Attended:
    """One captioned image and, per WordPiece, its attention over a grid x grid grid."""

    name: str
    image: Image.Image
    caption: str
    tokens: list[str]
    weights: np.ndarray  # (T, grid * grid), row-major
    grid: int


def figure_size(token_counts: Sequence[int]) -> tuple[int, int]:
    """Pixel (width, height) of the figure for images captioned with these many tokens."""
    columns, lines = _layout(token_counts)
    height = TITLE_H + sum(HEADER + n * LINE for n in lines)
    return round((2 * MARGIN + max(columns * PANEL, 4.0)) * DPI), round(height * DPI)


def render_attention(examples: Sequence[Attended], out: Path, title: str) -> Path:
    """Draw each image and a heat-map panel per word; write a PNG to `out`."""
    if not examples:
        raise ValueError("no images to draw attention for")
    columns, lines = _layout([len(e.tokens) for e in examples])
    width, height = (px / DPI for px in figure_size([len(e.tokens) for e in examples]))
    fig = plt.figure(figsize=(width, height), dpi=DPI, facecolor="white")
    fig.text(0.5, 1 - 0.32 / height, title, ha="center", va="center", fontsize=9.5,
             weight="bold", linespacing=1.4)  # fmt: skip
    top = TITLE_H
    for example, n in zip(examples, lines, strict=True):
        header = textwrap.shorten(f"{example.name}: {example.caption}", 30 + 14 * columns)
        fig.text(MARGIN / width, 1 - (top + HEADER / 2) / height, header, va="center", fontsize=8)
        top += HEADER
        thumb = example.image.copy()
        thumb.thumbnail((THUMB, THUMB))
        panels = [("(image)", None)] + list(zip(example.tokens, example.weights))
        for k, (token, weights) in enumerate(panels):
            row, col = divmod(k, COLUMNS)
            y = top + row * LINE
            side = PANEL - 0.06
            left = MARGIN + col * PANEL
            ax = fig.add_axes((left / width, 1 - (y + side) / height, side / width, side / height))
            label = token if weights is None else f"{token} ({weights.max():.2f})"
            _panel(ax, thumb, None if weights is None else weights.reshape(example.grid, -1))
            ax.set_title(label, fontsize=7.5, pad=2)
        top += n * LINE
    return save_png(fig, out)


def _layout(token_counts: Sequence[int]) -> tuple[int, list[int]]:
    """Panels per line, and lines of panels per image (its own panel + one per token)."""
    columns = min(COLUMNS, max(1 + n for n in token_counts))
    return columns, [math.ceil((1 + n) / COLUMNS) for n in token_counts]


def _panel(ax: plt.Axes, image: Image.Image, heat: np.ndarray | None) -> None:
    """The image; with `heat` (grid, grid) its map stretched over the whole image (the encoder
    sees the whole image resized to a square: cell (r, c) covers the same part of any image),
    bilinear between cell centres, scaled to its own maximum (the title gives that maximum).
    Opacity follows the weight too, so the image shows through where the model did not look."""
    width, height = image.size
    ax.imshow(image, extent=(0, width, height, 0))
    if heat is not None:
        scaled = np.asarray(Image.fromarray((heat / max(float(heat.max()), 1e-9)).astype(np.float32))
                            .resize((width, height), Image.Resampling.BILINEAR))  # fmt: skip
        rgba = plt.get_cmap(CMAP)(scaled)  # (H, W, 4)
        rgba[..., 3] = ALPHA * np.clip(scaled, 0, 1)
        ax.imshow(rgba, extent=(0, width, height, 0))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def evaluate_attention(
    captioner: CaptionPipeline,
    images: list[str],
    features: np.ndarray,
    raw_dir: Path,
    out: Path,
    decoding: Decoding,
) -> Path:
    """The evaluate stage's reports/attention.png: a few test images (two-object scenes first,
    when scenes are known), captioned as evaluation captions them, with attention per word.

    `features` (n, N, C) are the test images' encoder grids in `images` order. A `concat` model
    has no attention over the grid: the file then says so instead (it is a declared output).
    """
    model = captioner.model
    grid = model.encoder.spec.grid
    title = (
        "Where the model looks for each word (beam "
        f"{decoding.num_beams})\nrelevance over the {grid}x{grid} grid (gradient-weighted "
        "cross-attention, Chefer et al. 2021); in brackets: the word's highest cell weight"
    )
    if model.config.fusion != "cross_attention":
        return _notice(out, f"fusion {model.config.fusion!r}: no attention over the image grid")
    picks = _pick(images, raw_dir, EVAL_IMAGES)
    results = captioner.caption_features(features[picks], decoding, attention=True)  # (k, N, C)
    examples = [
        Attended(
            name=images[i],
            image=open_image(raw_dir / IMAGES_DIR / images[i]),
            caption=result.caption,
            tokens=result.tokens,
            weights=result.attention.flatten(1).numpy(),  # (T, grid * grid)
            grid=grid,
        )
        for i, result in zip(picks, results, strict=True)
    ]
    return render_attention(examples, out, title)


def _pick(images: list[str], raw_dir: Path, count: int) -> list[int]:
    """Indices of `count` test images: two-object synthetic scenes first, else the first ones."""
    order = list(range(len(images)))
    if (raw_dir / SCENES_FILE).is_file():
        scenes = load_scenes(raw_dir)
        two = lambda i: images[i] in scenes and len(scenes[images[i]].objects) == 2  # noqa: E731
        order.sort(key=lambda i: not two(i))  # stable: test order within each group
    return order[:count]


def _notice(out: Path, message: str) -> Path:
    fig = plt.figure(figsize=(6, 1), dpi=DPI, facecolor="white")
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=10)
    log.info("%s: %s", out, message)
    return save_png(fig, out)
