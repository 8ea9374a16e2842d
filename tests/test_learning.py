"""A tiny model must learn a tiny dataset: the whole train -> decode path works end to end."""

import torch

from model import decode_caption
from tests.helpers.model import caption_tokens, fit, picture, tiny

CAPTIONS = [
    "a red circle on the left",
    "a red circle on the right",
    "a blue square on the left",
    "a blue square on the right",
    "a green triangle above a red circle",
    "a green triangle below a red circle",
    "two yellow squares",
    "nothing but a black background",
]


def test_tiny_model_memorises_eight_captions(tokenizer):
    torch.manual_seed(0)
    model = tiny()
    pixels = torch.stack([model.preprocess(picture(i)) for i in range(8)])  # (8, 3, 32, 32)
    grid = model.encode_image(pixels)  # frozen: computed once, like the transform stage
    tokens = caption_tokens(tokenizer, CAPTIONS, max_tokens=16)  # (8, T)

    loss = fit(model, grid, tokens, lr=5e-3, steps=200)
    assert loss < 0.05
    for num_beams in (1, 3):  # beam search must not stop at an early, truncated hypothesis
        out = model.generate(pixels, num_beams=num_beams, max_length=16)
        assert [decode_caption(tokenizer, t) for t in out.tokens] == CAPTIONS, num_beams
