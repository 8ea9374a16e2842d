"""The MLflow Model Registry: one registered model per dataset, and a `champion` alias that moves
only to a version that beats it on the same test split.

- Name: `imgtocap-<dataset>` (`imgtocap-synthetic`, `imgtocap-flickr8k`, `imgtocap-folder-<name>`):
  a shapes model never competes with a photo model.
- Every evaluation registers a version (the checkpoint with the decoding it was scored with),
  tagged with dataset, preset, test split id, its test metrics, decoding, commit and runs; its
  description is the model card.
- `champion` (`models:/imgtocap-synthetic@champion`): the first version, then a new version
  whose CIDEr is strictly higher than the champion's on the same test split
  (`split_fingerprint`: a hash of the test images' bytes and reference captions). A version
  scored on another split is not compared and leaves the alias where it is (tag
  `champion.decision` says why).
- `package` stamps the archive with the version (`registered.json`, written by `evaluate`) and
  logs the `.mar` to the run that holds it.

Why a pyfunc from code (training/tracking/mlflow_model.py) and not `mlflow.pytorch.log_model`: the
pytorch flavour either traces with torch.export (beam search with a KV cache does not export)
or pickles the whole nn.Module (loading then needs this repository on the path, and pickles
break across code changes). The pyfunc carries the weights-only checkpoint, the tokenizer files
and the `model/` code, and its `predict` takes image bytes and returns captions: the same
contract as the TorchServe endpoint, so `models:/imgtocap-synthetic/<n>` is directly usable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ.setdefault(
    "MLFLOW_DISABLE_TELEMETRY", "true"
)  # as training/tracking/runs.py: before mlflow

import mlflow  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # noqa: E402

import model as model_package  # noqa: E402
from model import read_checkpoint  # noqa: E402
from model.domain import FILENAME as DOMAIN_FILE  # noqa: E402
from model.tokenizer import save_tokenizer  # noqa: E402
from training.data.checksums import file_sha256  # noqa: E402

log = logging.getLogger(__name__)

PREFIX = "imgtocap"
CHAMPION = "champion"
PRIMARY = "cider"  # the metric the champion is chosen on
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
MODEL_PACKAGE = Path(model_package.__file__).parent  # model/: in the .mar and the MLflow model
# What loading the pyfunc imports (see mlflow_model.py); pinned to the versions evaluated with.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "transformers", "pillow", "numpy", "pandas")
UNREGISTERED = "unregistered"  # the archive's version when nothing was registered
MODEL_SHA = "imgtocap.model_sha256"  # tag: the checkpoint a run or version evaluated
MODEL_URI = "imgtocap.model_uri"  # tag on the run that logged that checkpoint's weights
ARCHIVE = "imgtocap.archive"  # tag on the run that logged that checkpoint's archive
EVAL_RUN = "eval_run"  # version tag: the run holding its test metrics


def registered_name(dataset: str) -> str:
    """The registered model of a dataset (tracking.dataset_name): imgtocap-synthetic, ..."""
    return f"{PREFIX}-{dataset}"


def split_fingerprint(entries: Sequence[Mapping[str, Any]], images_dir: Path) -> str:
    """What makes two evaluations comparable: the test images' bytes and their references.

    `entries`: the test split of data/processed/captions.json ({"image", "captions"} each).
    """
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: e["image"]):
        digest.update(json.dumps([entry["image"], sorted(entry["captions"])]).encode())
        digest.update(file_sha256(images_dir / entry["image"]).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Registered:
    """Which registered version an evaluation made: artifacts/model/registered.json."""

    name: str | None = None
    version: str | None = None
    run_id: str | None = None  # the run that holds the version (and gets the archive)
    local: bool = False  # a store on this machine only (the default mlflow.db)

    def archive_version(self) -> str:
        """What `torch-model-archiver --version` stamps: the shared registry's version; a local
        store's as `local-<n>`, so nobody takes it for a team version; a registry-less server's
        run as `run-<id>`."""
        if self.version:
            return f"local-{self.version}" if self.local else self.version
        if self.run_id:
            return f"run-{self.run_id[:8]}"
        return UNREGISTERED

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self)) + "\n")

    @classmethod
    def load(cls, path: Path) -> Registered:
        return cls(**json.loads(path.read_text())) if path.is_file() else cls()


def register_model(
    checkpoint: Path,
    decoding: Mapping[str, Any],
    name: str,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Register the checkpoint as a version of `name`; returns the version.

    The weights are logged once per distinct checkpoint (by sha256, tag MODEL_SHA): a later
    evaluation of the same model (an evaluate-only experiment) registers a version that points
    at that logged model instead of copying it. Its pyfunc then decodes by default as the first
    evaluation did; the version's `decode.*` tags say how it was scored.
    """
    sha = file_sha256(checkpoint)
    model_uri = _logged_model(sha)
    if model_uri is None:
        model_uri = _log_model(checkpoint, decoding)
        mlflow.set_tag(MODEL_URI, model_uri)
    mlflow.set_tag(MODEL_SHA, sha)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*already exists")
        version_ = str(mlflow.register_model(model_uri, name).version)
    client = mlflow.MlflowClient()
    values = {
        **(tags or {}),
        MODEL_SHA: sha,
        EVAL_RUN: mlflow.active_run().info.run_id,
        **{f"decode.{k}": str(v) for k, v in decoding.items()},
    }
    for key, value in values.items():
        client.set_model_version_tag(name, version_, key, value)
    log.info("registered %s version %s (%s)", name, version_, model_uri)
    return version_


def _logged_model(sha: str) -> str | None:
    """The URI of the model already logged for a checkpoint with this sha256, if any."""
    runs = mlflow.search_runs(
        filter_string=f"tags.`{MODEL_SHA}` = '{sha}'", output_format="list", max_results=50
    )
    return next((r.data.tags[MODEL_URI] for r in runs if MODEL_URI in r.data.tags), None)


def _log_model(checkpoint: Path, decoding: Mapping[str, Any]) -> str:
    """Log the checkpoint as a pyfunc in the active run; returns its model URI."""
    config = read_checkpoint(checkpoint)["config"]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        save_tokenizer(config["tokenizer"], tokenizer_dir)
        artifacts = {"checkpoint": str(checkpoint), "tokenizer": str(tokenizer_dir)}
        if (domain := Path(checkpoint).with_name(DOMAIN_FILE)).is_file():
            artifacts["domain"] = str(domain)  # the in-domain check, read by mlflow_model.py
        with warnings.catch_warnings():
            # the explicit signature says what an input example would (image bytes in JSON)
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts=artifacts,
                code_paths=[str(MODEL_PACKAGE)],
                model_config=dict(decoding),
                signature=_signature(decoding),
                pip_requirements=_requirements(),  # explicit: skips MLflow's slow dependency scan
            )
    return info.model_uri


def promote(name: str, version_: str, score: float, test_split: str) -> bool:
    """Move `champion` to this version if it beats the champion's PRIMARY metric on the same
    test split (or there is no champion); records the decision on the version. True if moved."""
    client = mlflow.MlflowClient()
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:  # no alias yet (or its version was deleted)
        champion = None
    if champion is None:
        moved, decision = True, f"champion: the first version of {name}"
    elif champion.version == version_:
        moved, decision = True, "champion"
    elif champion.tags.get("test_split") != test_split:
        moved = False
        decision = (
            f"not compared: test split {test_split} differs from champion version "
            f"{champion.version}'s ({champion.tags.get('test_split')}); to promote it anyway: "
            f"MlflowClient().set_registered_model_alias({name!r}, 'champion', {version_!r})"
        )
    else:
        run_id = champion.tags.get(EVAL_RUN) or champion.run_id
        best = client.get_run(run_id).data.metrics[PRIMARY]
        moved, decision = _compared(score, best, f"champion version {champion.version}")
    if moved:
        client.set_registered_model_alias(name, CHAMPION, version_)
    client.set_model_version_tag(name, version_, "champion.decision", decision)
    log.info("%s version %s: %s", name, version_, decision)
    return moved


def _compared(score: float, best: float, champion: str) -> tuple[bool, str]:
    """Whether `score` beats the champion's `best`, and the decision in words."""
    moved = score > best
    verdict = "beats" if moved else "does not beat"
    decision = f"{PRIMARY} {score:.4f} {verdict} {champion}'s {best:.4f}"
    return moved, ("champion: " if moved else "") + decision


def attach_card(name: str, version_: str, run_id: str, card: str) -> None:
    """The model card as the version's description (MLflow renders it) and in its run."""
    client = mlflow.MlflowClient()
    client.update_model_version(name, version_, description=card)
    client.log_text(run_id, card, "model_card.md")


def promote_run(run_id: str, dataset: str, score: float, test_split: str) -> bool:
    """`champion` on a server without a registry: a run tag (CHAMPION = "true") that moves, by
    the same rule as the alias, among the dataset's evaluated runs. True if moved."""
    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    holders = client.search_runs(
        [experiment], f"tags.`{CHAMPION}` = 'true' and tags.dataset = '{dataset}'", max_results=1
    )
    champion = holders[0] if holders else None
    if champion is None or champion.info.run_id == run_id:
        moved, decision = True, "champion: the first evaluated run of " + dataset
    elif champion.data.tags.get("test_split") != test_split:
        moved = False
        decision = f"not compared: test split {test_split} differs from champion run " + (
            f"{champion.info.run_id}'s ({champion.data.tags.get('test_split')})"
        )
    else:
        best = champion.data.metrics[PRIMARY]
        moved, decision = _compared(score, best, f"champion run {champion.info.run_id}")
    if moved:
        if champion is not None and champion.info.run_id != run_id:
            client.set_tag(champion.info.run_id, CHAMPION, "false")
        client.set_tag(run_id, CHAMPION, "true")
    client.set_tag(run_id, "champion.decision", decision)
    log.info("run %s: %s", run_id, decision)
    return moved


def log_archive(registered: Registered, archive: Path, model_sha: str) -> str:
    """Log the TorchServe archive once per checkpoint (`model_sha`): to the run holding this
    evaluation, unless a run already holds an archive of the same weights, which is then
    referenced. Tags the registered version (if any) with where it is; returns its URI."""
    client = mlflow.MlflowClient()
    run = client.get_run(registered.run_id)
    holders = client.search_runs(
        [run.info.experiment_id], f"tags.`{ARCHIVE}` != '' and tags.`{MODEL_SHA}` = '{model_sha}'"
    )
    if holders:
        uri = holders[0].data.tags[ARCHIVE]
        log.info("the archive of these weights is already logged: %s (not copied again)", uri)
    else:
        client.log_artifact(registered.run_id, str(archive), "archive")
        uri = f"runs:/{registered.run_id}/archive/{archive.name}"
        client.set_tag(registered.run_id, ARCHIVE, uri)
        client.set_tag(registered.run_id, "archive.sha256", file_sha256(archive))
        log.info("logged %s to run %s (%s)", archive, registered.run_id, uri)
    if registered.version:
        client.set_model_version_tag(registered.name, registered.version, "archive", uri)
    return uri


def _signature(decoding: Mapping[str, Any]) -> ModelSignature:
    params = [
        ParamSpec("num_beams", "long", int(decoding["num_beams"])),
        ParamSpec("max_length", "long", int(decoding["max_length"])),
        ParamSpec("length_penalty", "double", float(decoding["length_penalty"])),
        ParamSpec("no_repeat_ngram_size", "long", int(decoding["no_repeat_ngram_size"])),
    ]
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "caption"),
                ColSpec("double", "score"),
                ColSpec("boolean", "in_domain", required=False),
                ColSpec("double", "domain_distance", required=False),
            ]
        ),
        params=ParamSchema(params),
    )


def _requirements() -> list[str]:
    pins = []
    for dist in REQUIREMENTS:
        try:
            pins.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            pins.append(dist)
    return pins
