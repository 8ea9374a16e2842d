"""imgtocap's captioner: frozen CNN encoder + causal BERT decoder, as plain PyTorch.

Captioning, for every caller: `load` a checkpoint (with its tokenizer and preprocessing), then
`caption` images with `Decoding` options (model/pipeline.py):

    captioner = model.load("artifacts/model/model.pth", device="cpu")
    results = captioner.caption([model.open_image("cat.jpg")], model.Decoding(num_beams=5))

The public names load their submodule on first use (PEP 562), so `from model.image import
open_image` or `from model.config import preset` does not import torch or transformers: the
torch-free pipeline stages (ingest, validate) use them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the submodule that defines it
_SOURCES = {
    "Captioner": "captioner",
    "Decoding": "options",
    "Generation": "decoding",
    "PRESETS": "config",
    "CaptionerConfig": "config",
    "preset": "config",
    "preprocess": "encoders",
    "ImageError": "image",
    "open_image": "image",
    "UnsupportedFormat": "image",
    "load_checkpoint": "io",
    "read_checkpoint": "io",
    "save_checkpoint": "io",
    "build_captioner": "pretrained",
    "decode_caption": "tokenizer",
    "encode_caption": "tokenizer",
    "load_tokenizer": "tokenizer",
    "normalize_caption": "tokenizer",
    "Caption": "pipeline",
    "CaptionPipeline": "pipeline",
    "load": "pipeline",
}

__all__ = [
    "PRESETS",
    "Caption",
    "CaptionPipeline",
    "Captioner",
    "CaptionerConfig",
    "Decoding",
    "Generation",
    "build_captioner",
    "ImageError",
    "decode_caption",
    "encode_caption",
    "load",
    "load_checkpoint",
    "load_tokenizer",
    "normalize_caption",
    "open_image",
    "preprocess",
    "preset",
    "read_checkpoint",
    "save_checkpoint",
    "UnsupportedFormat",
]

if TYPE_CHECKING:  # what linters and type checkers see; at runtime, __getattr__ below
    from .captioner import Captioner
    from .config import PRESETS, CaptionerConfig, preset
    from .decoding import Generation
    from .encoders import preprocess
    from .image import ImageError, UnsupportedFormat, open_image
    from .io import load_checkpoint, read_checkpoint, save_checkpoint
    from .options import Decoding
    from .pipeline import Caption, CaptionPipeline, load
    from .pretrained import build_captioner
    from .tokenizer import decode_caption, encode_caption, load_tokenizer, normalize_caption


def __getattr__(name: str) -> Any:
    if name not in _SOURCES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
