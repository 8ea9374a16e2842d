"""What the configured tracking server can do, asked once per process: does it take our
credentials, and does it have a model registry (DagsHub's hosted MLflow has none)?

- Wrong credentials stop `train` before its first epoch, naming the variables to fix: a run
  that trains for an hour and then cannot be recorded is worse than no run.
- A registry-less server is said once, in one line; `evaluate` and `package` then log the
  archive and the model card as run artifacts and record `champion` as a run tag.
"""

from __future__ import annotations

import logging
import os
import urllib.parse

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as runs.py: before mlflow

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from training import StageError  # noqa: E402

log = logging.getLogger(__name__)

NO_REGISTRY = (
    "this tracking server has no model registry (DagsHub): the archive and card are logged as "
    "run artifacts; champion is recorded as a run tag"
)
_registry: dict[str, bool] = {}  # tracking URI -> has a model registry


def is_local(uri: str) -> bool:
    """A store on this machine only (sqlite, a folder): its versions mean nothing elsewhere."""
    return urllib.parse.urlsplit(uri).scheme in ("", "file", "sqlite")


def check_access() -> None:
    """A StageError when the configured server refuses our credentials (HTTP 401 or 403)."""
    uri = mlflow.get_tracking_uri()
    if is_local(uri):
        return
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except MlflowException as exc:
        if _status(exc) in (401, 403):
            names = (
                "DAGSHUB_TOKEN"
                if os.environ.get("DAGSHUB_REPO_OWNER")
                else "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
            )
            raise StageError(
                f"the MLflow server {uri} refused the credentials (HTTP {_status(exc)}): set "
                f"{names} to an account that may write to it, or unset MLFLOW_TRACKING_URI to "
                "log to this repository's own store"
            ) from exc
        raise


def has_registry() -> bool:
    """Whether the configured server has a model registry; said once when it has none."""
    uri = mlflow.get_tracking_uri()
    if uri not in _registry:
        try:
            mlflow.MlflowClient().search_registered_models(max_results=1)
            _registry[uri] = True
        except MlflowException as exc:
            if _status(exc) != 404 and "not supported" not in str(exc).lower():
                raise
            _registry[uri] = False
            log.warning(NO_REGISTRY)
    return _registry[uri]


def _status(exc: MlflowException) -> int:
    """The HTTP status a REST call failed with (MLflow maps a plain-text answer's status to an
    error code, and an error code back to its status)."""
    return exc.get_http_status_code()
