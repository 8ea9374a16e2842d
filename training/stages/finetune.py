"""DVC stage `finetune`: self-critical sequence training after cross-entropy (training/scst.py).

Reads the cross-entropy model (artifacts/model/model.pth) and the cached features, and writes
the model evaluate and package read (artifacts/finetune/model.pth). With `finetune.enabled:
false` (the default, docs/training.md says why) that file is a hard link to the trained model:
no copy on disk, and DVC's cache holds the one object both outputs hash to.

On: per step a batch of training images (their plain features, no augmented views), K
samples per image from the model, CIDEr-D of each against the image's references (document
frequencies of the training captions, computed once), the baseline (greedy or the mean of the
other samples), loss = -(reward - baseline) x the sample's summed log-probs, AdamW at a
constant `lr`. The model stays in eval mode: the policy that samples is the one whose
log-probs get the gradient (no dropout between them). After each epoch the greedy captions
of the validation split are scored with the same CIDEr-D; the best epoch is kept.

Resumes after a kill like train (training/runtime/resume.py: artifacts/resume/finetune/,
outside DVC's outputs) and runs under torchrun like train: each rank takes a contiguous part
of every step's images and the per-sample terms are summed over the whole batch's sample
count, so DDP's gradient average is one process's gradient.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import Captioner, load_checkpoint, save_checkpoint
from model.io import atomic_write
from training import scst
from training.data.batches import CaptionData
from training.dvcfile import stage_code
from training.params import from_section, load_params, pick_device, stage_main
from training.paths import (
    FEATURES_DIR,
    FINETUNE_HISTORY_PATH,
    FINETUNE_METRICS_PATH,
    FINETUNED_PATH,
    MODEL_PATH,
    PROCESSED_PATH,
    RESUME_DIR,
    TRAIN_LOCK,
)
from training.runtime import distributed, resume
from training.runtime.distributed import LAUNCH_PARAMS, World
from training.runtime.precision import PRECISIONS, autocast
from training.runtime.process import die_with_dvc, die_with_launcher, exclusive
from training.runtime.resume import LoopState, ResumeState

log = logging.getLogger(__name__)

HISTORY_FIELDS = ("epoch", "reward", "baseline", "val_cider", "entropy", "seconds")


@dataclass
class FinetuneConfig:
    """The `finetune:` section of params.yaml."""

    enabled: bool = False  # false: the cross-entropy model goes on unchanged (a hard link)
    epochs: int = 1
    images_per_step: int = 16  # x `samples` captions per step
    images_per_epoch: int | None = None  # the first of each epoch's shuffled order; None: all
    samples: int = 5  # K per image
    baseline: str = "mean"  # mean: of the image's other samples (new SCST) | greedy (classic)
    lr: float = 2e-5  # constant, AdamW
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 20  # generated tokens per sample, [SEP] included
    entropy_weight: float = 0.0  # > 0: rewards spread-out next-token distributions
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    num_threads: int = 0
    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    ddp_timeout_s: int = 300

    def __post_init__(self) -> None:
        if self.baseline not in scst.BASELINES:
            raise ValueError(
                f"finetune.baseline must be one of {', '.join(scst.BASELINES)}, "
                f"got {self.baseline!r}"
            )
        if self.baseline == "mean" and self.samples < 2:
            raise ValueError(
                f"finetune.samples is {self.samples}: the mean baseline needs >= 2 samples per "
                "image; raise it or use finetune.baseline: greedy"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"finetune.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> FinetuneConfig:
        """Build from params.yaml's `finetune:` mapping; an unknown key is an error."""
        return from_section(cls, values, "finetune")

    @property
    def distributed(self) -> bool:
        return self.nproc_per_node > 1 or self.nnodes > 1


def references(data: CaptionData, config) -> list[list[tuple[int, ...]]]:
    """Per image its reference captions as token ids ([CLS], [SEP], padding stripped)."""
    rows = scst.words(data.tokens, config.bos_id, config.eos_id, config.pad_id)
    return [rows[int(f) : int(f) + int(c)] for f, c in zip(data.first, data.counts)]


def finetune(
    cfg: FinetuneConfig,
    model_path: Path = MODEL_PATH,
    out_path: Path = FINETUNED_PATH,
    processed_path: Path = PROCESSED_PATH,
    features_dir: Path = FEATURES_DIR,
    resume_dir: Path = RESUME_DIR / "finetune",
    metrics_path: Path = FINETUNE_METRICS_PATH,
    history_path: Path = FINETUNE_HISTORY_PATH,
) -> dict[str, Any]:
    """Fine-tune (or resume) with the self-critical loss; write the best epoch's model, the
    metrics and the reward history; returns the metrics. Off: link the model through."""
    if not cfg.enabled:
        _pass_through(model_path, out_path)
        metrics = {"enabled": False}
        _write_outputs(metrics, [], metrics_path, history_path)
        return metrics
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    world = World.from_env()
    device = distributed.device_for(pick_device(cfg.device), world)
    distributed.join(world, device, cfg.ddp_timeout_s)
    model = load_checkpoint(model_path, device)
    config = model.config
    processed = json.loads(processed_path.read_text())
    train = CaptionData(processed, features_dir, "train", config.pad_id).to(device)
    val = CaptionData(processed, features_dir, "val", config.pad_id).to(device)
    cider = scst.CiderD(references(train, config))  # the training captions' document frequencies
    val_refs = references(val, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    inputs = [model_path, processed_path, features_dir / "train.npy", features_dir / "val.npy"]
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LAUNCH_PARAMS}
    key = resume.fingerprint(inputs, stage_code("finetune"), finetune=settings)
    distributed.check_same_inputs(key, world)
    saved_state = ResumeState(resume_dir, key)
    saved = distributed.broadcast(saved_state.load() if world.main else None, world)
    state, start_cider = LoopState(), 0.0
    if saved:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        rngs = [saved["rng"], *saved["rank_rngs"]]
        torch.set_rng_state(rngs[world.rank] if world.rank < len(rngs) else rngs[0])
        state, start_cider = LoopState.from_saved(saved), saved["start_cider"]
        log.info("resuming after epoch %d of %d (%s)", state.epoch, cfg.epochs, saved_state.last)
    else:
        torch.manual_seed(cfg.seed * 1_000_003 + world.rank)
        if world.main:  # the cross-entropy model is epoch 0: fine-tuning must beat it
            start_cider = _val_cider(model, val, val_refs, cider, cfg, device)
            save_checkpoint(model, saved_state.best, epoch=0)
            log.info("cross-entropy model: val CIDEr-D %.4f", start_cider)
        start_cider = distributed.broadcast(start_cider, world)
        state.best_val = -start_cider
    model.eval()  # sampling and gradient under one policy: no dropout
    net = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    while state.epoch < cfg.epochs:
        started = time.perf_counter()
        row = _epoch(model, net, optimizer, train, cider, cfg, device, world, state.epoch)
        val_cider = -state.best_val
        if world.main:
            val_cider = _val_cider(model, val, val_refs, cider, cfg, device)
        val_cider = distributed.broadcast(val_cider, world)
        state.epoch += 1
        seconds = time.perf_counter() - started
        state.history.append(
            {
                "epoch": state.epoch,
                **row,
                "val_cider": round(val_cider, 5),
                "seconds": round(seconds, 1),
            }
        )
        state.seconds += seconds
        improved = -val_cider < state.best_val
        rngs = distributed.gather(torch.get_rng_state(), world)  # each rank's sampling stream
        if improved:
            state.best_val, state.best_epoch = -val_cider, state.epoch
        if world.main:
            if improved:
                save_checkpoint(model, saved_state.best, epoch=state.epoch)
            saved_state.save(
                {
                    **dataclasses.asdict(state),
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": {},
                    "rng": rngs[0],
                    "rank_rngs": rngs[1:],
                    "start_cider": start_cider,
                }
            )
        log.info("epoch %d: %s", state.epoch, state.history[-1])

    metrics = {
        "enabled": True,
        "best_epoch": state.best_epoch,  # 0: no epoch beat the cross-entropy model
        "best_val_cider": round(-state.best_val, 5),
        "start_val_cider": round(start_cider, 5),  # the cross-entropy model's
        "epochs_run": state.epoch,
        "finetune_seconds": round(state.seconds, 1),
    }
    if world.main:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(out_path) as f, saved_state.best.open("rb") as best:
            shutil.copyfileobj(best, f)
        load_checkpoint(out_path)  # the artifact must load on its own, weights-only
        _write_outputs(metrics, state.history, metrics_path, history_path)
        saved_state.remove()
    distributed.leave(world)
    return metrics


def _epoch(
    model: Captioner,
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: CaptionData,
    cider: scst.CiderD,
    cfg: FinetuneConfig,
    device: torch.device,
    world: World,
    epoch: int,
) -> dict[str, float]:
    """One pass over the training images in their (seed, epoch) order; the mean reward,
    baseline and entropy of its samples over all ranks."""
    config = model.config
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # on every rank
    order = torch.randperm(len(data.counts), generator=generator)[: cfg.images_per_epoch]
    steps = range(0, len(order), cfg.images_per_step)
    sums = torch.zeros(3, dtype=torch.float64)  # reward, baseline, entropy
    count = 0
    for start in tqdm(steps, desc=f"finetune {epoch + 1}/{cfg.epochs}", disable=not world.main):
        images = order[start : start + cfg.images_per_step]  # (I,) this step's, on every rank
        lo, hi = (
            len(images) * world.rank // world.size,
            len(images) * (world.rank + 1) // world.size,
        )
        mine = images[lo:hi]
        grid = data.grid[mine.to(data.grid.device)].to(device)  # (i, N, C)
        k = cfg.samples
        with torch.no_grad(), autocast(device, cfg.precision):
            tokens = scst.sample(model, model.image_context(grid), k, cfg.max_length)
            greedy = None
            if cfg.baseline == "greedy":
                greedy_caps = model.generate(grid=grid, num_beams=1, max_length=cfg.max_length)
        caps = scst.words(tokens, config.bos_id, config.eos_id, config.pad_id)
        owners = mine.repeat_interleave(k).tolist()
        rewards = torch.tensor([cider.score(c, i) for c, i in zip(caps, owners)]).view(-1, k)
        if cfg.baseline == "greedy":
            greedy = torch.tensor(
                [cider.score(tuple(c), int(i)) for c, i in zip(greedy_caps.tokens, mine)]
            )
        base = scst.baseline(rewards, greedy)  # (i, k)
        rows = torch.arange(len(mine), device=device).repeat_interleave(k)  # (i*k,)
        with autocast(device, cfg.precision):
            logp, entropy = scst.sample_log_probs(net, grid, tokens, rows)
        advantage = (rewards - base).flatten().to(device)
        loss = scst.scst_loss(logp, advantage, entropy, cfg.entropy_weight)
        share = loss / (len(images) * k)  # summed over the whole batch's samples: its mean
        optimizer.zero_grad(set_to_none=True)
        (share * world.size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        sums += torch.stack([rewards.sum(), base.sum(), entropy.detach().sum().cpu()]).double()
        count += len(mine) * k
    totals = distributed.total(
        torch.cat([sums, torch.tensor([count], dtype=torch.float64)]).to(device), world
    )
    reward, base, entropy, n = totals.tolist()
    return {
        "reward": round(reward / n, 5),
        "baseline": round(base / n, 5),
        "entropy": round(entropy / n, 5),
    }


@torch.no_grad()
def _val_cider(
    model: Captioner,
    data: CaptionData,
    refs: list[list[tuple[int, ...]]],
    cider: scst.CiderD,
    cfg: FinetuneConfig,
    device: torch.device,
) -> float:
    """Mean CIDEr-D (training document frequencies) of the greedy captions of a split."""
    model.eval()
    caps = []
    for start in range(0, len(data.counts), 64):
        grid = data.grid[start : start + 64].to(device)
        with autocast(device, cfg.precision):
            caps += model.generate(grid=grid, num_beams=1, max_length=cfg.max_length).tokens
    return sum(cider.scores(caps, refs)) / max(1, len(caps))


def _pass_through(model_path: Path, out_path: Path) -> None:
    """out_path becomes a hard link to model_path (a copy where the filesystem has none)."""
    if not model_path.is_file():
        raise FileNotFoundError(f"no model at {model_path}: run the train stage first (dvc repro)")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.unlink(missing_ok=True)
    try:
        os.link(model_path, out_path)
    except OSError:
        shutil.copyfile(model_path, out_path)


def _write_outputs(metrics, history, metrics_path: Path, history_path: Path) -> None:
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    with history_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)


@record
@stage_main
def main() -> None:
    """`python -m training.stages.finetune`: artifacts/model/model.pth -> artifacts/finetune/."""
    world = World.from_env()
    rank = f" [rank {world.rank}]" if world.size > 1 else ""
    logging.basicConfig(
        level=logging.INFO if world.main else logging.WARNING,
        format=f"%(levelname)s %(name)s{rank}: %(message)s",
    )
    worker = distributed.under_torchrun()
    die_with_launcher() if worker else die_with_dvc()
    lock = exclusive(TRAIN_LOCK) if distributed.holds_lock(world) else contextlib.nullcontext()
    with lock:
        cfg = FinetuneConfig.from_dict(load_params().get("finetune"))
        if cfg.enabled and cfg.distributed and not worker:
            distributed.launch(
                "training.stages.finetune", cfg.nproc_per_node, cfg.nnodes, cfg.rdzv_endpoint
            )
            return
        finetune(cfg)


if __name__ == "__main__":
    main()
