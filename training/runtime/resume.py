"""The resumable state of a training run, kept outside DVC's outputs.

After every epoch the trainer writes everything a resumed run needs (model, optimizer,
schedule, RNG, and the loop's `LoopState`: epoch, best epoch, history, MLflow run, ...) to
`artifacts/resume/<fingerprint>/last.pth`, and the best epoch's model to `best.pth` beside it,
each through `model.io.atomic_write`. The fingerprint hashes what the run depends on: its input
files (model config, captions, the train and val features, the encoder weights), its code
(what dvc.yaml lists for the train stage) and the train params; a state with another fingerprint is never
resumed. When the stage succeeds the state is gone.

Why not a DVC output: an output DVC must keep between runs (`persist: true`) keeps the train
stage out of DVC's run cache, so `dvc exp run --temp`, queued experiments and going back to an
earlier commit would all retrain. With the state here, DVC caches the stage's outputs whole.

A state that cannot be read (a crash or a full disk while it was written, a hand edit) is moved
to `artifacts/resume/damaged/` with a warning that says where, and training starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import pickle
import shutil
import time
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from model.io import atomic_write, discard_partial_writes, read_checkpoint
from training.data.checksums import hash_file

log = logging.getLogger(__name__)

# What reading a damaged or foreign file raises: torch's zip reader, the unpickler, our checks.
UNREADABLE = (RuntimeError, EOFError, OSError, ValueError, KeyError, TypeError)
UNREADABLE += (pickle.UnpicklingError, zipfile.BadZipFile)
KEY_CHARS = 16  # of the fingerprint, in the folder name


@dataclass
class LoopState:
    """Where a training run stands after `epoch` completed epochs: what its saved state holds
    besides the tensors (model, optimizer, schedule, RNG)."""

    epoch: int = 0
    best_val: float = math.inf  # the best epoch's validation loss
    best_epoch: int = 0  # 0: none yet
    bad_epochs: int = 0  # since the best one: early stopping counts them
    history: list[dict[str, Any]] = field(default_factory=list)  # a row per epoch
    run_id: str | None = None  # the MLflow run a resumed training continues
    seconds: float = 0.0  # spent in the epochs, over every execution

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> LoopState:
        """The loop state in a loaded state dict."""
        return cls(**{name: saved[name] for name in FIELDS})


FIELDS = {f.name for f in fields(LoopState)}
TENSORS = {"model", "optimizer", "scheduler", "rng"}


def fingerprint(files: Iterable[Path], code: Iterable[Path], **settings: Any) -> str:
    """What a resumable state must match: the files' bytes, the code's sources, the settings."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for path in files:
        hash_file(path, digest)
    for root in code:
        root = Path(root)
        sources = sorted(root.rglob("*.py")) if root.is_dir() else [root]
        for source in sources:
            digest.update(source.relative_to(root.parent).as_posix().encode())
            hash_file(source, digest)
    return digest.hexdigest()


class ResumeState:
    """`<root>/<fingerprint>/last.pth` (everything to resume) and `best.pth` (the best epoch)."""

    def __init__(self, root: Path, key: str):
        self.root, self.key = Path(root), key
        self.dir = self.root / key[:KEY_CHARS]
        self.last, self.best = self.dir / "last.pth", self.dir / "best.pth"

    def load(self) -> dict[str, Any] | None:
        """The state saved by this very run, or None (nothing saved; damaged: set aside).

        Call it first: it makes the folder that `save` and `best` are written to.

        Also removes what no run will resume: the states of other fingerprints (an earlier
        config, params, data or code) and the temporary files of a write that was killed.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        for other in self.root.iterdir():
            if other.is_dir() and other != self.dir and _is_key(other.name):
                log.info("removing %s: the resume state of another config, data or code", other)
                shutil.rmtree(other)
        discard_partial_writes(self.last)
        discard_partial_writes(self.best)
        if not self.last.is_file():
            return None
        try:
            state = torch.load(self.last, map_location="cpu", weights_only=True)
            problem = self._problem(state)
        except UNREADABLE as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return state
        aside = self.root / "damaged" / f"{self.dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.parent.mkdir(exist_ok=True)
        self.dir.rename(aside)
        self.dir.mkdir()
        log.warning(
            "the resume state in %s cannot be used (%s): moved it to %s and training starts "
            "over from epoch 1 (delete that folder once you no longer need it)",
            self.dir,
            problem.splitlines()[0].split(". ")[0][:300],  # torch's messages run on
            aside,
        )
        return None

    def save(self, state: dict[str, Any]) -> None:
        """Write the complete state atomically (a kill mid-write leaves the previous one)."""
        with atomic_write(self.last) as f:
            torch.save({**state, "fingerprint": self.key}, f)

    def remove(self) -> None:
        """The run finished: nothing is left to resume."""
        shutil.rmtree(self.dir, ignore_errors=True)

    def _problem(self, state: Any) -> str | None:
        """Why a loaded state cannot be resumed, or None."""
        if not isinstance(state, dict) or not FIELDS | TENSORS | {"fingerprint"} <= state.keys():
            return f"{self.last} is not a complete training state"
        if state["fingerprint"] != self.key:
            return f"{self.last} belongs to another run (fingerprint {state['fingerprint']})"
        if state["best_epoch"]:
            best = read_checkpoint(self.best)  # raises when missing or damaged
            # best.pth is written before last.pth: a kill in between leaves a newer best
            if best.get("epoch", 0) < state["best_epoch"]:
                return f"{self.best} holds epoch {best.get('epoch')}, not {state['best_epoch']}"
        return None


def _is_key(name: str) -> bool:
    return len(name) == KEY_CHARS and all(c in "0123456789abcdef" for c in name)
