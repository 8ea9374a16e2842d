"""MLflow tracking: one run per pipeline execution, in the repository's own store by default.

Where runs go:
- nothing set: `sqlite:///<repository>/mlflow.db`, artifacts in `<repository>/mlruns/` (browse
  with `mlflow ui --backend-store-uri sqlite:///mlflow.db` from the repository root);
- `MLFLOW_TRACKING_URI` (plus `MLFLOW_TRACKING_USERNAME`/`_PASSWORD`): any MLflow server;
- `DAGSHUB_REPO_OWNER` + `DAGSHUB_REPO_NAME` (+ `DAGSHUB_TOKEN`): the repository's DagsHub
  MLflow server, through `dagshub.init` (needs network and credentials: opt-in only).

The repository is `DVC_ROOT`, which DVC sets for every stage to the workspace, also when a
`--temp` or queued experiment runs in a copy under `.dvc/tmp/exps/`: those log to the
workspace's store, not to a store inside the copy that DVC deletes afterwards.

One execution, one run. `train` starts the run, named after the DVC experiment (`DVC_EXP_NAME`)
or the git revision, and records its id in `artifacts/model/mlflow.json`. `evaluate` completes
that run when it is the same execution (the run has no evaluation yet and was logged with the
same params.yaml); otherwise (only evaluate re-ran, e.g. `dvc exp run -S evaluate.num_beams=1`)
it starts a run of its own, a child of the training run, and never touches the training run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402

from training import StageError  # noqa: E402
from training.paths import RUN_FILE  # noqa: E402
from training.tracking import server  # noqa: E402

log = logging.getLogger(__name__)

EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "imgtocap")
STORE = "mlflow.db"  # the repository's store, artifacts in mlruns/ beside it
ARTIFACTS = "mlruns"
_defaulted: str | None = None  # the default store this process chose (and MLflow exported)
EVALUATED = "imgtocap.evaluated"  # tag on a run once test metrics are in it
TRAIN_RUN = "imgtocap.train_run"  # tag on an evaluation run: the training run it evaluated


# ------------------------------------------------------------------------------ the store


def repository() -> Path:
    """The repository the stage belongs to: DVC's workspace (`DVC_ROOT`), else the cwd."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    """The configured store; a local sqlite path is resolved against the repository."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri or uri == _defaulted:  # mlflow.set_tracking_uri exports what it is given
        uri = f"sqlite:///{STORE}"
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return f"sqlite:///{repository() / db}"
    return uri


def configure() -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI."""
    global _defaulted
    owner, name = os.environ.get("DAGSHUB_REPO_OWNER"), os.environ.get("DAGSHUB_REPO_NAME")
    if owner and name and not os.environ.get("MLFLOW_TRACKING_URI"):
        import dagshub  # opt-in: pip install dagshub

        dagshub.init(repo_owner=owner, repo_name=name, mlflow=True)
    else:  # set explicitly: a URI set earlier in this process must not win
        uri = tracking_uri()
        if os.environ.get("MLFLOW_TRACKING_URI") in (None, "", _defaulted):
            _defaulted = uri  # ours, not the user's, when MLflow exports it
        mlflow.set_tracking_uri(uri)
    server.check_access()  # wrong credentials: an error naming the variables, not a retry loop
    mlflow.set_experiment(EXPERIMENT)
    db = _sqlite_path(mlflow.get_tracking_uri())
    if db is not None and db == repository() / STORE:
        relocate_artifacts(db)  # also fixes an experiment just created from a temp copy's cwd
    return mlflow.get_tracking_uri()


def relocate_artifacts(db: Path) -> bool:
    """Point a sqlite store's artifact locations at the `mlruns/` beside it; True if any moved.

    MLflow stores them as absolute paths (the cwd's `mlruns/` when an experiment was created),
    so a copied or moved checkout would write its artifacts into the original's folder, and an
    experiment created by a `--temp` run into DVC's temporary copy. Only the default layout,
    `<folder>/mlruns/<experiment id>`, is rewritten: an artifact root set on purpose is kept.
    """
    here = (db.parent / ARTIFACTS).as_posix()
    with contextlib.closing(sqlite3.connect(db, timeout=60)) as con, con:
        experiments = con.execute("SELECT experiment_id, artifact_location FROM experiments")
        moved = set()
        for experiment_id, location in experiments.fetchall():
            scheme = "file://" if location.startswith("file://") else ""
            root, _, leaf = location.removeprefix(scheme).rpartition("/")
            if leaf == str(experiment_id) and root.endswith(f"/{ARTIFACTS}") and root != here:
                moved.add((scheme + root, scheme + here))
        if not moved:
            return False
        columns = [
            (table, column)
            for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            for _, column, kind, *_ in con.execute(f'PRAGMA table_info("{table}")')
            if re.match(r"(VAR)?CHAR|TEXT|CLOB", kind.upper())
        ]
        for old, new in sorted(moved):
            for table, column in columns:  # every location under the old root, in any table
                con.execute(
                    f'UPDATE "{table}" SET "{column}" = ? || substr("{column}", ?) '
                    f'WHERE substr("{column}", 1, ?) = ?',
                    (new, len(old) + 1, len(old) + 1, old + "/"),
                )
            log.info("MLflow store %s: artifact locations moved from %s to %s", db, old, new)
    return True


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (relative or absolute), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(urllib.parse.unquote(uri.removeprefix("sqlite:///")).split("?", 1)[0])


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


# -------------------------------------------------------------------- what is executing


@dataclass(frozen=True)
class Execution:
    """The DVC experiment or git revision a stage runs for."""

    name: str  # the experiment's name, else the short git revision (+ "-dirty")
    experiment: str | None  # DVC_EXP_NAME, None for a plain `dvc repro`
    commit: str | None  # the git commit the run started from (an experiment's baseline)
    dirty: bool  # tracked files other than the pipeline's outputs differ from the commit

    @classmethod
    def current(cls) -> Execution:
        """From DVC's environment (`dvc exp run`) or the repository's git state."""
        experiment = os.environ.get("DVC_EXP_NAME") or None
        commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
        dirty = experiment is None and bool(
            _git("status", "--porcelain", "--untracked-files=no", "--", ".", *_OUTPUTS)
        )
        if experiment:
            name = experiment
        elif commit:
            name = commit[:7] + ("-dirty" if dirty else "")
        else:
            name = "no-git"
        return cls(name, experiment, commit, dirty)

    def tags(self) -> dict[str, str]:
        tags = {"git.commit": self.commit or "", "git.dirty": str(self.dirty).lower()}
        if self.experiment:
            tags["dvc.experiment"] = self.experiment
        return tags


# tracked files the pipeline itself rewrites: not a change to what runs
_OUTPUTS = (":!dvc.lock", ":!metrics")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=repository(), capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def dataset_name(data: Mapping[str, Any] | None) -> str:
    """params.yaml `data:` -> synthetic | flickr8k | folder-<folder name>."""
    data = data or {}
    source = data.get("source") or "synthetic"
    if source != "folder":
        return source
    path = (data.get("folder") or {}).get("path")
    slug = re.sub(r"[^a-z0-9]+", "-", Path(path).stem.lower()).strip("-") if path else ""
    return f"folder-{slug}" if slug else "folder"


def run_tags(params: Mapping[str, Any], kind: str) -> dict[str, str]:
    """What every run says about itself: execution, dataset, preset, and train | evaluate."""
    return {
        **Execution.current().tags(),
        "dataset": dataset_name(params.get("data")),
        "preset": str((params.get("model") or {}).get("preset", "")),
        "imgtocap.kind": kind,
    }


def run_params(params: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """All of params.yaml plus the resolved model config, flat, as MLflow params."""
    config = dict(config)
    if config.get("output_vocab"):  # the id list would overflow MLflow's param size limit
        config["output_vocab"] = len(config["output_vocab"])
    elif "output_vocab" in config:
        config["output_vocab"] = "full"
    return flatten({**params, "config": config})


# ---------------------------------------------------------------------------------- runs


def start_training(
    run_id: str | None, params: Mapping[str, Any], config: Mapping[str, Any]
) -> str | None:
    """Start this execution's run (or continue `run_id`, a resumed training) for the rest of
    the process; None if tracking is unavailable, which must never cost a training run."""
    down = unreachable_server()
    if down:  # MLflow's client would retry for ~4 minutes before giving up
        log.warning("MLflow server %s does not answer: continuing without tracking", down)
        return None
    try:
        configure()
    except StageError:  # wrong credentials: stop before training, not after it
        raise
    except Exception as exc:
        log.warning("MLflow tracking unavailable (%s): continuing without it", exc)
        return None
    try:
        if run_id:
            return mlflow.start_run(run_id=run_id).info.run_id
        name = Execution.current().name
        run = mlflow.start_run(run_name=name, tags=run_tags(params, "train"))
        mlflow.log_params(run_params(params, config))
        log.info("MLflow run %s (%s) in %s", run.info.run_id, name, mlflow.get_tracking_uri())
        return run.info.run_id
    except Exception as exc:  # any store/network failure: train on without tracking
        log.warning("MLflow tracking unavailable (%s): continuing without it", exc)
        with contextlib.suppress(Exception):
            mlflow.end_run("FAILED")
        return None


@contextlib.contextmanager
def evaluation_run(train_run: str, params: Mapping[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The run an evaluation of `train_run`'s model logs to: that run when this is the same
    execution (no evaluation in it yet, logged with the same params), else a child of it."""
    configure()
    client = mlflow.MlflowClient()
    trained = client.get_run(train_run)
    flat = {key: str(value) for key, value in flatten(params).items()}
    logged = trained.data.params
    same = trained.data.tags.get(EVALUATED) != "true" and all(
        logged.get(key) == value for key, value in flat.items()
    )
    if same:
        with mlflow.start_run(run_id=train_run) as active:
            yield active
        return
    config = {key: value for key, value in logged.items() if key.startswith("config.")}
    tags = {**run_tags(params, "evaluate"), TRAIN_RUN: train_run}
    with mlflow.start_run(
        run_name=Execution.current().name,
        parent_run_id=train_run,
        experiment_id=trained.info.experiment_id,
        tags=tags,
    ) as active:
        mlflow.log_params({**flat, **config})
        log.info(
            "MLflow run %s evaluates training run %s (%s)",
            active.info.run_id,
            train_run,
            trained.info.run_name,
        )
        yield active


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
    """Record the training run for later stages (None: training ran without tracking).

    Only the id: the store is resolved again by each stage, so a moved checkout still works.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run_id}) + "\n")


def load_run_id(path: Path = RUN_FILE) -> str | None:
    """The training run's id, or None when training ran without tracking."""
    return json.loads(path.read_text())["run_id"] if path.is_file() else None


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: MLflow params are flat."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main() -> None:
    """`python -m training.tracking.runs`: open the store (moving its artifact paths here after a
    copy or move of the checkout) and say where it is."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    uri = configure()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    print(
        f"MLflow store {uri}, experiment {EXPERIMENT!r}: artifacts in {experiment.artifact_location}"
    )


if __name__ == "__main__":
    main()
