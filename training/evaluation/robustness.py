"""The robustness report: content accuracy on perturbed copies of the synthetic test split.

The transform stage encodes one copy of every test image per perturbation
(training.data.augment.PERTURBATIONS: JPEG 30-60, down- and up-scaled, padded, cropped, brightness,
another canvas size, mirrored); here the model captions each set of copies as it captions the
test split, and each caption is checked against the scene its copy shows (a mirrored copy's
"left of" is the original's "right of"). One number per perturbation, `robust_<name>`, and
their minimum, `robust_min`; every caption goes to reports/robustness.jsonl.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from training.data.augment import PERTURBATIONS
from training.data.synthetic import Scene
from training.evaluation.metrics import content_metrics
from training.paths import FEATURES_INDEX, ROBUST_DIR

log = logging.getLogger(__name__)


def robustness_report(
    features_dir: Path,
    images: list[str],
    scenes: Mapping[str, Scene],
    caption: Callable[[np.ndarray], list[str]],
    out_path: Path,
) -> dict[str, float]:
    """Caption every perturbed copy of the test `images` with `caption` (grids (n, N, C) ->
    captions); write each to `out_path`; returns {robust_<name>: content accuracy, robust_min}.

    Empty when transform encoded no copies (transform.robustness: false, or not synthetic data).
    """
    index = json.loads((features_dir / FEATURES_INDEX).read_text(encoding="utf-8"))
    names = index.get("robustness", {}).get("perturbations", [])
    if not names:
        log.info("no perturbed test copies in %s: no robustness report", features_dir)
        return {}
    unknown = [name for name in names if name not in PERTURBATIONS]
    if unknown:
        raise ValueError(
            f"{features_dir / FEATURES_INDEX} lists perturbations {unknown} this code does not "
            f"know ({list(PERTURBATIONS)}): run `dvc repro` so transform re-encodes them"
        )
    row_of = {name: i for i, name in enumerate(index["splits"]["test"])}
    missing = [image for image in images if image not in row_of]
    if missing:
        raise ValueError(
            f"{len(missing)} test image(s) have no perturbed copies in {features_dir}, e.g. "
            f"{missing[:3]}: run `dvc repro` so transform and preprocess agree"
        )
    rows = [row_of[image] for image in images]
    report: dict[str, float] = {}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for name in names:
            grid = np.load(features_dir / ROBUST_DIR / f"{name}.npy", mmap_mode="r")[rows]
            captions = caption(grid)
            expected = {
                i: scenes[i].mirrored() if PERTURBATIONS[name] else scenes[i] for i in images
            }
            rates, flags = content_metrics(dict(zip(images, captions)), expected)
            report[f"robust_{name}"] = rates["content_accuracy"]
            for image, text in zip(images, captions):
                line = {"perturbation": name, "image": image, "caption": text}
                line.update(correct=flags[image]["correct"], relation=expected[image].relation)
                f.write(json.dumps(line) + "\n")
            log.info("robustness %s: content accuracy %.3f", name, rates["content_accuracy"])
    report["robust_min"] = min(report.values())
    return report
