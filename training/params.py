"""Read `params.yaml`, the one place a user overrides the pipeline's settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import torch
import yaml

from model import CaptionerConfig, preset


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


def from_section(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """A params dataclass from its params.yaml mapping (`where`, e.g. "serve"), nested
    dataclasses included; an unknown key is an error naming the known ones, never ignored."""
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ValueError(f"{where} in params.yaml must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {where} key(s) {unknown} in params.yaml; known keys: {known}")
    return cls(
        **{
            k: from_section(hints[k], v, f"{where}.{k}") if is_dataclass(hints[k]) else v
            for k, v in values.items()
        }
    )


def captioner_config(params: dict[str, Any]) -> CaptionerConfig:
    """The model params (preset + encoder/fusion + overrides) resolved into a CaptionerConfig."""
    section = dict(params.get("model") or {})
    name = section.pop("preset", "offline")
    overrides = dict(section.pop("overrides", None) or {})
    section.pop("output_vocab", None)  # filled from the data by the define stage
    for key in ("encoder", "fusion"):
        if section.get(key) is not None:
            overrides[key] = section[key]
        section.pop(key, None)
    if section:
        raise ValueError(
            f"unknown key(s) {sorted(section)} under model: in params.yaml; use preset, encoder, "
            "fusion, or put CaptionerConfig fields under model.overrides"
        )
    return preset(name, **overrides)


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cpu` / `cuda` / `cuda:1` as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available: use auto or cpu")
    return device
