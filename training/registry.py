"""Register an evaluated checkpoint in the MLflow Model Registry as a pyfunc that captions images.

Why a pyfunc from code (training/mlflow_model.py) and not `mlflow.pytorch.log_model`: the
pytorch flavour either traces with torch.export (beam search with a KV cache does not export)
or pickles the whole nn.Module (loading then needs this repository on the path, and pickles
break across code changes). The pyfunc carries the weights-only checkpoint, the tokenizer files
and the `model/` code, and its `predict` takes image bytes and returns captions: the same
contract as the TorchServe endpoint, so `models:/imgtocap/<n>` is directly usable.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # as training/tracking.py: before mlflow

import mlflow  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # noqa: E402

import model as model_package  # noqa: E402
from model import read_checkpoint  # noqa: E402
from model.tokenizer import save_tokenizer  # noqa: E402

log = logging.getLogger(__name__)

REGISTERED_NAME = "imgtocap"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")
MODEL_PACKAGE = Path(model_package.__file__).parent
# What loading the pyfunc imports (see mlflow_model.py); pinned to the versions evaluated with.
REQUIREMENTS = ("mlflow", "torch", "torchvision", "transformers", "pillow", "numpy", "pandas")


def register_model(
    checkpoint: Path,
    metrics: dict[str, float],
    decoding: dict[str, Any],
    name: str = REGISTERED_NAME,
) -> str:
    """Log the checkpoint as a pyfunc in the active run and register it; returns the version."""
    config = read_checkpoint(checkpoint)["config"]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        save_tokenizer(config["tokenizer"], tokenizer_dir)
        with warnings.catch_warnings():
            # the explicit signature says what an input example would (image bytes in JSON)
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"checkpoint": str(checkpoint), "tokenizer": str(tokenizer_dir)},
                code_paths=[str(MODEL_PACKAGE)],
                model_config=dict(decoding),
                signature=_signature(decoding),
                pip_requirements=_requirements(),  # explicit: skips MLflow's slow dependency scan
                registered_model_name=name,
            )
    version_ = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in {**metrics, **{f"decode.{k}": v for k, v in decoding.items()}}.items():
        client.set_model_version_tag(name, version_, key, str(value))
    client.update_model_version(name, version_, description=describe(metrics, decoding))
    log.info("registered %s version %s (%s)", name, version_, info.model_uri)
    return version_


def describe(metrics: dict[str, float], decoding: dict[str, Any]) -> str:
    """One line for the registry: the headline test metrics and how captions were decoded."""
    parts = [f"{label} {metrics[key]:.3f}" for key, label in _HEADLINE if key in metrics]
    return (
        f"Test split, {metrics['num_images']} images: "
        + ", ".join(parts)
        + f" (beam {decoding.get('num_beams')}, max length {decoding.get('max_length')})"
    )


_HEADLINE = (
    ("bleu4", "BLEU-4"),
    ("meteor", "METEOR"),
    ("rouge_l", "ROUGE-L"),
    ("cider", "CIDEr"),
    ("content_accuracy", "content accuracy"),
)


def _signature(decoding: dict[str, Any]) -> ModelSignature:
    params = [
        ParamSpec("num_beams", "long", int(decoding["num_beams"])),
        ParamSpec("max_length", "long", int(decoding["max_length"])),
        ParamSpec("length_penalty", "double", float(decoding["length_penalty"])),
    ]
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "caption"), ColSpec("double", "score")]),
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
