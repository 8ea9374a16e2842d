"""dvc.yaml and training.paths name the same files; stages share paths, never import each other;
the stages that need no torch do not import it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training import paths

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# The pipeline's own files each stage reads and writes (its code deps aside).
FILES = {
    "source": (set(), {paths.SOURCE_PATH}),
    "ingest": ({paths.SOURCE_PATH}, {paths.RAW_DIR}),
    "validate": ({paths.RAW_DIR}, {paths.REPORT_PATH}),
    "preprocess": ({paths.RAW_DIR, paths.REPORT_PATH}, {paths.PROCESSED_DIR}),
    "transform": ({paths.RAW_DIR, paths.PROCESSED_DIR}, {paths.FEATURES_DIR}),
    "define": ({paths.PROCESSED_DIR}, {paths.CONFIG_PATH, paths.SUMMARY_PATH}),
    "train": (
        {paths.FEATURES_DIR, paths.PROCESSED_DIR, paths.CONFIG_PATH},
        {
            paths.MODEL_PATH,
            paths.RUN_FILE,
            paths.TRAIN_METRICS_PATH,
            paths.HISTORY_PATH,
        },
    ),
    "evaluate": (
        {paths.MODEL_PATH, paths.RUN_FILE, paths.FEATURES_DIR, paths.PROCESSED_DIR, paths.RAW_DIR},
        {
            paths.EVAL_METRICS_PATH,
            paths.PREDICTIONS_PATH,
            paths.SAMPLES_PATH,
            paths.ROBUSTNESS_PATH,
            paths.ATTENTION_PATH,
            paths.CARD_PATH,
            paths.REGISTERED_PATH,
        },
    ),
    "package": (
        {paths.MODEL_PATH, paths.REGISTERED_PATH, paths.CARD_PATH},
        {paths.ARCHIVE_PATH},
    ),
}
TORCH_FREE = ("training.source", "training.ingest", "training.validate")


def declared(entries: list | None) -> set[Path]:
    """A dvc.yaml list of paths, each a string or a one-key mapping {path: options}."""
    return {
        Path(e) for entry in entries or [] for e in ([entry] if isinstance(entry, str) else entry)
    }


def writes(stage: str) -> set[Path]:
    spec = STAGES[stage]
    return declared(spec.get("outs")) | declared(spec.get("metrics")) | declared(spec.get("plots"))


ALL_OUTS = {path for stage in STAGES for path in writes(stage)}


def test_every_stage_is_a_training_module():
    assert set(STAGES) == set(FILES)
    for stage, spec in STAGES.items():
        assert spec["cmd"] == f"python -m training.{stage}"
        assert (ROOT / "training" / f"{stage}.py").is_file()


@pytest.mark.parametrize("stage", FILES)
def test_dvc_yaml_declares_exactly_the_files_the_stage_uses(stage):
    reads, written = FILES[stage]
    deps = declared(STAGES[stage].get("deps"))
    assert writes(stage) == written
    assert deps & ALL_OUTS == reads
    for code in deps - ALL_OUTS:  # the rest are code: renaming a module must not orphan it
        assert (ROOT / code).exists(), f"dvc.yaml stage {stage} depends on missing {code}"


# The resumable training state: kept between runs, so never an output (an output DVC keeps,
# `persist: true`, would keep the train stage out of the run cache: training/resume.py).
NOT_OUTPUTS = {paths.RESUME_DIR, paths.TRAIN_LOCK}


def test_every_path_constant_is_a_declared_output():
    constants = {name: v for name, v in vars(paths).items() if isinstance(v, Path)}
    assert len(constants) >= 15
    for name, path in constants.items():
        if path in NOT_OUTPUTS:
            continue
        assert path in ALL_OUTS or path.parent in ALL_OUTS, f"paths.{name} = {path} not in dvc.yaml"


def test_the_resume_state_is_no_output_and_every_output_is_cached():
    for path in NOT_OUTPUTS:
        assert not {path, *path.parents} & ALL_OUTS, f"{path} is (inside) a DVC output"
    for stage, spec in STAGES.items():
        for entry in spec.get("outs") or []:
            options = next(iter(entry.values())) if isinstance(entry, dict) else {}
            assert not options.get("persist"), (
                f"{stage}: {entry} keeps {stage} out of the run cache"
            )
            # an always-changed stage (source) writes its output anew on every `dvc repro`
            assert options.get("cache", True) or spec.get("always_changed"), (
                f"{stage}: {entry} cannot be restored by dvc checkout"
            )


def _imports(module: Path) -> set[str]:
    """Dotted names a module imports at any depth (`from training import x` -> training.x)."""
    names = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("stage", FILES)
def test_no_stage_imports_another(stage):
    others = {f"training.{other}" for other in FILES if other != stage}
    assert not _imports(ROOT / "training" / f"{stage}.py") & others


def test_ingest_and_validate_do_not_import_torch():
    check = (
        f"import sys, {', '.join(TORCH_FREE)}\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'torchvision') if m in sys.modules)\n"
        "assert not heavy, heavy"
    )
    run = subprocess.run(
        [sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
