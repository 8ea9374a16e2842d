"""DVC stage `train`: fit the decoder on the precomputed image features.

AdamW (pretrained weights at `lr`, freshly initialised layers at `new_layer_lr`), linear
warmup then cosine decay, gradient clipping, optional label smoothing; validation loss every
epoch, the best epoch kept, early stopping after `patience` epochs without improvement.

Interrupted runs resume: after every epoch the full state (model, optimizer, schedule, RNG,
history, MLflow run) goes to `artifacts/resume/<fingerprint>/` (training/resume.py), outside
DVC's outputs. `dvc repro` after a kill continues from the last completed epoch, as long as the
config, params, data and code are unchanged (the fingerprint); the batch order of an epoch
depends only on (seed, epoch), so a resumed run trains exactly like a straight one. One trainer
runs per workspace, and it stops when the `dvc` that started it is gone (training/process.py).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model import Captioner, CaptionerConfig, load_checkpoint, save_checkpoint
from model.io import atomic_write
from model.pretrained import load_pretrained
from training import augment, resume, tracking
from training.augment import mirror_ids, mirror_tokens
from training.datachecks import check_learnable
from training.params import ModelParams, from_section, load_params, pick_device, stage_main
from training.paths import (
    CONFIG_PATH,
    ENCODER_WEIGHTS,
    FEATURES_DIR,
    FEATURES_INDEX,
    HISTORY_PATH,
    MODEL_PATH,
    PROCESSED_PATH,
    RESUME_DIR,
    TRAIN_LOCK,
    TRAIN_METRICS_PATH,
    TRAIN_VIEWS,
)
from training.process import die_with_dvc, exclusive
from training.weights import WeightsConfig, needed, weight_files

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The `train:` section of params.yaml."""

    epochs: int = 20
    batch_size: int = 64  # captions per step
    captions_per_image: int | None = 1  # per image per epoch, drawn anew each epoch; None: all
    lr: float = 3e-4
    new_layer_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    label_smoothing: float = 0.1
    patience: int = 3
    seed: int = 0
    device: str = "auto"
    num_threads: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> TrainConfig:
        """Build from params.yaml's `train:` mapping; an unknown key is an error."""
        return from_section(cls, values, "train")


class CaptionData:
    """One split: image features (n, N, C) fp16 and all captions of every image.

    A batch holds whole images with all their captions: the image's projected memory is
    computed once and shared by its captions (`rows`), which saves a third of the compute.
    Where transform encoded augmented views (the train split), each shuffled pass draws one
    per image, the image itself included; a mirrored view comes with its captions mirrored
    ("left" and "right" swapped in the token ids).
    """

    def __init__(self, processed: dict[str, Any], features_dir: Path, split: str, pad_id: int):
        entries = processed["splits"][split]
        index = json.loads((features_dir / FEATURES_INDEX).read_text())
        if index["splits"][split] != [e["image"] for e in entries]:
            raise ValueError(
                f"{features_dir} does not match {split} of data/processed: run `dvc repro` "
                "(the transform stage) again"
            )
        self.grid = torch.from_numpy(np.load(features_dir / f"{split}.npy"))  # (n, N, C) fp16
        sequences = [seq for e in entries for seq in e["tokens"]]
        self.tokens = torch.full((len(sequences), max(map(len, sequences), default=2)), pad_id)
        for i, seq in enumerate(sequences):
            self.tokens[i, : len(seq)] = torch.tensor(seq)
        counts = torch.tensor([len(e["tokens"]) for e in entries])
        self.first = torch.cumsum(counts, 0) - counts  # image i's captions: first[i] + 0..count-1
        self.counts = counts
        self.pad_id = pad_id
        self.views: np.ndarray | None = None  # (n, K, N, C) fp16, memory-mapped
        if split == "train" and "views" in index:
            self.views = np.load(features_dir / TRAIN_VIEWS, mmap_mode="r")
            self.flipped = torch.tensor(index["views"]["flipped"], dtype=torch.bool)  # (n, K)
            if self.views.shape[:2] != tuple(self.flipped.shape) or len(self.grid) != len(
                self.views
            ):
                raise ValueError(
                    f"{features_dir / TRAIN_VIEWS} does not match its index: run `dvc repro -f "
                    "transform`"
                )
            if self.flipped.any():
                self.mirrored = mirror_tokens(self.tokens, *mirror_ids(processed["tokenizer"]))

    def __len__(self) -> int:
        return len(self.tokens)

    def batches(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        captions_per_image: int | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(grid (I, N, C) fp16, tokens (B, T), rows (B,)): B ~ batch_size captions of I images.

        Each image comes with all its captions, or with `captions_per_image` of them drawn at
        random (a new draw each epoch: over epochs every caption is used). Images are shuffled
        when given a generator, and then each image is one of its views, drawn at random.
        """
        n = len(self.counts)
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        view = torch.zeros(n, dtype=torch.long)  # 0: the image itself; v: views[:, v - 1]
        if generator is not None and self.views is not None:
            view = torch.randint(self.views.shape[1] + 1, (n,), generator=generator)
        used = self.counts.clamp(max=captions_per_image) if captions_per_image else self.counts
        for start in range(0, n, self._images_per_batch(batch_size, used)):
            images = order[start : start + self._images_per_batch(batch_size, used)]  # (I,)
            counts = used[images]
            rows = torch.repeat_interleave(torch.arange(len(images)), counts)  # (B,)
            if captions_per_image:
                offsets = torch.cat(
                    [
                        torch.randperm(int(self.counts[i]), generator=generator)[: int(c)]
                        for i, c in zip(images, counts)
                    ]
                )
            else:
                offsets = torch.arange(len(rows)) - torch.repeat_interleave(
                    torch.cumsum(counts, 0) - counts, counts
                )
            picked = self.first[images][rows] + offsets  # (B,) caption rows
            tokens = self.tokens[picked]  # (B, T)
            grid = self.grid[images]  # (I, N, C)
            augmented = view[images] > 0  # (I,)
            if augmented.any():
                which = images[augmented], view[images][augmented] - 1  # (A,), (A,)
                grid[augmented] = torch.from_numpy(self.views[which[0].numpy(), which[1].numpy()])
                flip = torch.zeros(len(images), dtype=torch.bool)
                flip[augmented] = self.flipped[which]
                if flip.any():
                    tokens = torch.where(flip[rows, None], self.mirrored[picked], tokens)
            width = int((tokens != self.pad_id).sum(1).max())  # trim padding columns
            yield grid, tokens[:, :width], rows

    def steps(self, batch_size: int, captions_per_image: int | None = None) -> int:
        """Batches per pass over the split."""
        used = self.counts.clamp(max=captions_per_image) if captions_per_image else self.counts
        return math.ceil(len(self.counts) / self._images_per_batch(batch_size, used))

    @staticmethod
    def _images_per_batch(batch_size: int, used: torch.Tensor) -> int:
        return max(1, round(batch_size / max(1.0, used.float().mean().item())))


def param_groups(model: Captioner, new: set[str], cfg: TrainConfig) -> list[dict[str, Any]]:
    """Pretrained vs new layers (two learning rates) x decayed vs not (biases, norms)."""
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim < 2 or "norm" in name or name.endswith(("row_emb", "col_emb"))
        groups.setdefault((name in new, no_decay), []).append(param)
    return [
        {
            "params": params,
            "lr": cfg.new_layer_lr if is_new else cfg.lr,
            "weight_decay": 0.0 if no_decay else cfg.weight_decay,
        }
        for (is_new, no_decay), params in sorted(groups.items())
    ]


def warmup_cosine(total_steps: int, warmup_fraction: float):
    """Multiplier on the peak lr: linear warmup, then cosine decay to zero."""
    warmup = max(1, round(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@torch.no_grad()
@torch.no_grad()
def validation_loss(model: Captioner, data: CaptionData, batch_size: int, device) -> float:
    """Token-weighted mean cross-entropy (no label smoothing) over a split."""
    model.eval()
    total, count = 0.0, 0
    for grid, tokens, rows in data.batches(batch_size):
        tokens = tokens.to(device)
        _, loss = model(grid.to(device), tokens, rows=rows.to(device))
        n = int((tokens[:, 1:] != data.pad_id).sum())
        total, count = total + loss.item() * n, count + n
    return total / max(count, 1)


def train(
    cfg: TrainConfig,
    config_path: Path = CONFIG_PATH,
    processed_path: Path = PROCESSED_PATH,
    features_dir: Path = FEATURES_DIR,
    resume_dir: Path = RESUME_DIR,
    model_path: Path = MODEL_PATH,
    metrics_path: Path = TRAIN_METRICS_PATH,
    history_path: Path = HISTORY_PATH,
    params: dict[str, Any] | None = None,
    weights: WeightsConfig | None = None,
) -> dict[str, Any]:
    """Train (or resume), write the best model, metrics and history; returns the metrics.

    `params` (all of params.yaml) is only recorded: MLflow logs it as the run's params.
    `weights` (params.yaml model.weights) says where a downloaded decoder's file is.
    """
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    device = pick_device(cfg.device)
    config = CaptionerConfig.load(config_path)
    index = json.loads((features_dir / FEATURES_INDEX).read_text())
    if index["encoder"] != config.encoder:
        raise ValueError(
            f"features in {features_dir} come from {index['encoder']} but the model uses "
            f"{config.encoder}: run `dvc repro` so transform recomputes them"
        )
    processed = json.loads(processed_path.read_text())
    train_data = CaptionData(processed, features_dir, "train", config.pad_id)
    val_data = CaptionData(processed, features_dir, "val", config.pad_id)
    for split, data in (("train", train_data), ("val", val_data)):
        check_learnable(split, data.tokens, data.grid, config, f"{processed_path}, {features_dir}")

    torch.manual_seed(cfg.seed)
    model = Captioner(config)
    encoder_weights = torch.load(features_dir / ENCODER_WEIGHTS, weights_only=True)
    files = weight_files(needed(config, encoder=False), weights or WeightsConfig(), "the decoder")
    new = set(load_pretrained(model, encoder_weights=encoder_weights, files=files))
    model.to(device)
    # fused: the update of all parameters in one kernel; on a CPU the per-tensor loop made a
    # training step ~1.5x longer (measured side by side: 7.8 s vs 5.1 s per step, busy machine)
    optimizer = torch.optim.AdamW(param_groups(model, new, cfg), fused=True)
    steps_per_epoch = train_data.steps(cfg.batch_size, cfg.captions_per_image)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup_fraction)
    )

    inputs = [config_path, processed_path, features_dir / FEATURES_INDEX]
    inputs += [features_dir / name for name in ("train.npy", "val.npy", ENCODER_WEIGHTS)]
    if train_data.views is not None:  # the augmented views an epoch draws from
        inputs.append(features_dir / TRAIN_VIEWS)
    inputs += sorted(files.values())  # the decoder's pretrained file, when it has one
    code = (*resume.CODE, Path(augment.__file__))  # augment: how a mirrored view's captions read
    saved = resume.ResumeState(
        resume_dir, resume.fingerprint(inputs, code, train=dataclasses.asdict(cfg))
    )
    state = saved.load()
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        log.info("resuming after epoch %d of %d (%s)", state["epoch"], cfg.epochs, saved.last)
    else:
        state = {"epoch": 0, "best_val": math.inf, "best_epoch": 0, "bad_epochs": 0}
        state.update(history=[], run_id=None, seconds=0.0)
    # this execution's MLflow run (a resumed training continues its own)
    run_id = tracking.start_training(state["run_id"], params or {}, config.to_dict())
    state["run_id"] = run_id

    log.info(
        "%d train / %d val captions, %d steps per epoch, device %s",
        len(train_data),
        len(val_data),
        steps_per_epoch,
        device,
    )
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        batches = tqdm(
            train_data.batches(cfg.batch_size, generator, cfg.captions_per_image),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
        )
        running = 0.0
        for step, (grid, tokens, rows) in enumerate(batches, 1):
            with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
                _, loss = model(
                    grid.to(device), tokens.to(device), cfg.label_smoothing, rows.to(device)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            running += loss.item()
            batches.set_postfix(loss=f"{running / step:.3f}")
        val_loss = validation_loss(model, val_data, cfg.batch_size, device)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            "train_loss": round(running / steps_per_epoch, 5),
            "val_loss": round(val_loss, 5),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 1),
        }
        state["history"].append(row)
        state["seconds"] += seconds
        if val_loss < state["best_val"] - 1e-4:
            state.update(best_val=val_loss, best_epoch=epoch + 1, bad_epochs=0)
            save_checkpoint(model, saved.best, epoch=epoch + 1, val_loss=val_loss)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        saved.save(_full_state(state, model, optimizer, scheduler))
        tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        log.info(
            "epoch %d: train %.4f, val %.4f (%.0f s)",
            epoch + 1,
            row["train_loss"],
            val_loss,
            seconds,
        )

    model_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(model_path) as f, saved.best.open("rb") as best:
        shutil.copyfileobj(best, f)
    load_checkpoint(model_path)  # the artifact must load on its own, weights-only
    metrics = {
        "best_epoch": state["best_epoch"],
        "best_val_loss": round(state["best_val"], 5),
        "epochs_run": state["epoch"],
        "stopped_early": state["epoch"] < cfg.epochs,
        "final_train_loss": state["history"][-1]["train_loss"],
        "train_seconds": round(state["seconds"], 1),
        "train_captions": len(train_data),
    }
    _write_outputs(metrics, state["history"], metrics_path, history_path)
    tracking.log_metrics(
        {"best_val_loss": metrics["best_val_loss"], "best_epoch": metrics["best_epoch"]}
    )
    tracking.end()
    tracking.save_run_id(run_id)
    saved.remove()  # every output is written: nothing is left to resume
    return metrics


def _full_state(state: dict[str, Any], model, optimizer, scheduler) -> dict[str, Any]:
    """Everything a resumed run needs: the bookkeeping, the weights, optimizer, schedule, RNG."""
    return {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
    }


def _write_outputs(metrics, history, metrics_path: Path, history_path: Path) -> None:
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    with history_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@stage_main
def main() -> None:
    """`python -m training.train`: data/features + config -> artifacts/model/model.pth."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    die_with_dvc()
    with exclusive(TRAIN_LOCK):
        params = load_params()
        weights = ModelParams.from_dict(params.get("model")).weights
        train(TrainConfig.from_dict(params.get("train")), params=params, weights=weights)


if __name__ == "__main__":
    main()
