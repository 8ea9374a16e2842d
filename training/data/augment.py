"""Image augmentations for training views and the perturbations of the robustness report.

The transform stage encodes, besides every image as it is, `views` augmented copies of each
training image (`augmented_view`) and, for the synthetic data, one perturbed copy of each test
image per perturbation (`perturb`); the encoder runs once per copy and training and evaluation
read the cached features. Every random choice comes from `rng_for(seed, image, k)`: the same
seed gives the same copies, and a copy does not depend on which other images exist.

A view may be mirrored left to right; its captions then say "right" where they said "left"
and back (`mirror_tokens`, applied by the trainer to the token ids): a mirrored scene's
"red circle left of a blue square" is a red circle right of a blue square.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps

from model.image import open_image
from training.params import from_section
from training.data.synthetic import Scene, draw_scene

# The robustness report: each perturbation of a test image, and whether its expected scene is
# the mirror image of the original's (horizontal flip: left and right swap).
PERTURBATIONS: dict[str, bool] = {
    "jpeg": False,  # re-encoded as JPEG at quality 30-60
    "downscaled": False,  # resized to half its side
    "upscaled": False,  # resized to twice its side
    "padded": False,  # on a 1.5x larger canvas of its border colour: objects shrink to 2/3
    "cropped": False,  # a window of 3/4 of its side holding every object: objects grow 4/3x
    "brightness": False,  # pixels x 0.75-0.85 or x 1.15-1.25
    "canvas": False,  # the scene drawn anew on a 512-pixel canvas
    "flipped": True,  # mirrored left to right
}
CANVAS = 512  # the "canvas" perturbation's side: above the synthetic data's 128-384 range
_REFERENCE_SIDE = 224  # blur radii are given for an image of this side


@dataclass(frozen=True)
class AugmentConfig:
    """`transform.augment` in params.yaml: what an augmented training view may do."""

    zoom: list[float] = field(default_factory=lambda: [0.6, 1.4])  # < 1 pads, > 1 crops
    shift: float = 0.1  # translation up to this fraction of the side
    flip: float = 0.5  # fraction of views mirrored left-right (captions swap left/right)
    jpeg: float = 0.5  # fraction of views re-encoded as JPEG ...
    jpeg_quality: list[int] = field(default_factory=lambda: [25, 90])  # ... at a quality in here
    blur: float = 1.0  # Gaussian blur radius up to this (pixels at 224), on half of the views
    resolution: float = 0.4  # half of the views resampled down to [this, 1] of their side and back
    noise: float = 5.0  # pixel noise std up to this (of 255), on half of the views
    brightness: float = 0.25  # pixels x [1 - b, 1 + b]
    contrast: float = 0.25  # around the mean, x [1 - c, 1 + c]
    tint: float = 0.06  # per-channel gain in [1 - t, 1 + t]: white balance

    def __post_init__(self) -> None:
        lo, hi = _pair(self.zoom, "zoom")
        if not 0 < lo <= hi:
            raise ValueError(
                f"transform.augment.zoom must be [lo, hi] with 0 < lo <= hi, got {self.zoom}"
            )
        q0, q1 = _pair(self.jpeg_quality, "jpeg_quality")
        if not 1 <= q0 <= q1 <= 95:
            raise ValueError(
                "transform.augment.jpeg_quality must be [lo, hi] within 1..95, got "
                f"{self.jpeg_quality}"
            )
        for name in ("flip", "jpeg"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(
                    f"transform.augment.{name} is a fraction in [0, 1], got {getattr(self, name)}"
                )
        if not 0 < self.resolution <= 1:
            raise ValueError(
                f"transform.augment.resolution must be in (0, 1], got {self.resolution}"
            )
        for name in ("shift", "blur", "noise", "brightness", "contrast", "tint"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"transform.augment.{name} must be >= 0, got {getattr(self, name)}"
                )
        for name in ("brightness", "contrast", "tint"):
            if getattr(self, name) >= 1:
                raise ValueError(f"transform.augment.{name} must be < 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> AugmentConfig:
        """Build from params.yaml's `transform.augment` mapping; an unknown key is an error."""
        return from_section(cls, values, "transform.augment")


def rng_for(seed: int, image: str, k: int) -> np.random.Generator:
    """The random stream of copy `k` of `image`: a function of these three only."""
    return np.random.default_rng([seed, zlib.crc32(image.encode("utf-8")), k])


Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels


def objects_box(scene: Scene | None) -> Box | None:
    """The box holding every object of a scene (what no crop may cut); None without a scene."""
    if scene is None:
        return None
    boxes = np.array([o.bbox for o in scene.objects], dtype=float)  # (n, 4)
    return (*boxes[:, :2].min(0), *boxes[:, 2:].max(0))


# ------------------------------------------------------------------------- training views


def augmented_view(
    image: Image.Image,
    cfg: AugmentConfig,
    rng: np.random.Generator,
    keep: Box | None = None,
    max_side: int | None = None,
) -> tuple[Image.Image, bool]:
    """A random augmented copy of an RGB image and whether it is mirrored.

    `keep` (the objects' box, when known) stays whole inside any crop; without it a crop stays
    inside the image. The copy has the image's size, or is shrunk to fit `max_side` (the
    model's input side: its preprocessing would shrink it anyway, and smaller is faster).
    """
    scale = min(1.0, max_side / max(image.size)) if max_side else 1.0
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
        keep = None if keep is None else tuple(v * scale for v in keep)
    zoom = float(np.exp(rng.uniform(*np.log(cfg.zoom))))  # log-uniform: x0.8 as likely as x1.25
    shift = rng.uniform(-cfg.shift, cfg.shift, 2)
    view = reframe(image, zoom, shift, keep)
    flipped = bool(rng.random() < cfg.flip)
    if flipped:
        view = ImageOps.mirror(view)
    gains = rng.uniform(1 - cfg.tint, 1 + cfg.tint, 3) * rng.uniform(
        1 - cfg.brightness, 1 + cfg.brightness
    )
    contrast = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    blur = rng.uniform(0, cfg.blur) if rng.random() < 0.5 else 0.0
    resolution = rng.uniform(cfg.resolution, 1.0) if rng.random() < 0.5 else 1.0
    noise = rng.uniform(0, cfg.noise) if rng.random() < 0.5 else 0.0
    quality = int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1))
    jpeg = rng.random() < cfg.jpeg
    pixels = np.asarray(view, dtype=np.float32)  # (H, W, 3)
    mean = pixels.mean()
    pixels = ((pixels - mean) * contrast + mean) * gains
    view = _to_image(pixels)
    if blur > 0:
        view = view.filter(ImageFilter.GaussianBlur(blur * max(view.size) / _REFERENCE_SIDE))
    if resolution < 1:  # a small image enlarged: what a low-resolution upload looks like
        small = (max(8, round(view.width * resolution)), max(8, round(view.height * resolution)))
        view = view.resize(small, Image.Resampling.BICUBIC).resize(
            view.size, Image.Resampling.BICUBIC
        )
    if noise > 0:
        grain = rng.standard_normal(pixels.shape, dtype=np.float32) * noise
        view = _to_image(np.asarray(view, dtype=np.float32) + grain)
    if jpeg:
        view = reencode_jpeg(view, quality)
    return view, flipped


def reframe(image: Image.Image, zoom: float, shift: np.ndarray, keep: Box | None) -> Image.Image:
    """`image` zoomed by `zoom` about its centre moved by `shift`, at the same size."""
    return window(image, zoom_window(image.size, zoom, shift, keep), image.size)


def zoom_window(size: tuple[int, int], zoom: float, shift: np.ndarray, keep: Box | None) -> Box:
    """The part of an image of `size` that zooming by `zoom` about its centre, moved by
    `shift` (fractions of the size), shows.

    Zooming out (< 1) shows more than the image (padded, see `window`); zooming in crops, but
    never through `keep` (the window grows and moves to hold it) nor past the image's edges.
    """
    width, height = size
    win_w, win_h = width / zoom, height / zoom
    cx, cy = width / 2 + shift[0] * width, height / 2 + shift[1] * height
    x0, y0 = cx - win_w / 2, cy - win_h / 2
    if keep is not None:
        kx0, ky0, kx1, ky1 = keep
        win_w, win_h = max(win_w, kx1 - kx0), max(win_h, ky1 - ky0)
        x0 = min(max(x0, kx1 - win_w), kx0)  # the window holds [kx0, kx1]
        y0 = min(max(y0, ky1 - win_h), ky0)
    if win_w <= width:  # cropping along x: stay on the image (and still around `keep`)
        x0 = min(max(x0, 0.0), width - win_w)
    if win_h <= height:
        y0 = min(max(y0, 0.0), height - win_h)
    return (x0, y0, x0 + win_w, y0 + win_h)


def window(image: Image.Image, box: Box, size: tuple[int, int]) -> Image.Image:
    """The part of `image` inside `box`, resized to `size`; past its edges: its border colour."""
    fill = border_colour(image)
    return image.transform(
        size,
        Image.Transform.EXTENT,
        box,
        resample=Image.Resampling.BICUBIC,
        fillcolor=fill,
    )


def border_colour(image: Image.Image) -> tuple[int, int, int]:
    """Median colour of the outermost pixels: the background of a synthetic image."""
    pixels = np.asarray(image)
    edge = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (n, 3)
    return tuple(int(v) for v in np.median(edge, axis=0))


def reencode_jpeg(image: Image.Image, quality: int) -> Image.Image:
    """The image as a JPEG at `quality` (Pillow's defaults otherwise: 4:2:0), decoded again."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return open_image(buffer.getvalue())


def mirror_ids(tokenizer_source: str) -> tuple[int, int]:
    """The token ids of "left" and "right" in a tokenizer: what a mirrored caption swaps."""
    from model import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_source)
    ids = [tokenizer.encode(word, add_special_tokens=False) for word in ("left", "right")]
    if any(len(piece) != 1 or piece[0] == tokenizer.unk_token_id for piece in ids):
        raise ValueError(
            f"tokenizer {tokenizer_source!r} has no single tokens for 'left' and 'right', which "
            "mirrored training views swap in their captions: set transform.augment.flip: 0"
        )
    return ids[0][0], ids[1][0]


def mirror_tokens(tokens: Any, left_id: int, right_id: int) -> Any:
    """Token ids (a tensor or array) with `left_id` and `right_id` swapped: a mirrored caption."""
    out = tokens.clone() if hasattr(tokens, "clone") else tokens.copy()
    out[tokens == left_id] = right_id
    out[tokens == right_id] = left_id
    return out


# ------------------------------------------------------------- robustness report copies


def perturb(
    name: str, image: Image.Image, scene: Scene, rng: np.random.Generator
) -> tuple[Image.Image, Scene]:
    """A test image perturbed by `name` (one of PERTURBATIONS) and the scene it now shows.

    What the content metric checks (objects, relation) changes only by a flip; the boxes stay
    the original image's unless the perturbation redraws or mirrors it.
    """
    side = image.width
    if name == "jpeg":
        return reencode_jpeg(image, int(rng.integers(30, 61))), scene
    if name in ("downscaled", "upscaled"):
        new = max(16, round(side * (0.5 if name == "downscaled" else 2.0)))
        return image.resize((new, new), Image.Resampling.BICUBIC), scene
    if name in ("padded", "cropped"):  # zoom out 1.5x / in 4/3x, moved at random
        zoom, shift = (2 / 3, 0.25) if name == "padded" else (4 / 3, 0.125)
        margin = 0.02 * side
        x0, y0, x1, y1 = objects_box(scene) if name == "cropped" else (0, 0, side, side)
        keep = (x0 - margin, y0 - margin, x1 + margin, y1 + margin)  # what stays in view
        box = zoom_window(image.size, zoom, rng.uniform(-shift, shift, 2), keep)
        return window(image, box, image.size), scene
    if name == "brightness":
        factor = rng.uniform(0.75, 0.85) if rng.random() < 0.5 else rng.uniform(1.15, 1.25)
        return _to_image(np.asarray(image, dtype=np.float32) * factor), scene
    if name == "canvas":
        drawn = scene.scaled(CANVAS)
        return draw_scene(drawn, CANVAS, rng), drawn
    if name == "flipped":
        return ImageOps.mirror(image), scene.mirrored()
    raise ValueError(f"unknown perturbation {name!r}; known: {list(PERTURBATIONS)}")


def _pair(values: Any, name: str) -> tuple[float, float]:
    if not isinstance(values, (list, tuple)) or len(values) != 2:
        raise ValueError(f"transform.augment.{name} must be [lo, hi], got {values!r}")
    return values[0], values[1]


def _to_image(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
