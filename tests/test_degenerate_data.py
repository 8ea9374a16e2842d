"""A stage that would produce garbage stops: preprocess on mostly-[UNK] captions or an empty
split, train on data nothing can be learned from. Each refusal says what to fix and leaves
no output behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertTokenizer

from model import preset
from model.encoders import SPECS, ImageEncoder
from training.data.captions import write_captions
from training.data.datachecks import check_feature_rows, check_learnable, check_unknown_pieces
from training.data.synthetic import write_synthetic
from training.stages.preprocess import PreprocessConfig, preprocess
from training.stages.train import TrainConfig, train
from training.stages.validate import validate

CELL = (SPECS["tiny"].grid ** 2, SPECS["tiny"].channels)  # (N, C) of a tiny grid


ONE_IN_TEN = {"val_fraction": 0.1, "test_fraction": 0.1}  # of prepared()'s 10 images: 1 each


def prepared(root: Path, captions: list[tuple[str, str]] | None = None, images: int = 10):
    """A validated raw dataset under root (synthetic images, optionally other captions)."""
    raw = root / "raw"
    write_synthetic(raw, num_images=images, seed=3)
    if captions is not None:
        write_captions(raw, captions)
    validate(raw, root / "validation.json", workers=1)
    return raw, root / "validation.json"


def test_preprocess_refuses_captions_that_are_mostly_unknown_pieces(tmp_path):
    names = [f"shapes_{i:05d}.png" for i in range(10)]
    # letters, so validation keeps them; but bert-base-uncased has no piece for the emoji
    raw, report = prepared(tmp_path, [(n, "a 🐶🐶 🐱 and a 🦊") for n in names])
    out = tmp_path / "processed" / "captions.json"
    with pytest.raises(ValueError) as error:
        preprocess(PreprocessConfig(**ONE_IN_TEN), "bert-base-uncased", raw, report, out)
    message = str(error.value)
    assert "50% of the 60 caption WordPieces are [UNK]" in message
    assert "'bert-base-uncased'" in message and "a [UNK] [UNK] and a [UNK]" in message
    assert not out.exists()


def test_the_unknown_check_catches_the_five_token_vocabulary_of_an_unreachable_hub(tmp_path):
    # what BertTokenizer.from_pretrained("bert-base-uncased") returns offline: every word [UNK]
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    ids = tokenizer.encode("a dog runs", add_special_tokens=False)
    splits = {"train": [{"captions": ["a dog runs"], "tokens": [[2, *ids, 3]]}]}
    with pytest.raises(ValueError, match=r"100% of the 3 caption WordPieces are \[UNK\]"):
        check_unknown_pieces(splits, tokenizer, "bert-base-uncased")


@pytest.mark.parametrize(
    "fractions, empty", [({"val_fraction": 0.0}, "val"), ({"test_fraction": 0.04}, "test")]
)
def test_preprocess_refuses_an_empty_split(tmp_path, fractions, empty):
    raw, report = prepared(tmp_path)
    out = tmp_path / "processed" / "captions.json"
    out.parent.mkdir()
    out.write_text("{}")  # an earlier run's output: gone, so nothing stale is read later
    with pytest.raises(ValueError, match=rf"the {empty} split\(s\) would hold no images \(10 "):
        preprocess(PreprocessConfig(**{**ONE_IN_TEN, **fractions}), "packaged", raw, report, out)
    assert not out.exists()


# --- train ---------------------------------------------------------------------------------


def workspace(root: Path, tokens: list[list[int]], features: np.ndarray | None = None) -> dict:
    """What train reads, for a tiny model: config, processed captions (the same `tokens` for
    every image of train and val), features (random unless given) and encoder weights."""
    config = preset("tiny")
    config.save(root / "config.json")
    splits = {
        split: [
            {"image": f"{split}{i}.png", "captions": ["x"] * len(tokens), "tokens": tokens}
            for i in range(4)
        ]
        for split in ("train", "val")
    }
    (root / "captions.json").write_text(json.dumps({"splits": splits}))
    features_dir = root / "features"
    features_dir.mkdir()
    index = {
        "encoder": "tiny",
        "channels": CELL[1],
        "splits": {s: [e["image"] for e in v] for s, v in splits.items()},
    }
    (features_dir / "index.json").write_text(json.dumps(index))
    for split in splits:
        grid = features if features is not None else np.random.rand(4, *CELL)
        np.save(features_dir / f"{split}.npy", grid.astype(np.float16))
    torch.save(ImageEncoder("tiny").backbone.state_dict(), features_dir / "encoder.pth")
    return dict(
        config_path=root / "config.json",
        processed_path=root / "captions.json",
        features_dir=features_dir,
        resume_dir=root / "resume",
        model_path=root / "model.pth",
        metrics_path=root / "train.json",
        history_path=root / "history.csv",
    )


@pytest.mark.parametrize(
    "tokens, features, message",
    [
        ([[101, 102], [101, 102, 0]], None, "every caption is empty"),
        ([[101, 1037, 102], [101, 1037, 1037, 102]], None, r"1 distinct WordPiece \(id \[1037\]\)"),
        ([[101, 100, 100, 1037, 102]], None, "67% of the WordPieces are \\[UNK\\]"),
        ([[101, 1037, 2417, 102]], np.full((4, *CELL), np.nan), "NaN or infinity"),
        ([[101, 1037, 2417, 102]], np.ones((4, *CELL)), "all 4 images have identical features"),
    ],
)
def test_train_refuses_data_nothing_can_be_learned_from(tmp_path, tokens, features, message):
    paths = workspace(tmp_path, tokens, features)
    with pytest.raises(ValueError, match=rf"the train split \(.*captions\.json.*\): .*{message}"):
        train(TrainConfig(epochs=1, device="cpu"), **paths)
    assert not paths["model_path"].exists() and not paths["resume_dir"].exists()


@pytest.mark.parametrize("split", ["train", "val"])
def test_train_refuses_a_feature_file_zeroed_in_place(tmp_path, split):
    """All rows but one of a feature file overwritten with zeros at the same size (DVC sees no
    change): train names the file and says to re-run transform, instead of training on it."""
    paths = workspace(tmp_path, [[101, 1037, 2417, 102]])
    path = paths["features_dir"] / f"{split}.npy"
    features = np.load(path)
    features[1:] = 0
    np.save(path, features)
    with pytest.raises(ValueError, match=rf"{split}\.npy.*3 of 4 images have all zero features"):
        train(TrainConfig(epochs=1, device="cpu"), **paths)
    assert not paths["model_path"].exists()


def test_a_constant_view_or_row_is_refused_wherever_it_is():
    views = np.random.rand(4, 3, *CELL).astype(np.float16)  # (n, views, N, C)
    check_feature_rows(views, "views")
    views[2, 1] = 0.5
    with pytest.raises(ValueError, match=r"views: 1 of 4 images have constant features.*\[2\]"):
        check_feature_rows(views, "views")
    grid = torch.rand(3, *CELL).half()
    grid[0, 5, 7] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinity"):
        check_feature_rows(grid, "grid")


def test_train_refuses_features_of_an_older_encoder_layout(tmp_path):
    """Features from before the grid carried the middle stage: train says to re-run transform."""
    paths = workspace(tmp_path, [[101, 1037, 2417, 102]])
    index_path = paths["features_dir"] / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "channels": SPECS["tiny"].last_channels}))
    with pytest.raises(ValueError, match="have 32 channels, the tiny encoder gives 48.*dvc repro"):
        train(TrainConfig(epochs=1, device="cpu"), **paths)
    assert not paths["model_path"].exists()


def test_data_that_is_fine_passes():
    tokens = torch.tensor([[101, 1037, 2417, 102], [101, 2417, 3600, 102]])
    check_learnable("train", tokens, torch.rand(2, *CELL).half(), preset("tiny"), "here")
