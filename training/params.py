"""Read `params.yaml`, the one place a user overrides the pipeline's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load params.yaml as a dict; a missing or non-mapping file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.resolve()} not found: run the stage from the repository root "
            "(where params.yaml lives), e.g. `python -m training.ingest` or `dvc repro`"
        )
    params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(params, dict):
        raise ValueError(
            f"{path} must hold a YAML mapping (key: value), got {type(params).__name__}"
        )
    return params
