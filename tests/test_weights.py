"""Pretrained weights for the seed and base presets: one path (a placed copy, the cache, a
download) with checksums, against a loopback mirror and files written in the real formats;
offline, one paragraph within seconds."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch

from model import build_captioner, preset
from model.pretrained import encoder_state
from serve.runner import free_ports
from tests.helpers.data import FileServer
from tests.helpers.weights import write_bert, write_resnet50
from training.data import download as download_module
from training.data.weights import (
    WeightsConfig,
    WeightsUnavailable,
    cache_name,
    needed,
    weight_files,
)
from training.params import ModelConfig
from training.stages.transform import build_encoder

BOTH = ["resnet50", "bert-base-uncased"]


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path, monkeypatch):
    """No Hugging Face cache to find anything in, whatever this machine holds."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_weights_download_once_from_a_mirror_resuming_and_checked(tmp_path, monkeypatch):
    monkeypatch.setattr(download_module.time, "sleep", lambda seconds: None)
    resnet = bytes(i % 251 for i in range(3_000_000))  # stand-ins: the bytes do not matter here
    bert = b"a stand-in for model.safetensors"
    served = {"resnet50-0676ba61.pth": resnet, "model.safetensors": bert}
    cache = tmp_path / "cache"
    with FileServer(served, cut_first={"resnet50-0676ba61.pth": 1_000_000}) as server:
        cfg = WeightsConfig(
            cache_dir=str(cache),
            resnet50_url=f"{server.url}/resnet50-0676ba61.pth",
            resnet50_sha256=sha256(resnet),
            bert_url=f"{server.url}/model.safetensors",
            bert_sha256=sha256(bert),
        )
        files = weight_files(BOTH, cfg)
        assert files == {
            "resnet50": cache / f"resnet50-{sha256(resnet)[:8]}.pth",
            "bert-base-uncased": cache / f"bert-base-uncased-{sha256(bert)[:8]}.safetensors",
        }
        # the transfer cut after a third resumed where it stopped, with a Range request
        first, second = [r for name, r in server.requests if name == "resnet50-0676ba61.pth"]
        assert first is None and second.startswith("bytes=") and second != "bytes=0-"
        asked = len(server.requests)
        assert weight_files(BOTH, cfg) == files and len(server.requests) == asked  # cached
    assert files["resnet50"].read_bytes() == resnet
    assert files["bert-base-uncased"].read_bytes() == bert
    assert not list(cache.glob("*.part"))

    files["bert-base-uncased"].write_bytes(b"damaged")  # a cached file that changed is refused
    with pytest.raises(ValueError, match=r"checksum mismatch.*model\.weights\.bert_sha256"):
        weight_files(BOTH, cfg)


def test_offline_the_error_is_one_paragraph_naming_files_places_and_params(tmp_path, monkeypatch):
    # the official URLs, through a proxy that refuses: offline wherever the test runs
    (port,) = free_ports(1)  # nothing listens there
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    cfg = WeightsConfig(cache_dir=str(tmp_path / "cache"))
    started = time.monotonic()
    with pytest.raises(WeightsUnavailable) as error:
        weight_files(BOTH, cfg, "model.preset base")
    assert time.monotonic() - started < 5  # no retries of a server that cannot be reached
    paragraph = str(error.value)
    assert "\n" not in paragraph
    for expected in (
        "model.preset base starts from pretrained weights that are not on this machine",
        "cannot reach download.pytorch.org (connection refused)",
        "cannot reach huggingface.co (connection refused)",
        "ResNet-50 IMAGENET1K_V1 (torchvision): resnet50-0676ba61.pth (97.8 MiB, sha256 "
        "0676ba61b6795bbe1773cffd859882e5e297624d384b6993f7c9e683e722fb8a) from "
        "https://download.pytorch.org/models/resnet50-0676ba61.pth",
        f"saved as {tmp_path / 'cache' / 'resnet50-0676ba61.pth'}",
        "model.weights.resnet50_path",
        "bert-base-uncased (Hugging Face): model.safetensors (420.0 MiB, sha256 "
        "68d45e234eb4a928074dfd868cead0219ab85354cc53d20e772753c6bb9169d3) from "
        "https://huggingface.co/bert-base-uncased/resolve/main/model.safetensors",
        f"saved as {tmp_path / 'cache' / 'bert-base-uncased-68d45e23.safetensors'}",
        "model.weights.bert_path",
        "model.pretrained: false",
        "model.preset: offline",
    ):
        assert expected in paragraph
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


@pytest.mark.slow  # writes and loads 225 MB
def test_placed_copies_in_the_real_formats_are_used_with_no_network(tmp_path, no_network):
    folder = tmp_path / "my-weights"
    resnet_sha = write_resnet50(folder / "resnet50-0676ba61.pth")  # a folder holding the file
    bert_sha = write_bert(tmp_path / "bert" / "model.safetensors", layers=1)
    cfg = WeightsConfig(
        resnet50_path=str(folder),
        resnet50_sha256=resnet_sha,
        bert_path=str(tmp_path / "bert" / "model.safetensors"),
        bert_sha256=bert_sha,
    )
    files = weight_files(BOTH, cfg)
    assert files == {
        "resnet50": folder / "resnet50-0676ba61.pth",
        "bert-base-uncased": tmp_path / "bert" / "model.safetensors",
    }
    model = build_captioner(preset("base", num_layers=1), files=files)
    from safetensors.torch import load_file

    bert = load_file(files["bert-base-uncased"])
    state = model.state_dict()
    assert torch.equal(
        state["decoder.tok_emb.weight"], bert["bert.embeddings.word_embeddings.weight"]
    )
    assert torch.equal(
        state["decoder.layers.0.ffn_norm.weight"],
        bert["bert.encoder.layer.0.output.LayerNorm.gamma"],
    )
    assert torch.equal(state["head.bias"], bert["cls.predictions.bias"])
    resnet = encoder_state("resnet50", files["resnet50"])
    assert torch.equal(model.encoder.backbone.state_dict()["conv1.weight"], resnet["conv1.weight"])


def test_a_placed_copy_that_is_wrong_or_missing_is_an_error_naming_the_param(tmp_path):
    resnet = tmp_path / "resnet50-0676ba61.pth"
    actual = write_resnet50(resnet)
    with pytest.raises(ValueError) as error:  # params.yaml's sha256: the official file's
        weight_files(["resnet50"], WeightsConfig(resnet50_path=str(resnet)))
    for expected in (actual, "0676ba61b6795bbe", "model.weights.resnet50_sha256", str(resnet)):
        assert expected in str(error.value)
    with pytest.raises(
        FileNotFoundError, match=r"model\.weights\.bert_path is .*model\.safetensors"
    ):
        weight_files(["bert-base-uncased"], WeightsConfig(bert_path=str(tmp_path / "nowhere")))


def test_a_copy_in_the_hugging_face_cache_is_used(tmp_path, no_network):
    from huggingface_hub import constants

    repo = tmp_path / "hf-cache" / "models--bert-base-uncased"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("86b5e0934494bd15c9632b12f734a8a67f723594")
    snapshot = repo / "snapshots" / "86b5e0934494bd15c9632b12f734a8a67f723594"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"downloaded by transformers")
    assert str(tmp_path / "hf-cache") == constants.HF_HUB_CACHE
    cfg = WeightsConfig(
        cache_dir=str(tmp_path / "cache"), bert_sha256=sha256(b"downloaded by transformers")
    )
    assert weight_files(["bert-base-uncased"], cfg) == {
        "bert-base-uncased": snapshot / "model.safetensors"
    }


def test_no_pretrained_weights_is_a_deliberate_choice_and_needs_no_file(no_network):
    chosen = ModelConfig(preset="base", pretrained=False)
    config = chosen.captioner_config()
    assert config.decoder_weights == "random" and config.encoder == "resnet50"
    assert needed(config, encoder=False) == []  # train fetches nothing
    assert needed(ModelConfig(preset="seed").captioner_config()) == BOTH
    a, b = (build_encoder("resnet50", torch.device("cpu"), pretrained=False) for _ in range(2))
    for name, value in a.state_dict().items():  # seeded: features repeat from run to run
        assert torch.equal(value, b.state_dict()[name]), name

    with pytest.raises(ValueError, match=r"a download, not part of any package.*weight_files"):
        encoder_state("resnet50")  # model/ never fetches: it is handed the file
    assert cache_name("resnet50", "0676ba61" + "0" * 56) == "resnet50-0676ba61.pth"
