"""The offline preset: every pretrained weight comes from an installed package, no network."""

import os
import socket

import pytest
import torch
from PIL import Image
from skimage import data

from model import build_captioner, decode_caption, load_tokenizer, preset


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_offline_preset_loads_packaged_weights_and_captions_a_photo(no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    config = preset("offline")
    model = build_captioner(config).eval()  # EfficientNet-Lite0 + MiniLM-L6 from site-packages
    tokenizer = load_tokenizer(config.tokenizer)

    # the decoder's self-attention starts from MiniLM, not random
    from model.pretrained import decoder_state

    minilm = decoder_state("minilm-l6")
    assert torch.equal(
        model.decoder.layers[0].self_attn.query.weight,
        minilm["decoder.layers.0.self_attn.query.weight"],
    )

    photo = Image.fromarray(data.coffee())
    pixels = model.preprocess(photo)[None]  # (1, 3, 224, 224)
    out = model.generate(pixels, num_beams=3, max_length=8)
    caption = decode_caption(tokenizer, out.tokens[0])
    assert isinstance(caption, str) and len(out.tokens[0]) <= 8  # untrained: any words will do
