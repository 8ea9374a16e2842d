"""Decode untrusted image bytes into RGB and turn RGB images into encoder input tensors.

Training, evaluation and the TorchServe handler all go through these two functions, so an
image is decoded and normalised the same way everywhere (no train/serve skew). Decoding needs
only PIL and numpy (validation runs it without torch); torch is imported by `to_tensor`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# Checked from the header before any decoding: a bigger claim is refused, not decoded.
DEFAULT_MAX_PIXELS = 50_000_000
ACCEPTED = "JPEG, PNG, GIF, BMP, TIFF or WebP"
# The only Pillow plugins that ever see untrusted bytes: every other format (PPM, ICO, PCX, EPS
# and its Ghostscript subprocess, ...) is refused unparsed. Pillow opens an MPO (a phone's
# multi-picture JPEG) through its JPEG plugin.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP")


class ImageError(ValueError):
    """The input is not an image we can caption; the message says why and what is accepted."""


class UnsupportedFormat(ImageError):
    """The input is in none of the accepted formats (a server answers 415)."""


def open_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes or a file into an RGB PIL image with EXIF orientation applied."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(f"empty body: send the image file itself ({ACCEPTED})")
        fp = io.BytesIO(source)
        name = "request body"
    else:
        fp = Path(source)
        name = str(source)
    try:
        with warnings.catch_warnings():  # PIL's own bomb warning: we check the size ourselves
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(fp, formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{name} is too large ({exc}); downscale it first") from exc
    except UnidentifiedImageError as exc:  # its message names an in-memory object: useless
        raise UnsupportedFormat(
            f"{name} is not a readable image in an accepted format; send {ACCEPTED}"
        ) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name} is not a readable image ({exc}); send {ACCEPTED}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {max_pixels / 1e6:.1f} megapixels: downscale it first"
        )
    if width == 0 or height == 0:
        raise ImageError(f"{name} has no pixels ({width}x{height})")
    try:
        image.seek(0)  # animated GIF/WebP/APNG: caption the first frame
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(
            f"{name} could not be decoded ({exc}); is it truncated? send {ACCEPTED}"
        ) from exc


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        if array.max(initial=0) > 255:  # 16-bit data: scale to 8 bits, don't clip
            array = array / 257.0
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_tensor(
    image: Image.Image, size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """RGB PIL image -> normalised float tensor (3, size, size).

    The whole image is resized to a square (no crop): a crop could cut off an object at the
    border, and with it the caption's "left of"/"right of".
    """
    import torch

    image = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(image, dtype=np.float32) / 255.0  # (H, W, 3)
    # normalised before the transpose: elementwise ops on a transposed view are 5x slower
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)  # (H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, H, W)
