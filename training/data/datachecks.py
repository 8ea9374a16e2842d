"""Refusals of data a model cannot learn from, for the stages that would otherwise train on it.

A stage that produced garbage must stop (non-zero exit, a message saying what to fix), never
hand it on: preprocess checks the tokenised captions, train checks what it is about to fit,
train and evaluate check that the cached features are the model encoder's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.tokenizer import EXPECTED

if TYPE_CHECKING:
    import torch

    from model import CaptionerConfig

# More [UNK] than this and the tokenizer does not fit the captions (bert-base-uncased on
# Flickr8k: well under 0.1%)
MAX_UNKNOWN = 0.05


def check_unknown_pieces(
    splits: dict[str, list[dict[str, Any]]], tokenizer: Any, source: str
) -> float:
    """The fraction of caption WordPieces that are [UNK] in preprocess's splits; raises above
    MAX_UNKNOWN (a vocabulary that does not fit, or captions that are not text)."""
    unk = tokenizer.unk_token_id
    pieces = unknown = 0
    examples = []
    for entries in splits.values():
        for entry in entries:
            for caption, ids in zip(entry["captions"], entry["tokens"]):
                body = ids[1:-1]  # without [CLS] and [SEP]
                pieces += len(body)
                unknown += body.count(unk)
                if unk in body and len(examples) < 3:
                    examples.append(f"{caption!r} -> {tokenizer.decode(body)!r}")
    fraction = unknown / max(pieces, 1)
    if fraction > MAX_UNKNOWN:
        raise ValueError(
            f"{fraction:.0%} of the {pieces} caption WordPieces are [UNK] (more than "
            f"{MAX_UNKNOWN:.0%} is not a tokenizer that fits) with the tokenizer {source!r}, "
            f"e.g. {'; '.join(examples)}. Check model.preset / model.overrides.tokenizer, and "
            "that the captions are text"
        )
    return fraction


def check_learnable(
    split: str, tokens: torch.Tensor, grid: torch.Tensor, config: CaptionerConfig, where: str
) -> None:
    """Refuse a training split with no captions, captions without a word, one distinct word
    (train), mostly [UNK], or image features that are NaN or the same for every image.

    tokens (n_captions, T) padded with config.pad_id; grid (n_images, N, C), any float dtype.
    """
    import torch

    where = f"the {split} split ({where})"
    if len(tokens) == 0:
        raise ValueError(f"{where} holds no captions: run `dvc repro` (preprocess refuses that)")
    special = torch.tensor([config.pad_id, config.bos_id, config.eos_id])
    words = tokens[~torch.isin(tokens, special)]  # every WordPiece of every caption
    if words.numel() == 0:
        raise ValueError(f"{where}: every caption is empty (only [CLS], [SEP] and [PAD])")
    distinct = words.unique()
    if split == "train" and len(distinct) < 2:
        raise ValueError(
            f"{where}: the captions use {len(distinct)} distinct WordPiece (id "
            f"{distinct.tolist()}): nothing to learn. Check the captions and the tokenizer"
        )
    unknown = float((words == EXPECTED.unk).float().mean())
    if unknown > MAX_UNKNOWN:
        raise ValueError(
            f"{where}: {unknown:.0%} of the WordPieces are [UNK]: the captions were tokenised "
            "with a vocabulary that does not fit them; run `dvc repro -f preprocess`"
        )
    varies = len(grid) == 1
    for chunk in grid.split(512):  # (512, N, C) at a time: no float32 copy of all of it
        varies = varies or bool((chunk != grid[0]).any())
    if not varies:
        raise ValueError(
            f"{where}: all {len(grid)} images have identical features: the encoder sees no "
            "difference between them (identical or blank images?)"
        )
    check_feature_rows(grid, where)


def check_feature_rows(features: Any, where: str) -> None:
    """Refuse image features (n, ..., N, C), a torch tensor or a (memory-mapped) array, that
    hold NaN or infinity, or where one image's features are a constant (all zero, say): a CNN
    never gives that, a damaged or overwritten file does, and DVC does not notice a file
    rewritten at the same size and time."""
    import numpy as np
    import torch

    per_image = int(np.prod(features.shape[1:-2], dtype=np.int64))  # views per image, or 1
    constant: list[int] = []  # flattened rows: image * per_image + view
    for start in range(0, len(features), 256):  # (256, ..., N, C) at a time, as float32
        chunk = features[start : start + 256]
        chunk = chunk.float().numpy() if isinstance(chunk, torch.Tensor) else chunk
        rows = np.asarray(chunk, np.float32).reshape(-1, chunk.shape[-2] * chunk.shape[-1])
        if not np.isfinite(rows).all():  # rows: (rows, N * C)
            raise ValueError(
                f"{where}: the image features hold NaN or infinity: run `dvc repro -f "
                "transform` (on a GPU, compare with transform.device: cpu)"
            )
        same = (rows == rows[:, :1]).all(axis=1)  # (rows,)
        constant += (start * per_image + np.flatnonzero(same)).tolist()
    if constant:
        images = sorted({row // per_image for row in constant})
        zeros = "all zero" if not float(features[images[0]].max()) else "constant"
        raise ValueError(
            f"{where}: {len(images)} of {len(features)} images have {zeros} features (e.g. "
            f"image rows {images[:5]}), which no encoder gives: the feature file was damaged "
            "or overwritten. Run `dvc repro --force transform`"
        )


def check_features(index: Mapping[str, Any], encoder: str, features_dir: Path) -> None:
    """Raise unless the feature store's index (data/features/index.json) describes features of
    `encoder` in its current layout: another encoder's, or an older layout's channels (before
    the grid carried the middle stage), would be read as garbage."""
    from model.encoders import SPECS  # torch: not for preprocess, which imports this module

    if index["encoder"] != encoder:
        raise ValueError(
            f"{features_dir} holds {index['encoder']!r} features but the model uses the "
            f"{encoder!r} encoder: run `dvc repro` so transform and train agree"
        )
    channels = SPECS[encoder].channels
    if index.get("channels") != channels:
        raise ValueError(
            f"features in {features_dir} have {index.get('channels')} channels, the {encoder} "
            f"encoder gives {channels}: run `dvc repro` so transform recomputes them"
        )
