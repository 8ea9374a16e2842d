"""DVC stage `train`: fit the decoder on the precomputed image features.

AdamW (pretrained weights at `lr`, freshly initialised layers at `new_layer_lr`), linear
warmup then cosine decay, gradient clipping, optional label smoothing; validation loss every
epoch, the best epoch kept, early stopping after `patience` epochs without improvement.

`train()` is its steps: `setup` (ranks, data, model, optimizer, schedule, which resume state),
`load_or_resume`, then per epoch `train_epoch`, `validation_loss`, `end_epoch` (the loop's
`LoopState`: history, best epoch, epochs without improvement) and `save_epoch` (best model,
resume state, MLflow), and `finish` (model.pth, metrics, history). The batches come from
training/data/batches.py, the precision from training/runtime/precision.py.

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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import Captioner, CaptionerConfig, load_checkpoint, save_checkpoint
from model.io import atomic_write
from model.pretrained import load_pretrained
from training.data.batches import Batch, CaptionData, load_splits, shard
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
from training.runtime.distributed import LAUNCH_PARAMS, ONE_PROCESS, World
from training.runtime.precision import PRECISIONS, autocast, uses_bf16
from training.runtime.process import die_with_dvc, die_with_launcher, exclusive
from training.runtime.resume import LoopState, ResumeState
from training.tracking import runs as tracking

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
    patience: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 where the hardware has it (CUDA, AMX/AVX512-BF16 CPUs)
    num_threads: int = 0
    nproc_per_node: int = 1  # processes on this machine, one per GPU; > 1: DDP under torchrun
    nnodes: int = (
        1  # machines; > 1: node 0 runs `dvc repro`, the others the stage (docs/training.md)
    )
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


# Steps between updates of the progress bar's loss: reading it waits for the GPU.
SHOW_LOSS_EVERY = 25
# How much an epoch's validation loss must undercut the best so far to count as better.
MIN_IMPROVEMENT = 1e-4


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


@dataclass
class TrainSetup:
    """What the epochs work with, built once by `setup`."""

    world: World
    device: torch.device
    config: CaptionerConfig
    train_data: CaptionData
    val_data: CaptionData
    model: Captioner
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    saved: ResumeState  # this run's resumable state (its fingerprint's folder)


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
    run = setup(cfg, config_path, processed_path, features_dir, resume_dir, weights)
    state = load_or_resume(run, cfg)
    if run.world.main:  # this execution's MLflow run (a resumed training continues its own)
        state.run_id = tracking.start_training(state.run_id, params or {}, run.config.to_dict())
    net = parallel(run)
    while state.epoch < cfg.epochs and state.bad_epochs < cfg.patience:
        started = time.perf_counter()
        train_loss = train_epoch(run, net, cfg, state.epoch)
        val_loss = validation_loss(
            run.model, run.val_data, cfg.batch_size, run.device, run.world, cfg.precision
        )
        lr = run.optimizer.param_groups[0]["lr"]
        improved = end_epoch(state, train_loss, val_loss, lr, time.perf_counter() - started)
        save_epoch(run, state, improved, val_loss)
    return finish(run, state, cfg, model_path, metrics_path, history_path)


def setup(
    cfg: TrainConfig,
    config_path: Path,
    processed_path: Path,
    features_dir: Path,
    resume_dir: Path,
    weights: WeightsConfig | None,
) -> TrainSetup:
    """Join the other ranks, read the data, build the model from its pretrained weights, the
    optimizer and schedule; find this run's resume state by the fingerprint of its inputs."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    world = World.from_env()
    device = distributed.device_for(pick_device(cfg.device), world)
    distributed.join(world, device, cfg.ddp_timeout_s)
    config = CaptionerConfig.load(config_path)
    train_data, val_data = load_splits(config, processed_path, features_dir, device)

    torch.manual_seed(cfg.seed)
    model = Captioner(config)
    encoder_weights = torch.load(features_dir / ENCODER_WEIGHTS, weights_only=True)
    wanted = needed(config, encoder=False), weights or WeightsConfig(), "the decoder"
    files = distributed.local_first(world, weight_files, *wanted)
    new = set(load_pretrained(model, encoder_weights=encoder_weights, files=files))
    model.to(device)
    # fused: the update of all parameters in one kernel; on a CPU the per-tensor loop made a
    # training step ~1.5x longer (measured side by side at commit ba8e2ba)
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
    key = _fingerprint(cfg, inputs)
    distributed.check_same_inputs(key, world)
    log.info(
        "%d train / %d val captions, %d steps per epoch, device %s (%s)%s",
        len(train_data),
        len(val_data),
        steps_per_epoch,
        device,
        "bf16 autocast" if uses_bf16(device, cfg.precision) else "fp32",
        f", {world.size} processes (DDP)" if world.size > 1 else "",
    )
    return TrainSetup(
        world,
        device,
        config,
        train_data,
        val_data,
        model,
        optimizer,
        scheduler,
        steps_per_epoch,
        ResumeState(resume_dir, key),
    )


def load_or_resume(run: TrainSetup, cfg: TrainConfig) -> LoopState:
    """The state this very run saved after its last completed epoch, with the model,
    optimizer, schedule and this rank's RNG restored from it; else a fresh start."""
    world = run.world
    # rank 0 alone looks at the state (loading may set a damaged one aside), the rest get it
    saved = distributed.broadcast(run.saved.load() if world.main else None, world)
    if not saved:
        if world.rank:  # dropout: rank 0 draws as one process does, the others their own
            torch.manual_seed(_rank_seed(cfg.seed, world.rank))
        return LoopState()
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(_rank_rng(saved, world.rank, cfg.seed))
    log.info("resuming after epoch %d of %d (%s)", saved["epoch"], cfg.epochs, run.saved.last)
    return LoopState.from_saved(saved)


def parallel(run: TrainSetup) -> torch.nn.Module:
    """The module the steps run: the model, or under DDP the model wrapped so that its
    gradients are averaged over the ranks after each backward."""
    if run.world.size == 1:
        return run.model
    ids = [run.device.index] if run.device.type == "cuda" else None
    return DistributedDataParallel(run.model, device_ids=ids, forward_sync_buffers=False)


def train_epoch(run: TrainSetup, net: torch.nn.Module, cfg: TrainConfig, epoch: int) -> float:
    """One pass over the train split in its (seed, epoch) order, the same on every rank; the
    mean of its batches' losses."""
    world = run.world
    run.model.train()
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)  # on every rank
    batches = tqdm(
        run.train_data.batches(cfg.batch_size, generator, cfg.captions_per_image),
        total=run.steps_per_epoch,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        disable=not world.main,
    )
    # summed on the device (no wait per step), in float64 as one process always summed it
    running = torch.zeros((), dtype=torch.float64, device=run.device)
    for step, batch in enumerate(batches, 1):
        pad_id = run.config.pad_id
        share = train_step(net, run.optimizer, run.scheduler, batch, cfg, run.device, world, pad_id)
        running += share.double()
        if world.main and (step % SHOW_LOSS_EVERY == 0 or step == run.steps_per_epoch):
            # rank 0's share scaled up: the loss shown, roughly; the history has the exact one
            batches.set_postfix(loss=f"{running.item() * world.size / step:.3f}")
    return distributed.total(running, world).item() / run.steps_per_epoch


def end_epoch(
    state: LoopState, train_loss: float, val_loss: float, lr: float, seconds: float
) -> bool:
    """Count an epoch into `state` (its history row, time, the best epoch, the epochs without
    improvement); whether its validation loss improved on the best."""
    state.epoch += 1
    state.history.append(
        {
            "epoch": state.epoch,
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            "lr": lr,
            "seconds": round(seconds, 1),
        }
    )
    state.seconds += seconds
    improved = val_loss < state.best_val - MIN_IMPROVEMENT  # the same bits on every rank
    if improved:
        state.best_val, state.best_epoch, state.bad_epochs = val_loss, state.epoch, 0
    else:
        state.bad_epochs += 1
    return improved


def save_epoch(run: TrainSetup, state: LoopState, improved: bool, val_loss: float) -> None:
    """Rank 0 saves the model when it improved, then the resume state, and logs the epoch's
    metrics to MLflow; every rank hands it its RNG state."""
    rngs = distributed.gather(torch.get_rng_state(), run.world)  # each rank's dropout stream
    row = state.history[-1]
    if run.world.main:
        if improved:
            save_checkpoint(run.model, run.saved.best, epoch=state.epoch, val_loss=val_loss)
        run.saved.save(_full_state(state, run, rngs))
        tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=state.epoch)
    log.info(
        "epoch %d: train %.4f, val %.4f (%.0f s)",
        state.epoch,
        row["train_loss"],
        val_loss,
        row["seconds"],
    )


def finish(
    run: TrainSetup,
    state: LoopState,
    cfg: TrainConfig,
    model_path: Path,
    metrics_path: Path,
    history_path: Path,
) -> dict[str, Any]:
    """The run's metrics. Rank 0 writes the best epoch's model, the metrics and the history,
    closes the MLflow run and removes the resume state: nothing is left to resume."""
    metrics = {
        "best_epoch": state.best_epoch,
        "best_val_loss": round(state.best_val, 5),
        "epochs_run": state.epoch,
        "stopped_early": state.epoch < cfg.epochs,
        "final_train_loss": state.history[-1]["train_loss"],
        "train_seconds": round(state.seconds, 1),
        "train_captions": len(run.train_data),
    }
    if run.world.main:
        model_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(model_path) as f, run.saved.best.open("rb") as best:
            shutil.copyfileobj(best, f)
        load_checkpoint(model_path)  # the artifact must load on its own, weights-only
        _write_outputs(metrics, state.history, metrics_path, history_path)
        tracking.log_metrics(
            {"best_val_loss": metrics["best_val_loss"], "best_epoch": metrics["best_epoch"]}
        )
        tracking.end()
        tracking.save_run_id(state.run_id)
        run.saved.remove()
    distributed.leave(run.world)
    return metrics


def _full_state(state: LoopState, run: TrainSetup, rngs: list[torch.Tensor]) -> dict[str, Any]:
    """Everything a resumed run needs: the loop state, the weights, optimizer, schedule, and
    the RNG (rank 0's, as one process saves it, and the other ranks' beside it)."""
    return {
        **dataclasses.asdict(state),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rngs[0],
        "rank_rngs": rngs[1:],
    }


def _fingerprint(cfg: TrainConfig, inputs: list[Path]) -> str:
    """What a resumable state must match: the input files, the stage's code (dvc.yaml's list)
    and the train params but those that only say how the run is spread over processes."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in LAUNCH_PARAMS}
    return resume.fingerprint(inputs, stage_code("train"), train=settings)


def _rank_seed(seed: int, rank: int) -> int:
    return seed + 1_000_003 * rank


def _rank_rng(saved: dict[str, Any], rank: int, seed: int) -> torch.Tensor:
    """The RNG state `rank` saved; a rank the saving run did not have starts a stream of its own."""
    if rank == 0:
        return saved["rng"]
    if rank <= len(saved.get("rank_rngs", [])):
        return saved["rank_rngs"][rank - 1]
    return torch.Generator().manual_seed(_rank_seed(seed, rank)).get_state()


def _write_outputs(metrics, history, metrics_path: Path, history_path: Path) -> None:
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    with history_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


@record  # under torchrun: a worker's traceback goes into torchrun's report of the failure
@stage_main  # inside record: a StageError is its message and exit status 1, no traceback
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
