"""The transform stage's augmented training views and perturbed test copies, and the trainer
drawing one view per image per epoch: cached features that are what the model's own
preprocessing makes of each copy, the same on every run, mirrored captions for mirrored views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model import encode_caption, normalize_caption, open_image
from model.encoders import SPECS, ImageEncoder, preprocess
from training.data.augment import (
    PERTURBATIONS,
    augmented_view,
    mirror_ids,
    objects_box,
    perturb,
    rng_for,
)
from training.data.batches import CaptionData
from training.data.captions import read_captions
from training.data.synthetic import load_scenes, write_synthetic
from training.stages.transform import TransformConfig, transform

VIEWS = 3
CELL = (SPECS["tiny"].grid ** 2, SPECS["tiny"].channels)  # (N, C) of a tiny grid


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tokenizer):
    """12 synthetic images (8 train, 2 val, 2 test) encoded by the tiny encoder, 3 views each."""
    root = tmp_path_factory.mktemp("views")
    raw = root / "raw"
    write_synthetic(raw, num_images=12, image_size=[64, 96], seed=4)
    refs: dict[str, list[str]] = {}
    for row in read_captions(raw):
        refs.setdefault(row.image, []).append(normalize_caption(row.caption))
    images = sorted(refs)
    splits = {"train": images[:8], "val": images[8:10], "test": images[10:]}
    entry = lambda i: {  # noqa: E731
        "image": i,
        "captions": refs[i],
        "tokens": [encode_caption(tokenizer, c, 32) for c in refs[i]],
    }
    processed = {
        "tokenizer": "packaged",
        "max_tokens": 32,
        "splits": {s: [entry(i) for i in v] for s, v in splits.items()},
    }
    (root / "captions.json").write_text(json.dumps(processed))
    cfg = TransformConfig(device="cpu", batch_size=5, views=VIEWS, seed=3)
    torch.manual_seed(0)  # the tiny encoder is random: the same weights for every run here
    index = transform(cfg, "tiny", raw, root / "captions.json", root / "features")
    encoder = ImageEncoder("tiny")
    encoder.backbone.load_state_dict(torch.load(root / "features" / "encoder.pth"))
    return {
        "root": root,
        "raw": raw,
        "cfg": cfg,
        "index": index,
        "splits": splits,
        "processed": processed,
        "scenes": load_scenes(raw),
        "encoder": encoder,
    }


def encoded(ws, images) -> torch.Tensor:
    """What the model makes of PIL images: its one preprocessing function, then its encoder."""
    pixels = torch.stack([preprocess(image, "tiny") for image in images])
    return ws["encoder"](pixels)  # (n, N, C)


def test_views_are_the_encoded_augmentations_of_each_training_image(ws):
    features = ws["root"] / "features"
    views = np.load(features / "train_views.npy")
    train = ws["splits"]["train"]
    assert views.shape == (len(train), VIEWS, *CELL) and views.dtype == np.float16
    flipped = np.array(ws["index"]["views"]["flipped"], dtype=bool)
    assert flipped.shape == (len(train), VIEWS) and 0 < flipped.sum() < flipped.size
    for i, name in enumerate(train):
        image = open_image(ws["raw"] / "Images" / name)
        keep = objects_box(ws["scenes"][name])
        made = [
            augmented_view(image, ws["cfg"].augment, rng_for(3, name, v), keep, max_side=32)
            for v in range(VIEWS)
        ]
        assert [f for _, f in made] == flipped[i].tolist()
        expected = encoded(ws, [view for view, _ in made])
        assert torch.allclose(torch.from_numpy(views[i]).float(), expected, atol=2e-2, rtol=2e-2)
    # the originals are there too, untouched, and val/test have no views
    originals = np.load(features / "train.npy")
    first = encoded(ws, [open_image(ws["raw"] / "Images" / train[0])])[0]
    assert torch.allclose(torch.from_numpy(originals[0]).float(), first, atol=2e-2, rtol=2e-2)
    assert not (views[:, 0] == originals).all()


def test_perturbed_test_copies_are_encoded_for_the_robustness_report(ws):
    features = ws["root"] / "features"
    assert ws["index"]["robustness"]["perturbations"] == list(PERTURBATIONS)
    test = ws["splits"]["test"]
    for k, name in enumerate(PERTURBATIONS):
        copies = np.load(features / "robust" / f"{name}.npy")
        assert copies.shape == (len(test), *CELL)
        made = [
            perturb(
                name, open_image(ws["raw"] / "Images" / i), ws["scenes"][i], rng_for(3, i, 1000 + k)
            )[0]
            for i in test
        ]
        expected = encoded(ws, made)
        assert torch.allclose(torch.from_numpy(copies).float(), expected, atol=2e-2, rtol=2e-2)


def test_the_same_seed_encodes_the_same_copies(ws, tmp_path):
    torch.manual_seed(0)
    again = transform(ws["cfg"], "tiny", ws["raw"], ws["root"] / "captions.json", tmp_path)
    assert again == ws["index"]
    for name in ["train_views.npy", *(f"robust/{p}.npy" for p in PERTURBATIONS)]:
        assert (tmp_path / name).read_bytes() == (ws["root"] / "features" / name).read_bytes()


def test_no_views_and_no_copies_when_switched_off(ws, tmp_path):
    cfg = TransformConfig(device="cpu", batch_size=5, views=0, robustness=False)
    index = transform(cfg, "tiny", ws["raw"], ws["root"] / "captions.json", tmp_path)
    assert "views" not in index and "robustness" not in index
    assert not (tmp_path / "train_views.npy").exists() and not (tmp_path / "robust").exists()
    data = CaptionData(ws["processed"], tmp_path, "train", pad_id=0)
    assert data.views is None


def test_each_epoch_draws_one_view_per_image_and_mirrors_its_captions(ws):
    features = ws["root"] / "features"
    data = CaptionData(ws["processed"], features, "train", pad_id=0)
    originals = torch.from_numpy(np.load(features / "train.npy"))
    views = torch.from_numpy(np.load(features / "train_views.npy"))
    candidates = torch.cat([originals[:, None], views], 1)  # (n, 1 + K, N, C)
    flipped = torch.tensor(ws["index"]["views"]["flipped"], dtype=torch.bool)
    left, right = mirror_ids("packaged")

    def epoch(seed: int):
        """(image, view, caption tokens) of every caption one epoch yields."""
        drawn = []
        generator = torch.Generator().manual_seed(seed)
        for grid, tokens, rows in data.batches(4, generator, captions_per_image=2):
            for r, caption in zip(rows, tokens):
                # which image and view this grid row is: exactly one candidate matches
                match = (candidates == grid[r]).flatten(2).all(-1).nonzero().tolist()
                assert len(match) == 1
                drawn.append((*match[0], caption[caption != 0].tolist()))
        return drawn

    first = epoch(5)
    assert first == epoch(5)  # deterministic from the epoch's seed ...
    assert first != epoch(6)  # ... and drawn anew each epoch
    seen = {(i, v) for i, v, _ in first}
    assert len({i for i, _ in seen}) == len(originals)  # every image once per epoch, 2 captions
    assert len(first) == 2 * len(originals) and len(seen) == len(originals)
    assert len({v for _, v, _ in epoch(5) + epoch(6) + epoch(7) + epoch(8)}) == 1 + VIEWS
    for i, v, tokens in first:
        own = [t for t in data.tokens[data.first[i] : data.first[i] + data.counts[i]].tolist()]
        own = [[t for t in seq if t != 0] for seq in own]
        mirrored = v > 0 and bool(flipped[i, v - 1])
        if mirrored:
            swap = {left: right, right: left}
            own = [[swap.get(t, t) for t in seq] for seq in own]
        assert tokens in own, (i, v, mirrored)
    # validation (no generator): always the images themselves
    for grid, _, _ in data.batches(4):
        assert any((originals == g).flatten(1).all(-1).any() for g in grid)
