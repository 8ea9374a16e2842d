"""The archive's handler in this process (no TorchServe): request formats, options, errors per item."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from ts.context import RequestProcessor

from model import Captioner, decode_caption, load_checkpoint, open_image, preset, save_checkpoint
from model.domain import fit
from model.encoders import pooled
from model.int8 import quantize_decoder
from tests.helpers.model import archive_handler
from training.stages.package import build_archive
from training.tracking.registry import Registered

SERVE = {
    "num_beams": {"default": 1, "max": 3},
    "max_length": {"default": 8, "max": 20},
    "max_image_bytes": 100_000,
    "cpu_threads": 1,  # a tiny model: more threads only contend
}


def png(seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(handler, context, the same model loaded here), the handler loaded from the archive;
    the model here runs its decoder as the archive's CPU worker does (int8, the default)."""
    tmp = tmp_path_factory.mktemp("handler")
    model = Captioner(preset("tiny")).eval()
    save_checkpoint(model, tmp / "model.pth")
    with torch.inference_mode():  # an in-domain check beside it: the archive carries it
        pixels = torch.stack([model.preprocess(open_image(png(i))) for i in range(40)])
        features = pooled(model.encode_image(pixels))  # (40, C)
    fit(features[:30], features[30:], shrinkage=0.1, quantile=0.5).save(tmp / "domain.pt")
    registered = Registered("imgtocap-synthetic", "7", "0123abcd")  # what evaluate registered
    archive = build_archive(tmp / "model.pth", tmp / "store", SERVE, registered)
    threads = torch.get_num_threads()
    handler, context, model_dir = archive_handler(archive, tmp, batch_size=4)
    assert handler.lib.__file__ == str(model_dir / "model" / "__init__.py")
    assert handler.cpu_decoder == "int8"
    yield handler, context, quantize_decoder(load_checkpoint(tmp / "model.pth"))
    torch.set_num_threads(threads)  # initialize() set the worker's


def run(served, rows: list[dict]) -> list[tuple[int, dict]]:
    """Hand the handler one batch, as TorchServe does; (status, JSON body) per request."""
    handler, context, _ = served
    context.request_processor = [RequestProcessor({}) for _ in rows]
    bodies = handler.handle(rows, context)
    assert len(bodies) == len(rows)
    for i in range(len(rows)):
        assert context.get_response_content_type(i) == "application/json"
    return [(context.get_response_status(i)[0], json.loads(b)) for i, b in enumerate(bodies)]


def expected(served, data: bytes, num_beams: int = 1, max_length: int = 8) -> str:
    _, _, model = served
    pixels = model.preprocess(open_image(data))[None]  # (1, 3, S, S)
    out = model.generate(pixels, num_beams=num_beams, max_length=max_length)
    return decode_caption(served[0].captioner.tokenizer, out.tokens[0])


def test_every_request_format_gets_its_own_options(served):
    images = [png(i) for i in range(4)]
    results = run(
        served,
        [
            {"body": bytearray(images[0])},  # raw body
            {"data": bytearray(images[1]), "num_beams": bytearray(b"2"), "max_length": b"5"},
            {"file": bytearray(images[2]), "max_length": bytearray(b" 3 ")},
            {"body": {"data": base64.b64encode(images[3]).decode(), "num_beams": 3}},  # JSON
        ],
    )
    assert [status for status, _ in results] == [200] * 4
    bodies = [body for _, body in results]
    assert bodies[0]["caption"] == expected(served, images[0])
    assert bodies[1]["caption"] == expected(served, images[1], num_beams=2, max_length=5)
    assert bodies[2]["caption"] == expected(served, images[2], max_length=3)
    assert bodies[3]["caption"] == expected(served, images[3], num_beams=3)
    assert [(b["num_beams"], b["max_length"]) for b in bodies] == [(1, 8), (2, 5), (1, 3), (3, 8)]
    assert {b["batch_size"] for b in bodies} == {4}
    assert {b["model_version"] for b in bodies} == {"7"}  # the registered version answers
    check = served[0].captioner.domain  # read from the archive's domain.pt
    _, _, model = served
    for data, body in zip(images, bodies, strict=True):
        grid = model.encode_image(model.preprocess(open_image(data))[None])  # (1, N, C)
        distance = check.distance(pooled(grid)).item()
        assert body["domain_distance"] == pytest.approx(distance, abs=1e-3)
        assert body["in_domain"] is (distance <= check.threshold)


def test_bad_requests_fail_alone_with_a_reason(served):
    good = png(7)
    rows = {
        "not an image": ({"body": bytearray(b"GIF89a but not really")}, 415, "not a readable image"),
        "text body": ({"body": "a caption, not an image"}, 415, "not a readable image"),
        "PPM": ({"body": bytearray(b"P6 2 2 255 " + bytes(12))}, 415, "accepted format; send JPEG"),
        "truncated PNG": ({"body": bytearray(png(8)[:200])}, 400, "could not be decoded"),
        "no image": ({"num_beams": bytearray(b"2")}, 400, "no image in the request"),
        "JSON without data": ({"body": {"image": 5}}, 400, "base64-encoded image"),
        "bad base64": ({"body": {"data": "not base64!"}}, 400, "not valid base64"),
        "beams too many": ({"body": good, "num_beams": bytearray(b"4")}, 400, "from 1 to 3"),
        "length not a number": ({"body": good, "max_length": bytearray(b"ten")}, 400, "from 1 to 20"),
        "beams a boolean": ({"body": {"data": base64.b64encode(good).decode(), "num_beams": True}}, 400, "from 1 to 3"),
        "too many bytes": ({"body": bytearray(100_001)}, 413, "the limit is 100,000 bytes"),
        "valid": ({"body": bytearray(good)}, 200, None),
    }  # fmt: skip
    results = run(served, [row for row, _, _ in rows.values()])
    for (name, (_, status, message)), (got_status, body) in zip(rows.items(), results):
        assert got_status == status, (name, body)
        if message:
            assert set(body) == {"error"} and message in body["error"], (name, body)
    assert results[-1][1]["caption"] == expected(served, good)


def test_attention_on_request_follows_the_response_contract(served):
    handler, _, model = served
    images = [png(10 + i) for i in range(4)]
    encoded = base64.b64encode(images[2]).decode()
    results = run(
        served,
        [
            {"data": bytearray(images[0]), "attention": bytearray(b"true")},  # form field
            {"body": bytearray(images[1])},  # the same batch, not asked
            {"body": {"data": encoded, "attention": True, "num_beams": 2}},  # JSON
            {"file": bytearray(images[3]), "attention": bytearray(b"1"), "num_beams": b"3"},
        ],
    )
    assert [status for status, _ in results] == [200] * 4
    bodies = [body for _, body in results]
    assert "attention" not in bodies[1]
    assert bodies[1]["caption"] == expected(served, images[1])
    grid = model.encoder.spec.grid
    for i, num_beams in ((0, 1), (2, 2), (3, 3)):
        pixels = model.preprocess(open_image(images[i]))[None]
        out = model.generate(pixels, num_beams=num_beams, max_length=8, return_attention=True)
        assert bodies[i]["caption"] == decode_caption(handler.captioner.tokenizer, out.tokens[0])
        attention = bodies[i]["attention"]
        assert set(attention) == {"grid", "tokens"} and attention["grid"] == [grid, grid]
        pieces = [t["token"] for t in attention["tokens"]]
        assert pieces == handler.captioner.tokenizer.convert_ids_to_tokens(out.tokens[0])
        assert "[SEP]" not in pieces and len(pieces) == len(out.tokens[0]) > 0
        weights = np.array([t["weights"] for t in attention["tokens"]])  # (T, N)
        assert weights.shape == (len(pieces), grid * grid)
        np.testing.assert_array_equal(weights, np.round(weights, 4))  # rounded to 4 decimals
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=grid * grid * 5e-5)
        np.testing.assert_allclose(weights, out.attention[0].numpy(), atol=5e-5)


def test_attention_refused_for_a_bad_value_or_a_model_without_it(served, monkeypatch):
    handler = served[0]
    good = png(20)
    [(status, body)] = run(served, [{"body": good, "attention": bytearray(b"yes please")}])
    assert status == 400 and "attention must be true or false" in body["error"]
    lib = handler.lib
    concat = lib.Captioner(lib.preset("tiny", fusion="concat")).eval()
    monkeypatch.setattr(handler.captioner, "model", concat)
    results = run(served, [{"body": good, "attention": b"true"}, {"body": good}])
    assert results[0][0] == 400 and "fusion is 'concat'" in results[0][1]["error"]
    assert results[1][0] == 200 and "attention" not in results[1][1]
