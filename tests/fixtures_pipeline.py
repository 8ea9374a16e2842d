"""Test helpers for the real DVC pipeline, shrunk: a repository copy in a fresh git repo,
params edits, and `dvc` run with the venv's python first on PATH."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "validate", "preprocess", "transform", "define", "train", "evaluate", "package")
# `source` runs on every `dvc repro` (it lists the data outside the repository): not a change
ALWAYS = "source"
GIT = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]

# Tiny preset, a few dozen synthetic images, two epochs: every stage runs for real, in seconds.
SHRUNK = {
    "data.synthetic.num_images": 40,
    "model.preset": "tiny",
    "train.epochs": 2,
    "train.batch_size": 32,
    "evaluate.num_beams": 2,
    "evaluate.max_length": 12,
    "evaluate.grid_images": 4,
}


def project_copy(dest: Path) -> Path:
    """The repository's files, as a clone has them, committed into a fresh git repo."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    subprocess.run([*GIT, "init", "-q"], cwd=dest, check=True)
    git_commit(dest, "copy")
    return dest


def git_commit(repo: Path, message: str, *paths: str) -> str:
    """Commit `paths` (everything git does not ignore, when none are given); the new commit."""
    subprocess.run([*GIT, "add", *(paths or ["-A"])], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=repo, check=True)
    return git(repo, "rev-parse", "HEAD")


def git(repo: Path, *args: str) -> str:
    """`git <args>` in `repo`, which must succeed; its output."""
    return subprocess.run(
        [*GIT, *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def set_params(repo: Path, changes: dict[str, object]) -> None:
    """Edit params.yaml: {"train.epochs": 2, ...}."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = params
        for part in parents:
            node = node[part]
        node[key] = value
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def environment(repo: Path) -> dict[str, str]:
    """The venv first on PATH, no telemetry, offline; MLflow left to its default: the
    repository's own store (mlflow.db), as for a user who configured nothing."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "DVC_ROOT", "DVC_EXP_NAME"):
        env.pop(name, None)
    return env


def dvc_run(repo: Path, *args: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    """`dvc <args>` in `repo` whatever its exit status (`env` added to its environment)."""
    return subprocess.run(
        ["dvc", *args],
        cwd=repo,
        env={**environment(repo), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def dvc(repo: Path, *args: str, timeout: int = 600, **env: str) -> str:
    """Run `dvc <args>` in `repo`; fails the test unless it succeeds; returns its output."""
    p = _dvc(repo, args, timeout, **env)
    return p.stdout + p.stderr


def dvc_json(repo: Path, *args: str, timeout: int = 600):
    """`dvc <args> --json`, parsed (stdout only: warnings go to stderr)."""
    return json.loads(_dvc(repo, (*args, "--json"), timeout).stdout)


def _dvc(
    repo: Path, args: tuple[str, ...], timeout: int, **env: str
) -> subprocess.CompletedProcess:
    p = dvc_run(repo, *args, timeout=timeout, **env)
    assert p.returncode == 0, (
        f"dvc {' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    )
    return p


def ran(log: str) -> list[str]:
    """The stages a dvc log shows running (in order), but the always-changed `source`."""
    return [s for s in STAGES if f"Running stage '{s}'" in log]


def history(repo: Path) -> list[dict[str, str]]:
    """metrics/train_history.csv: one row per epoch."""
    with (repo / "metrics/train_history.csv").open() as f:
        return list(csv.DictReader(f))
