"""The package stage: a self-contained archive, and serve settings checked before packaging."""

import json
import zipfile

import pytest
import yaml

from model import Captioner, load_tokenizer, preset, save_checkpoint
from training.stages.package import ServeConfig, build_archive
from training.tracking.registry import Registered


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.pth"
    save_checkpoint(Captioner(preset("tiny")), path)
    return path


def test_the_archive_carries_code_weights_tokenizer_and_settings(checkpoint, tmp_path, tokenizer):
    serve = {"batch_size": 4, "max_batch_delay_ms": 200, "num_beams": {"default": 1, "max": 2}}
    archive = build_archive(checkpoint, tmp_path / "store", serve)
    assert archive == tmp_path / "store" / "imgtocap.mar"
    with zipfile.ZipFile(archive) as mar:
        names = set(mar.namelist())
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        assert manifest["handler"] == "imgtocap_handler.py"
        assert mar.read(manifest["serializedFile"]) == checkpoint.read_bytes()
        assert yaml.safe_load(mar.read(manifest["configFile"])) == {
            "minWorkers": 1,
            "maxWorkers": 1,
            "batchSize": 4,
            "maxBatchDelay": 200,
            "responseTimeout": 120,
        }
        settings = json.loads(mar.read("handler.json"))
        assert settings["num_beams"] == {"default": 1, "max": 2}
        assert settings["max_length"] == ServeConfig().max_length
        mar.extractall(tmp_path / "unpacked")
    # the captioner's code travels as a package (not spilled into the root), without caches
    assert {"model/__init__.py", "model/captioner.py", "model/image.py"} <= names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
    assert not {"captioner.py", "__init__.py"} & names
    # the tokenizer loads offline from the archive and is the one the model was trained with
    packaged = load_tokenizer(tmp_path / "unpacked" / "tokenizer")
    text = "a small red circle left of a large blue square"
    assert packaged.encode(text) == tokenizer.encode(text)
    assert packaged.get_vocab() == tokenizer.get_vocab()


def test_the_archive_is_stamped_with_the_registered_version(checkpoint, tmp_path):
    card = tmp_path / "model_card.md"
    card.write_text("# imgtocap-synthetic version 3\n")
    registered = Registered("imgtocap-synthetic", "3", "0123abcd")
    archive = build_archive(checkpoint, tmp_path / "store", {}, registered, card)
    with zipfile.ZipFile(archive) as mar:
        assert json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"] == "3"
        assert json.loads(mar.read("registered.json")) == {
            "name": "imgtocap-synthetic",
            "version": "3",
            "run_id": "0123abcd",
            "local": False,
        }
        assert mar.read("MODEL_CARD.md") == card.read_bytes()
    unregistered = build_archive(checkpoint, tmp_path / "bare", {})  # training ran untracked
    with zipfile.ZipFile(unregistered) as mar:
        manifest = json.loads(mar.read("MAR-INF/MANIFEST.json"))["model"]
        assert manifest["modelVersion"] == "unregistered" and "MODEL_CARD.md" not in mar.namelist()


@pytest.mark.parametrize(
    "serve, message",
    [
        ({"batchsize": 4}, r"unknown serve key\(s\) \['batchsize'\]"),
        ({"num_beams": {"default": 6, "max": 5}}, r"num_beams.default must be >= 1 and <= 5"),
        ({"num_beams": 3}, r"num_beams must be a mapping \{default: N, max: M\}"),
        ({"min_workers": 2, "max_workers": 1}, r"max_workers must be >= 2"),
        ({"batch_size": 0}, r"batch_size must be >= 1"),
        ({"max_image_bytes": "8MB"}, r"max_image_bytes must be an integer"),
        (
            {"max_length": {"default": 20, "max": 64}},
            r"too long for this model \(max_position=64\)",
        ),
    ],
)
def test_bad_serve_settings_fail_before_packaging(checkpoint, tmp_path, serve, message):
    with pytest.raises(ValueError, match=message):
        build_archive(checkpoint, tmp_path, serve)
    assert not (tmp_path / "imgtocap.mar").exists()
