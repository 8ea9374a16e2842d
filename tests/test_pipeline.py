"""The real DVC pipeline, shrunk: `dvc repro` in a copy of the repository, end to end.

Tiny preset, a few dozen synthetic images, an epoch or two: every stage runs for real
(ingest -> package), then DVC must skip what did not change, `dvc exp run -S` must work, and a
training run killed mid-way must resume and end where a straight run ends.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from tests.helpers.dockerfile import Dockerfile
from tests.helpers.project import (
    ALWAYS,
    SHRUNK,
    STAGES,
    dvc,
    dvc_json,
    environment,
    git_commit,
    history,
    project_copy,
    ran,
    set_params,
    wait_for_epoch,
)
from training.evaluation.samples import grid_size

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """One shrunk `dvc repro` from scratch, its baseline committed as docs/pipeline.md says; shared
    by the checks below (each leaves the workspace at that baseline)."""
    repo = project_copy(tmp_path_factory.mktemp("repo"))
    set_params(repo, SHRUNK)
    log = dvc(repo, "repro")
    git_commit(repo, "Baseline model", "params.yaml", "dvc.lock", "metrics")
    return repo, log


def test_every_stage_runs_and_writes_what_it_declares(pipeline):
    repo, log = pipeline
    for stage in (ALWAYS, *STAGES):
        assert f"Running stage '{stage}'" in log, stage

    report = json.loads((repo / "reports/validation.json").read_text())
    assert report["counts"]["kept"] == 200 and report["counts"]["dropped"] == 0

    splits = json.loads((repo / "data/processed/captions.json").read_text())["splits"]
    images = [e["image"] for entries in splits.values() for e in entries]
    assert len(images) == len(set(images)) == 40  # split by image: none in two splits
    assert all(len(e["captions"]) == 5 for entries in splits.values() for e in entries)

    metrics = json.loads((repo / "metrics/eval.json").read_text())
    for key in ("bleu1", "bleu4", "meteor", "rouge_l", "cider", "content_accuracy"):
        assert 0 <= metrics[key] <= (10 if key == "cider" else 1), key
    predictions = (repo / "reports/predictions.jsonl").read_text().splitlines()
    assert len(predictions) == len(splits["test"]) == metrics["num_images"]
    shown = min(SHRUNK["evaluate.grid_images"], len(splits["test"]))
    assert Image.open(repo / "reports/samples.png").size == grid_size(shown)

    train = json.loads((repo / "metrics/train.json").read_text())
    assert train["epochs_run"] == 2
    with (repo / "metrics/train_history.csv").open() as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2"]

    checkpoint = torch.load(repo / "artifacts/model/model.pth", weights_only=True)
    assert checkpoint["config"]["encoder"] == "tiny"
    with zipfile.ZipFile(repo / "model-store/imgtocap.mar") as mar:
        names = set(mar.namelist())
    assert {
        "model.pth",
        "domain.pt",  # the in-domain check, beside the checkpoint as in artifacts/model/
        "imgtocap_handler.py",
        "model/captioner.py",
        "MAR-INF/MANIFEST.json",
    } <= names
    assert any(n.startswith("tokenizer/") and n.endswith("vocab.txt") for n in names)


def test_runs_are_tracked_and_the_model_registered(pipeline):
    repo, _ = pipeline
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    run_id = json.loads((repo / "artifacts/model/mlflow.json").read_text())["run_id"]
    run = client.get_run(run_id)
    assert run.data.params["train.epochs"] == "2"
    assert len(client.get_metric_history(run_id, "val_loss")) == 2  # one point per epoch
    assert "bleu4" in run.data.metrics and "content_accuracy" in run.data.metrics
    versions = client.search_model_versions("name='imgtocap-synthetic'")
    assert versions and versions[0].run_id == run_id


def test_the_docker_image_finds_every_file_it_copies(pipeline):
    repo, _ = pipeline
    for source in Dockerfile(repo / "Dockerfile").sources:
        assert (repo / source).exists(), f"COPY {source}: missing after dvc repro"


def model_bytes(repo: Path) -> bytes:
    return (repo / "artifacts/model/model.pth").read_bytes()


def back_to_the_commit(repo: Path) -> None:
    """The way back to the committed baseline that docs/pipeline.md gives."""
    git = ["git", "checkout", "--", "params.yaml", "dvc.lock", "metrics"]
    subprocess.run(git, cwd=repo, check=True)
    dvc(repo, "checkout")


def exp_show(repo: Path) -> dict[str, dict[str, float]]:
    """`dvc exp show`'s rows, by experiment name ("baseline": the commit the others came from),
    each {"eval.json:bleu4": 0.1, ...}: the metrics it shows."""
    (workspace, baseline) = dvc_json(repo, "exp", "show", "--no-fetch")
    rows = {"workspace": workspace, "baseline": baseline}
    for experiment in baseline["experiments"] or []:
        rows[experiment["name"]] = experiment["revs"][0]
    return {
        name: {
            f"{Path(f).name}:{k}": v
            for f, m in (row["data"]["metrics"] or {}).items()
            for k, v in (m.get("data") or {}).items()
        }
        for name, row in rows.items()
    }


def test_earlier_models_come_back_from_the_cache_without_training(pipeline):
    repo, _ = pipeline
    baseline = model_bytes(repo)
    assert isinstance(exp_show(repo)["baseline"].get("eval.json:bleu4"), float), (
        "the baseline row of `dvc exp show` has no metrics: commit them"
    )

    log = dvc(repo, "exp", "run", "-n", "more-epochs", "-S", "train.epochs=3")
    assert ran(log) == ["train", "finetune", "evaluate", "package"]
    experiment = model_bytes(repo)
    assert experiment != baseline

    # back to the baseline: git has its params and dvc.lock, DVC's cache its model
    back_to_the_commit(repo)
    assert model_bytes(repo) == baseline
    assert not ran(dvc(repo, "repro")), "the baseline retrained"

    # an evaluate-only change, in a temporary copy as queued experiments run: no training
    log = dvc(repo, "exp", "run", "--temp", "-n", "one-beam", "-S", "evaluate.num_beams=1")
    assert "train" not in ran(log) and "evaluate" in ran(log), log

    dvc(repo, "exp", "apply", "more-epochs")
    assert model_bytes(repo) == experiment
    set_params(repo, {"train.epochs": SHRUNK["train.epochs"]})  # by hand: the run cache
    log = dvc(repo, "repro")
    assert "Stage 'train' is cached - skipping run" in log and not ran(log), log
    assert model_bytes(repo) == baseline

    shown = exp_show(repo)
    assert shown["more-epochs"]["train.json:epochs_run"] == 3
    assert shown["one-beam"]["train.json:epochs_run"] == SHRUNK["train.epochs"]  # not retrained
    for name in ("baseline", "more-epochs", "one-beam"):
        assert isinstance(shown[name].get("eval.json:bleu4"), float), name
    back_to_the_commit(repo)


def test_dvc_reruns_only_what_changed(pipeline):
    repo, _ = pipeline
    assert json.loads(dvc(repo, "status", "--json")) == {
        ALWAYS: ["always changed"],
        "track": ["always changed"],
    }
    # the original architecture through the same pipeline, as an experiment
    log = dvc(repo, "exp", "run", "-S", "model.fusion=concat")
    for stage in ("ingest", "validate", "preprocess", "transform", "domain"):
        assert f"Stage '{stage}' didn't change, skipping" in log, stage
    for stage in ("define", "train", "finetune", "evaluate", "package"):
        assert f"Running stage '{stage}'" in log, stage
    config = json.loads((repo / "artifacts/model/config.json").read_text())
    assert config["fusion"] == "concat"
    assert json.loads((repo / "metrics/eval.json").read_text())["num_images"] > 0


def test_make_repackages_after_a_handler_edit_and_only_then(pipeline):
    if shutil.which("make") is None:
        pytest.skip("needs make")
    repo, _ = pipeline
    venv = Path(sys.prefix)
    # `make setup` is done: -o keeps make from redoing it in the shared venv
    make = ["make", "-o", f"{venv}/.installed", f"VENV={venv}", "model-store/imgtocap.mar"]

    def make_archive() -> str:
        p = subprocess.run(
            make, cwd=repo, env=environment(repo), capture_output=True, text=True, timeout=600
        )
        assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        return p.stdout + p.stderr

    handler = repo / "handler" / "imgtocap_handler.py"
    handler.write_text(handler.read_text() + "# edited after the archive was built\n")
    log = make_archive()
    assert "Running stage 'package'" in log
    assert ran(log) == ["package"], log
    archive = repo / "model-store" / "imgtocap.mar"
    with zipfile.ZipFile(archive) as mar:
        assert mar.read("imgtocap_handler.py").decode() == handler.read_text()

    built = archive.read_bytes()
    assert ran(make_archive()) == []  # nothing changed: nothing runs
    assert archive.read_bytes() == built


def test_killed_dvc_stops_its_trainer_which_resumes_and_matches_a_straight_run(tmp_path):
    straight = project_copy(tmp_path / "straight")
    set_params(
        straight,
        {**SHRUNK, "data.synthetic.num_images": 60, "train.epochs": 12, "train.batch_size": 8},
    )
    dvc(straight, "repro", "define")
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed, symlinks=True)
    dvc(straight, "repro", "train")

    # Start training and SIGKILL dvc alone after the 3rd epoch is saved, as an OOM kill or a
    # CI timeout would: the trainer must not run on as an orphan. /bin/sh runs the stage's cmd
    # (DVC's default without $SHELL): dash stays between dvc and python, bash would exec.
    state = resumed / "artifacts/resume"
    proc = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=resumed,
        env={**environment(resumed), "SHELL": "/bin/sh"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for_epoch(proc, state, 3, timeout_s=300)
    assert proc.poll() is None, "training finished before it could be interrupted"
    stage = psutil.Process(proc.pid).children(recursive=True)
    assert any("training.stages.train" in " ".join(p.cmdline()) for p in stage)
    proc.kill()
    proc.wait()
    _, orphans = psutil.wait_procs(stage, timeout=30)
    for orphan in orphans:
        orphan.kill()
    assert not orphans, f"outlived dvc: pids {[p.pid for p in orphans]}"
    (saved,) = state.glob("*/last.pth")
    killed_at = torch.load(saved, weights_only=True)["epoch"]
    assert 3 <= killed_at < 12 and not (resumed / "metrics/train.json").exists()

    log = dvc(resumed, "repro", "train")
    assert f"resuming after epoch {killed_at} of 12" in log
    assert "epoch 1/12" not in log  # no epoch ran twice
    a, b = history(straight), history(resumed)
    assert [r["epoch"] for r in b] == [str(e) for e in range(1, 13)]
    for x, y in zip(a, b):
        assert float(x["val_loss"]) == pytest.approx(float(y["val_loss"]), abs=1e-4)
    assert json.loads((straight / "metrics/train.json").read_text())[
        "best_val_loss"
    ] == pytest.approx(
        json.loads((resumed / "metrics/train.json").read_text())["best_val_loss"], abs=1e-4
    )
    assert not [p for p in state.iterdir() if p.is_dir()], "the finished run's state is left"
