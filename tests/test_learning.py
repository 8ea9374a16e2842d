"""A tiny model must learn a tiny dataset: the whole train -> decode path works end to end."""

import numpy as np
import torch
from PIL import Image, ImageDraw

from model import Captioner, decode_caption, encode_caption, preset

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


def scene(i: int) -> Image.Image:
    """Eight different 32x32 pictures (the captions need not describe them: ids must map)."""
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    ImageDraw.Draw(image).rectangle(
        [4 * (i % 4), 2 * i, 4 * (i % 4) + 12, 2 * i + 10], fill=(255, 0, 0)
    )
    return image


def test_tiny_model_memorises_eight_captions(tokenizer):
    torch.manual_seed(0)
    model = Captioner(preset("tiny"))
    pixels = torch.stack([model.preprocess(scene(i)) for i in range(8)])  # (8, 3, 32, 32)
    grid = model.encode_image(pixels)  # frozen: computed once, like the transform stage
    ids = [encode_caption(tokenizer, c, max_tokens=16) for c in CAPTIONS]
    tokens = torch.zeros(8, max(map(len, ids)), dtype=torch.long)
    for row, seq in zip(tokens, ids):
        row[: len(seq)] = torch.tensor(seq)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(200):
        _, loss = model(grid, tokens)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    assert loss.item() < 0.05
    for num_beams in (1, 3):  # beam search must not stop at an early, truncated hypothesis
        out = model.generate(pixels, num_beams=num_beams, max_length=16)
        assert [decode_caption(tokenizer, t) for t in out.tokens] == CAPTIONS, num_beams
