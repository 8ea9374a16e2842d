"""Checkpoints: one plain dict, weights-only, rebuilt with no network."""

import pytest
import torch
from fixtures_model import tiny

from model import load_checkpoint, save_checkpoint


@pytest.mark.parametrize("output_vocab", [None, [102, 1037, 2417, 4418]])
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_save_load_gives_identical_captions_offline(tmp_path, no_network, fusion, output_vocab):
    model = tiny(fusion, output_vocab=output_vocab)
    pixels = torch.randn(3, 3, 32, 32)
    before = model.generate(pixels, num_beams=2, max_length=8)
    save_checkpoint(model, tmp_path / "model.pth", epoch=3)

    loaded = load_checkpoint(tmp_path / "model.pth")
    assert loaded.config == model.config
    assert not loaded.training
    after = loaded.generate(pixels, num_beams=2, max_length=8)
    assert after.tokens == before.tokens
    assert after.scores == pytest.approx(before.scores)


def test_checkpoint_is_a_plain_weights_only_dict(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "model.pth", epoch=7)
    checkpoint = torch.load(tmp_path / "model.pth", weights_only=True)
    assert set(checkpoint) == {"config", "state_dict", "epoch"}
    assert checkpoint["config"]["encoder"] == "tiny"
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
    # the frozen encoder travels with the model: serving needs nothing else
    assert any(k.startswith("encoder.backbone.") for k in checkpoint["state_dict"])


def test_load_checkpoint_errors_are_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*dvc repro"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an imgtocap checkpoint"):
        load_checkpoint(tmp_path / "other.pth")
