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
        if not torch.isfinite(chunk).all():
            raise ValueError(
                f"{where}: the image features hold NaN or infinity: run `dvc repro -f "
                "transform` (on a GPU, compare with transform.device: cpu)"
            )
        varies = varies or bool((chunk != grid[0]).any())
    if not varies:
        raise ValueError(
            f"{where}: all {len(grid)} images have identical features: the encoder sees no "
            "difference between them (identical or blank images?)"
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
