"""Image decoding shared by training and serving: every common mode, and refusals with reasons."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model import ImageError, UnsupportedFormat, open_image, preprocess
from tests.helpers.model import png_claiming


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb(w=40, h=30) -> Image.Image:
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[:, : w // 2] = (200, 30, 30)  # left half red
    return Image.fromarray(array)


@pytest.mark.parametrize(
    "make",
    [
        lambda: encode(rgb(), "JPEG"),
        lambda: encode(rgb(), "PNG"),
        lambda: encode(rgb().convert("L"), "PNG"),
        lambda: encode(rgb().convert("LA"), "PNG"),
        lambda: encode(rgb().convert("RGBA"), "PNG"),
        lambda: encode(rgb().convert("CMYK"), "JPEG"),
        lambda: encode(rgb().convert("P"), "GIF"),
        lambda: encode(rgb(), "WEBP"),
        lambda: encode(rgb(), "BMP"),
        lambda: encode(rgb(), "TIFF"),
        lambda: encode(Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)), "PNG"),
    ],
    ids=[
        "jpeg",
        "png",
        "gray",
        "gray-alpha",
        "rgba",
        "cmyk",
        "palette-gif",
        "webp",
        "bmp",
        "tiff",
        "png16",
    ],
)
def test_common_formats_and_modes_decode_to_rgb(make):
    image = open_image(make())
    assert image.mode == "RGB" and image.size == (40, 30)


def test_sixteen_bit_is_scaled_not_clipped():
    data = encode(Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)), "PNG")  # 50% grey
    assert open_image(data).getpixel((0, 0)) == (128, 128, 128)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert open_image(encode(image, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = open_image(data).getpixel((0, 0))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    data = encode(rgb(40, 30), "JPEG", exif=exif.tobytes())
    image = open_image(data)
    assert image.size == (30, 40)
    assert image.getpixel((15, 5))[0] > 150  # red half is now on top


def test_pixel_count_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageError, match=r"12000x9000 = 108.0 megapixels; the limit is 50.0"):
        open_image(png_claiming(12000, 9000))
    with pytest.raises(ImageError, match="too large"):  # past PIL's own bomb limit
        open_image(png_claiming(30000, 30000))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty body"),
        (b"hello, this is text", "not a readable image"),
        (encode(rgb(400, 300), "JPEG")[:1500], "could not be decoded"),
    ],
    ids=["empty", "text", "truncated-jpeg"],
)
def test_bad_input_is_refused_with_a_reason(data, message):
    with pytest.raises(ImageError, match=message) as info:
        open_image(data)
    assert "JPEG, PNG" in str(info.value) or "empty" in message  # says what is accepted


# A minimal EPS: Pillow's EPS plugin would hand it to Ghostscript to rasterise.
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n%%EOF\n"


@pytest.mark.parametrize(
    "data",
    [
        encode(rgb(), "PPM"),
        encode(rgb(), "ICO"),
        encode(rgb(), "PCX"),
        encode(rgb(), "TGA"),
        EPS,
        b"hello, this is text",
    ],
    ids=["ppm", "ico", "pcx", "tga", "eps", "text"],
)
def test_formats_outside_the_contract_are_refused_unparsed(data, monkeypatch):
    from PIL import EpsImagePlugin

    def never(*args, **kwargs):
        raise AssertionError("an untrusted body reached Pillow's EPS plugin")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", never)
    with pytest.raises(UnsupportedFormat, match="accepted format; send JPEG, PNG, GIF, BMP"):
        open_image(data)


def test_preprocess_resizes_the_whole_image_and_normalises():
    x = preprocess(rgb(400, 100), "efficientnet_lite0")
    assert x.shape == (3, 224, 224)
    assert x[0, :, :100].mean() > 0.5 and x[0, :, 124:].mean() < -0.9  # no crop: both halves kept


def test_preprocess_is_the_normalised_resized_pixels_channel_first():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 130, 3), dtype=np.uint8))
    x = preprocess(image, "resnet50")  # (3, 224, 224)
    pixels = np.asarray(image.resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = (torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std  # the old formula
    assert x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x, expected)  # bit for bit: training, evaluation and serving agree
