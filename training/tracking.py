"""MLflow tracking: a local sqlite store by default, any MLflow server or DagsHub when configured.

- nothing set: `sqlite:///mlflow.db` in the repository (browse with `mlflow ui`);
- `MLFLOW_TRACKING_URI` (plus `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`): any MLflow server;
- `DAGSHUB_REPO_OWNER` + `DAGSHUB_REPO_NAME` (+ `DAGSHUB_TOKEN`): the repository's DagsHub
  MLflow server, through `dagshub.init` (needs network and credentials: opt-in only).

One pipeline run is one MLflow run: train creates it and records its id in
`artifacts/model/mlflow.json`; evaluate and package add to the same run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from training.paths import RUN_FILE  # noqa: E402

log = logging.getLogger(__name__)

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "imgtocap")


def configure() -> str:
    """Point MLflow at the configured store; returns the tracking URI."""
    owner, name = os.environ.get("DAGSHUB_REPO_OWNER"), os.environ.get("DAGSHUB_REPO_NAME")
    if owner and name and not os.environ.get("MLFLOW_TRACKING_URI"):
        import dagshub  # opt-in: pip install dagshub

        dagshub.init(repo_owner=owner, repo_name=name, mlflow=True)
    elif os.environ.get("MLFLOW_TRACKING_URI"):  # explicit: a URI set earlier in-process loses
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    else:
        mlflow.set_tracking_uri(f"sqlite:///{Path('mlflow.db').resolve()}")
    mlflow.set_experiment(EXPERIMENT)
    return mlflow.get_tracking_uri()


@contextlib.contextmanager
def run(run_id: str | None = None, name: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """Start a new run, or continue `run_id` (a resumed training, or a later stage)."""
    configure()
    with mlflow.start_run(run_id=run_id, run_name=name) as active:
        yield active


def start(run_id: str | None = None, name: str | None = None) -> str | None:
    """Start (or continue) a run for the rest of the process; None if tracking is unavailable.

    Tracking must never cost a training run: a store that cannot be reached is a warning.
    """
    down = unreachable_server()
    if down:  # MLflow's client would retry for ~4 minutes before giving up
        log.warning("MLflow server %s does not answer: continuing without tracking", down)
        return None
    try:
        configure()
        return mlflow.start_run(run_id=run_id, run_name=name).info.run_id
    except Exception as exc:  # any store/network failure: train on without tracking
        log.warning("MLflow tracking unavailable (%s): continuing without it", exc)
        return None


def log_params(params: dict[str, Any]) -> None:
    _safely(mlflow.log_params, flatten(params))


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _safely(mlflow.log_metrics, metrics, step=step)


def end(status: str = "FINISHED") -> None:
    _safely(mlflow.end_run, status)


def _safely(fn, *args, **kwargs) -> None:
    if mlflow.active_run() is None:
        return
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # a dropped connection mid-run loses a log line, not the run
        log.warning("MLflow %s failed: %s", fn.__name__, exc)


def save_run_id(run_id: str | None, path: Path = RUN_FILE) -> None:
    """Record the pipeline's run for later stages (None: training ran without tracking)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    uri = mlflow.get_tracking_uri() if run_id else None
    path.write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}) + "\n")


def load_run_id(path: Path = RUN_FILE) -> str | None:
    """The pipeline's run id, or None when training ran without tracking."""
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def unreachable_server(timeout: float = 5.0) -> str | None:
    """host:port of the configured MLflow server when nothing accepts a connection there."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri and os.environ.get("DAGSHUB_REPO_OWNER"):
        uri = "https://dagshub.com"
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None  # a local store (sqlite, file) or a scheme a plugin handles
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError:
        return f"{parts.hostname}:{port}"
    return None


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: MLflow params are flat."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
