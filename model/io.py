"""One checkpoint format: a plain dict {"config": dict, "state_dict": tensors}, loaded weights-only.

Every checkpoint is written through `atomic_write`: a crash, a kill or a full disk while
writing leaves the previous file, never a truncated one.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .captioner import Captioner
from .config import CaptionerConfig


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write that replaces `path` whole when the block ends, or not at all.

    It is a temporary file beside `path`, flushed and fsynced before the rename, the directory
    fsynced after it: even a power loss leaves the old file or the complete new one. On an
    error the temporary file is removed and `path` is untouched. (A file, not a temporary
    path: `torch.save` to a path names the archive inside after the file, and a random name
    would make identical checkpoints differ in bytes.)
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # the rename itself reaches the disk with the directory's entry
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def discard_partial_writes(path: str | Path) -> None:
    """Remove what killed `atomic_write`s of `path` left beside it (their temporary files)."""
    path = Path(path)
    for leftover in path.parent.glob(f".{path.name}.*.tmp"):
        leftover.unlink(missing_ok=True)


def save_checkpoint(model: Captioner, path: str | Path, **extra: Any) -> None:
    """Write the model's config and full state dict (frozen encoder included: self-contained)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with atomic_write(path) as f:
        torch.save({"config": model.config.to_dict(), "state_dict": state, **extra}, f)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, read with weights_only=True (no pickled code is ever executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: train one first (dvc repro)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"config", "state_dict"} <= checkpoint.keys():
        raise ValueError(f"{path} is not an imgtocap checkpoint (expected keys config, state_dict)")
    return checkpoint


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Captioner:
    """Rebuild a Captioner from a checkpoint, in eval mode. Never downloads anything."""
    checkpoint = read_checkpoint(path)
    config = CaptionerConfig.from_dict(checkpoint["config"])
    with torch.device("meta"):  # no random init of weights that are overwritten next
        model = Captioner(config)
    found = checkpoint["state_dict"].get("image_proj.weight")
    channels = model.encoder.spec.channels
    if found is not None and found.shape[1] != channels:
        raise ValueError(
            f"{path} reads {found.shape[1]}-channel grid cells, but this version's "
            f"{config.encoder} grid has {channels} (model/encoders.py): it was trained by an "
            "earlier imgtocap; train it again (dvc repro) or use that version"
        )
    model.load_state_dict(checkpoint["state_dict"], strict=True, assign=True)
    return model.to(device).eval()
