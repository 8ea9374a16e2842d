"""params.yaml and its dataclasses: one per section, the same defaults, errors that name the key."""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model import CaptionerConfig, preset
from tests.helpers.project import ALWAYS, STAGES
from training import StageError
from training.params import DataConfig, ModelConfig, ParamsError, load_params, stage_main
from training.stages.domain import DomainConfig
from training.stages.evaluate import EvaluateConfig
from training.stages.finetune import FinetuneConfig
from training.stages.package import ServeConfig
from training.stages.preprocess import PreprocessConfig
from training.stages.train import TrainConfig
from training.stages.transform import TransformConfig

ROOT = Path(__file__).resolve().parents[1]
PARAMS = load_params(ROOT / "params.yaml")
SECTIONS = {
    "data": DataConfig,
    "preprocess": PreprocessConfig,
    "transform": TransformConfig,
    "domain": DomainConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "finetune": FinetuneConfig,
    "evaluate": EvaluateConfig,
    "serve": ServeConfig,
}


def test_every_section_has_its_dataclass():
    assert list(PARAMS) == list(SECTIONS)


@pytest.mark.parametrize("section", SECTIONS)
def test_a_left_out_key_means_what_params_yaml_ships(section):
    cls = SECTIONS[section]
    assert dataclasses.asdict(cls.from_dict({})) == PARAMS[section]  # nested sections too
    assert cls.from_dict(PARAMS[section]) == cls()


@pytest.mark.parametrize("section", SECTIONS)
def test_an_unknown_key_is_an_error_naming_it_and_the_known_ones(section):
    with pytest.raises(ParamsError, match=rf"unknown {section} key\(s\) \['colour'\].*known keys"):
        SECTIONS[section].from_dict({"colour": 1})


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (TrainConfig, {"epochs": "ten"}, r"^train\.epochs must be an integer, got 'ten'$"),
        (TrainConfig, {"epochs": True}, r"train\.epochs must be an integer, got True"),
        (TrainConfig, {"lr": "1e-3"}, r"train\.lr must be a number, got '1e-3' \(YAML reads"),
        (TrainConfig, {"captions_per_image": 2.5}, r"must be an integer or null, got 2\.5"),
        (TrainConfig, {"device": 0}, r"train\.device must be a string, got 0"),
        (DataConfig, {"synthetic": {"seed": "x"}}, r"data\.synthetic\.seed must be an integer"),
        (DataConfig, {"folder": "pics/"}, r"data\.folder in params\.yaml must be a mapping"),
        (PreprocessConfig, {"test_fraction": 0.95}, r"val_fraction \+ test_fraction .* \[0, 1\)"),
        (TransformConfig, {"batch_size": 0}, r"transform\.batch_size must be >= 1"),
        (ModelConfig, {"preset": "huge"}, r"model in params\.yaml: unknown preset 'huge'"),
        (
            ModelConfig,
            {"overrides": {"layers": 3}},
            r"unknown CaptionerConfig key\(s\) \['layers'\]",
        ),
        (ModelConfig, {"overrides": 3}, r"model\.overrides must be a mapping"),
        (
            ModelConfig,
            {"output_vocab": "all"},
            r"model\.output_vocab is 'all'; use dataset or full",
        ),
        (EvaluateConfig, {"num_beams": 0}, r"evaluate\.num_beams must be an integer >= 1"),
        (
            ServeConfig,
            {"max_batch_delay_ms": 0},
            r"_ms must be >= 1, got 0 \(TorchServe 0\.12 reads",
        ),
    ],
)
def test_a_bad_value_is_an_error_naming_the_key(cls, values, message):
    with pytest.raises(ParamsError, match=message):
        cls.from_dict(values)


def test_integers_are_numbers_and_null_is_allowed_where_the_type_says():
    cfg = TrainConfig.from_dict({"lr": 1, "captions_per_image": None})
    assert cfg.lr == 1 and cfg.captions_per_image is None


def test_the_model_section_resolves_to_a_captioner_config():
    # CaptionerConfig's defaults, which are what params.yaml trained before they were: offline
    # with its first 3 layers
    shipped = ModelConfig.from_dict(PARAMS["model"]).captioner_config()
    assert shipped == CaptionerConfig() == preset("offline", num_layers=3)
    assert ModelConfig(preset="tiny", fusion="concat", overrides=None).captioner_config() == (
        preset("tiny", fusion="concat")
    )
    # encoder / fusion given explicitly win over the same field in overrides
    chosen = ModelConfig(preset="tiny", encoder="tiny", overrides={"encoder": "resnet50"})
    assert chosen.captioner_config().encoder == "tiny"


def test_params_yaml_sets_what_dvc_yaml_says_each_stage_reads():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, spec in stages.items():
        for dotted in spec.get("params", []):
            node = PARAMS
            for part in dotted.split("."):
                assert isinstance(node, dict) and part in node, f"{stage}: {dotted} not set"
                node = node[part]


@pytest.mark.parametrize(
    "stage, text, message",
    [
        ("ingest", "data: {source: sythetic}\n", "data.source is 'sythetic'; use synthetic,"),
        ("ingest", "data: {source: [synthetic}\n", "params.yaml line 1, column 26 is not valid"),
        ("validate", "data: {on_invalid: skip}\n", "data.on_invalid is 'skip'; use drop or"),
    ],
)
def test_a_stage_reports_a_params_mistake_in_one_line(stage, text, message, tmp_path):
    (tmp_path / "params.yaml").write_text(text)
    done = subprocess.run(
        [sys.executable, "-m", f"training.stages.{stage}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in done.stderr
    assert done.stderr.startswith("error")


@pytest.mark.parametrize("stage", (ALWAYS, *STAGES))
def test_every_stage_reports_params_mistakes_so(stage):
    # the torch stages take ~20 s to start here: that they are wrapped is checked, not run
    main = importlib.import_module(f"training.stages.{stage}").main
    assert main.__wrapped__ and main.__module__ == f"training.stages.{stage}"
    wrappers = []  # outermost first: torchrun's @record may wrap it (train, transform)
    while hasattr(main, "__wrapped__"):
        wrappers.append(main.__code__)
        main = main.__wrapped__
    assert stage_main(lambda: None).__code__ in wrappers


def test_a_stage_error_ends_the_stage_with_its_message_and_status_1(capsys):
    @stage_main
    def main() -> None:
        raise StageError("reports/validation.json: 3 rows dropped. Fix the data.")

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 1
    assert capsys.readouterr().err == "reports/validation.json: 3 rows dropped. Fix the data.\n"

    @stage_main
    def broken() -> None:  # a bug is no StageError: its traceback stays
        raise KeyError("epoch")

    with pytest.raises(KeyError):
        broken()
