"""validate: every problem reported with its reason, nothing lost; captions.txt reading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from training import StageError
from training.data.captions import (
    CaptionRow,
    parse_caption_lines,
    read_captions,
    valid_rows,
    write_captions,
)
from training.data.synthetic import write_synthetic
from training.stages.validate import main, validate


def broken_dataset(root: Path) -> tuple[Path, int]:
    """A small synthetic dataset with one of each problem; returns (raw dir, clean row count)."""
    write_synthetic(root, num_images=8, seed=2)
    images = root / "Images"
    corrupt = images / "shapes_00001.png"
    corrupt.write_bytes(corrupt.read_bytes()[:200])  # truncated mid-file
    shutil.copyfile(images / "shapes_00003.png", images / "copy_of_3.png")  # same bytes
    (images / "orphan.png").write_bytes((images / "shapes_00004.png").read_bytes()[:-1] + b"x")
    lines = (root / "captions.txt").read_text().splitlines()
    first_caption_of_2 = next(line for line in lines if line.startswith("shapes_00002.png,"))
    lines += [
        "shapes_00002.png,",  # empty caption
        "shapes_00002.png,   ",  # whitespace only
        "ghost.png,a red circle for a file that does not exist",
        first_caption_of_2,  # the same caption again for the same image
        first_caption_of_2.replace(",a", ",A", 1) + "  ",  # again, case and spacing differ
        "a line without any comma",
        "../secret.png,a path instead of a file name",
        "shapes_00005.png,12345 !!!",
        "shapes_00005.png,bell\x07 in the middle",
        "shapes_00005.png," + "very long " * 60,
        "copy_of_3.png,a copy under another name",
    ]
    (root / "captions.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, 40 - 5  # 8 images x 5 captions, less the 5 of the corrupt image


def test_every_problem_is_reported_with_its_reason_and_the_rest_kept(tmp_path):
    raw, clean = broken_dataset(tmp_path / "raw")
    report = validate(raw, tmp_path / "reports" / "validation.json", "drop", workers=1)
    assert json.loads((tmp_path / "reports" / "validation.json").read_text()) == report

    counts = report["counts"]
    total = len(parse_caption_lines(raw / "captions.txt"))
    assert counts["captions"] == total == 51
    assert counts["kept"] + counts["dropped"] == total
    assert counts["kept"] == clean + 1  # + the caption of copy_of_3.png
    assert counts["dropped_by_reason"] == {
        "bad_image_name": 1,
        "caption_too_long": 1,
        "duplicate_caption": 2,
        "empty_caption": 2,
        "malformed_line": 1,
        "missing_image": 1,
        "not_text": 2,
        "unreadable_image": 5,
    }
    by_reason = {}
    for row in report["dropped_rows"]:
        by_reason.setdefault(row["reason"], []).append(row)
    assert {r["image"] for r in by_reason["unreadable_image"]} == {"shapes_00001.png"}
    assert "shapes_00001.png" in by_reason["unreadable_image"][0]["detail"]
    assert by_reason["missing_image"][0]["image"] == "ghost.png"
    assert by_reason["missing_image"][0]["line"] == 44
    assert "same caption for this image as line" in by_reason["duplicate_caption"][0]["detail"]
    assert by_reason["malformed_line"][0]["caption"] == "a line without any comma"

    assert [(i["image"], i["reason"]) for i in report["dropped_images"]] == [
        ("orphan.png", "no_captions"),
        ("shapes_00001.png", "unreadable"),
    ]
    assert "could not be decoded" in report["dropped_images"][1]["detail"]
    assert counts["images"] == 10 and counts["images_kept"] == 8 and counts["images_dropped"] == 2
    assert report["duplicate_images"] == [["copy_of_3.png", "shapes_00003.png"]]

    kept = valid_rows(raw, tmp_path / "reports" / "validation.json")
    dropped_lines = {r["line"] for r in report["dropped_rows"]}
    every_line = [row.line for row, _ in parse_caption_lines(raw / "captions.txt")]
    assert [r.line for r in kept] == [line for line in every_line if line not in dropped_lines]
    assert len(kept) == counts["kept"]
    assert all(r.image != "shapes_00001.png" and r.caption.strip() for r in kept)


def test_fail_mode_stops_with_a_summary_after_writing_the_report(tmp_path):
    raw, _ = broken_dataset(tmp_path / "raw")
    report_path = tmp_path / "validation.json"
    with pytest.raises(StageError) as stop:  # an exception a caller can handle, not an exit
        validate(raw, report_path, "fail", workers=1)
    message = str(stop.value)
    for expected in (
        "dropped 15 of 51 caption rows",
        "5 unreadable_image",
        "1 missing_image",
        "2 empty_caption",
        "2 of 10 images",
        str(report_path),
        "on_invalid: drop",
    ):
        assert expected in message
    assert json.loads(report_path.read_text())["counts"]["dropped"] == 15


def test_main_reads_params_and_exits_with_the_message(tmp_path, monkeypatch, capsys):
    broken_dataset(tmp_path / "data" / "raw")
    (tmp_path / "params.yaml").write_text("data:\n  source: synthetic\n  on_invalid: fail\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main()
    # the stage, not the library, exits: status 1, the summary as the one thing on stderr
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "reports/validation.json" in err and "on_invalid: drop" in err
    assert "Traceback" not in err and err.endswith(" to go on.\n")
    assert json.loads((tmp_path / "reports" / "validation.json").read_text())["counts"]["dropped"]

    (tmp_path / "params.yaml").write_text("data:\n  on_invalid: maybe\n")
    with pytest.raises(SystemExit) as stop:  # a params.yaml mistake: one line, status 2
        main()
    assert stop.value.code == 2 and "drop or fail" in capsys.readouterr().err


def test_clean_data_passes_fail_mode_and_pool_matches_serial(tmp_path):
    raw = tmp_path / "raw"
    write_synthetic(raw, num_images=70, seed=4)  # above the pool threshold
    serial = validate(raw, tmp_path / "a.json", "fail", workers=1)
    pooled = validate(raw, tmp_path / "b.json", "fail", workers=2)
    assert serial == pooled
    assert serial["counts"]["kept"] == 350 and serial["counts"]["dropped"] == 0
    assert serial["dropped_rows"] == serial["dropped_images"] == []


def test_valid_rows_refuses_a_stale_report(tmp_path):
    raw = tmp_path / "raw"
    write_synthetic(raw, num_images=3, seed=1)
    validate(raw, tmp_path / "v.json", workers=1)
    assert len(valid_rows(raw, tmp_path / "v.json")) == 15
    with (raw / "captions.txt").open("a") as f:
        f.write("shapes_00000.png,one more caption\n")
    with pytest.raises(ValueError, match="run `python -m training.stages.validate` again"):
        valid_rows(raw, tmp_path / "v.json")


def test_captions_file_round_trip_and_errors(tmp_path):
    rows = [
        ("a.jpg", "a dog, running, fast"),
        ("b.jpg", '"quoted" at the start'),
        ("c.jpg", 'ends with "quotes"'),
    ]
    assert write_captions(tmp_path, rows) == 3
    assert [(r.image, r.caption) for r in read_captions(tmp_path)] == rows
    assert read_captions(tmp_path)[0] == CaptionRow(2, "a.jpg", "a dog, running, fast")

    # Kaggle/pandas style: a caption with commas wrapped in quotes
    (tmp_path / "captions.txt").write_text('image,caption\na.jpg,"a dog, running"\n\n')
    assert read_captions(tmp_path) == [CaptionRow(2, "a.jpg", "a dog, running")]

    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,fine\nbroken line\n")
    with pytest.raises(ValueError, match=r"captions.txt, line 3: no comma"):
        read_captions(tmp_path)
    (tmp_path / "captions.txt").write_text("a.jpg,no header\n")
    with pytest.raises(ValueError, match="header 'image,caption'"):
        read_captions(tmp_path)
    (tmp_path / "captions.txt").write_bytes(b"image,caption\na.jpg,caf\xe9\n")
    with pytest.raises(ValueError, match="line 2: not UTF-8"):
        read_captions(tmp_path)
    with pytest.raises(ValueError, match="comma"):
        write_captions(tmp_path, [("a,b.jpg", "x")])
    with pytest.raises(FileNotFoundError, match="training.stages.ingest"):
        read_captions(tmp_path / "nowhere")


def rows_of(raw: Path) -> list[tuple[int, str, str, str | None]]:
    return [(r.line, r.image, r.caption, problem) for r, problem in parse_caption_lines(raw)]


@pytest.mark.parametrize("mode", ["drop", "fail"])
def test_an_old_mac_captions_file_with_cr_line_ends_validates(tmp_path, mode):
    raw = tmp_path / "raw"
    write_synthetic(raw, num_images=2, seed=1)
    text = (raw / "captions.txt").read_text()
    (raw / "captions.txt").write_bytes(text.replace("\n", "\r").encode())
    report = validate(raw, tmp_path / "v.json", mode, workers=1)
    assert report["passed"] and report["counts"]["kept"] == 10 == report["counts"]["captions"]
    assert [r.line for r in valid_rows(raw, tmp_path / "v.json")] == list(range(2, 12))


def test_captions_txt_is_read_as_the_csv_a_csv_writer_writes(tmp_path):
    (tmp_path / "captions.txt").write_bytes(
        b'"image","caption"\r\n'
        b'"a.png","a caption"\r\n'  # every field quoted (csv.QUOTE_ALL, pandas quoting=1)
        b'b.png,"two lines\r\nof one caption"\r\n'  # a quoted newline: one caption
        b'c.png,"a ""quoted"" word, and a comma"\r\n'
        b"d.png,a dog, running, unquoted commas (Kaggle)\r\n"
        b'e.png,"an unbalanced quote\r\n'  # never closes: reported, the next row still read
        b'f.png,"closed" and then more text\r\n'
        b'g.png,ends with "quotes"\r\n'
    )
    assert rows_of(tmp_path / "captions.txt") == [
        (2, "a.png", "a caption", None),
        (3, "b.png", "two lines of one caption", None),
        (5, "c.png", 'a "quoted" word, and a comma', None),
        (6, "d.png", "a dog, running, unquoted commas (Kaggle)", None),
        (7, "e.png", '"an unbalanced quote', "the caption opens a quote that never closes"),
        (
            8,
            "f.png",
            '"closed" and then more text',
            "text after the caption's closing quote: ' and then more text'",
        ),
        (9, "g.png", 'ends with "quotes"', None),
    ]


def test_quoting_problems_are_reported_and_quoted_rows_kept(tmp_path):
    raw = tmp_path / "raw"
    write_synthetic(raw, num_images=2, seed=1)
    with (raw / "captions.txt").open("a", encoding="utf-8") as f:
        f.write('"shapes_00000.png","a fully quoted row"\n')
        f.write('shapes_00001.png,"a caption over\ntwo lines"\n')
        f.write('shapes_00001.png,"an unbalanced leading quote\n')
        f.write("shapes_00000.png,the last row\n")
    report = validate(raw, tmp_path / "v.json", "drop", workers=1)
    assert report["counts"]["dropped_by_reason"] == {"malformed_line": 1}
    (dropped,) = report["dropped_rows"]
    assert (dropped["line"], dropped["detail"]) == (
        15,
        "the caption opens a quote that never closes",
    )
    kept = [(r.line, r.image, r.caption) for r in valid_rows(raw, tmp_path / "v.json")]
    assert kept[-3:] == [
        (12, "shapes_00000.png", "a fully quoted row"),
        (13, "shapes_00001.png", "a caption over two lines"),
        (16, "shapes_00000.png", "the last row"),
    ]


def test_a_failed_validation_stops_preprocess_run_by_hand(tmp_path, monkeypatch):
    from training.stages import preprocess

    broken_dataset(tmp_path / "data" / "raw")
    (tmp_path / "params.yaml").write_text("data:\n  on_invalid: fail\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main()
    assert json.loads((tmp_path / "reports" / "validation.json").read_text())["passed"] is False
    stale = tmp_path / "data" / "processed" / "captions.json"  # from an earlier, passed run
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    with pytest.raises(
        ValueError, match=r"did not pass.*on_invalid: fail.*training\.stages\.validate"
    ):
        preprocess.main()
    assert not stale.exists()  # no stale output for a later stage to pick up
