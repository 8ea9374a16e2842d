"""Read `params.yaml`, the one place a user overrides the pipeline's settings.

Each section is one dataclass whose defaults equal params.yaml (tests/test_params.py checks),
beside the one stage that reads it; the two sections several stages read live here, so that no
stage imports another:

| section | dataclass | read by |
|---|---|---|
| `data` | `DataConfig` (here) | source, ingest, validate (`on_invalid`) |
| `preprocess` | `training.stages.preprocess.PreprocessConfig` | preprocess |
| `transform` | `training.stages.transform.TransformConfig` | transform |
| `model` | `ModelConfig` (here), `model.weights`: `training.data.weights.WeightsConfig` | preprocess (tokenizer), transform (encoder, weights), define, train (weights) |
| `train` | `training.stages.train.TrainConfig` | train |
| `evaluate` | `training.stages.evaluate.EvaluateConfig` | evaluate |
| `serve` | `training.stages.package.ServeConfig` | package |

A stage's `main()` loads params.yaml and builds its dataclasses with `from_section`, which
refuses unknown keys and scalars of the wrong type; the stage function takes the dataclass.
Every such mistake is a `ParamsError`, and `@stage_main` turns it into one line on stderr and
exit status 2; a `training.StageError` (bad data, weights not to be had, ...) into its message and
exit status 1. Libraries raise; only a stage's `main()` exits.
Nothing here imports torch: `pick_device` imports it when called.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin, get_type_hints

import yaml

from model.config import CaptionerConfig, preset
from training import StageError
from training.data.synthetic import SyntheticConfig
from training.data.weights import WeightsConfig

if TYPE_CHECKING:
    import torch


class ParamsError(ValueError):
    """A mistake in params.yaml (unknown key, wrong type or value); the message names the key."""


def stage_main(main: Callable[[], None]) -> Callable[[], None]:
    """Decorate a stage's `main()`: a params.yaml mistake ends the stage with one actionable
    line on stderr and exit status 2, a `StageError` with its message and exit status 1; not
    with a traceback."""

    @functools.wraps(main)
    def run() -> None:
        try:
            main()
        except ParamsError as exc:
            message = str(exc)
            where = "" if "params.yaml" in message else " in params.yaml"
            print(f"error{where}: {message}", file=sys.stderr)
            raise SystemExit(2) from None
        except StageError as exc:  # as `raise SystemExit(message)` would end it
            print(exc, file=sys.stderr)
            raise SystemExit(1) from None

    return run


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load params.yaml as a dict; a missing or non-mapping file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.resolve()} not found: run the stage from the repository root "
            "(where params.yaml lives), e.g. `python -m training.stages.ingest` or `dvc repro`"
        )
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:  # one line: where, and what the parser expected
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ParamsError(f"{path}{at} is not valid YAML: {problem}") from None
    if not isinstance(params, dict):
        raise ParamsError(
            f"{path} must hold a YAML mapping (key: value), got {type(params).__name__}"
        )
    return params


def from_section(cls: type, values: Mapping[str, Any] | None, where: str) -> Any:
    """A params dataclass from its params.yaml mapping (`where`, e.g. "serve"), nested
    dataclasses included; an unknown key or a scalar of the wrong type is an error naming it.

    Mappings and lists (serve.num_beams, model.overrides) are left to the dataclass, which
    knows their shape.
    """
    values = {} if values is None else values
    if not isinstance(values, Mapping):
        raise ParamsError(f"{where} in params.yaml must be a mapping, got {values!r}")
    hints = get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ParamsError(f"unknown {where} key(s) {unknown} in params.yaml; known keys: {known}")
    built = {}
    for key, value in values.items():
        if is_dataclass(hints[key]):
            built[key] = from_section(hints[key], value, f"{where}.{key}")
        else:
            _check_scalar(value, hints[key], f"{where}.{key}")
            built[key] = value
    try:
        return cls(**built)
    except ParamsError:
        raise
    except ValueError as exc:  # the dataclass's own checks (ranges, choices)
        raise ParamsError(str(exc)) from exc


_SCALARS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    type(None): "null",
}


def _check_scalar(value: Any, hint: Any, where: str) -> None:
    """Raise when `value` is none of the scalar types `hint` allows (int, float | None, ...)."""
    allowed = get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)
    if not all(t in _SCALARS for t in allowed) or any(_is(value, t) for t in allowed):
        return
    expected = " or ".join(_SCALARS[t] for t in allowed)
    note = ""
    if float in allowed and isinstance(value, str) and _parses_as_float(value):
        note = f" (YAML reads {value} as text: write it with a dot, e.g. 1.0e-3)"
    raise ParamsError(f"{where} must be {expected}, got {value!r}{note}")


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):  # YAML's true/false are not numbers here
        return kind is bool
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def pick_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cpu` / `cuda` / `cuda:1` as given."""
    import torch  # here: the stages that need no torch (ingest, validate) import this module

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ParamsError(f"device {name!r} asked for, but CUDA is not available: use auto or cpu")
    return device


# --------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Flickr8kConfig:
    """`data.flickr8k`: a local `path`, or archives to download (checksums: null = unchecked).

    No sha256 is published for the official archives. The MD5s are the ones two independent
    public code bases check the same URLs against (an R torchvision port and a CMake fetch
    script); a sha256 is recorded on first download (training.data.download).
    """

    path: str | None = None
    images_url: str = (
        "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip"
    )
    images_sha256: str | None = None
    images_md5: str | None = "f18a1e2920de5bd84dae7cf08ec78978"
    text_url: str = (
        "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_text.zip"
    )
    text_sha256: str | None = None
    text_md5: str | None = "bf6c1abcb8e4a833b7f922104de18627"
    cache_dir: str = "data/downloads"


@dataclass(frozen=True)
class FolderConfig:
    """`data.folder`: a directory (or zip) with `Images/` + `captions.txt`."""

    path: str | None = None


@dataclass(frozen=True)
class KarpathyConfig:
    """`data.karpathy`: a Karpathy-split caption file (dataset_flickr8k.json,
    dataset_flickr30k.json, dataset_coco.json) and the folder (or zip) of the images it names."""

    json: str | None = None
    images: str | None = None


SOURCES = ("synthetic", "flickr8k", "folder", "karpathy")


@dataclass(frozen=True)
class DataConfig:
    """The `data` section of params.yaml."""

    source: str = "synthetic"  # synthetic | flickr8k | folder | karpathy
    on_invalid: str = "drop"  # drop: train on the rest | fail: stop on any problem
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    flickr8k: Flickr8kConfig = field(default_factory=Flickr8kConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    karpathy: KarpathyConfig = field(default_factory=KarpathyConfig)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source is {self.source!r}; use {', '.join(SOURCES)}")
        if self.on_invalid not in ("drop", "fail"):
            raise ValueError(f"data.on_invalid is {self.on_invalid!r}; use drop or fail")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> DataConfig:
        """Build from params.yaml's `data` mapping; an unknown key is an error."""
        return from_section(cls, data, "data")


# -------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelConfig:
    """The `model` section: a preset, optionally with its encoder, fusion or any other
    CaptionerConfig field replaced; resolved by `captioner_config()`."""

    # default (CaptionerConfig's defaults: the shipped model) | seed | base | offline | tiny
    preset: str = "default"  # model.config.PRESETS
    encoder: str | None = None  # None: the preset's
    fusion: str | None = None  # None: the preset's
    overrides: dict[str, Any] | None = field(default_factory=dict)  # CaptionerConfig fields
    # dataset: the model emits only WordPieces of the train/val captions (define fills them)
    output_vocab: str = "dataset"  # dataset | full
    # false: encoder and decoder start from random weights, a deliberate choice (tests, speed)
    pretrained: bool = True
    weights: WeightsConfig = field(default_factory=WeightsConfig)  # ResNet-50, bert-base-uncased

    def __post_init__(self) -> None:
        if self.output_vocab not in ("dataset", "full"):
            raise ValueError(f"model.output_vocab is {self.output_vocab!r}; use dataset or full")
        if self.overrides is not None and not isinstance(self.overrides, Mapping):
            raise ValueError(
                f"model.overrides must be a mapping of CaptionerConfig fields, e.g. "
                f"{{num_layers: 6}}, got {self.overrides!r}"
            )
        self.captioner_config()  # an unknown preset or field fails here, before any work

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> ModelConfig:
        """Build from params.yaml's `model` mapping; an unknown key is an error."""
        return from_section(cls, values, "model")

    def captioner_config(self) -> CaptionerConfig:
        """The preset with encoder, fusion and overrides applied (output_vocab: all ids);
        `pretrained: false` makes the decoder's weights "random" (the encoder's: transform)."""
        overrides = dict(self.overrides or {})
        for key in ("encoder", "fusion"):
            if getattr(self, key) is not None:
                overrides[key] = getattr(self, key)
        if not self.pretrained:
            overrides["decoder_weights"] = "random"
        try:
            return preset(self.preset, **overrides)
        except ValueError as exc:  # name the section: the message alone names a dataclass
            raise ValueError(f"model in params.yaml: {exc}") from exc
