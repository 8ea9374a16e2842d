"""Test helpers for the real DVC pipeline, shrunk: a repository copy in a fresh git repo (the
files git tracks, never what the last run left), params edits, and `dvc` run with the venv's
python first on PATH; a workspace built up to the train stage by the stage functions, and
trainers run in it as DVC runs them."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
STAGES = (
    *("ingest", "validate", "preprocess", "transform", "domain", "define", "train", "finetune"),
    *("evaluate", "track", "package"),
)
# `source` runs on every `dvc repro` (it lists the data outside the repository): not a change
ALWAYS = "source"
TRACK = "track"  # runs on every `dvc repro` too (it logs to the server): not a change either
GIT = ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci"]

# Tiny preset, a few dozen synthetic images, two epochs: every stage runs for real, in seconds.
SHRUNK = {
    "data.synthetic.num_images": 40,
    "model.preset": "tiny",
    "train.epochs": 2,
    "train.batch_size": 32,
    "finetune.enabled": True,  # self-critical fine-tuning runs too: one short epoch
    "finetune.images_per_step": 8,
    "finetune.samples": 2,
    "finetune.max_length": 12,
    "evaluate.num_beams": 2,
    "evaluate.max_length": 12,
    "evaluate.grid_images": 4,
}


def project_copy(dest: Path, root: Path = ROOT) -> Path:
    """The checkout's files as a clone has them, with the developer's uncommitted work but
    nothing a pipeline run left (`tracked_files`), committed into a fresh git repo at `dest`."""
    copy_tracked(dest, root=root)
    subprocess.run([*GIT, "init", "-q"], cwd=dest, check=True)
    git_commit(dest, "copy")
    return dest


def copy_tracked(dest: Path, *pathspecs: str, root: Path = ROOT) -> Path:
    """`tracked_files(*pathspecs)` of the checkout copied to the same places under `dest`. Every
    test that copies the project's files copies them with this."""
    for name in tracked_files(*pathspecs, root=root):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
    return dest


def tracked_files(*pathspecs: str, root: Path = ROOT) -> list[str]:
    """The checkout's files (under `pathspecs`) that a test may copy: what git tracks, as edited
    now, and the files git does not ignore that the developer added, but none a pipeline run
    wrote: after `make demo` a checkout also holds dvc.lock, metrics/ and the like, which git
    does not ignore (dvc.lock is meant to be committed) and which would make a copy an already
    reproduced workspace (`pipeline_outputs`)."""

    def listed(*args: str) -> list[str]:
        out = subprocess.run(
            ["git", "ls-files", "-z", *args, "--", *pathspecs],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [n for n in out.split("\0") if n and (root / n).is_file()]

    tracked = listed("--cached")
    outputs = pipeline_outputs(root)
    added = [
        n
        for n in listed("--others", "--exclude-standard")
        if not any(n == o or n.startswith(o.rstrip("/") + "/") for o in outputs)
    ]
    return sorted({*tracked, *added})


def pipeline_outputs(root: Path = ROOT) -> set[str]:
    """The files and folders a pipeline run writes, as dvc.yaml names them: dvc.lock, every
    stage's outs, metrics and plots, and the .gitignore DVC writes beside a cached out."""
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    paths = {"dvc.lock"}
    for stage in dvc_yaml.get("stages", {}).values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                paths.update([entry] if isinstance(entry, str) else entry)
    for entry in dvc_yaml.get("metrics") or []:
        paths.add(entry)
    for entry in dvc_yaml.get("plots") or []:
        for plot in [entry] if isinstance(entry, str) else entry.values():
            if isinstance(plot, str):
                paths.add(plot)
            elif isinstance(plot, dict) and isinstance(plot.get("y"), dict):
                paths.update(plot["y"])
    paths |= {str(Path(p).parent / ".gitignore") for p in paths if Path(p).parent != Path(".")}
    return {str(Path(p)) for p in paths}


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
    """The stages a dvc log shows running (in order), but the always-changed `source` and
    `track`."""
    return [s for s in STAGES if s != TRACK and f"Running stage '{s}'" in log]


def history(repo: Path) -> list[dict[str, str]]:
    """metrics/train_history.csv: one row per epoch."""
    with (repo / "metrics/train_history.csv").open() as f:
        return list(csv.DictReader(f))


def workspace_after_define(root: Path, num_images: int = 12) -> Path:
    """The pipeline's layout up to `define` in `root` (synthetic 64 px images, the tiny preset),
    built by calling the real stage functions, and params.yaml for the tiny preset on the CPU."""
    from training.data.synthetic import write_synthetic
    from training.params import ModelConfig
    from training.paths import FEATURES_DIR, PROCESSED_PATH, RAW_DIR, REPORT_PATH
    from training.stages.define import define
    from training.stages.preprocess import PreprocessConfig, preprocess
    from training.stages.transform import TransformConfig, transform
    from training.stages.validate import validate

    cwd = Path.cwd()
    os.chdir(root)
    try:
        write_synthetic(RAW_DIR, num_images=num_images, image_size=64, seed=1)
        validate(RAW_DIR, REPORT_PATH, workers=1)
        split = PreprocessConfig(val_fraction=0.25, test_fraction=0.1)
        preprocess(split, "packaged", RAW_DIR, REPORT_PATH, PROCESSED_PATH)
        transform(TransformConfig(device="cpu"), "tiny", RAW_DIR, PROCESSED_PATH, FEATURES_DIR)
        define(
            ModelConfig(preset="tiny"),
            PROCESSED_PATH,
            Path("artifacts/model/config.json"),
            Path("reports/model_size.json"),
        )
    finally:
        os.chdir(cwd)
    shutil.copy(ROOT / "params.yaml", root / "params.yaml")
    set_params(root, {"model.preset": "tiny", "train.batch_size": 8, "train.device": "cpu"})
    return root


def closed_port() -> int:
    """A loopback port nothing listens on (as good as free: for servers the test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def trainer_env(root: Path, **extra: str) -> dict[str, str]:
    """`python -m training.stages.train` as DVC starts it, tracking pointed at a closed port (off)."""
    env = environment(root)
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"http://127.0.0.1:{closed_port()}")
    return {**env, "PYTHONDONTWRITEBYTECODE": "1", **extra}


def imgtocap(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The `imgtocap` console script's code in a fresh process (the installed script runs the
    same), `env` added to this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "serve.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def wait_for_epoch(
    proc: subprocess.Popen, state: Path, epoch: int, timeout_s: float, poll_s: float = 0.1
) -> None:
    """Until the trainer under `proc` saved the resume state of `epoch` (or later) in `state`
    (artifacts/resume), `proc` ended, or `timeout_s` passed."""
    import torch

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        saved = list(state.glob("*/last.pth"))
        if saved and torch.load(saved[0], weights_only=True)["epoch"] >= epoch:
            return
        time.sleep(poll_s)
