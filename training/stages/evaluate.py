"""DVC stage `evaluate`: caption the test split, score it, draw samples, log and register.

Reads artifacts/model/model.pth, data/processed/captions.json, data/features/ (the test
split's precomputed encoder features) and data/raw/ (images for the grid; scenes.json for the
synthetic content metric). Writes metrics/eval.json, reports/predictions.jsonl,
reports/samples.png, reports/attention.png (where the model looks for each word) and
reports/model_card.md. When training recorded an MLflow run (artifacts/model/mlflow.json), the
results go to that run (or to a child of it when only evaluate re-ran: training/tracking/runs.py),
the model is registered as `imgtocap-<dataset>` (training/tracking/registry.py), and
artifacts/model/registered.json says which version, for `package`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model import Captioner, decode_caption, load_checkpoint, load_tokenizer
from training.data.captions import IMAGES_DIR, SCENES_FILE
from training.data.datachecks import check_features
from training.data.synthetic import load_scenes
from training.evaluation.attention_plot import evaluate_attention
from training.evaluation.metrics import caption_metrics, content_metrics
from training.evaluation.robustness import robustness_report
from training.evaluation.samples import Sample, render_grid
from training.params import from_section, load_params, pick_device, stage_main
from training.paths import (
    ATTENTION_PATH,
    CARD_PATH,
    EVAL_METRICS_PATH,
    FEATURES_DIR,
    FEATURES_INDEX,
    MODEL_PATH,
    PREDICTIONS_PATH,
    PROCESSED_PATH,
    RAW_DIR,
    REGISTERED_PATH,
    ROBUSTNESS_PATH,
    RUN_FILE,
    SAMPLES_PATH,
)
from training.tracking import registry
from training.tracking import runs as tracking
from training.tracking.model_card import CardFacts, model_card
from training.tracking.registry import Registered, register_model

log = logging.getLogger(__name__)

DECODING = ("num_beams", "max_length", "length_penalty")


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml `evaluate:`: how test captions are decoded and how many the grid shows."""

    num_beams: int = 3
    max_length: int = 20  # generated tokens at most, [SEP] included
    length_penalty: float = 1.0
    batch_size: int = 32
    grid_images: int = 16
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for name in ("num_beams", "max_length", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"evaluate.{name} must be an integer >= 1, got {getattr(self, name)!r}"
                )
        if self.grid_images < 1:  # reports/samples.png is a declared output: always drawn
            raise ValueError(f"evaluate.grid_images must be >= 1, got {self.grid_images}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> EvaluateConfig:
        """Build from params.yaml's `evaluate:` mapping; an unknown key is an error."""
        return from_section(cls, values, "evaluate")

    def decoding(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in DECODING}


def evaluate(
    cfg: EvaluateConfig,
    model_path: str | Path,
    processed_path: str | Path,
    features_dir: str | Path,
    raw_dir: str | Path,
    out_metrics: str | Path,
    out_predictions: str | Path,
    out_grid: str | Path,
    out_attention: str | Path | None = None,
    *,
    params: Mapping[str, Any] | None = None,
    out_card: str | Path | None = None,
    out_registered: str | Path | None = None,
    out_robustness: str | Path | None = None,
) -> dict[str, Any]:
    """Caption the test split; write metrics, predictions, the sample grid and the attention
    figure (`out_attention`, default attention.png beside the grid); return the metrics.

    `params` (all of params.yaml) is recorded with the run and names the dataset; the model
    card and the registered version are written to `out_card` / `out_registered` when given.
    Synthetic data also gets the robustness report (training.evaluation.robustness), its captions in
    `out_robustness` (default: robustness.jsonl beside the predictions).
    """
    model_path, raw_dir = Path(model_path), Path(raw_dir)
    device = pick_device(cfg.device)
    model = load_checkpoint(model_path, device)
    tokenizer = load_tokenizer(model.config.tokenizer)
    test = _test_split(Path(processed_path))
    grid = _test_features(Path(features_dir), [entry["image"] for entry in test], model)

    start = time.perf_counter()
    captions, scores = _caption(model, tokenizer, grid, cfg, device)
    seconds = time.perf_counter() - start
    images = [entry["image"] for entry in test]
    predictions = dict(zip(images, captions))
    references = {entry["image"]: entry["captions"] for entry in test}
    log.info("captioned %d test images in %.1f s; scoring", len(images), seconds)

    metrics: dict[str, Any] = caption_metrics(predictions, references)
    flags: dict[str, dict[str, bool | None]] = {}
    out_robustness = Path(out_robustness or Path(out_predictions).with_name(ROBUSTNESS_PATH.name))
    out_robustness.parent.mkdir(parents=True, exist_ok=True)
    out_robustness.write_text("")  # stays empty without perturbed copies (a DVC output always)
    if (raw_dir / SCENES_FILE).is_file():  # synthetic data: captions can be checked for content
        scenes = load_scenes(raw_dir)
        rates, flags = content_metrics(predictions, scenes)
        metrics.update(rates)
        metrics.update(
            robustness_report(
                Path(features_dir),
                images,
                scenes,
                lambda copies: _caption(model, tokenizer, copies, cfg, device)[0],
                out_robustness,
            )
        )
    metrics = {key: round(value, 4) for key, value in metrics.items()}
    metrics.update(
        num_images=len(images),
        **cfg.decoding(),
        decode_seconds=round(seconds, 2),
        captions_per_second=round(len(images) / max(seconds, 1e-9), 2),
    )

    _write_json(Path(out_metrics), metrics)
    _write_predictions(Path(out_predictions), images, captions, scores, references, flags)
    samples = [
        Sample(image, predictions[image], references[image], flags.get(image, {}).get("correct"))
        for image in images[: cfg.grid_images]
    ]
    render_grid(samples, raw_dir / IMAGES_DIR, Path(out_grid), _grid_title(metrics))
    out_attention = Path(out_attention or Path(out_grid).with_name(ATTENTION_PATH.name))
    evaluate_attention(
        model, tokenizer, images, grid, raw_dir, out_attention, cfg.decoding(), device
    )
    log.info("test metrics: %s", ", ".join(f"{k} {v}" for k, v in metrics.items()))

    outputs = [Path(out_metrics), Path(out_predictions), Path(out_grid), out_attention]
    outputs += [out_robustness] if out_robustness.stat().st_size else []
    facts = _card_facts(model, Path(processed_path), raw_dir, test, metrics, cfg, params or {})
    registered = track(
        model_path.parent / RUN_FILE.name, model_path, metrics, outputs, cfg, facts, params or {}
    )
    if out_card is not None:
        card = model_card(facts, registered.name, registered.version)
        Path(out_card).parent.mkdir(parents=True, exist_ok=True)
        Path(out_card).write_text(card, encoding="utf-8")
    if out_registered is not None:
        registered.save(Path(out_registered))
    return metrics


def _card_facts(
    model: Captioner,
    processed_path: Path,
    raw_dir: Path,
    test: list[dict[str, Any]],
    metrics: dict[str, Any],
    cfg: EvaluateConfig,
    params: Mapping[str, Any],
) -> CardFacts:
    """What the model card and the registry say about this model and its evaluation."""
    splits = json.loads(processed_path.read_text(encoding="utf-8"))["splits"]
    execution = tracking.Execution.current()
    return CardFacts(
        dataset=tracking.dataset_name(params.get("data")),
        config=model.config.to_dict(),
        parameters=sum(p.numel() for p in model.parameters()),
        images={split: len(entries) for split, entries in splits.items()},
        test_split=registry.split_fingerprint(test, raw_dir / IMAGES_DIR),
        metrics=metrics,
        decoding=cfg.decoding(),
        preset=str((params.get("model") or {}).get("preset", "")),
        commit=execution.commit,
        experiment=execution.experiment,
    )


def track(
    run_file: Path,
    model_path: Path,
    metrics: dict[str, Any],
    files: list[Path],
    cfg: EvaluateConfig,
    facts: CardFacts,
    params: Mapping[str, Any],
) -> Registered:
    """Log the results to this execution's MLflow run, register the model and move the
    champion alias if it wins; returns the registered version (empty without tracking).

    Tracking is a record, not a result: any failure (server unreachable, registry refused) is
    logged as a warning and the stage still succeeds with its local outputs.
    """
    run_id = tracking.load_run_id(run_file)
    if run_id is None:
        log.info(
            "no MLflow run recorded in %s (training ran without tracking): not logging", run_file
        )
        return Registered()
    down = tracking.unreachable_server()
    if down:  # MLflow's client would retry for ~4 minutes before giving up
        log.warning(
            "MLflow server %s does not answer: the evaluation is not logged to run %s (its "
            "files are written). Start the server or fix MLFLOW_TRACKING_URI, then run "
            "`dvc repro -f evaluate` to log it.",
            down,
            run_id,
        )
        return Registered()
    scores = {k: v for k, v in metrics.items() if k not in DECODING}
    failure: Exception | None = None
    registered = Registered()
    try:
        with tracking.evaluation_run(run_id, params) as active:
            try:  # caught inside the run: MLflow would otherwise mark training's run FAILED
                registered = _log_and_register(
                    model_path, scores, files, cfg, facts, active.info.run_id, run_id
                )
            except Exception as exc:
                failure = exc
    except Exception as exc:  # the store itself: unreachable, refused, misconfigured
        failure = exc
    if failure is not None:
        log.warning(
            "MLflow logging failed (%s: %s); the evaluation's files are written, the run %s and "
            "the registry may be incomplete. Check MLFLOW_TRACKING_URI (now %s).",
            type(failure).__name__,
            failure,
            run_id,
            _tracking_uri(),
        )
        return registered
    log.info(
        "MLflow: test metrics logged, model registered as %s version %s (run %s)",
        registered.name,
        registered.version,
        registered.run_id,
    )
    return registered


def _log_and_register(
    model_path: Path,
    scores: dict[str, Any],
    files: list[Path],
    cfg: EvaluateConfig,
    facts: CardFacts,
    run_id: str,
    train_run: str,
) -> Registered:
    """In the active run: the metrics (named as in eval.json), the files, the registered model
    with its card, the champion decision."""
    mlflow = tracking.mlflow  # imported there, after telemetry is switched off
    mlflow.log_metrics({k: float(v) for k, v in scores.items()})
    mlflow.set_tag(tracking.EVALUATED, "true")
    for path in files:
        mlflow.log_artifact(str(path), artifact_path="evaluation")
    name = registry.registered_name(facts.dataset)
    tags = {
        "dataset": facts.dataset,
        "preset": facts.preset,
        "test_split": facts.test_split,
        "git.commit": facts.commit or "",
        "dvc.experiment": facts.experiment or "",
        "train_run": train_run,
    }
    version = register_model(model_path, scores, cfg.decoding(), name, tags)
    registry.promote(name, version, float(scores[registry.PRIMARY]), facts.test_split)
    registry.attach_card(name, version, run_id, model_card(facts, name, version))
    return Registered(name, version, run_id)


def _caption(
    model: Captioner, tokenizer: Any, grid: np.ndarray, cfg: EvaluateConfig, device: torch.device
) -> tuple[list[str], list[float]]:
    """Batched decoding of precomputed grid features (n, N, C) -> captions and scores."""
    captions: list[str] = []
    scores: list[float] = []
    with tqdm(total=len(grid), desc="captioning test images", unit="img") as bar:
        for start in range(0, len(grid), cfg.batch_size):
            batch = torch.from_numpy(np.array(grid[start : start + cfg.batch_size]))  # a copy
            out = model.generate(
                grid=batch.to(device, torch.float32),  # (B, N, C)
                num_beams=cfg.num_beams,
                max_length=cfg.max_length,
                length_penalty=cfg.length_penalty,
            )
            captions += [decode_caption(tokenizer, ids) for ids in out.tokens]
            scores += out.scores
            bar.update(len(batch))
    return captions, scores


def _test_split(processed_path: Path) -> list[dict[str, Any]]:
    if not processed_path.is_file():
        raise FileNotFoundError(f"{processed_path} not found: run `dvc repro preprocess` first")
    test = json.loads(processed_path.read_text(encoding="utf-8"))["splits"].get("test") or []
    if not test:
        raise ValueError(
            f"the test split in {processed_path} is empty: raise preprocess.test_fraction in "
            "params.yaml (or provide a test split) and run `dvc repro`"
        )
    return test


def _test_features(features_dir: Path, images: list[str], model: Captioner) -> np.ndarray:
    """Rows of data/features/test.npy in `images` order, checked against the model's encoder."""
    index_path, array_path = features_dir / FEATURES_INDEX, features_dir / "test.npy"
    if not index_path.is_file() or not array_path.is_file():
        raise FileNotFoundError(f"{index_path} or {array_path} missing: run `dvc repro transform`")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    spec = model.encoder.spec
    check_features(index, model.config.encoder, features_dir)
    features = np.load(array_path, mmap_mode="r")
    if features.shape[1:] != (spec.grid * spec.grid, spec.channels):
        raise ValueError(
            f"{array_path} has shape {features.shape}, expected (n, {spec.grid**2}, "
            f"{spec.channels}) for the {model.config.encoder!r} encoder: run `dvc repro`"
        )
    row_of = {name: i for i, name in enumerate(index["splits"]["test"])}
    missing = [name for name in images if name not in row_of]
    if missing:
        raise ValueError(
            f"{len(missing)} test image(s) have no features in {features_dir}, e.g. "
            f"{missing[:3]}: preprocess and transform are out of step; run `dvc repro`"
        )
    rows = [row_of[name] for name in images]
    if rows == list(range(len(rows))):
        return features[: len(rows)]  # same order: stay memory-mapped
    return features[rows]


def _write_predictions(
    path: Path,
    images: list[str],
    captions: list[str],
    scores: list[float],
    references: dict[str, list[str]],
    flags: dict[str, dict[str, bool | None]],
) -> None:
    """One JSON line per test image: caption, score, references and (synthetic) content flags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for image, caption, score in zip(images, captions, scores):
            line: dict[str, Any] = {
                "image": image,
                "caption": caption,
                "score": round(score, 4),
                "references": references[image],
            }
            if image in flags:
                line["correct"] = flags[image]["correct"]
                line["content"] = {k: v for k, v in flags[image].items() if k != "correct"}
            f.write(json.dumps(line) + "\n")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _grid_title(metrics: dict[str, Any]) -> str:
    parts = [f"BLEU-4 {metrics['bleu4']:.3f}", f"CIDEr {metrics['cider']:.3f}"]
    if "content_accuracy" in metrics:
        parts.append(f"content accuracy {metrics['content_accuracy']:.3f}")
    return (
        f"imgtocap test samples \u2014 {', '.join(parts)} on {metrics['num_images']} images "
        f"(beam {metrics['num_beams']})"
    )


def _tracking_uri() -> str:
    return tracking.mlflow.get_tracking_uri()


@stage_main
def main() -> None:
    """Evaluate artifacts/model/model.pth on the test split with params.yaml's `evaluate:`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    evaluate(
        EvaluateConfig.from_dict(params.get("evaluate")),
        MODEL_PATH,
        PROCESSED_PATH,
        FEATURES_DIR,
        RAW_DIR,
        EVAL_METRICS_PATH,
        PREDICTIONS_PATH,
        SAMPLES_PATH,
        ATTENTION_PATH,
        params=params,
        out_card=CARD_PATH,
        out_registered=REGISTERED_PATH,
        out_robustness=ROBUSTNESS_PATH,
    )


if __name__ == "__main__":
    main()
