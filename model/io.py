"""One checkpoint format: a plain dict {"config": dict, "state_dict": tensors}, loaded weights-only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .captioner import Captioner
from .config import CaptionerConfig


def save_checkpoint(model: Captioner, path: str | Path, **extra: Any) -> None:
    """Write the model's config and full state dict (frozen encoder included: self-contained)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"config": model.config.to_dict(), "state_dict": state, **extra}, Path(path))


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
    model.load_state_dict(checkpoint["state_dict"], strict=True, assign=True)
    return model.to(device).eval()
