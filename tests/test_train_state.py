"""The train stage's resumable state under faults: a damaged state, changed inputs or code, a
second trainer in the same workspace, and a `dvc` killed under its trainer (real processes).

The workspace is the pipeline's layout up to `define` (12 synthetic images, the tiny preset),
built once by calling the real stage functions; the trainers run as `python -m training.stages.train`
in it, as DVC runs them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.helpers.project import (
    copy_tracked,
    set_params,
    trainer_env,
    workspace_after_define,
)
from training import StageError
from training.paths import FEATURES_DIR, TRAIN_LOCK, TRAIN_VIEWS
from training.runtime.process import exclusive
from training.stages import train as train_module
from training.stages.train import TrainConfig, train
from training.tracking import runs as tracking

STATE = Path("artifacts/resume")


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A workspace after `define`: data/raw, processed captions, features, the model config."""
    return workspace_after_define(tmp_path_factory.mktemp("workspace"))


@pytest.fixture
def ws(template, tmp_path, monkeypatch) -> Path:
    """A fresh copy of the workspace, the current directory, tracking off."""
    root = shutil.copytree(template, tmp_path / "ws")
    monkeypatch.chdir(root)
    monkeypatch.setattr(tracking, "start_training", lambda *args, **kwargs: None)
    return root


class Interrupted(Exception):
    """Stands in for a kill after an epoch: the state of that epoch is on disk."""


def run_train(epochs: int, stop_after: int | None = None) -> dict | None:
    """train() as the stage runs it, in the current directory; `stop_after` epochs: interrupted."""
    validation_loss = train_module.validation_loss
    done = 0

    def counting(*args, **kwargs):  # called once per epoch, after its training steps
        nonlocal done
        if done == stop_after:
            raise Interrupted
        done += 1
        return validation_loss(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "validation_loss", counting)
        cfg = TrainConfig(epochs=epochs, batch_size=8, device="cpu", patience=epochs)
        if stop_after is None:
            return train(cfg)
        with pytest.raises(Interrupted):
            train(cfg)
    return None


def saved_epoch() -> int:
    (last,) = STATE.glob("*/last.pth")
    return torch.load(last, weights_only=True)["epoch"]


def epochs_run() -> list[int]:
    lines = Path("metrics/train_history.csv").read_text().splitlines()[1:]
    return [int(line.split(",")[0]) for line in lines]


def test_a_truncated_resume_state_is_set_aside_and_training_starts_over(ws, caplog):
    run_train(epochs=4, stop_after=2)
    assert saved_epoch() == 2
    (last,) = STATE.glob("*/last.pth")
    damaged = last.read_bytes()[: last.stat().st_size // 2]  # a crash mid-write, a full disk
    last.write_bytes(damaged)

    with caplog.at_level(logging.WARNING, logger="training.runtime.resume"):
        metrics = run_train(epochs=4)
    assert metrics["epochs_run"] == 4 and epochs_run() == [1, 2, 3, 4]  # from scratch
    (warning,) = [r.getMessage() for r in caplog.records if "cannot be used" in r.getMessage()]
    (aside,) = (STATE / "damaged").iterdir()
    assert str(aside) in warning and "starts over" in warning
    assert (aside / "last.pth").read_bytes() == damaged  # kept for a look, out of the way
    assert not [p for p in STATE.iterdir() if p.is_dir() and p.name != "damaged"]


def test_a_state_whose_best_model_is_missing_is_not_resumed(ws, caplog):
    run_train(epochs=3, stop_after=1)
    (best,) = STATE.glob("*/best.pth")
    best.unlink()
    with caplog.at_level(logging.WARNING, logger="training.runtime.resume"):
        run_train(epochs=3)
    assert epochs_run() == [1, 2, 3]
    assert any("best.pth" in r.getMessage() for r in caplog.records)


def change_val_features(root: Path) -> None:
    path = root / FEATURES_DIR / "val.npy"
    np.save(path, np.load(path) * 2)


def change_train_views(root: Path) -> None:
    path = root / FEATURES_DIR / TRAIN_VIEWS
    assert path.is_file()  # the template's transform encoded views (transform.views default)
    np.save(path, np.load(path) * 2)


def change_encoder_weights(root: Path) -> None:
    path = root / FEATURES_DIR / "encoder.pth"
    weights = torch.load(path, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}, path)


@pytest.mark.parametrize(
    "change",
    [None, change_val_features, change_train_views, change_encoder_weights, "model code"],
    ids=["nothing", "val features", "train views", "encoder weights", "model code"],
)
def test_a_run_resumes_only_with_the_same_inputs_and_code(ws, monkeypatch, caplog, change):
    code = copy_tracked(ws / "model_code", "model") / "model"
    monkeypatch.setattr(train_module, "stage_code", lambda stage: (code,))
    run_train(epochs=3, stop_after=1)
    if change == "model code":
        (code / "decoder.py").write_text((code / "decoder.py").read_text() + "\n# changed\n")
    elif change:
        change(ws)

    with caplog.at_level(logging.INFO):
        run_train(epochs=3)
    resumed = any("resuming after epoch 1 of 3" in r.getMessage() for r in caplog.records)
    assert resumed == (change is None)
    assert epochs_run() == [1, 2, 3]


def start_trainer(root: Path, log: Path) -> subprocess.Popen:
    """A trainer that runs until stopped (10,000 tiny epochs), logging to `log`."""
    set_params(root, {"train.epochs": 10_000, "train.patience": 10_000})
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "training.stages.train"],
            cwd=root,
            env=trainer_env(root),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_for_an_epoch(root: Path, *procs: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((root / STATE).glob("*/last.pth")):
        assert all(p.poll() is None for p in procs), "the trainer ended before its first epoch"
        assert time.monotonic() < deadline, "no epoch saved in time"
        time.sleep(0.1)


def test_a_held_lock_is_an_error_the_caller_gets_not_an_exit(tmp_path):
    lock = tmp_path / TRAIN_LOCK
    refused = pytest.raises(StageError, match=rf"pid {os.getpid()} .*`kill {os.getpid()}`")
    with exclusive(lock), refused, exclusive(lock):
        pass
    with exclusive(lock):  # released: the next one gets it
        pass


@pytest.mark.slow  # two trainers start: each imports torch and MLflow
def test_a_second_trainer_in_the_workspace_refuses_and_names_the_first(ws, tmp_path):
    first = start_trainer(ws, tmp_path / "first.log")
    try:
        wait_for_an_epoch(ws, first)
        assert json.loads((ws / TRAIN_LOCK).read_text())["pid"] == first.pid
        second = subprocess.run(
            [sys.executable, "-m", "training.stages.train"],
            cwd=ws,
            env=trainer_env(ws),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        message = second.stderr.strip().splitlines()[-1]
        assert f"pid {first.pid}" in message and f"`kill {first.pid}`" in message, message
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first one trains on
    finally:
        first.kill()
        first.wait()
    with exclusive(ws / TRAIN_LOCK):  # a killed holder leaves no stale lock behind
        pass


# A stand-in for dvc: runs a stage's cmd as DVC does (`$SHELL -c cmd`, DVC_STAGE set) and waits.
DVC_STANDIN = "import subprocess, sys; subprocess.run([sys.argv[1], '-c', sys.argv[2]])"
# A stage that would run for two minutes; what the trainer's main() does first, then sleep.
STAGE = (
    "import logging, time; from training.runtime.process import die_with_dvc; logging.basicConfig(); "
    "print(die_with_dvc(poll_s=0.2).pid, flush=True); time.sleep(120)"
)


@pytest.mark.subprocess
@pytest.mark.parametrize("shell", ["/bin/sh", "bash"])  # dash stays in between, bash execs
def test_a_stage_stops_when_the_dvc_that_started_it_is_killed(tmp_path, shell):
    dvc = subprocess.Popen(
        [sys.executable, "-c", DVC_STANDIN, shutil.which(shell), f"{sys.executable} -c '{STAGE}'"],
        env=trainer_env(tmp_path, DVC_STAGE="train"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        watched = int(dvc.stdout.readline())
        stage = psutil.Process(dvc.pid).children(recursive=True)
    finally:
        dvc.kill()  # SIGKILL: dvc gets no chance to stop its children
        dvc.wait()
    assert watched == dvc.pid  # not the shell in between
    _, orphans = psutil.wait_procs(stage, timeout=30)
    for orphan in orphans:
        orphan.kill()
    assert not orphans, f"outlived dvc: pids {[p.pid for p in orphans]}"
    assert "is gone: stopping" in dvc.stderr.read()
