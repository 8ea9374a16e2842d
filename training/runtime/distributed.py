"""Stages past one process: torchrun, its process group, and what the ranks exchange.

A stage whose params ask for more than one process (`train.nproc_per_node`, `train.nnodes`,
`transform.nproc_per_node`) re-launches itself through torchrun: `launch()` runs
`torch.distributed.run` in the stage's own process, so the process DVC started stays the one
that holds the workspace's lock and watches DVC, while torchrun's agent starts the workers and
stops all of them as soon as one fails (`--max-restarts=0`: `dvc repro` resumes instead). Each
worker runs the stage's `main()` again, finds torchrun's environment (RANK, WORLD_SIZE, ...) in
`World.from_env()` and joins the process group: gloo on a CPU, NCCL on CUDA, every collective
bounded by a timeout so that a rank that hangs fails the job instead of stalling it.

One machine: `torchrun --standalone` (a free port, nothing to configure). Several: torchrun's
static rendezvous at `rdzv_endpoint` (host:port of node 0), each machine's rank in NODE_RANK:
node 0 holds global rank 0, which alone writes files, so its workspace gets the outputs.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from training import StageError

log = logging.getLogger(__name__)

# Set by `launch()` for its workers: the launcher (its pid) holds the workspace's lock.
LAUNCHER_ENV = "IMGTOCAP_LAUNCHER_PID"
# How a run is spread over processes, not what it computes: the data order and the gradient
# do not depend on it, so a state saved by 2 processes resumes with 1 or 4 (train, finetune).
LAUNCH_PARAMS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "ddp_timeout_s")
NODE_RANK_ENV = "NODE_RANK"


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0  # on this machine: which GPU
    size: int = 1

    @classmethod
    def from_env(cls) -> World:
        """From torchrun's variables; rank 0 of 1 outside torchrun."""
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))
        )

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files, logs and tracks."""
        return self.rank == 0


ONE_PROCESS = World()


def under_torchrun() -> bool:
    """This process is a worker torchrun started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def holds_lock(world: World) -> bool:
    """Whether this process takes the workspace's lock: the one that will write. That is the
    stage's own process on node 0 (NODE_RANK unset or 0; a shared workspace is not locked
    against the other nodes, which write nothing), or global rank 0 under a torchrun started
    by hand; never `launch()`'s workers, whose launcher holds it."""
    first_node = os.environ.get(NODE_RANK_ENV, "0") == "0"
    return LAUNCHER_ENV not in os.environ and world.rank == 0 and first_node


def torchrun_args(
    module: str, nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None
) -> list[str]:
    """torchrun's command line (after `torchrun`) that runs `python -m module` on this node."""
    args = [f"--nproc-per-node={nproc_per_node}", "--max-restarts=0"]
    if nnodes == 1:
        args.append("--standalone")
    else:
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank(nnodes)}"]
        args += ["--rdzv-backend=static", f"--rdzv-endpoint={rdzv_endpoint}"]
    return [*args, "-m", module]


def node_rank(nnodes: int) -> int:
    """This machine's rank among `nnodes`, from NODE_RANK (0: the machine whose workspace gets
    the outputs)."""
    value = os.environ.get(NODE_RANK_ENV, "0")
    if not value.isdigit() or int(value) >= nnodes:
        raise StageError(
            f"{NODE_RANK_ENV}={value!r}: with nnodes {nnodes} each machine needs its own rank "
            f"0..{nnodes - 1} (0 on the machine that runs `dvc repro`; docs/training.md)"
        )
    return int(value)


def launch(module: str, nproc_per_node: int, nnodes: int = 1, rdzv_endpoint: str | None = None):
    """Run `python -m module` under torchrun from this process; return when every worker
    succeeded, else raise StageError with torchrun's report of the first failure."""
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun_args(module, nproc_per_node, nnodes, rdzv_endpoint)
    log.info("torchrun %s", " ".join(args))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:
        run.run(run.parse_args(args))
    except ChildFailedError as exc:
        raise StageError(
            f"{exc}\n{module} stopped: a worker failed (above: which rank, its exit code or "
            "signal, and its traceback when it raised); torchrun stopped the others. Fix the "
            "cause, then run `dvc repro` again: training resumes from its last completed epoch."
        ) from None
    except SignalException as exc:
        message = f"{module} stopped by {exc.sigval.name}; torchrun stopped its workers too"
        raise StageError(message) from None
    finally:
        del os.environ[LAUNCHER_ENV]


def device_for(device: torch.device, world: World) -> torch.device:
    """On CUDA every process of a machine has its own GPU: local rank i gets cuda:i."""
    if world.size > 1 and device.type == "cuda":
        gpus = torch.cuda.device_count()
        if world.local_rank >= gpus:
            raise ValueError(
                f"local rank {world.local_rank} has no GPU of its own: this machine has {gpus}. "
                f"Set nproc_per_node (params.yaml train: or transform:) to at most {gpus}."
            )
        return torch.device("cuda", world.local_rank)
    return device


def join(world: World, device: torch.device, timeout_s: float) -> None:
    """Join the other ranks (one process: nothing to join): NCCL for CUDA, else gloo; a
    collective that waits `timeout_s` for a rank raises instead of hanging."""
    if world.size == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )


def leave(world: World) -> None:
    """Leave the process group once done. (Not after an error: tearing down a group whose
    peers are gone can block; the process ends anyway.)"""
    if world.size > 1:
        dist.destroy_process_group()


def barrier(world: World) -> None:
    """Wait until every rank is here."""
    if world.size > 1:
        dist.barrier()


def local_first(world: World, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) on each machine's local rank 0, then on its other ranks: what it fetches into
    a machine's caches (pretrained weights) is fetched once, not raced for."""
    if world.local_rank == 0:
        value = fn(*args)
    barrier(world)
    return value if world.local_rank == 0 else fn(*args)


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if world.size == 1:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


def total(value: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of `value` over the ranks, bit-identical on every rank (rank 0's copy)."""
    if world.size == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    dist.broadcast(value, src=0)  # the same bits everywhere: every rank takes the same decisions
    return value


def check_same_inputs(fingerprint: str, world: World) -> None:
    """Raise on every rank unless every rank's inputs (their fingerprint) equal rank 0's."""
    seen = gather((fingerprint, socket.gethostname()), world)
    differ = [f"rank {r} on {host}" for r, (key, host) in enumerate(seen) if key != seen[0][0]]
    if differ:
        raise ValueError(
            f"{', '.join(differ)} would train on other inputs than rank 0 on {seen[0][1]}: the "
            "model config, data/processed, data/features, the code or params.yaml train differ. "
            "Every node must hold the same commit and files: `dvc pull` (or copy data/ and "
            "artifacts/model/config.json from node 0) on each, then start again."
        )
