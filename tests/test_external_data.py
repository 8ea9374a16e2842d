"""Data outside the repository is a dependency: edit the captions.txt or the images that
data.folder.path / data.flickr8k.path point at, and `dvc repro` ingests again; change nothing
and it skips ingest and everything after. Real DVC in a copy of the repository."""

from __future__ import annotations

import json

import pytest

from tests.helpers.data import make_kaggle, make_karpathy, tiny_jpeg, zip_dir
from tests.helpers.project import dvc, project_copy, set_params
from training.params import DataConfig
from training.stages.source import fingerprint


@pytest.mark.slow
def test_editing_the_external_dataset_re_ingests_and_only_then(tmp_path):
    data = make_kaggle(tmp_path / "my-dataset")
    repo = project_copy(tmp_path / "repo")
    set_params(repo, {"data.source": "folder", "data.folder.path": str(data)})

    def validated() -> dict:
        log = dvc(repo, "repro", "validate")
        report = json.loads((repo / "reports/validation.json").read_text())
        return {"ingested": "Running stage 'ingest'" in log, **report["counts"]}

    first = validated()
    assert first["ingested"] and first["kept"] == 20 and first["images"] == 4
    again = validated()
    assert not again["ingested"]  # nothing changed: ingest and validate skipped
    # DVC cannot see outside the repository without looking: it says so, no more
    status = json.loads(dvc(repo, "status", "--with-deps", "validate", "--json"))
    assert status == {"source": ["always changed"]}

    with (data / "captions.txt").open("a", encoding="utf-8") as f:
        f.write("4000_ddd.jpg,a cat sleeps on a red sofa\n")
    edited = validated()
    assert edited["ingested"] and edited["kept"] == 21

    (data / "Images" / "5000_eee.jpg").write_bytes(tiny_jpeg(9))
    added = validated()
    assert added["ingested"] and added["images"] == 5 and added["images_dropped"] == 1  # no caption


def test_the_fingerprint_changes_with_any_file_of_any_external_source(tmp_path):
    kaggle = zip_dir(make_kaggle(tmp_path / "k"), tmp_path / "flickr8k.zip")
    dataset, images = make_karpathy(tmp_path / "coco")
    configs = {
        "flickr8k": DataConfig.from_dict({"source": "flickr8k", "flickr8k": {"path": str(kaggle)}}),
        "karpathy": DataConfig.from_dict(
            {"source": "karpathy", "karpathy": {"json": str(dataset), "images": str(images)}}
        ),
    }
    before = {name: fingerprint(cfg) for name, cfg in configs.items()}
    assert before == {name: fingerprint(cfg) for name, cfg in configs.items()}  # stable
    assert before["karpathy"]["files"] == 7 and before["flickr8k"]["files"] == 1
    assert fingerprint(DataConfig())["paths"] == {}  # synthetic: nothing outside

    kaggle.write_bytes(kaggle.read_bytes() + b"\0")  # a new archive in its place
    next(images.rglob("*.jpg")).write_bytes(tiny_jpeg(3))
    after = {name: fingerprint(cfg) for name, cfg in configs.items()}
    for name in configs:
        assert after[name]["sha256"] != before[name]["sha256"], name
