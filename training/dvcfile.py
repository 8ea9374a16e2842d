"""What `dvc.yaml` says a stage depends on: the one list of each stage's code.

DVC re-runs a stage when a file it lists changes; the train stage's resume fingerprint hashes the
same files (a changed loss or layer must not continue under old weights), so both read this list.
tests/test_stage_code.py holds it to what each stage module really imports.
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]  # the checkout this package was imported from
CODE_ROOTS = ("model", "training", "handler")  # deps under these are code; the rest is data


def stage_deps(stage: str, root: Path = ROOT) -> list[str]:
    """Every dep `dvc.yaml` lists for `stage`, as written there (relative to the repository)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    if stage not in stages:
        raise KeyError(f"dvc.yaml has no stage {stage!r}; it has {sorted(stages)}")
    return [str(dep) for dep in stages[stage].get("deps", [])]


def stage_code(stage: str, root: Path = ROOT) -> tuple[Path, ...]:
    """The code files and folders `dvc.yaml` lists as `stage`'s deps, as absolute paths."""
    deps = stage_deps(stage, root)
    return tuple(root / dep for dep in deps if dep.split("/", 1)[0] in CODE_ROOTS)
