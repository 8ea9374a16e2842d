"""The offline preset: every pretrained weight comes from an installed package, no network."""

import os

import torch
from PIL import Image
from skimage import data

from model import build_captioner, decode_caption, load_tokenizer, preset
from model.pretrained import decoder_state, encoder_state


def test_offline_preset_loads_packaged_weights_and_captions_a_photo(no_network):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    config = preset("offline")
    model = build_captioner(config).eval()  # EfficientNet-Lite0 + MiniLM-L6 from site-packages
    tokenizer = load_tokenizer(config.tokenizer)
    state = model.state_dict()

    # The decoder is MiniLM's in all six layers, embeddings included: only cross-attention
    # (which MiniLM lacks) starts random.
    minilm = decoder_state("minilm-l6")
    decoder = [name for name in state if name.startswith("decoder.")]
    assert {int(name.split(".")[2]) for name in decoder if ".layers." in name} == set(range(6))
    assert {name for name in decoder if ".cross_attn." not in name} == minilm.keys()
    for name, weight in minilm.items():
        assert torch.equal(state[name], weight), name

    # The encoder is EfficientNet-Lite0's ImageNet backbone, BatchNorm statistics included.
    backbone = model.encoder.backbone.state_dict()
    imagenet = encoder_state("efficientnet_lite0")
    assert backbone.keys() == imagenet.keys()
    for name, weight in imagenet.items():
        assert torch.equal(backbone[name], weight), name

    photo = Image.fromarray(data.coffee())
    pixels = model.preprocess(photo)[None]  # (1, 3, 224, 224)
    out = model.generate(pixels, num_beams=3, max_length=8)
    # untrained cross-attention and LM head: any words will do, within the limits
    (tokens,) = out.tokens
    assert len(tokens) <= 8 and all(0 <= t < config.vocab_size for t in tokens)
    caption = decode_caption(tokenizer, tokens)
    assert not any(special in caption for special in ("[CLS]", "[PAD]", "[SEP]")), caption
