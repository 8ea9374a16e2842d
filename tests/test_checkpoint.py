"""Checkpoints: one plain dict, weights-only, rebuilt with no network, written atomically."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from model import load_checkpoint, read_checkpoint, save_checkpoint
from model.io import discard_partial_writes
from tests.helpers.model import tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("projector", ["linear", "mlp"])
@pytest.mark.parametrize("output_vocab", [None, [102, 1037, 2417, 4418]])
@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_save_load_gives_identical_captions_offline(
    tmp_path, no_network, fusion, output_vocab, projector
):
    model = tiny(fusion, output_vocab=output_vocab, projector=projector)
    pixels = torch.randn(3, 3, 32, 32)
    before = model.generate(pixels, num_beams=2, max_length=8)
    save_checkpoint(model, tmp_path / "model.pth", epoch=3)

    loaded = load_checkpoint(tmp_path / "model.pth")
    assert loaded.config == model.config
    assert not loaded.training
    after = loaded.generate(pixels, num_beams=2, max_length=8)
    assert after.tokens == before.tokens
    assert after.scores == pytest.approx(before.scores)


def test_checkpoint_is_a_plain_weights_only_dict(tmp_path):
    model = tiny()
    save_checkpoint(model, tmp_path / "model.pth", epoch=7)
    checkpoint = torch.load(tmp_path / "model.pth", weights_only=True)
    assert set(checkpoint) == {"config", "state_dict", "epoch"}
    assert checkpoint["config"]["encoder"] == "tiny"
    assert all(isinstance(v, torch.Tensor) for v in checkpoint["state_dict"].values())
    # the frozen encoder travels with the model: serving needs nothing else
    assert any(k.startswith("encoder.backbone.") for k in checkpoint["state_dict"])


def test_a_checkpoint_from_before_the_projector_field_loads_with_one_linear_layer(tmp_path):
    model = tiny(projector="linear")
    save_checkpoint(model, tmp_path / "old.pth")
    checkpoint = torch.load(tmp_path / "old.pth", weights_only=True)
    del checkpoint["config"]["projector"]  # as every checkpoint saved before it was written
    torch.save(checkpoint, tmp_path / "old.pth")

    loaded = load_checkpoint(tmp_path / "old.pth")
    assert loaded.config.projector == "linear"
    pixels = torch.randn(2, 3, 32, 32)
    assert (
        loaded.generate(pixels, max_length=8).tokens == model.generate(pixels, max_length=8).tokens
    )


def test_load_checkpoint_errors_are_actionable(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*dvc repro"):
        load_checkpoint(tmp_path / "missing.pth")
    torch.save({"weights": {}}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not an imgtocap checkpoint"):
        load_checkpoint(tmp_path / "other.pth")
    # trained when a grid cell had other channels (an earlier version of the encoder's grid)
    save_checkpoint(tiny(), tmp_path / "old.pth")
    checkpoint = torch.load(tmp_path / "old.pth", weights_only=True)
    state = checkpoint["state_dict"]
    state["image_proj.weight"] = state["image_proj.weight"][:, :40]
    torch.save(checkpoint, tmp_path / "old.pth")
    with pytest.raises(ValueError, match="reads 40-channel grid cells.* has 48 .*dvc repro"):
        load_checkpoint(tmp_path / "old.pth")


# Saves a whole checkpoint of epoch 1 to argv[1], then starts epoch 2's with torch.save patched
# to write half of its bytes into the file, flush them to the disk and say so on stdout, then
# wait on stdin (to be killed there). The test kills it only once it is inside that write.
WRITER = """
import io, os, sys, torch
from model import Captioner, preset, save_checkpoint
model = Captioner(preset("tiny"))
save_checkpoint(model, sys.argv[1], epoch=1)
print("saved 1", flush=True)
real_save = torch.save
def save_half(obj, f, *args, **kwargs):
    whole = io.BytesIO()
    real_save(obj, whole, *args, **kwargs)
    f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
    f.flush()
    os.fsync(f.fileno())
    print("writing 2", len(whole.getvalue()), flush=True)
    sys.stdin.read()
torch.save = save_half
save_checkpoint(model, sys.argv[1], epoch=2)
print("saved 2", flush=True)
"""


@pytest.mark.subprocess
def test_a_checkpoint_write_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    path = tmp_path / "best.pth"
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(120, writer.kill)  # a writer that never gets there fails, not hangs
    watchdog.start()
    try:
        assert writer.stdout.readline() == "saved 1\n"
        inside = writer.stdout.readline().split()  # it is in the middle of epoch 2's write
    finally:
        writer.kill()  # SIGKILL: no cleanup, as a crash, an OOM kill or a power cut would
        writer.wait()
        watchdog.cancel()
    assert inside[:2] == ["writing", "2"], inside
    (partial,) = tmp_path.glob(".best.pth.*.tmp")  # the kill landed in the write
    assert 0 < partial.stat().st_size < int(inside[2])
    assert read_checkpoint(path)["epoch"] == 1  # the previous checkpoint, whole
    discard_partial_writes(path)
    assert [p.name for p in tmp_path.iterdir()] == ["best.pth"]


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_old_one(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tiny(), tmp_path / "model.pth")
    (written, renamed, directory) = events
    assert written[0] == "fsync" and written[1].startswith(".model.pth.")  # the temporary file
    assert renamed == ("rename", "model.pth")
    assert directory == ("fsync", tmp_path.name)  # the rename itself is durable
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]


def test_a_failed_checkpoint_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    save_checkpoint(tiny(), tmp_path / "model.pth", epoch=1)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tiny(), tmp_path / "model.pth", epoch=2)
    assert read_checkpoint(tmp_path / "model.pth")["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pth"]
