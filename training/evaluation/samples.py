"""The sample grid: test images, each with its generated caption and reference captions under it."""

from __future__ import annotations

import logging
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, none opened

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from model import ImageError, open_image  # noqa: E402

log = logging.getLogger(__name__)

# Layout in inches at DPI pixels per inch; integers of pixels, so the size is exact.
DPI = 100
COLUMNS = 4
CELL_W = 3.0
NAME_H = 0.2  # the file name above the image
IMAGE_H = 2.5
TEXT_H = 1.3  # caption (<= 3 lines) + 2 references (<= 2 lines each)
CELL_H = NAME_H + IMAGE_H + TEXT_H
TITLE_H = 0.6
PAD = 0.12
THUMB = 256  # px: images are shown at ~250 px, so nothing larger is kept (file size)

FONT = 8.0  # points
LINE_H = FONT * 1.3 / 72  # inches per text line
CAPTION_WRAP, REFERENCE_WRAP = 40, 46  # characters per line (bold is wider)
CAPTION_LINES, REFERENCE_LINES, REFERENCES = 3, 2, 2
COLOUR = {True: "#1a7f37", False: "#cf222e", None: "#1f3b73"}  # green, red, unknown: dark blue
MARK = {True: "\u2713 ", False: "\u2717 ", None: ""}  # tick / cross: not colour alone


@dataclass(frozen=True)
class Sample:
    """One test image: its generated caption, references and content correctness (synthetic)."""

    image: str
    caption: str
    references: list[str]
    correct: bool | None = None


def grid_size(count: int, columns: int = COLUMNS) -> tuple[int, int]:
    """Pixel (width, height) of the grid for `count` images."""
    cols, rows = min(columns, count), math.ceil(count / columns)
    return round(cols * CELL_W * DPI), round((TITLE_H + rows * CELL_H) * DPI)


def render_grid(
    samples: list[Sample], images_dir: Path, out: Path, title: str, columns: int = COLUMNS
) -> Path:
    """Draw the samples in a grid with captions under each image; write a PNG to `out`."""
    if not samples:
        raise ValueError("no samples to draw: evaluate.grid_images must be >= 1")
    width, height = grid_size(len(samples), columns)
    page = _Page(plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white"))
    page.text(page.W / 2, 0.2, title, ha="center", va="center", fontsize=11, weight="bold")
    legend = "bold: generated caption"
    if any(s.correct is not None for s in samples):
        legend += " (\u2713 green: content correct, \u2717 red: wrong)"
    page.text(page.W / 2, 0.45, legend + "; grey: reference captions", ha="center",
              va="center", fontsize=FONT, color="#555555")  # fmt: skip
    for i, sample in enumerate(samples):
        left = (i % columns) * CELL_W + PAD
        top = TITLE_H + (i // columns) * CELL_H
        page.text(left, top + NAME_H / 2, sample.image, va="center", fontsize=6.5, color="#777777")
        page.image(_thumbnail(images_dir / sample.image), left, top + NAME_H)
        caption = MARK[sample.correct] + (sample.caption or "(empty caption)")
        y = page.wrapped(left, top + NAME_H + IMAGE_H + 0.05, caption, CAPTION_WRAP,
                         CAPTION_LINES, color=COLOUR[sample.correct], weight="bold")  # fmt: skip
        for reference in sample.references[:REFERENCES]:
            y = page.wrapped(left, y + 0.03, reference, REFERENCE_WRAP, REFERENCE_LINES,
                             color="#666666")  # fmt: skip
    return save_png(page.fig, out)


def save_png(fig: plt.Figure, out: Path) -> Path:
    """Write the figure at its own size as a 256-colour PNG, and close it."""
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])  # (H, W, 3)
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours, dithered: text stays crisp, photos look right, and a grid of photos takes
    # ~0.4 MB instead of ~1.1 MB (synthetic shapes: ~0.15 MB)
    palette = rgb.quantize(256, method=Image.Quantize.FASTOCTREE)
    rgb.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG).save(out, optimize=True)
    return out


class _Page:
    """A figure addressed in inches from its top-left corner (matplotlib's origin: bottom-left)."""

    def __init__(self, fig: plt.Figure):
        self.fig = fig
        self.W, self.H = fig.get_size_inches()

    def text(self, x: float, top: float, text: str, **style) -> None:
        self.fig.text(x / self.W, 1 - top / self.H, text, **style)

    def wrapped(self, x: float, top: float, text: str, wrap: int, max_lines: int, **style) -> float:
        """Wrapped text, cut with an ellipsis after max_lines; returns the inches below it."""
        lines = textwrap.wrap(text, wrap) or [""]
        if len(lines) > max_lines:
            lines = lines[:max_lines]
            lines[-1] = lines[-1][: wrap - 1].rstrip() + "\u2026"
        self.text(x, top, "\n".join(lines), va="top", ha="left", fontsize=FONT, linespacing=1.3,
                  **style)  # fmt: skip
        return top + len(lines) * LINE_H

    def image(self, image: Image.Image, x: float, top: float) -> None:
        """The image fitted into the cell's image box, top-left aligned, with a light frame."""
        box = (x / self.W, 1 - (top + IMAGE_H - 0.05) / self.H)
        ax = self.fig.add_axes((*box, (CELL_W - 2 * PAD) / self.W, (IMAGE_H - 0.05) / self.H))
        ax.imshow(image)
        ax.set_anchor("NW")
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("#cccccc")


def _thumbnail(path: Path) -> Image.Image:
    """The image, at most THUMB px a side; a grey placeholder if it cannot be read."""
    try:
        image = open_image(path)
    except (ImageError, OSError) as exc:
        log.warning("sample grid: cannot read %s (%s); drawing a placeholder", path, exc)
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    image.thumbnail((THUMB, THUMB))
    return image
