"""Tracking and registry rules on a real sqlite MLflow store: where the store is, what a run is
named, when evaluate gets a run of its own, when `champion` moves, and a copied store.

The whole pipeline doing the same through `dvc exp run` is tests/test_experiments.py.
"""

from __future__ import annotations

import shutil
import socket
import sqlite3
import subprocess
from pathlib import Path

import mlflow
import pytest

from tests.helpers.project import GIT, git_commit
from training.tracking import registry, ui
from training.tracking import runs as tracking

PARAMS = {"data": {"source": "synthetic"}, "model": {"preset": "tiny"}, "evaluate": {"beams": 2}}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A repository DVC runs a stage for: DVC_ROOT set, no MLflow settings."""
    root = tmp_path / "repo"
    root.mkdir()
    for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    yield root
    mlflow.set_tracking_uri(None)


def test_the_store_is_the_repositorys_whatever_the_working_directory(workspace, monkeypatch):
    temp = workspace / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"  # `dvc exp run --temp`
    temp.mkdir(parents=True)
    monkeypatch.chdir(temp)
    assert tracking.tracking_uri() == f"sqlite:///{workspace / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/store.db")  # relative: the repo's
    assert tracking.tracking_uri() == f"sqlite:///{workspace / 'runs' / 'store.db'}"
    for uri in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        assert tracking.tracking_uri() == uri


def test_runs_are_named_after_the_experiment_or_the_git_revision(workspace, monkeypatch):
    subprocess.run([*GIT, "init", "-q"], cwd=workspace, check=True)
    (workspace / "params.yaml").write_text("a: 1\n")
    (workspace / "dvc.lock").write_text("schema: '2.0'\n")
    (workspace / "metrics").mkdir()
    (workspace / "metrics" / "eval.json").write_text("{}")
    head = git_commit(workspace, "baseline")

    plain = tracking.Execution.current()
    assert (plain.name, plain.commit, plain.experiment, plain.dirty) == (
        head[:7],
        head,
        None,
        False,
    )
    (workspace / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # the pipeline's own
    (workspace / "metrics" / "eval.json").write_text('{"cider": 1.0}')
    assert tracking.Execution.current().name == head[:7]
    (workspace / "params.yaml").write_text("a: 2\n")  # an edit nobody committed
    assert tracking.Execution.current().name == f"{head[:7]}-dirty"

    monkeypatch.setenv("DVC_EXP_NAME", "wider-beams")  # what `dvc exp run` sets
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "f" * 40)
    exp = tracking.Execution.current()
    assert (exp.name, exp.experiment, exp.commit) == ("wider-beams", "wider-beams", "f" * 40)
    assert tracking.run_tags(PARAMS, "train") == {
        "git.commit": "f" * 40,
        "git.dirty": "false",
        "dvc.experiment": "wider-beams",
        "dataset": "synthetic",
        "preset": "tiny",
        "imgtocap.kind": "train",
    }


@pytest.mark.parametrize(
    "data, name",
    [
        (None, "synthetic"),
        ({"source": "flickr8k"}, "flickr8k"),
        ({"source": "folder", "folder": {"path": "/data/My Captions.zip"}}, "folder-my-captions"),
    ],
)
def test_each_dataset_has_its_registered_model(data, name):
    assert tracking.dataset_name(data) == name
    assert registry.registered_name(name) == f"imgtocap-{name}"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The repository's store, first opened by a stage of a `--temp` experiment (in DVC's copy
    of the repository); shared by the tests below: creating a store costs seconds."""
    root = tmp_path_factory.mktemp("store")
    temp = root / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    temp.mkdir(parents=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(temp)
        mp.setenv("DVC_ROOT", str(root))  # what DVC sets, pointing at the workspace
        for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
            mp.delenv(name, raising=False)
        tracking.configure()
        yield root
    mlflow.set_tracking_uri(None)


def test_a_temp_experiment_logs_to_the_workspace_store(store):
    temp = Path.cwd()
    assert not (temp / "mlflow.db").exists() and (store / "mlflow.db").is_file()
    # MLflow would put the experiment's artifacts under the cwd: they belong to the workspace
    experiment = mlflow.get_experiment_by_name(tracking.EXPERIMENT)
    assert experiment.artifact_location == f"{store / 'mlruns'}/{experiment.experiment_id}"
    with mlflow.start_run() as run:
        mlflow.log_text("x", "note.txt")
    assert (store / "mlruns" / experiment.experiment_id / run.info.run_id).is_dir()
    assert not (temp / "mlruns").exists()


def test_evaluate_completes_its_training_run_once_then_gets_runs_of_its_own(store):
    run_id = tracking.start_training(None, PARAMS, {"encoder": "tiny", "output_vocab": [5, 7]})
    tracking.end()
    client = mlflow.MlflowClient()
    trained = client.get_run(run_id)
    assert trained.data.params["evaluate.beams"] == "2"
    assert trained.data.params["config.output_vocab"] == "2"  # the size, not the id list
    assert trained.data.tags["imgtocap.kind"] == "train"

    with tracking.evaluation_run(run_id, PARAMS) as same:  # train and evaluate, one execution
        mlflow.log_metric("cider", 1.0)
        mlflow.set_tag(tracking.EVALUATED, "true")
    assert same.info.run_id == run_id

    changed = {**PARAMS, "evaluate": {"beams": 1}}  # only evaluate re-runs
    with tracking.evaluation_run(run_id, changed) as child:
        mlflow.log_metric("cider", 0.5)
    assert child.info.run_id != run_id
    child = client.get_run(child.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == run_id
    assert child.data.tags[tracking.TRAIN_RUN] == run_id
    assert child.data.tags["imgtocap.kind"] == "evaluate"
    assert child.data.params["evaluate.beams"] == "1"
    assert child.data.params["config.encoder"] == "tiny"  # what it evaluated, complete
    trained = client.get_run(run_id)  # untouched
    assert trained.data.params["evaluate.beams"] == "2" and trained.data.metrics["cider"] == 1.0

    with tracking.evaluation_run(run_id, PARAMS) as again:  # the same settings once more
        pass
    assert again.info.run_id not in (run_id, child.info.run_id)


def _version(name: str, cider: float, split: str) -> str:
    """A registered version as track makes it (no model: the rule reads the split tag and the
    evaluation run's metric)."""
    client = mlflow.MlflowClient()
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    with mlflow.start_run() as run:
        mlflow.log_metric("cider", cider)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_model_version_tag(name, version.version, "test_split", split)
    return version.version


def test_champion_moves_only_to_a_better_cider_on_the_same_test_split(store):
    name = "imgtocap-rules"
    client = mlflow.MlflowClient()

    def champion() -> str:
        return client.get_model_version_by_alias(name, registry.CHAMPION).version

    first = _version(name, 0.5, "split-a")
    assert registry.promote(name, first, 0.5, "split-a") and champion() == first
    worse = _version(name, 0.4, "split-a")
    assert not registry.promote(name, worse, 0.4, "split-a") and champion() == first
    tie = _version(name, 0.5, "split-a")
    assert not registry.promote(name, tie, 0.5, "split-a") and champion() == first
    elsewhere = _version(name, 9.0, "split-b")  # a far higher score, on other test images
    assert not registry.promote(name, elsewhere, 9.0, "split-b") and champion() == first
    decision = client.get_model_version(name, elsewhere).tags["champion.decision"]
    assert decision.startswith("not compared: test split split-b differs")
    better = _version(name, 0.6, "split-a")
    assert registry.promote(name, better, 0.6, "split-a") and champion() == better
    assert client.get_model_version(name, better).tags["champion.decision"] == (
        f"champion: cider 0.6000 beats champion version {first}'s 0.5000"
    )


def _locations(db: Path) -> list[str]:
    """Every local artifact location the store holds (`runs:/` sources resolve through them)."""
    with sqlite3.connect(db) as con:
        return [
            row[0]
            for query in (
                "SELECT artifact_location FROM experiments",
                "SELECT artifact_uri FROM runs",
                "SELECT artifact_location FROM logged_models",
                "SELECT storage_location FROM model_versions",
            )
            for row in con.execute(query)
            if row[0] and row[0].startswith("/")
        ]


def test_a_copied_store_writes_into_the_copy(store, tmp_path, monkeypatch):
    with mlflow.start_run() as run:  # something in the original's artifacts
        mlflow.log_text("original", "note.txt")
    original = sorted(p.relative_to(store) for p in (store / "mlruns").rglob("*"))
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    assert all(loc.startswith(str(store)) for loc in _locations(copy / "mlflow.db"))

    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(copy))
    tracking.configure()  # what every stage does first
    assert all(loc.startswith(f"{copy}/mlruns/") for loc in _locations(copy / "mlflow.db"))
    with mlflow.start_run() as new:
        mlflow.log_text("copy", "note.txt")
    experiment = new.info.experiment_id
    assert (copy / "mlruns" / experiment / new.info.run_id / "artifacts" / "note.txt").is_file()
    assert mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/note.txt") == "original"
    assert sorted(p.relative_to(store) for p in (store / "mlruns").rglob("*")) == original
    assert not tracking.relocate_artifacts(copy / "mlflow.db")  # once is enough


def test_make_ui_skips_a_taken_port_and_says_when_none_is_free():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        assert ui.free_port(port, tries=2) > port
        with pytest.raises(SystemExit, match=f"no free port in {port}-{port}: set UI_PORT"):
            ui.free_port(port, tries=1)
