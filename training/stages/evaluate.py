"""DVC stage `evaluate`: caption the test split, score it, draw samples, write the model card.

Reads artifacts/finetune/model.pth (train's model, or its self-critical fine-tuning),
data/processed/captions.json, data/features/ (the test
split's precomputed encoder features) and data/raw/ (images for the grid; scenes.json for the
synthetic content metric). Writes metrics/eval.json, reports/predictions.jsonl,
reports/samples.png, reports/attention.png (where the model looks for each word) and
reports/model_card.md. Logging to MLflow and registering is the `track` stage's
(training/tracking/publish.py), which always runs: DVC may restore this stage from its cache.
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
from tqdm import tqdm

from model import Caption, Captioner, CaptionPipeline, Decoding, load
from model.options import CPU_DECODER
from training.data.captions import IMAGES_DIR, SCENES_FILE
from training.data.datachecks import check_feature_rows, check_features
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
    FINETUNED_PATH,
    PREDICTIONS_PATH,
    PROCESSED_PATH,
    RAW_DIR,
    ROBUSTNESS_PATH,
    SAMPLES_PATH,
)
from training.tracking import registry
from training.tracking import runs as tracking
from training.tracking.model_card import CardFacts, model_card

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluateConfig:
    """params.yaml `evaluate:`: how test captions are decoded and how many the grid shows."""

    num_beams: int = Decoding.num_beams
    max_length: int = Decoding.max_length  # generated tokens at most, [SEP] included
    length_penalty: float = Decoding.length_penalty
    no_repeat_ngram_size: int = Decoding.no_repeat_ngram_size  # 0: off
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

    def decoding(self) -> Decoding:
        return Decoding(
            self.num_beams, self.max_length, self.length_penalty, self.no_repeat_ngram_size
        )


@dataclass(frozen=True)
class EvalPaths:
    """What evaluate reads (the model, the test split, its features, the raw images) and
    writes; the defaults are the pipeline's (training/paths.py)."""

    model: Path = FINETUNED_PATH
    processed: Path = PROCESSED_PATH
    features: Path = FEATURES_DIR
    raw: Path = RAW_DIR
    metrics: Path = EVAL_METRICS_PATH
    predictions: Path = PREDICTIONS_PATH
    robustness: Path = ROBUSTNESS_PATH  # empty without perturbed copies (a DVC output always)
    samples: Path = SAMPLES_PATH
    attention: Path = ATTENTION_PATH
    card: Path = CARD_PATH


def evaluate(
    cfg: EvaluateConfig, paths: EvalPaths, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Caption the test split; write the metrics, predictions, robustness captions, sample grid,
    attention figure, model card and registered version to `paths`; return the metrics.

    `params` (all of params.yaml) is recorded with the run and names the dataset.
    """
    params = params or {}
    captioner = load(paths.model, pick_device(cfg.device), cpu_decoder=_cpu_decoder(params))
    test = _test_split(paths.processed)
    images = [entry["image"] for entry in test]
    references = {entry["image"]: entry["captions"] for entry in test}
    features = _test_features(paths.features, images, captioner.model)

    start = time.perf_counter()
    results = _caption(captioner, features, cfg)
    seconds = time.perf_counter() - start
    log.info("captioned %d test images in %.1f s; scoring", len(images), seconds)
    predictions = {image: r.caption for image, r in zip(images, results)}

    metrics, flags = _score(captioner, cfg, paths, images, predictions, references)
    metrics.update(
        num_images=len(images),  # the decoding settings are params (evaluate.*), not metrics
        decode_seconds=round(seconds, 2),
        captions_per_second=round(len(images) / max(seconds, 1e-9), 2),
    )
    _write_reports(captioner, cfg, paths, images, results, references, metrics, flags, features)
    log.info("test metrics: %s", ", ".join(f"{k} {v}" for k, v in metrics.items()))
    _publish(captioner, cfg, paths, test, metrics, params)
    return metrics


def _score(
    captioner: CaptionPipeline,
    cfg: EvaluateConfig,
    paths: EvalPaths,
    images: list[str],
    predictions: dict[str, str],
    references: dict[str, list[str]],
) -> tuple[dict[str, Any], dict[str, dict[str, bool | None]]]:
    """The caption metrics; on synthetic data (scenes known) also content accuracy, per image
    its content flags, and the robustness report (its captions written to paths.robustness)."""
    metrics: dict[str, Any] = caption_metrics(predictions, references)
    flags: dict[str, dict[str, bool | None]] = {}
    paths.robustness.parent.mkdir(parents=True, exist_ok=True)
    paths.robustness.write_text("")  # stays empty without perturbed copies (a DVC output always)
    if (paths.raw / SCENES_FILE).is_file():  # synthetic data: captions can be checked for content
        scenes = load_scenes(paths.raw)
        rates, flags = content_metrics(predictions, scenes)
        metrics.update(rates)
        metrics.update(
            robustness_report(
                paths.features,
                images,
                scenes,
                lambda copies: [r.caption for r in _caption(captioner, copies, cfg)],
                paths.robustness,
            )
        )
    return {key: round(value, 4) for key, value in metrics.items()}, flags


def _write_reports(
    captioner: CaptionPipeline,
    cfg: EvaluateConfig,
    paths: EvalPaths,
    images: list[str],
    results: list[Caption],
    references: dict[str, list[str]],
    metrics: dict[str, Any],
    flags: dict[str, dict[str, bool | None]],
    features: np.ndarray,
) -> None:
    """eval.json, predictions.jsonl, the sample grid and the attention figure."""
    _write_json(paths.metrics, metrics)
    _write_predictions(paths.predictions, images, results, references, flags)
    samples = [
        Sample(image, r.caption, references[image], flags.get(image, {}).get("correct"))
        for image, r in zip(images[: cfg.grid_images], results)
    ]
    render_grid(samples, paths.raw / IMAGES_DIR, paths.samples, _grid_title(metrics, cfg.num_beams))
    evaluate_attention(captioner, images, features, paths.raw, paths.attention, cfg.decoding())


def _publish(
    captioner: CaptionPipeline,
    cfg: EvaluateConfig,
    paths: EvalPaths,
    test: list[dict[str, Any]],
    metrics: dict[str, Any],
    params: Mapping[str, Any],
) -> None:
    """The model card (`track` adds the registered version when it logs it: stages/track.py)."""
    facts = _card_facts(captioner.model, paths.processed, paths.raw, test, metrics, cfg, params)
    paths.card.parent.mkdir(parents=True, exist_ok=True)
    paths.card.write_text(model_card(facts), encoding="utf-8")


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
        decoding={**cfg.decoding().to_dict(), "cpu_decoder": _cpu_decoder(params)},
        preset=str((params.get("model") or {}).get("preset", "")),
        commit=execution.commit,
        experiment=execution.experiment,
    )


def _caption(
    captioner: CaptionPipeline, features: np.ndarray, cfg: EvaluateConfig
) -> list[Caption]:
    """Precomputed grid features (n, N, C) -> their captions, cfg.batch_size at a time."""
    results: list[Caption] = []
    with tqdm(total=len(features), desc="captioning test images", unit="img") as bar:
        for start in range(0, len(features), cfg.batch_size):
            batch = features[start : start + cfg.batch_size]
            results += captioner.caption_features(batch, cfg.decoding())
            bar.update(len(batch))
    return results


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
    check_feature_rows(features, f"the test split ({array_path})")
    if rows == list(range(len(rows))):
        return features[: len(rows)]  # same order: stay memory-mapped
    return features[rows]


def _write_predictions(
    path: Path,
    images: list[str],
    results: list[Caption],
    references: dict[str, list[str]],
    flags: dict[str, dict[str, bool | None]],
) -> None:
    """One JSON line per test image: caption, score, references and (synthetic) content flags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for image, result in zip(images, results):
            line: dict[str, Any] = {
                "image": image,
                **result.to_json(),  # caption, score
                "references": references[image],
            }
            if image in flags:
                line["correct"] = flags[image]["correct"]
                line["content"] = {k: v for k, v in flags[image].items() if k != "correct"}
            f.write(json.dumps(line) + "\n")


def _cpu_decoder(params: Mapping[str, Any]) -> str:
    """How the archive runs the decoder on a CPU (params.yaml serve.cpu_decoder): evaluate
    captions the same way, and the MLflow model loads it the same way."""
    return (params.get("serve") or {}).get("cpu_decoder", CPU_DECODER)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _grid_title(metrics: dict[str, Any], num_beams: int) -> str:
    parts = [f"BLEU-4 {metrics['bleu4']:.3f}", f"CIDEr {metrics['cider']:.3f}"]
    if "content_accuracy" in metrics:
        parts.append(f"content accuracy {metrics['content_accuracy']:.3f}")
    return (
        f"imgtocap test samples \u2014 {', '.join(parts)} on {metrics['num_images']} images "
        f"(beam {num_beams})"
    )


@stage_main
def main() -> None:
    """Evaluate artifacts/finetune/model.pth on the test split with params.yaml's `evaluate:`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    params = load_params()
    evaluate(EvaluateConfig.from_dict(params.get("evaluate")), EvalPaths(), params)


if __name__ == "__main__":
    main()
