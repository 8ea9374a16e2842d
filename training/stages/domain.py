"""DVC stage `domain`: the in-domain check every caption carries (model/domain.py).

Fitted right after transform, on its features alone: the check describes the frozen encoder's
view of the training images, not the trained decoder, so it is not re-fitted when training
params change, and it runs in seconds. The training images and their augmented views (the
variation the model was trained to caption) are the density; the threshold is the validation
split's `quantile` distance, so that that fraction of in-domain images pass.

Writes `artifacts/finetune/domain.pt` (beside the model evaluate and package read, where `model.load` finds it; package puts
it in the .mar) and `metrics/domain.json` (threshold and counts).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.domain import FILENAME, fit, pooled_features
from training.params import from_section, load_params, stage_main
from training.paths import (
    DOMAIN_METRICS_PATH,
    DOMAIN_PATH,
    FEATURES_DIR,
    FINETUNED_PATH,
    TRAIN_VIEWS,
)

log = logging.getLogger(__name__)

# `model.load` looks beside the checkpoint: the one evaluate, track and package read
if FINETUNED_PATH.with_name(FILENAME) != DOMAIN_PATH:
    raise AssertionError(f"{DOMAIN_PATH} must lie beside {FINETUNED_PATH}, named {FILENAME}")


@dataclass(frozen=True)
class DomainConfig:
    """params.yaml `domain:`: covariance shrinkage and the validation quantile that passes."""

    shrinkage: float = 0.01  # toward a multiple of the identity (bench/domain.py chose it)
    quantile: float = 0.99  # of validation images called in domain

    def __post_init__(self) -> None:
        if not 0 < self.shrinkage <= 1:
            raise ValueError(f"domain.shrinkage must be in (0, 1], got {self.shrinkage}")
        if not 0 < self.quantile <= 1:
            raise ValueError(f"domain.quantile must be in (0, 1], got {self.quantile}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> DomainConfig:
        """Build from params.yaml's `domain:` mapping; an unknown key is an error."""
        return from_section(cls, values, "domain")


def domain(cfg: DomainConfig, features: Path, out: Path, metrics: Path) -> dict[str, Any]:
    """Fit the check on `features` (transform's folder), save it to `out`, its numbers to `metrics`."""
    train = pooled_features(np.load(features / "train.npy", mmap_mode="r"))
    views = features / TRAIN_VIEWS
    if views.is_file():
        train = torch.cat([train, pooled_features(np.load(views, mmap_mode="r"))])
    val = pooled_features(np.load(features / "val.npy", mmap_mode="r"))
    if len(val) == 0:
        raise ValueError(
            f"{features}/val.npy holds no images: the threshold is chosen on the validation "
            "split; raise preprocess.val_fraction and run dvc repro"
        )
    check = fit(train, val, cfg.shrinkage, cfg.quantile)
    out.parent.mkdir(parents=True, exist_ok=True)
    check.save(out)
    summary = {
        "threshold": round(check.threshold, 4),
        "train_vectors": len(train),
        "val_in_domain": round(float((check.distance(val) <= check.threshold).float().mean()), 4),
    }
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(summary, indent=2) + "\n")
    log.info("in-domain threshold %.3f from %d training vectors", check.threshold, len(train))
    return summary


@stage_main
def main() -> None:
    """`python -m training.stages.domain`: data/features -> artifacts/finetune/domain.pt."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = DomainConfig.from_dict(load_params().get("domain"))
    domain(cfg, FEATURES_DIR, DOMAIN_PATH, DOMAIN_METRICS_PATH)


if __name__ == "__main__":
    main()
