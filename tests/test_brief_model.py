"""The brief's model through the real pipeline: `dvc repro` shrunk with the `seed` and the `base`
preset (ResNet-50 + all 12 layers of bert-base-uncased), from stand-in weight files written at
the true shapes, to an archive that a real TorchServe answers from. And offline, with no
weights, `dvc exp run -S model.preset=base` stops at the first stage that needs them with the
one paragraph, leaving nothing that claims success.

CPU-heavy (110M-parameter decoder, 0.5-2 GB files): a handful of images, one epoch of one
step, short beams. Downloads would fail: every stage runs behind a proxy that refuses.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time

import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file

from model.domain import DomainCheck
from serve.runner import TorchServe, free_ports
from tests.helpers.project import dvc, dvc_run, environment, project_copy, set_params
from tests.helpers.weights import write_bert, write_resnet50

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
]

SHRUNK = {
    "data.synthetic.num_images": 10,  # 8 train, 1 val, 1 test
    "preprocess.val_fraction": 0.1,
    "preprocess.test_fraction": 0.1,
    "data.synthetic.image_size": 96,
    "model.overrides": {},  # all of BERT-base: 12 layers
    "train.epochs": 1,
    "train.batch_size": 8,  # one captions per image: one step
    "evaluate.num_beams": 2,
    "evaluate.max_length": 6,
    "evaluate.grid_images": 1,
    "serve.num_beams": {"default": 2, "max": 3},
    "serve.max_length": {"default": 8, "max": 20},
}


def offline(tmp_path) -> dict[str, str]:
    """An environment where any download fails at once, and no cache holds anything."""
    (port,) = free_ports(1)  # nothing listens there
    proxy = f"http://127.0.0.1:{port}"
    return {
        "HTTPS_PROXY": proxy,
        "HTTP_PROXY": proxy,
        "TORCH_HOME": str(tmp_path / "torch-home"),
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
    }


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A repository copy set up for the brief's model, and the stand-in weights it uses."""
    tmp = tmp_path_factory.mktemp("brief")
    weights = tmp / "weights"
    resnet_sha = write_resnet50(weights / "resnet50-0676ba61.pth")
    bert_sha = write_bert(weights / "model.safetensors")
    repo = project_copy(tmp / "repo")
    dvc(repo, "config", "--local", "cache.type", "hardlink,copy")  # no second copy of each .pth
    set_params(
        repo,
        {
            **SHRUNK,
            "model.weights.resnet50_path": str(weights / "resnet50-0676ba61.pth"),
            "model.weights.resnet50_sha256": resnet_sha,
            "model.weights.bert_path": str(weights),  # the folder holding model.safetensors
            "model.weights.bert_sha256": bert_sha,
        },
    )
    return repo, weights, offline(tmp)


def caption_over_http(repo, workdir) -> dict:
    """One real TorchServe request to the archive the pipeline built."""
    photo = io.BytesIO()
    Image.open(repo / "data/raw/Images/shapes_00000.png").save(photo, format="JPEG")
    with TorchServe.private(workdir, repo / "model-store") as server:
        response = requests.put(
            f"{server.inference}/predictions/imgtocap",
            data=photo.getvalue(),
            headers=server.headers(),
            timeout=300,
        )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.java  # TorchServe
@pytest.mark.parametrize("preset", ["seed", "base"])
def test_the_brief_model_runs_from_pretrained_weights_to_a_served_caption(
    workspace, preset, tmp_path
):
    repo, weights, env = workspace
    set_params(repo, {"model.preset": preset})
    started = time.monotonic()
    log = dvc(repo, "repro", timeout=1800, **env)
    print(f"\n{preset}: dvc repro {time.monotonic() - started:.0f} s")
    for stage in ("transform", "define", "train", "evaluate", "package"):
        assert f"Running stage '{stage}'" in log, stage
    # seed and base share ResNet-50's features: the second preset's check is the first's
    assert "Running stage 'domain'" in log or "Stage 'domain' didn't change" in log

    config = json.loads((repo / "artifacts/model/config.json").read_text())
    assert (config["encoder"], config["decoder_weights"]) == ("resnet50", "bert-base-uncased")
    assert (config["num_layers"], config["hidden_size"]) == (12, 768)
    assert config["fusion"] == ("concat" if preset == "seed" else "cross_attention")

    # the model started from the stand-ins: the frozen ResNet-50 is theirs exactly, BERT's
    # weights moved by at most one AdamW step (a random start would be ~0.02 away)
    state = torch.load(repo / "artifacts/model/model.pth", weights_only=True)["state_dict"]
    resnet = torch.load(weights / "resnet50-0676ba61.pth", weights_only=True)
    assert torch.equal(
        state["encoder.backbone.layer4.2.conv3.weight"], resnet["layer4.2.conv3.weight"]
    )
    bert = load_file(weights / "model.safetensors")
    for ours, theirs in (
        ("decoder.tok_emb.weight", "bert.embeddings.word_embeddings.weight"),
        ("decoder.layers.11.ffn_out.weight", "bert.encoder.layer.11.output.dense.weight"),
    ):
        assert (state[ours] - bert[theirs]).abs().max() < 2e-3, ours

    assert json.loads((repo / "metrics/eval.json").read_text())["num_images"] == 1
    answer = caption_over_http(repo, tmp_path / "torchserve")
    assert isinstance(answer["caption"], str) and answer["num_beams"] == 2
    # the in-domain check fitted on this model's own (ResNet-50) features, answered with
    channels = json.loads((repo / "data/features/index.json").read_text())["channels"]
    check = DomainCheck.read(repo / "artifacts/finetune/domain.pt")
    assert check.mean.shape == (channels,) and check.precision.shape == (channels, channels)
    assert isinstance(answer["in_domain"], bool) and answer["domain_distance"] >= 0


def test_offline_the_base_preset_stops_at_transform_with_the_paragraph(tmp_path):
    repo = project_copy(tmp_path / "repo")
    set_params(repo, {k: v for k, v in SHRUNK.items() if k.startswith(("data.", "preprocess."))})
    env = offline(tmp_path)
    dvc(repo, "repro", "preprocess", **env)  # the data stages need no weights

    started = time.monotonic()
    failed = dvc_run(repo, "exp", "run", "-S", "model.preset=base", **env)
    seconds = time.monotonic() - started
    print(f"\noffline base: failed after {seconds:.1f} s\n{failed.stdout}{failed.stderr}")
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "Running stage 'transform'" in output and "Running stage 'define'" not in output
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    for expected in (
        "model.preset base starts from pretrained weights that are not on this machine",
        "cannot reach download.pytorch.org",
        f"saved as {checkpoints / 'resnet50-0676ba61.pth'}",
        f"saved as {checkpoints / 'bert-base-uncased-68d45e23.safetensors'}",
        "model.weights.resnet50_path",
        "model.weights.bert_path",
        "model.pretrained: false",
    ):
        assert expected in output
    assert "Traceback" not in output and "URLError" not in output
    assert seconds < 120  # seconds, not minutes of retries (DVC itself takes most of it)

    # nothing claims success: no features, transform not in dvc.lock, DVC says it must run
    assert not (repo / "data/features").exists()
    assert "transform" not in (repo / "dvc.lock").read_text()
    assert "transform" in json.loads(dvc(repo, "status", "--json", **env))

    # the stage itself, as `python -m training.stages.transform` by hand: the paragraph, nothing else
    set_params(repo, {"model.preset": "base"})
    started = time.monotonic()
    stage = subprocess.run(
        [sys.executable, "-m", "training.stages.transform"],
        cwd=repo,
        env={**environment(repo), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.monotonic() - started
    print(f"transform by hand: exit {stage.returncode} after {seconds:.1f} s:\n{stage.stderr}")
    assert stage.returncode == 1 and stage.stdout == ""
    assert stage.stderr.count("\n") == 1 and stage.stderr.startswith("model.preset base starts")
    assert seconds < 60
