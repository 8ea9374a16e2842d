"""The decoder's int8 weights (model/int8.py): close to fp32, and a row's result never depends
on the other rows of its batch, so a served caption is the same alone or batched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from model import Captioner, Decoding, load, preset, save_checkpoint
from model.int8 import Int8Linear, quantize_decoder


def test_int8_linear_is_close_to_fp32_and_rows_do_not_interact():
    torch.manual_seed(0)
    linear = nn.Linear(384, 1536)
    int8 = Int8Linear(linear)
    assert int8.weight.dtype == torch.int8 and int8.weight.shape == (1536, 384)
    x = torch.randn(2, 3, 384)  # (B, T, in)
    with torch.inference_mode():
        exact, approx = linear(x), int8(x)
        assert approx.shape == exact.shape and approx.dtype == torch.float32
        # int8 weights (1/254 of each row's largest weight) and bf16 activations (8 bits)
        error = (approx - exact).abs().max() / exact.abs().max()
        assert error < 0.02, float(error)
        alone = int8(x[:1, :1])
        batched = int8(torch.cat([x[:1, :1], 50 * torch.randn(7, 1, 384)]))[:1]
        torch.testing.assert_close(alone, batched, rtol=0, atol=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "model.pth"
    torch.manual_seed(0)
    save_checkpoint(Captioner(preset("tiny")), path)
    return path


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)) for _ in range(n)]


def test_load_quantizes_the_decoder_on_the_cpu_only_when_asked(checkpoint):
    int8 = load(checkpoint)  # the default: params.yaml serve.cpu_decoder's
    fp32 = load(checkpoint, cpu_decoder="fp32")
    linears = [m for m in int8.model.decoder.modules() if isinstance(m, Int8Linear)]
    assert linears and not any(isinstance(m, nn.Linear) for m in int8.model.decoder.modules())
    assert not any(isinstance(m, Int8Linear) for m in fp32.model.decoder.modules())
    # the encoder, the image projection and the output layer stay fp32
    assert isinstance(int8.model.image_proj, nn.Linear)
    with pytest.raises(ValueError, match="cpu_decoder must be one of"):
        load(checkpoint, cpu_decoder="int4")


def test_a_caption_is_the_same_alone_or_in_a_batch(checkpoint):
    captioner = load(checkpoint, cpu_decoder="int8")
    images = _images(6)
    decoding = Decoding(num_beams=3, max_length=8)
    batched = captioner.caption(images, decoding)
    for image, together in zip(images, batched):
        (alone,) = captioner.caption([image], decoding)
        assert alone.ids == together.ids
        assert alone.score == pytest.approx(together.score, abs=1e-5)


def test_quantizing_refuses_a_gpu_decoder(checkpoint):
    model = Captioner(preset("tiny"))
    model.decoder.to("meta")  # a decoder that is not on the CPU, without needing a GPU
    with pytest.raises(RuntimeError, match="runs on the CPU"):
        quantize_decoder(model)


def test_int8_linear_passes_the_gradient_to_its_input():
    """The attention relevance differentiates through the decoder: the int8 layer's input
    gradient is the dequantized weights' (the kernel itself has no derivative)."""
    torch.manual_seed(0)
    int8 = Int8Linear(nn.Linear(16, 8))
    x = torch.randn(5, 16, requires_grad=True)
    int8(x).square().sum().backward()
    dequantized = int8.weight.float() * int8.scale.float()[:, None]  # (8, 16)
    y = x.detach().requires_grad_()
    (y @ dequantized.T + int8.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=0.05, atol=0.05)
