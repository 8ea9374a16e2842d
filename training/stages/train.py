"""DVC stage `train`: fit the decoder on the precomputed image features.

AdamW (pretrained weights at `lr`, freshly initialised layers at `new_layer_lr`), linear
warmup then cosine decay, gradient clipping, optional label smoothing; validation loss every
epoch, the best epoch kept, early stopping after `patience` epochs without improvement.

Interrupted runs resume: after every epoch the full state (model, optimizer, schedule, RNG,
history, MLflow run) goes to `artifacts/resume/<fingerprint>/` (training/runtime/resume.py), outside
DVC's outputs. `dvc repro` after a kill continues from the last completed epoch, as long as the
config, params, data and code are unchanged (the fingerprint); the batch order of an epoch
depends only on (seed, epoch), so a resumed run trains exactly like a straight one. One trainer
runs per workspace, and it stops when the `dvc` that started it is gone (training/runtime/process.py).

Past one process (`nproc_per_node`, `nnodes`): the stage re-launches itself under torchrun
(training/runtime/distributed.py) and trains with DistributedDataParallel. The global batch stays
`batch_size` captions in the same (seed, epoch) order; each rank takes a contiguous part of its
images (`shard`), and its summed token loss is weighted so that DDP's gradient average is the
gradient of the whole batch's mean loss, as one process computes it: the loss curve is the
one-process curve up to float rounding (and dropout masks, which each rank draws for its own
captions). Rank 0 alone reads and writes the resume state, checkpoints, outputs and MLflow;
every rank gets the same validation loss bits, so all take the same early-stopping decision.
One process computes exactly what it computed before DDP existed.
"""

from __future__ import annotations

import contextlib
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
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import Captioner, CaptionerConfig, load_checkpoint, save_checkpoint
from model.io import atomic_write
from model.pretrained import load_pretrained
from training.data.augment import mirror_ids, mirror_tokens
from training.data.datachecks import check_features, check_learnable
from training.data.weights import WeightsConfig, needed, weight_files
from training.dvcfile import stage_code
from training.params import ModelConfig, from_section, load_params, pick_device, stage_main
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
from training.runtime import distributed, resume
from training.runtime.distributed import ONE_PROCESS, World
from training.runtime.process import die_with_dvc, die_with_launcher, exclusive
from training.tracking import runs as tracking

log = logging.getLogger(__name__)


# train.precision: auto is bf16 autocast where the device computes it natively, else fp32.
PRECISIONS = ("auto", "fp32", "bf16")


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
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where the hardware has it (CUDA, AMX/AVX512-BF16 CPUs)
    num_threads: int = 0
    nproc_per_node: int = 1  # processes on this machine, one per GPU; > 1: DDP under torchrun
    nnodes: int = 1  # machines; > 1: node 0 runs `dvc repro`, the others the stage (README)
    rdzv_endpoint: str | None = None  # host:port on node 0 that every node reaches (nnodes > 1)
    ddp_timeout_s: int = 300  # a rank waiting this long for the others fails the whole job

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
            )
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ValueError(
                f"train.nproc_per_node ({self.nproc_per_node}) and train.nnodes ({self.nnodes}) "
                "must be >= 1"
            )
        host, _, port = (self.rdzv_endpoint or "").rpartition(":")
        if self.nnodes > 1 and not (host and port.isdigit()):
            raise ValueError(
                f"train.nnodes is {self.nnodes}: train.rdzv_endpoint must be host:port of node 0, "
                f"reachable from every node (e.g. 10.0.0.1:29500), got {self.rdzv_endpoint!r}"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> TrainConfig:
        """Build from params.yaml's `train:` mapping; an unknown key is an error."""
        return from_section(cls, values, "train")

    @property
    def distributed(self) -> bool:
        """Whether the stage launches itself under torchrun."""
        return self.nproc_per_node > 1 or self.nnodes > 1


# How the run is spread over processes, not what it computes: the data order and the
# gradient do not depend on it, so a state saved by 2 processes resumes with 1 or 4.
LAUNCH_PARAMS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "ddp_timeout_s")
# Steps between updates of the progress bar's loss: reading it waits for the GPU.
SHOW_LOSS_EVERY = 25


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

    def to(self, device: torch.device) -> CaptionData:
        """Hold the features on `device` (a GPU: no copy per step); the captions stay on the
        CPU, where batches are put together without waiting for the GPU."""
        self.grid = self.grid.to(device)
        return self

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
            grid = self.grid[images.to(self.grid.device, non_blocking=True)]  # (I, N, C)
            augmented = view[images] > 0  # (I,)
            if augmented.any():
                which = images[augmented], view[images][augmented] - 1  # (A,), (A,)
                drawn = torch.from_numpy(self.views[which[0].numpy(), which[1].numpy()])
                grid[augmented.to(grid.device)] = drawn.to(grid.device)  # (A, N, C)
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


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # grid (I, N, C), tokens (B, T), rows (B,)


def shard(batch: Batch, world: World, pad_id: int) -> tuple[Batch, int]:
    """This rank's part of a batch every rank drew alike: a contiguous run of its images with
    their captions (possibly none), and the whole batch's number of targets (non-pad tokens
    after [CLS]: the mean loss's denominator). One process: the batch itself."""
    grid, tokens, rows = batch
    targets = int((tokens[:, 1:] != pad_id).sum())  # on the CPU: no wait for the GPU
    if world.size == 1:
        return batch, targets
    lo, hi = len(grid) * world.rank // world.size, len(grid) * (world.rank + 1) // world.size
    mine = (rows >= lo) & (rows < hi)  # rows are sorted: a contiguous run of captions
    tokens, rows = tokens[mine], rows[mine] - lo
    width = int((tokens != pad_id).sum(1).max()) if len(tokens) else 2  # trim padding columns
    return (grid[lo:hi], tokens[:, :width], rows), targets


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
def validation_loss(
    model: Captioner,
    data: CaptionData,
    batch_size: int,
    device,
    world: World = ONE_PROCESS,
    precision: str = "fp32",
) -> float:
    """Token-weighted mean cross-entropy (no label smoothing) over a split, the ranks sharing
    each batch, in the training steps' precision; every rank gets the same value."""
    model.eval()
    summed = torch.zeros((), dtype=torch.float64, device=device)  # on the device: no wait
    count = 0
    for batch in data.batches(batch_size):
        (grid, tokens, rows), targets = shard(batch, world, data.pad_id)
        count += targets
        n = int((tokens[:, 1:] != data.pad_id).sum())  # this rank's targets
        if n:
            with autocast(device, precision):
                _, loss = model(grid.to(device), tokens.to(device), rows=rows.to(device))
            summed += loss.double() * n  # as one process always summed it: float64
    return distributed.total(summed, world).item() / max(count, 1)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: CUDA GPUs from Ampere on, and CPUs with AMX or
    AVX512-BF16 (oneDNN's bf16 matmul is ~6x fp32 on AMX; elsewhere bf16 is emulated, slower)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)  # Ampere and later
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: may go away
    return device.type == "cpu" and any(getattr(cpu, name, lambda: False)() for name in checks)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether training steps on `device` run under bf16 autocast for `train.precision`."""
    return precision == "bf16" or (precision == "auto" and native_bf16(device))


def autocast(device: torch.device, precision: str = "fp32") -> torch.autocast:
    """The autocast context a training step runs in: bf16 where `uses_bf16` (weights,
    optimizer state and the loss stay fp32; no loss scaling needed), else disabled (fp32)."""
    return torch.autocast(device.type, torch.bfloat16, enabled=uses_bf16(device, precision))


def train_step(
    net: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    batch: Batch,
    cfg: TrainConfig,
    device: torch.device,
    world: World = ONE_PROCESS,
    pad_id: int = 0,
) -> torch.Tensor:
    """One optimizer step on this rank's part of `batch`; returns (detached, on `device`) its
    share of the batch's mean loss: the shares of all ranks add up to it.

    One process minimises the batch's mean token loss. A rank holds part of the tokens: its
    share is its summed token loss over the whole batch's target count, and since DDP averages
    the ranks' gradients, backpropagating world size times it makes that average the gradient
    of the whole batch's mean loss, as one process computes it (up to float rounding).
    """
    (grid, tokens, rows), targets = shard(batch, world, pad_id)
    grid = grid.to(device, non_blocking=True)
    tokens, rows = tokens.to(device, non_blocking=True), rows.to(device, non_blocking=True)
    with autocast(device, cfg.precision):
        if world.size == 1:  # the mean loss itself: one process trains as it always did
            _, share = net(grid, tokens, cfg.label_smoothing, rows)
        else:  # a rank with no captions in this batch adds 0 (and takes part in the all-reduce)
            _, summed = net(grid, tokens, cfg.label_smoothing, rows, reduction="sum")
            share = summed / targets
    optimizer.zero_grad(set_to_none=True)
    (share * world.size).backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return share.detach()


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
    Under torchrun this is one rank of a DDP run (training/runtime/distributed.py); rank 0 writes.
    """
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    world = World.from_env()
    device = distributed.device_for(pick_device(cfg.device), world)
    distributed.join(world, device, cfg.ddp_timeout_s)
    config = CaptionerConfig.load(config_path)
    index = json.loads((features_dir / FEATURES_INDEX).read_text())
    check_features(index, config.encoder, features_dir)
    processed = json.loads(processed_path.read_text())
    train_data = CaptionData(processed, features_dir, "train", config.pad_id)
    val_data = CaptionData(processed, features_dir, "val", config.pad_id)
    for split, data in (("train", train_data), ("val", val_data)):
        check_learnable(split, data.tokens, data.grid, config, f"{processed_path}, {features_dir}")
    if device.type == "cuda":  # features read where the model runs: no copy per step
        train_data.to(device)
        val_data.to(device)

    torch.manual_seed(cfg.seed)
    model = Captioner(config)
    encoder_weights = torch.load(features_dir / ENCODER_WEIGHTS, weights_only=True)
    wanted = needed(config, encoder=False), weights or WeightsConfig(), "the decoder"
    files = distributed.local_first(world, weight_files, *wanted)
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
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LAUNCH_PARAMS}
    key = resume.fingerprint(inputs, stage_code("train"), train=settings)
    distributed.check_same_inputs(key, world)
    saved = resume.ResumeState(resume_dir, key)
    # rank 0 alone looks at the state (loading may set a damaged one aside), the rest get it
    state = distributed.broadcast(saved.load() if world.main else None, world)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(_rank_rng(state, world.rank, cfg.seed))
        log.info("resuming after epoch %d of %d (%s)", state["epoch"], cfg.epochs, saved.last)
    else:
        state = {"epoch": 0, "best_val": math.inf, "best_epoch": 0, "bad_epochs": 0}
        state.update(history=[], run_id=None, seconds=0.0)
        if world.rank:  # dropout: rank 0 draws as one process does, the others their own
            torch.manual_seed(_rank_seed(cfg.seed, world.rank))
    # this execution's MLflow run (a resumed training continues its own); rank 0's alone
    run_id = None
    if world.main:
        run_id = tracking.start_training(state["run_id"], params or {}, config.to_dict())
    state["run_id"] = run_id
    # gradients averaged over the ranks after each backward; the module itself is `model`
    net = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)

    log.info(
        "%d train / %d val captions, %d steps per epoch, device %s (%s)%s",
        len(train_data),
        len(val_data),
        steps_per_epoch,
        device,
        "bf16 autocast" if uses_bf16(device, cfg.precision) else "fp32",
        f", {world.size} processes (DDP)" if world.size > 1 else "",
    )
    for epoch in range(state["epoch"], cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            break
        started = time.perf_counter()
        model.train()
        generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # on every rank
        batches = tqdm(
            train_data.batches(cfg.batch_size, generator, cfg.captions_per_image),
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=not world.main,
        )
        # summed on the device (no wait per step), in float64 as one process always summed it
        running = torch.zeros((), dtype=torch.float64, device=device)
        for step, batch in enumerate(batches, 1):
            share = train_step(net, optimizer, scheduler, batch, cfg, device, world, config.pad_id)
            running += share.double()
            if world.main and (step % SHOW_LOSS_EVERY == 0 or step == steps_per_epoch):
                # rank 0's share scaled up: the loss shown, roughly; the history has the exact one
                batches.set_postfix(loss=f"{running.item() * world.size / step:.3f}")
        train_loss = distributed.total(running, world).item() / steps_per_epoch
        val_loss = validation_loss(model, val_data, cfg.batch_size, device, world, cfg.precision)
        seconds = time.perf_counter() - started
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(seconds, 1),
        }
        state["history"].append(row)
        state["seconds"] += seconds
        improved = val_loss < state["best_val"] - 1e-4  # the same on every rank: the same bits
        if improved:
            state.update(best_val=val_loss, best_epoch=epoch + 1, bad_epochs=0)
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        rngs = distributed.gather(torch.get_rng_state(), world)  # each rank's dropout stream
        if world.main:
            if improved:
                save_checkpoint(model, saved.best, epoch=epoch + 1, val_loss=val_loss)
            saved.save(_full_state(state, model, optimizer, scheduler, rngs))
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
        log.info(
            "epoch %d: train %.4f, val %.4f (%.0f s)",
            epoch + 1,
            row["train_loss"],
            val_loss,
            seconds,
        )

    metrics = {
        "best_epoch": state["best_epoch"],
        "best_val_loss": round(state["best_val"], 5),
        "epochs_run": state["epoch"],
        "stopped_early": state["epoch"] < cfg.epochs,
        "final_train_loss": state["history"][-1]["train_loss"],
        "train_seconds": round(state["seconds"], 1),
        "train_captions": len(train_data),
    }
    if world.main:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(model_path) as f, saved.best.open("rb") as best:
            shutil.copyfileobj(best, f)
        load_checkpoint(model_path)  # the artifact must load on its own, weights-only
        _write_outputs(metrics, state["history"], metrics_path, history_path)
        tracking.log_metrics(
            {"best_val_loss": metrics["best_val_loss"], "best_epoch": metrics["best_epoch"]}
        )
        tracking.end()
        tracking.save_run_id(run_id)
        saved.remove()  # every output is written: nothing is left to resume
    distributed.leave(world)
    return metrics


def _full_state(state: dict[str, Any], model, optimizer, scheduler, rngs) -> dict[str, Any]:
    """Everything a resumed run needs: the bookkeeping, the weights, optimizer, schedule, and
    the RNG (rank 0's, as one process saves it, and the other ranks' beside it)."""
    return {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rngs[0],
        "rank_rngs": rngs[1:],
    }


def _rank_seed(seed: int, rank: int) -> int:
    return seed + 1_000_003 * rank


def _rank_rng(state: dict[str, Any], rank: int, seed: int) -> torch.Tensor:
    """The RNG state `rank` saved; a rank the saving run did not have starts a stream of its own."""
    if rank == 0:
        return state["rng"]
    if rank <= len(state.get("rank_rngs", [])):
        return state["rank_rngs"][rank - 1]
    return torch.Generator().manual_seed(_rank_seed(seed, rank)).get_state()


def _write_outputs(metrics, history, metrics_path: Path, history_path: Path) -> None:
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    with history_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@stage_main
@record  # under torchrun: a worker's traceback goes into torchrun's report of the failure
def main() -> None:
    """`python -m training.stages.train`: data/features + config -> artifacts/model/model.pth.

    With train.nproc_per_node or nnodes > 1 this process becomes torchrun, whose workers run
    this again, as ranks. The workspace's lock is taken by the process that writes: this one
    on node 0 (under a torchrun started by hand, global rank 0), never by the other nodes."""
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
        params = load_params()
        cfg = TrainConfig.from_dict(params.get("train"))
        if cfg.distributed and not worker:
            distributed.launch(
                "training.stages.train", cfg.nproc_per_node, cfg.nnodes, cfg.rdzv_endpoint
            )
            return
        weights = ModelConfig.from_dict(params.get("model")).weights
        train(cfg, params=params, weights=weights)


if __name__ == "__main__":
    main()
