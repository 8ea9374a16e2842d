"""Test-wide settings (offline, no telemetry, passive OpenMP threads, a fixed seed) and the
fixtures many tests share."""

import os
import socket

# Before anything imports transformers / huggingface_hub / mlflow / dvc.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    DVC_NO_ANALYTICS="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
    # OpenMP threads that spin while waiting stall 10x and worse as soon as another process
    # (a TorchServe worker, a pipeline stage) holds one of the two cores
    OMP_WAIT_POLICY="PASSIVE",
)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from model import load_tokenizer

    return load_tokenizer("packaged")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket this test opens fails it: what it does must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: socket{args}")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
