"""Is an image like the training images? Mahalanobis distance of its pooled encoder features.

Fitted once by the `domain` stage on the training images' frozen-encoder features (each image
and its augmented views), its threshold chosen on the validation split so that `quantile` of
in-domain images pass; stored beside the checkpoint (`domain.pt`) and in the .mar. The
covariance is shrunk toward a multiple of the identity: 4,500 images do not pin down
1,600 x 1,600 covariances, and the unshrunk inverse calls every new image far
(docs/results.md has the measurements that chose it over k-nearest-neighbour distance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FILENAME = "domain.pt"  # beside the checkpoint, and in the .mar


@dataclass(frozen=True)
class DomainCheck:
    """The training features' mean (C,), shrunk precision matrix (C, C) and the distance
    threshold: an image whose distance is <= threshold is in domain."""

    mean: torch.Tensor
    precision: torch.Tensor
    threshold: float

    def distance(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, C) -> Mahalanobis distance per image (B,), per dimension's
        square root scale (divided by sqrt(C)) so that numbers read alike across encoders."""
        x = pooled.float().cpu() - self.mean  # (B, C)
        squared = ((x @ self.precision) * x).sum(dim=1)  # (B,)
        return (squared.clamp_min(0) / x.shape[1]).sqrt()

    def save(self, path: str | Path) -> None:
        torch.save(
            {"mean": self.mean, "precision": self.precision, "threshold": self.threshold}, path
        )

    @classmethod
    def read(cls, path: str | Path) -> DomainCheck:
        """A saved check, read weights-only."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        return cls(state["mean"], state["precision"], float(state["threshold"]))


def pooled_features(grid: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Grid features (..., N, C), fp16 or fp32 -> pooled (M, C) fp32, every leading axis flattened."""
    grid = torch.as_tensor(np.asarray(grid, dtype=np.float32))
    return grid.mean(dim=-2).reshape(-1, grid.shape[-1])  # (M, C)


def fit(train: torch.Tensor, val: torch.Tensor, shrinkage: float, quantile: float) -> DomainCheck:
    """Fit on training pooled features (M, C); threshold: the `quantile` of the validation
    images' (V, C) distances, so that that fraction of in-domain images pass."""
    mean = train.double().mean(dim=0)  # (C,)
    centred = train.double() - mean
    cov = centred.T @ centred / max(1, len(train) - 1)  # (C, C)
    target = torch.eye(cov.shape[0], dtype=cov.dtype) * cov.diagonal().mean()
    precision = torch.linalg.inv((1 - shrinkage) * cov + shrinkage * target)
    check = DomainCheck(mean.float(), precision.float(), float("inf"))
    # "higher": the threshold is a validation distance, and at least `quantile` of them pass
    threshold = float(
        torch.quantile(check.distance(val).double(), quantile, interpolation="higher")
    )
    return DomainCheck(check.mean, check.precision, threshold)


def read_beside(checkpoint: str | Path) -> DomainCheck | None:
    """The check saved beside a checkpoint, or None when there is none (a model trained
    before the check existed, or a checkpoint copied alone)."""
    path = Path(checkpoint).with_name(FILENAME)
    return DomainCheck.read(path) if path.is_file() else None
