"""`imgtocap caption` from a checkpoint, run as a user runs it (its own process): folders searched
recursively, one JSON line per image, a bad file reported alone, heat-maps per image. The same
command against a real TorchServe is in tests/test_serving.py."""

from __future__ import annotations

import importlib.metadata
import json
import runpy
from pathlib import Path

import pytest
import setuptools
import torch
from PIL import Image

from model import decode_caption, load_checkpoint, open_image, save_checkpoint
from model.domain import fit
from model.encoders import pooled
from model.int8 import quantize_decoder
from serve.cli import main
from tests.helpers.model import picture, tiny
from tests.helpers.project import imgtocap
from training.evaluation.attention_plot import figure_size

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "imgtocap = serve.cli:main"


def test_setup_py_installs_the_console_script(monkeypatch):
    declared = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: declared.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    assert SCRIPT in declared["entry_points"]["console_scripts"]
    name, _, value = SCRIPT.partition(" = ")
    entry = importlib.metadata.EntryPoint(name, value, "console_scripts")
    assert entry.load().__module__ == "serve.cli"
    assert "training" in declared["packages"]
    run = imgtocap("caption", "--help")
    assert run.returncode == 0, run.stderr
    assert "usage: imgtocap caption" in run.stdout and "--attention DIR" in run.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """photos/: two PNGs and a JPEG (one in a subfolder), a corrupt .png, a .txt to skip."""
    root = tmp_path_factory.mktemp("cli") / "photos"
    (root / "sub").mkdir(parents=True)
    picture(0, size=64).save(root / "a.png")
    picture(1, size=48).save(root / "sub" / "b.png")
    picture(2, size=40).convert("RGB").save(root / "sub" / "c.JPG", "JPEG")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "notes.txt").write_text("not an image, and not named like one")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.pth"
    save_checkpoint(tiny(), path)
    return path


@pytest.mark.subprocess
def test_local_checkpoint_captions_a_folder_and_reports_a_bad_file_alone(
    folder, checkpoint, tokenizer, tmp_path
):
    out, maps = tmp_path / "captions.jsonl", tmp_path / "maps"
    run = imgtocap(
        "caption", str(folder), str(tmp_path / "missing.jpg"),
        "--checkpoint", str(checkpoint), "--num-beams", "2", "--max-length", "6",
        "--batch-size", "2", "--attention", str(maps), "--output", str(out),
    )  # fmt: skip
    assert run.returncode == 1, run.stderr  # some failed, the rest were captioned
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_path = {Path(line["path"]).name: line for line in lines}
    assert list(by_path) == ["missing.jpg", "a.png", "broken.png", "b.png", "c.JPG"]
    assert by_path["missing.jpg"]["error"] == "no such file or folder"
    assert "not a readable image" in by_path["broken.png"]["error"]
    assert set(by_path["broken.png"]) == {"path", "error"}
    assert f"{folder / 'broken.png'}: " in run.stderr and "2 of 5 image(s) failed" in run.stderr
    assert "5/5 [" in run.stderr  # the progress bar, done

    model = quantize_decoder(load_checkpoint(checkpoint))  # as the CLI runs it on a CPU
    for name, path in (("a.png", "a.png"), ("b.png", "sub/b.png"), ("c.JPG", "sub/c.JPG")):
        line = by_path[name]
        pixels = model.preprocess(open_image(folder / path))[None]  # as training and serving
        want = model.generate(pixels, num_beams=2, max_length=6)
        assert line["caption"] == decode_caption(tokenizer, want.tokens[0])
        assert line["score"] == pytest.approx(want.scores[0], abs=1e-3)
        # the picture of a.png is a.png, of c.JPG c.png: the extension not doubled
        assert line["attention_png"] == str(maps / "photos" / Path(path).with_suffix(".png"))
        with Image.open(line["attention_png"]) as png:
            assert png.format == "PNG" and png.size == figure_size([len(want.tokens[0])])


def test_one_file_to_stdout_with_the_default_options(folder, checkpoint, tokenizer, capsys):
    assert main(["caption", str(folder / "a.png"), "--checkpoint", str(checkpoint)]) == 0
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    model = quantize_decoder(load_checkpoint(checkpoint))  # as the CLI runs it on a CPU
    pixels = model.preprocess(open_image(folder / "a.png"))[None]
    want = model.generate(pixels, num_beams=3, max_length=20)  # the CLI's documented defaults
    assert line == {
        "path": str(folder / "a.png"),
        "caption": decode_caption(tokenizer, want.tokens[0]),
        "score": round(want.scores[0], 4),
        "in_domain": None,  # this checkpoint has no domain check beside it
        "domain_distance": None,
        "model_version": "unregistered",
    }


def test_local_lines_carry_the_domain_check_and_the_registered_version(folder, tmp_path, capsys):
    model = tiny()
    pixels = torch.stack([model.preprocess(picture(i)) for i in range(24)])  # (24, 3, S, S)
    features = pooled(model.encode_image(pixels))  # (24, C)
    check = fit(features, features, shrinkage=0.1, quantile=1.0)
    save_checkpoint(model, tmp_path / "model.pth")
    check.save(tmp_path / "domain.pt")
    (tmp_path / "registered.json").write_text('{"name": "imgtocap-synthetic", "version": "7"}')
    assert (
        main(["caption", str(folder / "a.png"), "--checkpoint", str(tmp_path / "model.pth")]) == 0
    )
    (line,) = [json.loads(text) for text in capsys.readouterr().out.splitlines()]
    grid = model.encode_image(model.preprocess(open_image(folder / "a.png"))[None])
    distance = check.distance(pooled(grid)).item()
    assert line["model_version"] == "7"
    assert line["domain_distance"] == pytest.approx(distance, abs=1e-3)
    assert line["in_domain"] is (distance <= check.threshold)


def test_a_missing_checkpoint_says_what_to_pass(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no artifacts/model/model.pth here
    assert main(["caption", str(folder)]) == 2  # a usage error: returned, as argparse's status
    assert (
        "no checkpoint at artifacts/finetune/model.pth: pass --checkpoint"
        in capsys.readouterr().err
    )


def test_a_token_may_start_with_a_dash(folder, capsys):
    """TorchServe's keys can start with "-": `--token -k3y` passes the key, as `--token=-k3y`."""
    assert main(["caption", str(folder), "--token", "-k3y_9"]) == 2  # a key, and no --url
    assert "--token is for --url" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # an option of caption's right after it: no key was given
        main(["caption", str(folder), "--token", "--url", "http://127.0.0.1:9"])
    assert "argument --token: expected one argument" in capsys.readouterr().err
