"""A copy of the repository in a fresh git repo, and `dvc` run in it: the real pipeline for the
tests that run `dvc repro` (shrunk through params.yaml)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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
    git = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run([*git, "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


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
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }


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
    """`dvc <args>` in `repo`, which must succeed; returns its output."""
    p = dvc_run(repo, *args, timeout=timeout, **env)
    assert p.returncode == 0, (
        f"dvc {' '.join(args)} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    )
    return p.stdout + p.stderr
