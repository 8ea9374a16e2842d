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
from training.dvcfile import CODE_ROOTS, stage_code

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# The pipeline's own files each stage reads and writes (its code deps aside).
FILES = {
    "source": (set(), {paths.SOURCE_PATH}),
    "ingest": ({paths.SOURCE_PATH}, {paths.RAW_DIR}),
    "validate": ({paths.RAW_DIR}, {paths.REPORT_PATH}),
    "preprocess": ({paths.RAW_DIR, paths.REPORT_PATH}, {paths.PROCESSED_DIR}),
    "transform": ({paths.RAW_DIR, paths.PROCESSED_DIR}, {paths.FEATURES_DIR}),
    "domain": ({paths.FEATURES_DIR}, {paths.DOMAIN_PATH, paths.DOMAIN_METRICS_PATH}),
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
    "finetune": (
        {paths.MODEL_PATH, paths.FEATURES_DIR, paths.PROCESSED_DIR},
        {paths.FINETUNED_PATH, paths.FINETUNE_METRICS_PATH, paths.FINETUNE_HISTORY_PATH},
    ),
    "evaluate": (
        {paths.FINETUNED_PATH, paths.FEATURES_DIR, paths.PROCESSED_DIR, paths.RAW_DIR},
        {
            paths.EVAL_METRICS_PATH,
            paths.PREDICTIONS_PATH,
            paths.SAMPLES_PATH,
            paths.ROBUSTNESS_PATH,
            paths.ATTENTION_PATH,
            paths.CARD_PATH,
        },
    ),
    "track": (
        {
            paths.FINETUNED_PATH,
            paths.DOMAIN_PATH,  # registered with the model (training/tracking/registry.py)
            paths.RUN_FILE,
            paths.EVAL_METRICS_PATH,
            paths.HISTORY_PATH,
            paths.CARD_PATH,
            paths.PREDICTIONS_PATH,
            paths.SAMPLES_PATH,
            paths.ATTENTION_PATH,
            paths.ROBUSTNESS_PATH,
            paths.PROCESSED_DIR,
            paths.RAW_DIR,
        },
        {paths.REGISTERED_PATH},
    ),
    "package": (
        {paths.FINETUNED_PATH, paths.REGISTERED_PATH, paths.DOMAIN_PATH, paths.CARD_PATH},
        {paths.ARCHIVE_PATH},
    ),
}
TORCH_FREE = ("training.stages.source", "training.stages.ingest", "training.stages.validate")


def declared(entries: list | None) -> set[Path]:
    """A dvc.yaml list of paths, each a string or a one-key mapping {path: options}."""
    return {
        Path(e) for entry in entries or [] for e in ([entry] if isinstance(entry, str) else entry)
    }


def writes(stage: str) -> set[Path]:
    spec = STAGES[stage]
    return declared(spec.get("outs")) | declared(spec.get("metrics")) | declared(spec.get("plots"))


ALL_OUTS = {path for stage in STAGES for path in writes(stage)}


def test_the_stages_folder_holds_exactly_the_dvc_stages():
    assert set(STAGES) == set(FILES)
    for stage, spec in STAGES.items():
        assert spec["cmd"] == f"python -m training.stages.{stage}"
    modules = {p.stem for p in (ROOT / "training" / "stages").glob("*.py")} - {"__init__"}
    assert modules == set(STAGES)


@pytest.mark.parametrize("stage", FILES)
def test_dvc_yaml_declares_exactly_the_files_the_stage_uses(stage):
    reads, written = FILES[stage]
    deps = declared(STAGES[stage].get("deps"))
    assert writes(stage) == written
    assert deps & ALL_OUTS == reads
    for code in deps - ALL_OUTS:  # the rest are code: renaming a module must not orphan it
        assert (ROOT / code).exists(), f"dvc.yaml stage {stage} depends on missing {code}"


# The resumable training state: kept between runs, so never an output (an output DVC keeps,
# `persist: true`, would keep the train stage out of the run cache: training/runtime/resume.py).
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
    module_path = module.resolve()
    names, tree = set(), ast.parse(module.read_text())
    typing_only = {  # `if TYPE_CHECKING:` imports are for annotations: nothing runs them
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
            module = node.module or ""
            if node.level:  # `from .decoder import x` in model/captioner.py -> model.decoder
                package = module_path.relative_to(ROOT).parent.parts
                package = package[: len(package) - node.level + 1]
                module = ".".join([*package, *([module] if module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("stage", FILES)
def test_no_stage_imports_another(stage):
    others = {f"training.stages.{other}" for other in FILES if other != stage}
    assert not _imports(ROOT / "training" / "stages" / f"{stage}.py") & others


# Imported by stages, yet unable to change what a stage writes: where files lie (the paths are
# deps themselves), reading params.yaml (params are deps by value: what it imports for their
# dataclasses is not followed), the one-process guard and this list's own reader. A package's
# `__init__.py` counts as the modules it re-exports.
NOT_OUTPUT_CODE = {"training/paths.py", "training/params.py", "training/dvcfile.py"}
NOT_OUTPUT_CODE |= {"training/runtime/process.py"}


def _module_file(name: str) -> Path | None:
    """The checkout's file for a dotted module name, or None for a third-party one."""
    base = ROOT / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file() and candidate.parts[len(ROOT.parts)] in CODE_ROOTS:
            return candidate
    return None


def _reexported(package: Path, name: str) -> Path | None:
    """The module a package's `__init__.py` takes `name` from (model/ maps names lazily)."""
    for node in ast.parse(package.read_text()).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "_SOURCES":
            module = ast.literal_eval(node.value).get(name)
            return package.with_name(f"{module}.py") if module else None
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and name in {alias.asname or alias.name for alias in node.names}
        ):
            return _module_file(node.module)
    return None


def _files(path: Path) -> set[Path]:
    """The project files a module imports directly; a package's re-exports count as their source."""
    found = set()
    for name in _imports(path):
        file = _module_file(name)
        if file is None and "." in name:  # `from pkg import name`: a re-export of pkg's?
            parent, _, attr = name.rpartition(".")
            package = _module_file(parent)
            if package is not None and package.name == "__init__.py":
                file = _reexported(package, attr)
        if file is not None and file.name != "__init__.py":
            found.add(file)
    return found


def _closure(start: Path) -> set[Path]:
    """Every project file `start` imports, at any depth, itself included."""
    seen, todo = set(), [start]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path.relative_to(ROOT).as_posix() not in NOT_OUTPUT_CODE:
            todo += _files(path) - seen
    return seen


@pytest.mark.parametrize("stage", FILES)
def test_a_stage_lists_the_code_it_imports(stage):
    listed = stage_code(stage)
    module = ROOT / "training" / "stages" / f"{stage}.py"
    missing = sorted(
        rel
        for path in _closure(module)
        if (rel := path.relative_to(ROOT).as_posix()) not in NOT_OUTPUT_CODE
        and not any(path == code or code in path.parents for code in listed)
    )
    assert not missing, f"dvc.yaml's {stage} stage imports but does not list {missing}"
    assert not [p for p in listed if not p.exists()], "dvc.yaml lists code that is not there"


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
