"""The caption API (model/pipeline.py): `load` a checkpoint, `caption` images with `Decoding`
options; what it returns is what `generate()` decodes, and every caller answers the same."""

from __future__ import annotations

import inspect
import io
import json

import numpy as np
import pytest
import torch
from ts.context import RequestProcessor

import model
from model import Caption, CaptionPipeline, Decoding, Generation, load, open_image, save_checkpoint
from model.options import MAX_BEAMS, MAX_LENGTH
from serve.cli import main as cli
from tests.helpers.model import archive_handler, picture, tiny
from training.stages.evaluate import EvaluateConfig
from training.stages.package import ServeConfig, build_archive


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("api") / "model.pth"
    save_checkpoint(tiny(), path)
    return path


@pytest.fixture(scope="module")
def captioner(checkpoint) -> CaptionPipeline:
    return load(checkpoint, device="cpu")


def pictures(n: int) -> list:
    return [picture(i, size=48) for i in range(n)]


def generated(captioner: CaptionPipeline, images: list, **options) -> Generation:
    pixels = torch.stack([captioner.model.preprocess(image) for image in images])  # (B, 3, S, S)
    return captioner.model.generate(pixels, **options)


def test_captions_are_what_generate_decodes_with_the_options_given(captioner, tokenizer):
    images = pictures(3)
    for decoding in (Decoding(num_beams=1, max_length=4), Decoding(num_beams=2, max_length=7)):
        results = captioner.caption(images, decoding)
        want = generated(captioner, images, **decoding.to_dict())
        assert [r.ids for r in results] == want.tokens
        assert [r.score for r in results] == want.scores  # exactly: the same floats
        assert all(len(r.ids) <= decoding.max_length for r in results)
        for r in results:
            assert r.caption == model.decode_caption(tokenizer, r.ids)
            assert r.tokens == tokenizer.convert_ids_to_tokens(r.ids)
            assert r.attention is None and "attention" not in r.to_json()


def test_one_place_holds_the_decoding_defaults(captioner):
    """generate(), the API, params.yaml's evaluate: and serve: defaults and the CLI agree."""
    images = pictures(2)
    default = Decoding()
    assert (default.num_beams, default.max_length, default.length_penalty) == (3, 20, 1.0)
    assert [r.ids for r in captioner.caption(images)] == generated(captioner, images).tokens
    signature = inspect.signature(model.Captioner.generate).parameters
    assert {k: signature[k].default for k in default.to_dict()} == default.to_dict()
    assert EvaluateConfig().decoding() == default
    serve = ServeConfig()
    assert serve.num_beams == {"default": default.num_beams, "max": MAX_BEAMS}
    assert serve.max_length == {"default": default.max_length, "max": MAX_LENGTH}
    with pytest.raises(ValueError, match="num_beams must be an integer >= 1, got 0"):
        Decoding(num_beams=0)


def test_arrays_features_and_images_caption_alike(captioner):
    images = pictures(2)
    results = captioner.caption(images, Decoding(num_beams=2, max_length=6))
    arrays = captioner.caption([np.asarray(i) for i in images], Decoding(num_beams=2, max_length=6))
    assert arrays == results
    pixels = torch.stack([captioner.preprocess(image) for image in images])
    grid = captioner.model.encode_image(pixels).detach()  # (B, N, C)
    for features in (grid, grid.numpy()):
        assert captioner.caption_features(features, Decoding(num_beams=2, max_length=6)) == results
    assert captioner.caption([]) == []


def test_attention_is_a_distribution_over_the_grid_per_token(captioner):
    grid = captioner.model.encoder.spec.grid
    images = pictures(3)
    decoding = Decoding(num_beams=2, max_length=6)
    seen = captioner.caption(images, decoding, attention=True)
    plain = captioner.caption(images, decoding)
    assert [(r.ids, r.score) for r in seen] == [(r.ids, r.score) for r in plain]
    want = generated(captioner, images, num_beams=2, max_length=6, return_attention=True)
    for r, expected in zip(seen, want.attention, strict=True):
        assert r.attention.shape == (len(r.tokens), grid, grid)
        torch.testing.assert_close(r.attention.sum((1, 2)), torch.ones(len(r.tokens)))
        torch.testing.assert_close(r.attention.flatten(1), expected, rtol=0, atol=0)
        answer = r.to_json()
        assert answer["attention"]["grid"] == [grid, grid]
        assert [t["token"] for t in answer["attention"]["tokens"]] == r.tokens
        weights = np.array([t["weights"] for t in answer["attention"]["tokens"]])  # (T, N)
        np.testing.assert_array_equal(weights, np.round(weights, 4))
        np.testing.assert_allclose(weights, expected.numpy(), atol=5e-5)


def test_a_concat_model_refuses_attention(tokenizer):
    concat = CaptionPipeline(tiny("concat"), tokenizer)
    with pytest.raises(ValueError, match="fusion is 'concat'"):
        concat.caption(pictures(1), attention=True)


def test_a_score_that_is_not_finite_is_none(captioner, monkeypatch):
    ids = [1037, 2417]
    out = Generation(tokens=[ids, ids], scores=[float("-inf"), -0.123456])
    monkeypatch.setattr(captioner.model, "generate", lambda *a, **kw: out)
    first, second = captioner.caption(pictures(2))
    assert first.score is None and second.score == -0.123456
    assert json.loads(json.dumps(first.to_json())) == {
        "caption": first.caption,
        "score": None,
        "in_domain": None,  # this captioner has no domain check
        "domain_distance": None,
    }
    assert second.to_json()["score"] == -0.1235


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_the_server_and_the_command_line_answer_alike(checkpoint, captioner, tmp_path, capsys):
    """The handler (from the archive) and `imgtocap caption` give one image the same answer."""
    image = tmp_path / "a.png"
    image.write_bytes(png(picture(5, size=48)))
    serve = {"num_beams": {"default": 2, "max": 3}, "max_length": {"default": 7, "max": 20}}
    archive = build_archive(checkpoint, tmp_path / "store", serve)
    handler, context, _ = archive_handler(archive, tmp_path, batch_size=1)
    context.request_processor = [RequestProcessor({})]
    [body] = handler.handle([{"body": bytearray(image.read_bytes()), "attention": b"1"}], context)
    served = json.loads(body)

    args = ["caption", str(image), "--checkpoint", str(checkpoint), "--num-beams", "2"]
    assert cli([*args, "--max-length", "7"]) == 0
    [line] = [json.loads(text) for text in capsys.readouterr().out.splitlines()]

    [mine] = captioner.caption([open_image(image)], Decoding(2, 7), attention=True)
    assert isinstance(mine, Caption)
    assert served["caption"] == line["caption"] == mine.caption
    assert served["score"] == line["score"] == mine.to_json()["score"]
    assert served["attention"] == mine.to_json()["attention"]
