"""ingest: Flickr8k in both layouts from folders, zips and a local HTTP server; Karpathy-split
JSON (COCO, Flickr30k) on real photographs; synthetic; errors leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from tests.helpers.data import (
    CAPTIONS,
    KARPATHY,
    SPLITS,
    FileServer,
    images,
    kaggle_captions_text,
    make_kaggle,
    make_karpathy,
    make_original,
    official_archives,
    zip_dir,
)
from training.data import download as download_module
from training.data.captions import read_captions
from training.data.download import download
from training.params import DataConfig
from training.stages.ingest import ingest
from training.stages.preprocess import PreprocessConfig, preprocess
from training.stages.validate import validate

EXPECTED_ROWS = [(n, c) for n, caps in CAPTIONS.items() for c in caps]


def flickr(path: Path | None, **more: object) -> DataConfig:
    flickr8k = {"path": None if path is None else str(path), **more}
    return DataConfig.from_dict({"source": "flickr8k", "flickr8k": flickr8k})


def folder(path: Path) -> DataConfig:
    return DataConfig.from_dict({"source": "folder", "folder": {"path": str(path)}})


def assert_raw(raw: Path, splits: bool) -> None:
    """The raw layout holds exactly the fixture images and captions (and splits if official)."""
    assert {p.name: p.read_bytes() for p in (raw / "Images").iterdir()} == images()
    assert [(r.image, r.caption) for r in read_captions(raw)] == EXPECTED_ROWS
    if splits:
        assert json.loads((raw / "splits.json").read_text()) == SPLITS
    else:
        assert not (raw / "splits.json").exists()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_kaggle_folder_is_hard_linked_and_captions_kept_byte_for_byte(tmp_path):
    source = make_kaggle(tmp_path / "kaggle")
    raw = ingest(flickr(source), tmp_path / "raw")
    assert_raw(raw, splits=False)
    assert (raw / "captions.txt").read_text() == kaggle_captions_text()
    linked = raw / "Images" / "1000_aaa.jpg"
    assert linked.stat().st_ino == (source / "Images" / "1000_aaa.jpg").stat().st_ino


def test_kaggle_zip_nested_in_one_top_folder(tmp_path):
    archive = zip_dir(make_kaggle(tmp_path / "k"), tmp_path / "archive.zip", top="flickr8k")
    assert_raw(ingest(flickr(archive), tmp_path / "raw"), splits=False)


@pytest.mark.parametrize("form", ["folder", "zip_nested", "official_zips_in_a_folder"])
def test_original_layout_converts_captions_and_splits(tmp_path, form):
    if form == "folder":
        source = make_original(tmp_path / "orig")
    elif form == "zip_nested":
        source = zip_dir(make_original(tmp_path / "orig"), tmp_path / "f8k.zip", top="Flickr8k")
    else:  # what a user has after downloading the two archives by hand
        image_zip, text_zip = official_archives(tmp_path)
        source = tmp_path / "downloads"
        source.mkdir()
        (source / "Flickr8k_Dataset.zip").write_bytes(image_zip)
        (source / "Flickr8k_text.zip").write_bytes(text_zip)
    assert_raw(ingest(flickr(source), tmp_path / "raw"), splits=True)


def test_download_checks_extracts_records_hash_and_reuses_cache(tmp_path):
    image_zip, text_zip = official_archives(tmp_path)
    files = {"Flickr8k_Dataset.zip": image_zip, "Flickr8k_text.zip": text_zip}
    cache = tmp_path / "cache"
    with FileServer(files) as server:
        cfg = flickr(
            None,
            images_url=f"{server.url}/Flickr8k_Dataset.zip",
            images_sha256=sha256(image_zip),
            images_md5=hashlib.md5(image_zip).hexdigest(),
            text_url=f"{server.url}/Flickr8k_text.zip",
            text_sha256=None,  # unchecked: the computed hash is recorded instead
            text_md5=None,
            cache_dir=str(cache),
        )
        raw = ingest(cfg, tmp_path / "raw")
        assert_raw(raw, splits=True)
        assert len(server.requests) == 2
        assert (cache / "Flickr8k_text.zip.sha256").read_text().split()[0] == sha256(text_zip)
        assert not list(cache.glob("*.part"))

        ingest(cfg, tmp_path / "raw")  # second run: archives come from the cache
        assert len(server.requests) == 2

        # a cached archive that no longer matches its recorded hash is refused
        (cache / "Flickr8k_text.zip").write_bytes(b"X" + text_zip[1:])
        with pytest.raises(ValueError, match="recorded on first download"):
            ingest(cfg, tmp_path / "raw")


def test_checksum_mismatch_is_a_clear_error(tmp_path):
    _, text_zip = official_archives(tmp_path)
    wrong = "0" * 64
    with FileServer({"Flickr8k_text.zip": text_zip}) as server:
        url = f"{server.url}/Flickr8k_text.zip"
        with pytest.raises(ValueError) as error:
            download(
                url, tmp_path / "c" / "Flickr8k_text.zip", sha256=wrong, key="data.flickr8k.text"
            )
    message = str(error.value)
    for expected in (url, wrong, sha256(text_zip), "data.flickr8k.text_sha256", "delete"):
        assert expected in message
    assert not (tmp_path / "c" / "Flickr8k_text.zip").exists()  # never accepted


def test_interrupted_download_resumes_with_range_on_rerun(tmp_path):
    image_zip, _ = official_archives(tmp_path, padding=300_000)
    dest = tmp_path / "cache" / "Flickr8k_Dataset.zip"
    with FileServer(
        {"Flickr8k_Dataset.zip": image_zip}, cut_first={"Flickr8k_Dataset.zip": 200_000}
    ) as server:
        url = f"{server.url}/Flickr8k_Dataset.zip"
        with pytest.raises(ConnectionError, match="run again to resume"):
            download(url, dest, sha256=sha256(image_zip), retries=0)
        partial = dest.with_name(dest.name + ".part").stat().st_size
        assert 0 < partial <= 200_000

        download(url, dest, sha256=sha256(image_zip), retries=0)
    assert server.requests == [
        ("Flickr8k_Dataset.zip", None),
        ("Flickr8k_Dataset.zip", f"bytes={partial}-"),
    ]
    assert sha256(dest.read_bytes()) == sha256(image_zip)


def test_download_retries_and_resumes_by_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(download_module.time, "sleep", lambda seconds: None)
    image_zip, _ = official_archives(tmp_path, padding=300_000)
    dest = tmp_path / "cache" / "Flickr8k_Dataset.zip"
    with FileServer({"a.zip": image_zip}, cut_first={"a.zip": 150_000}) as server:
        download(f"{server.url}/a.zip", dest, md5=hashlib.md5(image_zip).hexdigest(), retries=2)
    assert [r for _, r in server.requests][0] is None
    assert server.requests[1][1].startswith("bytes=") and server.requests[1][1] != "bytes=0-"
    assert dest.read_bytes() == image_zip


def test_http_error_names_the_url(tmp_path):
    with (
        FileServer({}) as server,
        pytest.raises(ConnectionError, match=r"HTTP 404.*data\.flickr8k\.images_url"),
    ):
        download(f"{server.url}/missing.zip", tmp_path / "x.zip", key="data.flickr8k.images")


def test_missing_source_or_unknown_layout_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        ingest(flickr(tmp_path / "does-not-exist"), tmp_path / "raw")

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError) as error:
        ingest(flickr(junk), tmp_path / "raw")
    for looked_for in ("Images/", "captions.txt", "Flicker8k_Dataset/", "Flickr8k.token.txt"):
        assert looked_for in str(error.value)

    only_text = make_original(tmp_path / "orig")
    for path in (only_text / "Flicker8k_Dataset").iterdir():
        path.unlink()
    (only_text / "Flicker8k_Dataset").rmdir()
    with pytest.raises(FileNotFoundError, match="add the images archive"):
        ingest(flickr(only_text), tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


def test_folder_source_takes_the_kaggle_layout_only(tmp_path):
    raw = ingest(folder(make_kaggle(tmp_path / "k")), tmp_path / "raw")
    assert_raw(raw, splits=False)
    with pytest.raises(FileNotFoundError, match="captions.txt"):
        ingest(folder(make_original(tmp_path / "o")), tmp_path / "r2")
    with pytest.raises(ValueError, match="data.folder.path"):
        ingest(DataConfig(source="folder"), tmp_path / "r3")


def test_bad_data_reaches_validation_instead_of_crashing_ingest(tmp_path):
    source = make_original(tmp_path / "orig")
    with (source / "Flickr8k.token.txt").open("a", encoding="utf-8") as f:
        f.write("this line has no tab and no hash\n")
        f.write("ghost.jpg#0\ta caption for a file that is not there\n")
    archive = zip_dir(source, tmp_path / "f8k.zip")
    # Corrupt one image's stored bytes inside the zip: its CRC check fails on extraction.
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("Flicker8k_Dataset/2000_bbb.jpg")
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 5] ^= 0xFF
    archive.write_bytes(bytes(data))

    raw = ingest(flickr(archive), tmp_path / "raw")
    rows = read_captions(raw)
    assert (rows[-2].image, rows[-2].caption) == ("", "this line has no tab and no hash")
    assert rows[-1].image == "ghost.jpg"
    assert (raw / "Images" / "2000_bbb.jpg").read_bytes() == b""  # validation reports it


def test_synthetic_source_replaces_the_previous_raw_dir(tmp_path):
    raw = tmp_path / "raw"
    (raw / "Images").mkdir(parents=True)
    (raw / "Images" / "stale.jpg").write_bytes(b"old")
    ingest(DataConfig.from_dict({"synthetic": {"num_images": 6, "seed": 3}}), raw)
    assert sorted(p.name for p in (raw / "Images").iterdir()) == [
        f"shapes_{i:05d}.png" for i in range(6)
    ]
    assert len(read_captions(raw)) == 30
    assert set(json.loads((raw / "scenes.json").read_text())) == {
        f"shapes_{i:05d}.png" for i in range(6)
    }
    assert not (tmp_path / "raw.ingesting").exists()


def test_params_errors_name_the_key():
    with pytest.raises(ValueError, match=r"sourse.*known keys"):
        DataConfig.from_dict({"sourse": "flickr8k"})
    with pytest.raises(ValueError, match=r"data\.flickr8k.*cache"):
        DataConfig.from_dict({"flickr8k": {"cache": "x"}})
    with pytest.raises(ValueError, match="synthetic, flickr8k, folder, karpathy"):
        DataConfig.from_dict({"source": "coco"})
    assert DataConfig.from_dict(None) == DataConfig()


def karpathy(dataset: Path, images: Path) -> DataConfig:
    return DataConfig.from_dict(
        {"source": "karpathy", "karpathy": {"json": str(dataset), "images": str(images)}}
    )


@pytest.mark.parametrize("coco", [True, False], ids=["coco_folder", "flickr30k_zip"])
def test_karpathy_json_on_real_photos_keeps_its_splits_restval_trains(tmp_path, coco):
    dataset, images = make_karpathy(tmp_path / "source", coco)
    if not coco:  # a zip of the image folder, as downloaded
        images = zip_dir(images, tmp_path / "flickr30k-images.zip", top="flickr30k-images")
    raw = ingest(karpathy(dataset, images), tmp_path / "raw")

    items = json.loads(dataset.read_text())["images"]
    name = {photo: item["filename"] for photo, item in zip(KARPATHY, items)}
    assert sorted(p.name for p in (raw / "Images").iterdir()) == sorted(name.values())
    assert [(r.image, r.caption) for r in read_captions(raw)] == [
        (item["filename"], sentence["raw"]) for item in items for sentence in item["sentences"]
    ]
    expected = {
        "train": [name[p] for p in ("astronaut", "coffee", "camera", "grace_hopper")],
        "val": [name["chelsea"]],
        "test": [name["rocket"]],
    }
    assert json.loads((raw / "splits.json").read_text()) == expected

    # every photo decodes as training will decode it, and preprocess keeps the splits
    report = validate(raw, tmp_path / "validation.json", "fail", workers=1)
    assert report["counts"]["kept"] == 30 and report["counts"]["images_kept"] == 6
    out = preprocess(
        PreprocessConfig(), "packaged", raw, tmp_path / "validation.json", tmp_path / "p.json"
    )
    assert {s: [e["image"] for e in v] for s, v in out["splits"].items()} == {
        s: sorted(v) for s, v in expected.items()
    }


def test_karpathy_errors_name_the_setting_and_missing_images_reach_validation(tmp_path):
    dataset, images = make_karpathy(tmp_path / "source")
    with pytest.raises(ValueError, match=r"data\.karpathy\.json or \.images is not set"):
        ingest(DataConfig(source="karpathy"), tmp_path / "raw")
    with pytest.raises(FileNotFoundError, match="data.karpathy.images"):
        ingest(karpathy(dataset, tmp_path / "nowhere"), tmp_path / "raw")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds none of the 6 images .* train2014/COCO_"):
        ingest(karpathy(dataset, empty), tmp_path / "raw")
    not_karpathy = tmp_path / "captions.json"
    not_karpathy.write_text('{"annotations": []}')
    with pytest.raises(ValueError, match="not a Karpathy-split caption file"):
        ingest(karpathy(not_karpathy, images), tmp_path / "raw")
    data = json.loads(dataset.read_text())
    data["images"][0]["split"] = "holdout"
    dataset.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"split 'holdout'; expected one of \['restval', 'test'"):
        ingest(karpathy(dataset, images), tmp_path / "raw")

    data["images"][0]["split"] = "train"
    dataset.write_text(json.dumps(data))
    missing = next(images.rglob(data["images"][1]["filename"]))
    missing.unlink()
    raw = ingest(karpathy(dataset, images), tmp_path / "raw")
    report = validate(raw, tmp_path / "validation.json", workers=1)
    assert report["counts"]["dropped_by_reason"] == {"missing_image": 5}
    assert not (tmp_path / "raw.ingesting").exists()


def test_a_failed_ingest_leaves_no_half_written_dataset_behind(tmp_path):
    raw = ingest(DataConfig.from_dict({"synthetic": {"num_images": 2}}), tmp_path / "raw")
    before = sorted(p.name for p in (raw / "Images").iterdir())
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("no dataset here")
    with pytest.raises(FileNotFoundError, match="holds no known dataset layout"):
        ingest(folder(junk), raw)
    assert not (tmp_path / "raw.ingesting").exists()
    assert sorted(p.name for p in (raw / "Images").iterdir()) == before  # the last good one
