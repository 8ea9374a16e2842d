"""Test helpers for the model: distinct little pictures and padded caption batches."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from model import encode_caption


def picture(i: int, size: int = 32) -> Image.Image:
    """Picture i of a set of different ones: noise from seed i, a red box placed by i."""
    s = size // 32
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    x, y = 4 * s * (i % 4), 2 * s * i
    ImageDraw.Draw(image).rectangle([x, y, x + 12 * s, y + 10 * s], fill=(255, 0, 0))
    return image


def caption_tokens(tokenizer, captions: list[str], max_tokens: int) -> torch.Tensor:
    """Captions -> [CLS] ... [SEP] token ids (B, T), padded with [PAD] (id 0)."""
    ids = [encode_caption(tokenizer, c, max_tokens=max_tokens) for c in captions]
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for row, seq in zip(tokens, ids, strict=True):
        row[: len(seq)] = torch.tensor(seq)
    return tokens
