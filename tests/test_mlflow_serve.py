"""The way out from TorchServe (archived in August 2025; docs/deployment-local.md): the registered
MLflow pyfunc model served by `mlflow models serve --env-manager local` must caption an image
exactly as TorchServe does with the archive of the same pipeline run.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from serve.runner import TorchServe
from tests.helpers.deployment import trained_pipeline
from tests.helpers.project import closed_port, environment
from training.tracking.registry import Registered

# dvc repro; TorchServe (a JVM); mlflow models serve
pytestmark = [pytest.mark.slow, pytest.mark.java, pytest.mark.subprocess]

BIN = Path(sys.executable).parent


def _mlflow_serve(repo: Path, model_uri: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow models serve` on a free loopback port, tracking the pipeline's own store."""
    port = closed_port()
    env = {**environment(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    with log.open("wb") as out:
        server = subprocess.Popen(
            [BIN / "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        assert server.poll() is None, f"mlflow models serve exited:\n{log.read_text()[-3000:]}"
        try:
            if requests.get(f"{url}/ping", timeout=5).status_code == 200:
                return server, url
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, f"no /ping after 240 s:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def test_mlflow_serves_the_registered_model_with_torchserves_captions(tmp_path_factory, tmp_path):
    trained = trained_pipeline(tmp_path_factory)
    registered = Registered.load(trained.repo / "artifacts" / "model" / "registered.json")
    data, expected = trained.test_image()

    with TorchServe.private(tmp_path / "torchserve", trained.archive.parent) as torchserve:
        response = requests.put(
            f"{torchserve.inference}/predictions/imgtocap",
            data=data,
            headers={**torchserve.headers(), "Content-Type": "application/octet-stream"},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        served = response.json()
    assert served["model_version"] == registered.archive_version()  # local-<n>: a local store

    started = time.monotonic()
    server, url = _mlflow_serve(
        trained.repo, f"models:/{registered.name}/{registered.version}", tmp_path / "mlflow.log"
    )
    try:
        ready = time.monotonic() - started
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(data).decode()]]}}  # fmt: skip
        answer = requests.post(f"{url}/invocations", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)

    assert prediction["caption"] == served["caption"] == expected["caption"]
    assert prediction["score"] == pytest.approx(served["score"], abs=1e-3)
    assert isinstance(served["in_domain"], bool) and prediction["in_domain"] == served["in_domain"]
    assert prediction["domain_distance"] == pytest.approx(served["domain_distance"], abs=1e-3)
    print(f"\nmlflow models serve: /ping after {ready:.0f} s; both say {served['caption']!r}")
