"""The in-domain check: the threshold rule, the stage on stand-in features, and the fields every
local answer carries (the served, CLI and MLflow answers are checked in their own tests)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from model import load, save_checkpoint
from model.domain import FILENAME, DomainCheck, fit, pooled_features
from model.encoders import pooled
from tests.helpers.model import picture, tiny
from training.stages.domain import DomainConfig, domain


def gaussian(n: int, c: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * torch.linspace(0.2, 3.0, c) * scale  # (n, C)


@pytest.mark.parametrize("quantile", [0.9, 0.99])
def test_the_threshold_passes_that_quantile_of_the_validation_images(quantile):
    train, val = gaussian(2000, 16, 0), gaussian(250, 16, 1)  # 250: as the default val split
    check = fit(train, val, shrinkage=0.01, quantile=quantile)
    passed = (check.distance(val) <= check.threshold).float().mean().item()
    assert quantile <= passed <= quantile + 1 / len(val)  # at least that share, never fewer
    # the same distribution passes at about that rate; a shifted one fails
    assert (
        check.distance(gaussian(4000, 16, 2)) <= check.threshold
    ).float().mean() > quantile - 0.03
    assert (check.distance(gaussian(250, 16, 3) + 4.0) > check.threshold).all()


def test_the_distance_is_mahalanobis_per_dimension_and_whitening_makes_it_euclidean():
    train = gaussian(5000, 8, 0)
    check = fit(train, train[:100], shrinkage=1e-6, quantile=0.99)
    x = gaussian(5, 8, 4)
    cov = torch.cov(train.double().T)
    want = (
        ((x.double() - train.double().mean(0)) @ torch.linalg.inv(cov)) * (x - train.mean(0))
    ).sum(1)
    assert torch.allclose(check.distance(x).double(), (want / 8).sqrt(), rtol=1e-3)
    assert check.distance(train.mean(0, keepdim=True)).item() == pytest.approx(0, abs=1e-4)


def test_the_stage_fits_on_train_and_views_and_saves_a_check_that_reads_back(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    grid = lambda n, seed: gaussian(n * 4, 6, seed).reshape(n, 4, 6).numpy().astype(np.float16)  # noqa: E731
    np.save(features / "train.npy", grid(300, 0))
    np.save(features / "train_views.npy", grid(600, 1).reshape(300, 2, 4, 6))
    np.save(features / "val.npy", grid(200, 2))
    out, metrics = tmp_path / "model" / FILENAME, tmp_path / "domain.json"
    summary = domain(DomainConfig(quantile=0.95), features, out, metrics)
    assert summary["train_vectors"] == 900  # each image and each of its views
    assert 0.95 <= summary["val_in_domain"] <= 0.955
    check = DomainCheck.read(out)
    assert check.threshold == pytest.approx(summary["threshold"], abs=1e-4)
    assert json.loads(metrics.read_text()) == summary
    val = pooled_features(np.load(features / "val.npy"))
    assert (check.distance(val) <= check.threshold).float().mean() >= 0.95


def test_an_empty_validation_split_says_what_to_change(tmp_path):
    np.save(tmp_path / "train.npy", np.ones((3, 4, 6), np.float16))
    np.save(tmp_path / "val.npy", np.ones((0, 4, 6), np.float16))
    with pytest.raises(ValueError, match="preprocess.val_fraction"):
        domain(DomainConfig(), tmp_path, tmp_path / FILENAME, tmp_path / "m.json")


@pytest.mark.parametrize("value", [0.0, 1.5])
def test_params_out_of_range_are_refused(value):
    with pytest.raises(ValueError, match="domain.quantile"):
        DomainConfig(quantile=value)


@torch.inference_mode()
def test_every_local_answer_carries_in_domain_and_its_distance(tmp_path, tokenizer):
    model = tiny()
    pixels = torch.stack([model.preprocess(picture(i)) for i in range(40)])  # (40, 3, S, S)
    features = pooled(model.encode_image(pixels))  # (40, C)
    checkpoint = tmp_path / "model.pth"
    save_checkpoint(model, checkpoint)
    noise = (np.random.default_rng(0).integers(0, 255, (64, 64, 3))).astype(np.uint8)
    without = load(checkpoint).caption([picture(31), noise])[0]
    assert (without.in_domain, without.domain_distance) == (None, None)
    assert {"in_domain": None, "domain_distance": None}.items() <= without.to_json().items()

    check = fit(features[:30], features[30:], shrinkage=0.1, quantile=1.0)
    check.save(tmp_path / FILENAME)  # beside the checkpoint: where load looks
    captioner = load(checkpoint)
    same, odd = captioner.caption([picture(31), noise])
    want = check.distance(features[31:32]).item()
    assert same.domain_distance == pytest.approx(want, rel=1e-4) and same.in_domain is True
    assert odd.in_domain is False and odd.domain_distance > check.threshold
    answer = json.loads(json.dumps(odd.to_json()))
    assert answer["in_domain"] is False
    assert answer["domain_distance"] == round(odd.domain_distance, 4)
    assert same.caption == without.caption and same.score == without.score  # decoding unchanged


@torch.inference_mode()
def test_the_mlflow_model_answers_with_the_logged_check(tmp_path, tokenizer):
    from types import SimpleNamespace

    import pandas as pd

    from model.tokenizer import save_tokenizer
    from training.tracking.mlflow_model import CaptionerModel

    model = tiny()
    pixels = torch.stack([model.preprocess(picture(i)) for i in range(30)])  # (30, 3, S, S)
    check = fit(pooled(model.encode_image(pixels)), pooled(model.encode_image(pixels)), 0.1, 1.0)
    # MLflow keeps each artifact in its own folder: the check is not beside the checkpoint
    (tmp_path / "ckpt").mkdir()
    save_checkpoint(model, tmp_path / "ckpt" / "model.pth")
    check.save(tmp_path / "check.pt")
    save_tokenizer(model.config.tokenizer, tmp_path / "tokenizer")
    artifacts = {
        "checkpoint": str(tmp_path / "ckpt" / "model.pth"),
        "tokenizer": str(tmp_path / "tokenizer"),
        "domain": str(tmp_path / "check.pt"),
    }
    pyfunc = CaptionerModel()
    pyfunc.load_context(SimpleNamespace(artifacts=artifacts, model_config={"num_beams": 1}))
    buffer = io.BytesIO()
    picture(3).save(buffer, format="PNG")
    out = pyfunc.predict(None, pd.DataFrame({"image": [buffer.getvalue()]}))
    assert list(out.columns) == ["caption", "score", "in_domain", "domain_distance"]
    grid = model.encode_image(model.preprocess(picture(3))[None])
    assert out["domain_distance"][0] == pytest.approx(check.distance(pooled(grid)).item(), rel=1e-3)
    assert bool(out["in_domain"][0]) is True
