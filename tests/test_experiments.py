"""Experiments a team can trust (issue #11), as a DVC and MLflow user runs them.

In a temporary git repository: the shrunk pipeline as the committed baseline, then
`dvc exp run -S evaluate.num_beams=1` (an evaluate param), `dvc exp run -S train.epochs=4` (a
train param) and `dvc exp run --temp -S evaluate.num_beams=3` (in DVC's temporary copy). Then:
one MLflow run per execution with the params and metrics that ran, no training for the
evaluate-only changes, `champion` on the best CIDEr, every archive stamped with its registered
version, and a copied checkout that logs into itself.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.project import SHRUNK, dvc, git, git_commit, project_copy, set_params

pytestmark = pytest.mark.slow

NAME = "imgtocap-synthetic"
# name -> (-S settings, what it changes): the three experiments, run in this order
EXPERIMENTS = {
    "beams-1": ("evaluate.num_beams=1", "evaluate"),
    "longer": ("train.epochs=4", "train"),
    "temp-beams-3": ("evaluate.num_beams=3", "evaluate"),
}


@dataclass
class Experiments:
    repo: Path
    start: str  # the commit the baseline ran from
    baseline: str  # the commit holding the baseline's dvc.lock and metrics
    logs: dict[str, str]  # dvc's output per execution
    metrics: dict[str, dict]  # metrics/eval.json per execution
    client: object  # MlflowClient on the repository's own store

    def runs(self) -> dict[str, object]:
        (experiment,) = [e for e in self.client.search_experiments() if e.name == "imgtocap"]
        runs = self.client.search_runs([experiment.experiment_id], max_results=100)
        names = [r.info.run_name for r in runs]
        assert len(names) == len(set(names)), names
        return {r.info.run_name: r for r in runs}


@pytest.fixture(scope="module")
def experiments(tmp_path_factory) -> Experiments:
    from mlflow.tracking import MlflowClient

    repo = project_copy(tmp_path_factory.mktemp("experiments"))
    set_params(repo, SHRUNK)
    start = git_commit(repo, "shrunk pipeline")
    logs = {"baseline": dvc(repo, "repro")}
    # the documented workflow (docs/pipeline.md): commit the baseline so that experiments compare
    # against it
    baseline = git_commit(repo, "baseline: dvc.lock and metrics")
    metrics = {"baseline": json.loads((repo / "metrics/eval.json").read_text())}
    for name, (setting, _) in EXPERIMENTS.items():
        temp = ["--temp"] if name.startswith("temp") else []
        logs[name] = dvc(repo, "exp", "run", *temp, "-n", name, "-S", setting)
        (repo.parent / f"{name}.log").write_text(logs[name])  # for a look after a failure
        refs = git(repo, "for-each-ref", "--format=%(refname)", "refs/exps/").split()
        (ref,) = [r for r in refs if r.endswith(f"/{name}")]
        metrics[name] = json.loads(git(repo, "show", f"{ref}:metrics/eval.json"))
        git(repo, "checkout", "--", ".")  # back to the baseline's params for the next one
    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    return Experiments(repo, start, baseline, logs, metrics, client)


def test_one_run_per_execution_with_the_params_and_metrics_that_ran(experiments):
    runs = experiments.runs()
    baseline_name = experiments.start[:7]  # a plain `dvc repro`: the git revision
    assert set(runs) == {baseline_name, *EXPERIMENTS}
    baseline = runs[baseline_name]
    assert baseline.data.tags["git.commit"] == experiments.start
    assert baseline.data.tags["imgtocap.kind"] == "train"
    assert (baseline.data.tags["dataset"], baseline.data.tags["preset"]) == ("synthetic", "tiny")

    expected = {
        baseline_name: {"train.epochs": "2", "evaluate.num_beams": "2"},
        "beams-1": {"train.epochs": "2", "evaluate.num_beams": "1"},
        "longer": {"train.epochs": "4", "evaluate.num_beams": "2"},
        "temp-beams-3": {"train.epochs": "2", "evaluate.num_beams": "3"},
    }
    for name, run in runs.items():
        params = run.data.params
        assert {key: params[key] for key in expected[name]} == expected[name], name
        assert params["model.preset"] == "tiny" and params["config.encoder"] == "tiny", name
        ran = experiments.metrics["baseline" if name == baseline_name else name]
        for key in ("bleu4", "cider", "meteor", "content_accuracy"):
            assert run.data.metrics[key] == pytest.approx(ran[key]), (name, key)
        assert run.info.status == "FINISHED", name
    for name in EXPERIMENTS:
        assert runs[name].data.tags["dvc.experiment"] == name
        assert runs[name].data.tags["git.commit"] == experiments.baseline

    # training runs hold the per-epoch history; evaluate-only runs are children of what they
    # evaluated, and the baseline's run kept its own params and metrics
    client = experiments.client
    assert len(client.get_metric_history(baseline.info.run_id, "val_loss")) == 2
    assert len(client.get_metric_history(runs["longer"].info.run_id, "val_loss")) == 4
    assert runs["longer"].data.tags["imgtocap.kind"] == "train"
    tags = runs["beams-1"].data.tags
    assert tags["imgtocap.kind"] == "evaluate"
    assert tags["mlflow.parentRunId"] == tags["imgtocap.train_run"] == baseline.info.run_id


def test_the_temp_experiment_logged_to_the_workspace_store(experiments):
    assert "temp-beams-3" in experiments.runs()  # found in the repository's mlflow.db
    stray = list((experiments.repo / ".dvc" / "tmp").rglob("mlflow.db"))
    assert not stray
    artifacts = experiments.runs()["temp-beams-3"].info.artifact_uri
    assert artifacts.startswith(str(experiments.repo / "mlruns"))


def test_an_evaluate_only_change_does_not_retrain(experiments):
    """Also in DVC's temporary copy, where the model must come from DVC's cache."""
    runs = experiments.runs()
    baseline = runs[experiments.start[:7]].info.run_id
    for name, (_, changes) in EXPERIMENTS.items():
        log = experiments.logs[name]
        assert "Running stage 'evaluate'" in log, name
        if changes == "train":
            assert "Running stage 'train'" in log, name
            continue
        assert "Running stage 'train'" not in log, name
        tags = runs[name].data.tags  # the run of an evaluation of the baseline's model
        assert tags["imgtocap.kind"] == "evaluate", name
        assert tags["mlflow.parentRunId"] == tags["imgtocap.train_run"] == baseline, name
    kinds = sorted(r.data.tags["imgtocap.kind"] for r in runs.values())
    assert kinds == ["evaluate", "evaluate", "train", "train"]


def test_champion_is_the_first_version_with_the_best_cider(experiments):
    client = experiments.client
    versions = sorted(client.search_model_versions(f"name='{NAME}'"), key=lambda v: int(v.version))
    runs = {r.info.run_id: name for name, r in experiments.runs().items()}
    assert [runs[v.tags["eval_run"]] for v in versions] == [experiments.start[:7], *EXPERIMENTS]
    assert len({v.tags["test_split"] for v in versions}) == 1  # all scored on the same images
    assert not any("cider" in v.tags for v in versions)  # metrics live in the runs only
    ciders = [client.get_run(v.tags["eval_run"]).data.metrics["cider"] for v in versions]
    best = versions[ciders.index(max(ciders))]
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == best.version, list(zip(versions, ciders))
    for version in versions:
        assert version.tags["champion.decision"], version.version
        # a store on this machine only: its versions are stamped local-<n>
        assert version.description.startswith(f"# {NAME} version local-{version.version}\n")
        assert "describes every image in those words" in version.description  # known limits


def test_every_archive_is_stamped_with_its_registered_version(experiments, tmp_path):
    """One archive per distinct model (baseline and `longer`): the evaluate-only versions point
    at the baseline's instead of a copy of the same weights."""
    client = experiments.client
    versions = {v.tags["eval_run"]: v for v in client.search_model_versions(f"name='{NAME}'")}
    runs = experiments.runs()
    for name in (experiments.start[:7], "longer"):  # the runs that trained a model
        version = versions[runs[name].info.run_id]
        number = f"local-{version.version}"
        run_id = version.tags["eval_run"]
        assert version.tags["archive"] == f"runs:/{run_id}/archive/imgtocap.mar"
        mar = Path(client.download_artifacts(run_id, "archive/imgtocap.mar", tmp_path))
        assert _archive_version(mar) == number
        with zipfile.ZipFile(mar) as archive:
            card = archive.read("MODEL_CARD.md").decode()
            registered = json.loads(archive.read("registered.json"))
        assert card == version.description
        assert registered == {
            "name": NAME,
            "version": str(version.version),
            "run_id": run_id,
            "local": True,
        }
        mar.unlink()
    baseline = versions[runs[experiments.start[:7]].info.run_id]
    for name in ("beams-1", "temp-beams-3"):
        assert versions[runs[name].info.run_id].tags["archive"] == baseline.tags["archive"]
    # the workspace holds the last experiment run in it (the temp one left it alone)
    registered = json.loads((experiments.repo / "artifacts/model/registered.json").read_text())
    assert registered["run_id"] == runs["longer"].info.run_id
    stamp = _archive_version(experiments.repo / "model-store/imgtocap.mar")
    assert stamp == f"local-{registered['version']}"


def _archive_version(mar: Path) -> str:
    with zipfile.ZipFile(mar) as archive:
        return json.loads(archive.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]


def test_a_copied_checkout_writes_into_itself(experiments, tmp_path):
    original = experiments.repo
    before = _tree(original / "mlruns")
    runs_before = len(experiments.runs())
    copy = tmp_path / "copy"
    shutil.copytree(original, copy, symlinks=True)

    set_params(copy, {"evaluate.length_penalty": 0.9})  # an evaluation the store has not seen
    assert "Running stage 'track'" in dvc(copy, "repro")
    assert _tree(original / "mlruns") == before  # not one file added or changed
    assert len(experiments.runs()) == runs_before
    with sqlite3.connect(copy / "mlflow.db") as con:
        locations = [row[0] for row in con.execute("SELECT artifact_uri FROM runs")]
    assert len(locations) == runs_before + 1
    assert all(loc.startswith(f"{copy}/mlruns/") for loc in locations)
    assert _tree(copy / "mlruns").keys() > before.keys()  # the new run's files are in the copy


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under folder: size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }
