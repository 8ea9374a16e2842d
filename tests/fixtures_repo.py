"""A copy of the repository as a user's clone, and DVC run in it: the pipeline tests' helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "validate", "preprocess", "transform", "define", "train", "evaluate", "package")
GIT = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]

# The real pipeline, small enough for a test: tiny preset, 40 images, 2 epochs.
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
    commit(dest, "copy")
    return dest


def commit(repo: Path, message: str) -> str:
    """`git add -A && git commit`; returns the new commit."""
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-qm", message], cwd=repo, check=True)
    return git(repo, "rev-parse", "HEAD")


def git(repo: Path, *args: str) -> str:
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
    repository's own store, as for a user who configured nothing."""
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


def dvc(repo: Path, *args: str, timeout: int = 600) -> str:
    """Run `dvc *args` in `repo`; its output, or a failure showing the end of it."""
    p = subprocess.run(
        ["dvc", *args],
        cwd=repo,
        env=environment(repo),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, (
        f"dvc {' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    )
    return p.stdout + p.stderr
