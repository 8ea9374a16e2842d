"""Put the workspace's model and its evaluation on the configured tracking server, whatever DVC
ran: the `track` stage (always run) calls `publish` after `evaluate`.

An evaluation is keyed by what it is, not by which process made it: the sha256 of the
checkpoint and of metrics/eval.json (tag `imgtocap.evaluation`). If the server already has a
run with that key, `publish` only reads its registered version back; otherwise it logs it:
- into training's run (artifacts/model/mlflow.json) when that run is on this server and has no
  evaluation yet (train and evaluate ran in one execution), or into a child of it (only
  evaluate re-ran);
- into a run of its own when training's run is not on this server (DVC restored `train` from
  its run cache, another server logged it, `dvc exp apply` or `git checkout` + `dvc checkout`
  brought the model back): the training curves come from metrics/train_history.csv.
Then it registers the model (weights logged once per checkpoint), moves `champion`, and
returns the version `package` stamps. Switching servers, restores and checkouts therefore
leave the server and the archive's stamp consistent.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model import Decoding
from model.options import CPU_DECODER
from training.data.captions import IMAGES_DIR
from training.data.checksums import file_sha256
from training.tracking import registry, server
from training.tracking import runs as tracking
from training.tracking.model_card import retitle
from training.tracking.registry import Registered

log = logging.getLogger(__name__)

KEY = "imgtocap.evaluation"  # tag: sha256 of the checkpoint and of eval.json
VERSION = "imgtocap.version"  # tag on that run: registered name/version (empty: registry-less)
DECODING = ("num_beams", "max_length", "length_penalty", "no_repeat_ngram_size")


@dataclass(frozen=True)
class Evaluated:
    """What `evaluate` left in the workspace (paths: training/paths.py)."""

    model: Path
    metrics: Path  # metrics/eval.json
    card: Path  # reports/model_card.md, without a version
    processed: Path  # data/processed/captions.json: the test split
    raw: Path  # data/raw: its images
    history: Path  # metrics/train_history.csv
    run_file: Path  # artifacts/model/mlflow.json: training's run (finetune's model is elsewhere)
    files: tuple[Path, ...] = ()  # logged under evaluation/ (empty ones skipped)

    def key(self) -> str:
        digest = hashlib.sha256(file_sha256(self.model).encode())
        digest.update(self.metrics.read_bytes())
        return digest.hexdigest()[:32]


def publish(evaluated: Evaluated, params: Mapping[str, Any]) -> Registered:
    """The server's run for this evaluation, logged if missing; its registered version.

    Tracking is a record, not a result: a server that does not answer or fails midway is a
    warning, and the archive is then stamped `unregistered`. Wrong credentials are an error.
    """
    down = tracking.unreachable_server()
    if down:  # MLflow's client would retry for ~4 minutes before giving up
        log.warning(
            "MLflow server %s does not answer: nothing logged, the archive will be stamped "
            "'unregistered'. Start the server or fix MLFLOW_TRACKING_URI, then `dvc repro`.",
            down,
        )
        return Registered()
    tracking.configure()  # wrong credentials: a StageError
    key = evaluated.key()
    found = tracking.mlflow.search_runs(
        filter_string=f"tags.`{KEY}` = '{key}'", output_format="list", max_results=1
    )
    if found:
        registered = _registered(found[0])
        log.info("MLflow already has this evaluation: run %s", registered.run_id)
        return registered
    try:
        return _log(evaluated, params, key)
    except Exception as exc:  # the store itself: refused, misconfigured, dropped
        log.warning(
            "MLflow logging failed (%s: %s); the archive will be stamped 'unregistered'. "
            "Fix the server named by MLFLOW_TRACKING_URI (now %s), then `dvc repro`.",
            type(exc).__name__,
            exc,
            tracking.mlflow.get_tracking_uri(),
        )
        return Registered()


def _registered(run) -> Registered:
    name, _, version = run.data.tags.get(VERSION, "").partition("/")
    local = server.is_local(tracking.mlflow.get_tracking_uri())
    return Registered(name or None, version or None, run.info.run_id, local)


def _log(evaluated: Evaluated, params: Mapping[str, Any], key: str) -> Registered:
    mlflow = tracking.mlflow
    client = mlflow.MlflowClient()
    train_run = tracking.load_run_id(evaluated.run_file)
    if train_run is not None:
        try:
            client.get_run(train_run)
        except Exception:  # logged to another store, or never
            train_run = None
    metrics = json.loads(evaluated.metrics.read_text())
    scores = {k: float(v) for k, v in metrics.items() if k not in DECODING}
    if train_run is None:
        runs = tracking.mlflow.start_run(
            run_name=tracking.Execution.current().name, tags=tracking.run_tags(params, "train")
        )
        mlflow.log_params(tracking.flatten(params))
        _log_history(evaluated.history)
    else:
        runs = tracking.evaluation_run(train_run, params)
    with runs as active:
        run_id = active.info.run_id
        mlflow.log_metrics(scores)
        mlflow.set_tag(tracking.EVALUATED, "true")
        for path in evaluated.files:
            if path.is_file() and path.stat().st_size:
                mlflow.log_artifact(str(path), artifact_path="evaluation")
        registered = _register(evaluated, params, scores, run_id, train_run or run_id)
        version = f"{registered.name}/{registered.version}" if registered.version else ""
        mlflow.set_tags({VERSION: version, KEY: key})  # last: a failed run is logged again
    log.info(
        "MLflow: evaluation logged to run %s, archive version %s",
        run_id,
        registered.archive_version(),
    )
    return registered


def _register(
    evaluated: Evaluated,
    params: Mapping[str, Any],
    scores: dict[str, float],
    run_id: str,
    train_run: str,
) -> Registered:
    """Register the model (or, without a registry, keep it in the run), move champion, attach
    the card."""
    mlflow = tracking.mlflow
    dataset = tracking.dataset_name(params.get("data"))
    test = json.loads(evaluated.processed.read_text())["splits"]["test"]
    split = registry.split_fingerprint(test, evaluated.raw / IMAGES_DIR)
    local = server.is_local(mlflow.get_tracking_uri())
    card = evaluated.card.read_text(encoding="utf-8")
    score = scores[registry.PRIMARY]
    if not server.has_registry():  # DagsHub: the card here, the archive at package
        mlflow.set_tags({registry.MODEL_SHA: file_sha256(evaluated.model), "test_split": split})
        mlflow.set_tag("dataset", dataset)
        registry.promote_run(run_id, dataset, score, split)
        registered = Registered(run_id=run_id, local=local)
        mlflow.log_text(retitle(card, None, registered.archive_version()), "model_card.md")
        return registered
    execution = tracking.Execution.current()
    tags = {
        "dataset": dataset,
        "preset": str((params.get("model") or {}).get("preset", "")),
        "test_split": split,
        "git.commit": execution.commit or "",
        "dvc.experiment": execution.experiment or "",
        "train_run": train_run,
    }
    evaluate = params.get("evaluate") or {}
    decoding = Decoding(**{k: evaluate[k] for k in DECODING if k in evaluate}).to_dict()
    decoding["cpu_decoder"] = (params.get("serve") or {}).get("cpu_decoder", CPU_DECODER)
    name = registry.registered_name(dataset)
    version = registry.register_model(evaluated.model, decoding, name, tags)
    registered = Registered(name, version, run_id, local)
    registry.promote(name, version, score, split)
    registry.attach_card(name, version, run_id, retitle(card, name, registered.archive_version()))
    return registered


def _log_history(history: Path) -> None:
    """Training's per-epoch curves from metrics/train_history.csv (train itself did not log
    to this server)."""
    if not history.is_file():
        return
    with history.open(newline="") as f:
        for row in csv.DictReader(f):
            epoch = int(row.pop("epoch"))
            values = {k: float(v) for k, v in row.items() if v not in ("", None)}
            tracking.mlflow.log_metrics(values, step=epoch)
