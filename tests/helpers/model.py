"""Test helpers for the model: a tiny captioner, a training loop, distinct little pictures and
captions for them, padded caption batches, a PNG that lies about its size, a model store to
serve, and an archive's handler loaded as a TorchServe worker loads it."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import sys
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from ts.context import Context

from model import Captioner, decode_caption, encode_caption, preset, save_checkpoint
from training.stages.package import build_archive


def tiny(fusion: str = "cross_attention", **overrides) -> Captioner:
    """A random tiny-preset captioner in eval mode (`overrides` replace preset fields)."""
    return Captioner(preset("tiny", fusion=fusion, **overrides)).eval()


def fit(
    model: Captioner,
    grid: torch.Tensor,
    tokens: torch.Tensor,
    *,
    lr: float,
    steps: int,
    until: Callable[[Captioner], bool] | None = None,
    every: int = 25,
) -> float:
    """Train `model` on one batch (grid (B, N, C) -> tokens (B, T)) with AdamW for `steps`
    steps, or until `until(model)` holds (asked in eval mode every `every` steps). Returns the
    last loss; the model is left in eval mode."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tensors this small only make threads contend (seconds vs minutes)
    try:
        for step in range(1, steps + 1):
            model.train()
            _, loss = model(grid, tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if until is not None and step % every == 0 and until(model.eval()):
                break
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return loss.item()


def picture(i: int, size: int = 32) -> Image.Image:
    """Picture i of a set of different ones: noise from seed i, a red box placed by i."""
    s = size // 32
    rng = np.random.default_rng(i)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    x, y = 4 * s * (i % 4), 2 * s * i
    ImageDraw.Draw(image).rectangle([x, y, x + 12 * s, y + 10 * s], fill=(255, 0, 0))
    return image


# Eight captions for picture(0) ... picture(7), one each, for a tiny model to memorise.
PICTURE_CAPTIONS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "two yellow squares",
    "a black circle",
    "an orange square",
    "a purple triangle",
    "a white background",
]


def caption_tokens(tokenizer, captions: list[str], max_tokens: int) -> torch.Tensor:
    """Captions -> [CLS] ... [SEP] token ids (B, T), padded with [PAD] (id 0)."""
    ids = [encode_caption(tokenizer, c, max_tokens=max_tokens) for c in captions]
    tokens = torch.zeros(len(ids), max(map(len, ids)), dtype=torch.long)
    for row, seq in zip(tokens, ids, strict=True):
        row[: len(seq)] = torch.tensor(seq)
    return tokens


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header is rewritten to claim width x height pixels (no such pixel data)."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = buffer.getvalue()
    chunk = b"IHDR" + struct.pack(">II", width, height) + data[24:29]  # depth, colour, ...
    return (
        data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
    )


def model_store(
    directory: Path, *, captions: list[str] | None = None, tokenizer=None, **serve
) -> Path:
    """`directory` as a model store holding imgtocap.mar: a tiny captioner behind the real handler,
    `serve` overriding the serve: defaults. Random (its captions are real but nonsense), or with
    `captions` memorised for picture(0), picture(1), ... so that greedy decoding (`serve`
    num_beams default 1) answers picture(i) with captions[i]."""
    model = tiny()
    if captions:
        pixels = torch.stack([model.preprocess(picture(i)) for i in range(len(captions))])

        def memorised(m: Captioner) -> bool:
            out = m.generate(pixels, num_beams=1, max_length=12)
            return [decode_caption(tokenizer, t) for t in out.tokens] == captions

        tokens = caption_tokens(tokenizer, captions, max_tokens=8)  # (B, T)
        fit(model, model.encode_image(pixels), tokens, lr=1e-2, steps=800, until=memorised)
        assert memorised(model), f"not memorised after 800 steps: {captions}"
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = directory / "model.pth"
    save_checkpoint(model, checkpoint)
    build_archive(checkpoint, directory, serve)
    checkpoint.unlink()
    return directory


class NoMetrics:
    """Stands in for TorchServe's metrics cache: the handler records one time per batch."""

    def __init__(self):
        self.times = []

    def add_time(self, name, value, idx=None, unit="ms"):
        self.times.append((name, value, unit))


def archive_handler(archive: Path, workdir: Path, batch_size: int, gpu_id: int | None = None):
    """(handler, context, its model_dir): the archive's handler initialised in this process as a
    fresh TorchServe worker runs it (its own `model/` imported, `gpu_id` as TorchServe assigns);
    this process's `model` modules and sys.path are put back afterwards."""
    model_dir = workdir / "unpacked"
    with zipfile.ZipFile(archive) as mar:
        mar.extractall(model_dir)
    spec = importlib.util.spec_from_file_location(
        "imgtocap_handler", model_dir / "imgtocap_handler.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context("imgtocap", str(model_dir), manifest, batch_size, gpu_id, "0.12.0")
    context.metrics = NoMetrics()
    context.model_yaml_config = {"maxWorkers": 1}
    ours = {name: m for name, m in sys.modules.items() if name.split(".")[0] == "model"}
    path = list(sys.path)
    for name in ours:
        del sys.modules[name]
    try:
        handler = module.ImgtocapHandler()
        handler.initialize(context)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "model"]:
            del sys.modules[name]
        sys.modules.update(ours)
        sys.path[:] = path
    return handler, context, model_dir
