"""Tracking across stores (issue #24): the workspace's model and evaluation end up on whichever
server MLFLOW_TRACKING_URI names, whatever DVC ran, and the archive's stamp is that server's.

Three real stores: the repository's sqlite store, a loopback `mlflow server` with basic auth (a
team's shared server), and the same server behind a proxy that answers registry calls as
DagsHub's hosted MLflow does (404 "Model Registry features are not supported").
"""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from model import Captioner, preset, save_checkpoint
from training import StageError
from training.stages import package
from training.tracking import publish as publish_module
from training.tracking import registry, server
from training.tracking import runs as tracking
from training.tracking.publish import Evaluated, publish

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

USER, PASSWORD = "admin", "team-password-1234"
PARAMS = {"data": {"source": "synthetic"}, "model": {"preset": "tiny"}, "evaluate": {}}
REFUSED = {
    "error_code": "ENDPOINT_NOT_FOUND",
    "message": "Model Registry features are not supported",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def team_server(tmp_path_factory):
    """A loopback `mlflow server --app-name basic-auth` (sqlite behind it, artifacts proxied)."""
    root = tmp_path_factory.mktemp("team-server")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\nadmin_username = {USER}\n"
        f"admin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "test",
    }
    command = [
        sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with (root / "server.log").open("w") as log_file:
        process = subprocess.Popen(command, cwd=root, env=env, stdout=log_file, stderr=log_file)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2).close()
                break
            except (OSError, urllib.error.URLError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield url, root
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def registry_less(team_server):
    """The team server behind a proxy that refuses the model registry as DagsHub does."""
    upstream = team_server[0]

    class Proxy(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            if "registered-models" in self.path or "model-versions" in self.path:
                body = json.dumps(REFUSED).encode()
                self.send_response(404)
            else:
                length = int(self.headers.get("Content-Length") or 0)
                request = urllib.request.Request(
                    upstream + self.path,
                    data=self.rfile.read(length) if length else None,
                    method=self.command,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                )
                try:
                    with urllib.request.urlopen(request, timeout=60) as answer:
                        status, body = answer.status, answer.read()
                except urllib.error.HTTPError as error:
                    status, body = error.code, error.read()
                self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{proxy.server_address[1]}"
    proxy.shutdown()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """What `evaluate` leaves: a tiny model, its eval.json and card, a one-image test split."""
    root = tmp_path_factory.mktemp("workspace")
    (root / "model").mkdir()
    save_checkpoint(Captioner(preset("tiny")), root / "model" / "model.pth")
    (root / "raw" / "Images").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(root / "raw" / "Images" / "a.png")
    (root / "processed").mkdir()
    split = [{"image": "a.png", "captions": ["a red square"]}]
    (root / "processed" / "captions.json").write_text(json.dumps({"splits": {"test": split}}))
    (root / "reports").mkdir()
    (root / "reports" / "model_card.md").write_text("# imgtocap (not registered)\n\nA card.\n")
    (root / "metrics").mkdir()
    (root / "metrics" / "train_history.csv").write_text("epoch,train_loss\n1,2.0\n2,1.5\n")
    evaluate(root, cider=0.5)
    return root


def evaluate(root: Path, cider: float) -> None:
    """An evaluation of the workspace's model (what `evaluate` writes to metrics/eval.json)."""
    (root / "metrics" / "eval.json").write_text(json.dumps({"cider": cider, "bleu4": cider / 2}))


def evaluated(root: Path) -> Evaluated:
    return Evaluated(
        model=root / "model" / "model.pth",
        metrics=root / "metrics" / "eval.json",
        card=root / "reports" / "model_card.md",
        processed=root / "processed" / "captions.json",
        raw=root / "raw",
        history=root / "metrics" / "train_history.csv",
        run_file=root / "model" / "mlflow.json",
        files=(root / "metrics" / "eval.json",),
    )


@contextlib.contextmanager
def store(uri: str | None, root: Path, user: str = USER, password: str = PASSWORD):
    """MLflow pointed where a stage in `root` would point it with these settings."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DVC_ROOT", str(root))
        mp.chdir(root)
        for name in ("DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "MLFLOW_TRACKING_URI"):
            mp.delenv(name, raising=False)
        if uri:
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.setenv("MLFLOW_TRACKING_USERNAME", user)
            mp.setenv("MLFLOW_TRACKING_PASSWORD", password)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(None)


def _keyed_runs(key: str) -> list:
    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{publish_module.KEY}` = '{key}'",
        output_format="list",
    )


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_switching_stores_logs_the_workspace_model_where_the_uri_points(workspace, team_server):
    """Finding 1 and 2: the shared server gets the run although no stage re-ran (DVC restored
    them), its version is the team's, and the local store's stamp says `local-`."""
    url, server_root = team_server
    key = evaluated(workspace).key()
    with store(None, workspace):
        local = publish(evaluated(workspace), PARAMS)
        assert local.local and local.archive_version() == "local-1"
        assert publish(evaluated(workspace), PARAMS) == local  # tracked again: looked up
        assert len(_keyed_runs(key)) == 1
    # `train` recorded a run in the local store: on the team server it does not exist
    tracking.save_run_id(local.run_id, workspace / "model" / "mlflow.json")
    with store(url, workspace):
        shared = publish(evaluated(workspace), PARAMS)
        assert not shared.local and shared.archive_version() == "1"
        assert shared.run_id != local.run_id
        (run,) = _keyed_runs(key)
        assert run.info.run_id == shared.run_id and run.data.metrics["cider"] == 0.5
        history = mlflow.MlflowClient().get_metric_history(shared.run_id, "train_loss")
        assert [m.value for m in history] == [2.0, 1.5]  # training's curve, from the csv
        client = mlflow.MlflowClient()
        alias = client.get_model_version_by_alias("imgtocap-synthetic", registry.CHAMPION)
        assert alias.version == "1"
        assert publish(evaluated(workspace), PARAMS) == shared
    with store(None, workspace):  # back (`git checkout` + `dvc checkout`): the local one again
        assert publish(evaluated(workspace), PARAMS) == local
    assert (server_root / "artifacts").is_dir()


def test_an_evaluate_only_experiment_references_the_weights(workspace, team_server, tmp_path):
    """Finding 4: another evaluation of the same checkpoint registers a version without copying
    the weights or the archive again; metrics are not repeated as version tags."""
    url, server_root = team_server
    with store(url, workspace):
        first = publish(evaluated(workspace), PARAMS)
        archive = package.build_archive(
            workspace / "model" / "model.pth",
            tmp_path / "a",
            {},
            first,
            workspace / "reports" / "model_card.md",
        )
        registry.log_archive(
            first, archive, registry.file_sha256(workspace / "model" / "model.pth")
        )
        before = _size(server_root / "artifacts")
        evaluate(workspace, cider=0.7)  # e.g. -S evaluate.num_beams=5
        second = publish(evaluated(workspace), PARAMS)
        archive = package.build_archive(
            workspace / "model" / "model.pth",
            tmp_path / "b",
            {},
            second,
            workspace / "reports" / "model_card.md",
        )
        uri = registry.log_archive(
            second, archive, registry.file_sha256(workspace / "model" / "model.pth")
        )
        growth = _size(server_root / "artifacts") - before
        checkpoint = (workspace / "model" / "model.pth").stat().st_size
        assert second.version != first.version and second.run_id != first.run_id
        assert growth < checkpoint / 2, f"{growth} bytes for an evaluate-only run"
        assert uri.startswith(f"runs:/{first.run_id}/archive/")
        client = mlflow.MlflowClient()
        version = client.get_model_version("imgtocap-synthetic", second.version)
        assert "cider" not in version.tags and version.tags["archive"] == uri
        assert client.get_model_version_by_alias("imgtocap-synthetic", "champion").version == (
            second.version
        )
    evaluate(workspace, cider=0.5)


def test_wrong_credentials_stop_training_before_it_starts(workspace, team_server):
    with (
        store(team_server[0], workspace, password="wrong"),
        pytest.raises(StageError, match="MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"),
    ):
        tracking.start_training(None, PARAMS, {})


def test_a_server_without_registry_keeps_card_archive_and_champion_in_runs(
    workspace, registry_less, tmp_path, caplog
):
    """Finding 3: said once, in one line; the card and the archive are run artifacts, the
    champion a run tag, the stamp the run."""
    workspace = shutil.copytree(workspace, tmp_path / "dagshub")  # a model of its own
    torch.manual_seed(1)
    save_checkpoint(Captioner(preset("tiny")), workspace / "model" / "model.pth")
    evaluate(workspace, cider=0.9)
    with store(registry_less, workspace), caplog.at_level(logging.INFO):
        registered = publish(evaluated(workspace), PARAMS)
        assert registered.version is None and registered.run_id
        assert registered.archive_version() == f"run-{registered.run_id[:8]}"
        archive = package.build_archive(
            workspace / "model" / "model.pth",
            tmp_path / "mar",
            {},
            registered,
            workspace / "reports" / "model_card.md",
        )
        package.track(registered, archive, workspace / "model" / "model.pth")
        client = mlflow.MlflowClient()
        run = client.get_run(registered.run_id)
        assert run.info.status == "FINISHED" and run.data.tags[registry.CHAMPION] == "true"
        names = {a.path for a in client.list_artifacts(registered.run_id)}
        assert {"model_card.md", "archive", "evaluation"} <= names
        card = mlflow.artifacts.load_text(f"runs:/{registered.run_id}/model_card.md")
        assert card.startswith(f"# imgtocap version run-{registered.run_id[:8]}\n")
        evaluate(workspace, cider=0.95)
        publish(evaluated(workspace), PARAMS)
    assert caplog.text.count(server.NO_REGISTRY) == 1
    assert "Check MLFLOW_TRACKING_URI" not in caplog.text and "failed" not in caplog.text
