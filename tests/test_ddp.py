"""Training past one process: the train and transform stages under real torchrun (gloo, two
CPU processes, the tiny preset on a dozen synthetic images).

Two processes must train as one does (the same per-epoch losses; weights equal up to the order
of float sums), only rank 0 may write; a rank killed mid-epoch stops the job with torchrun's
report and `dvc repro` resumes where the last completed epoch left off; the sharded transform
writes the one-process feature store byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from tests.helpers.project import (
    SHRUNK,
    dvc,
    environment,
    history,
    project_copy,
    set_params,
    trainer_env,
    wait_for_epoch,
    workspace_after_define,
)
from training import StageError
from training.data.batches import shard
from training.runtime import distributed
from training.runtime.distributed import World
from training.runtime.precision import autocast
from training.stages.train import TrainConfig, train_step

EPOCHS = 3
# Max abs difference between the weights 1 and 2 processes trained (measured: 8.3e-7 after 3
# epochs of the tiny preset): the gradients are the same sums taken in another order.
WEIGHTS_ATOL = 1e-5
# The kill test's epochs: enough that the run is still going when a rank is killed.
KILL_EPOCHS = 8


# --- pieces, no processes ----------------------------------------------------------------------


def test_ranks_split_each_batch_into_contiguous_runs_of_images():
    pad = 0
    grid = torch.arange(5.0).view(5, 1, 1).expand(5, 4, 3)  # (I, N, C): image i is all i
    rows = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # (B,) captions per image: 2, 1, 3, 1, 1
    lengths = torch.tensor([3, 5, 2, 4, 6, 3, 2, 5])
    tokens = torch.stack([torch.cat([torch.ones(n), torch.zeros(6 - n)]).long() for n in lengths])
    targets = int((lengths - 1).sum())
    for size in (1, 2, 3, 7):
        parts = [shard((grid, tokens, rows), World(r, r, size), pad) for r in range(size)]
        assert {t for _, t in parts} == {targets}  # every rank divides by the whole batch's
        images, captions = [], []  # what the ranks hold together, in rank order
        for (g, t, r), _ in parts:
            assert len(t) == len(r) and (not len(r) or r.max() < len(g))
            if len(t):  # padding trimmed to this rank's longest caption
                assert t.shape[1] == int((t != pad).sum(1).max())
            captions += [(int(g[i, 0, 0]), int((c != pad).sum())) for i, c in zip(r, t)]
            images += g[:, 0, 0].tolist()
        assert images == [0, 1, 2, 3, 4]  # each image once, in order
        assert captions == list(zip(rows.tolist(), lengths.tolist()))  # each caption with it
    assert shard((grid, tokens, rows), World(), pad)[0][1] is tokens  # one process: untouched


def test_a_rank_without_captions_in_a_batch_adds_nothing_but_takes_its_step():
    from tests.helpers.model import tiny

    model = tiny().train()
    spec = model.encoder.spec
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    grid = torch.randn(2, spec.grid**2, spec.channels).half()
    batch = grid, torch.randint(5, 50, (2, 6)), torch.arange(2)  # 2 images for 3 ranks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cpu = torch.device("cpu")
    share = train_step(model, optimizer, scheduler, batch, TrainConfig(), cpu, World(0, 0, 3))
    assert share == 0  # rank 0 of 3 holds none of the 2 images
    assert all(p.grad is not None and not p.grad.any() for p in optimizer.param_groups[0]["params"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_torchrun_command_lines(monkeypatch):
    one = distributed.torchrun_args("training.stages.train", 2)
    assert one == [
        "--nproc-per-node=2",
        "--max-restarts=0",
        "--standalone",
        "-m",
        "training.stages.train",
    ]
    monkeypatch.setenv("NODE_RANK", "1")
    two = distributed.torchrun_args("training.stages.train", 4, 2, "node0.example:29500")
    assert two[:2] == ["--nproc-per-node=4", "--max-restarts=0"]
    assert {"--nnodes=2", "--node-rank=1", "--rdzv-backend=static"} <= set(two)
    assert "--rdzv-endpoint=node0.example:29500" in two and "--standalone" not in two
    monkeypatch.setenv("NODE_RANK", "2")
    with pytest.raises(StageError, match="NODE_RANK='2': with nnodes 2 each machine needs"):
        distributed.torchrun_args("training.stages.train", 4, 2, "node0.example:29500")


def test_train_params_for_several_processes_are_checked():
    assert not TrainConfig().distributed and TrainConfig(nproc_per_node=2).distributed
    with pytest.raises(ValueError, match="train.rdzv_endpoint must be host:port of node 0"):
        TrainConfig(nnodes=2)
    with pytest.raises(ValueError, match=r"train.nproc_per_node \(0\)"):
        TrainConfig(nproc_per_node=0)
    assert TrainConfig(nnodes=2, rdzv_endpoint="10.0.0.1:29500").distributed


def test_each_process_gets_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    two = World(rank=3, local_rank=1, size=4)
    assert distributed.device_for(torch.device("cuda"), two) == torch.device("cuda", 1)
    assert distributed.device_for(torch.device("cuda", 2), World()) == torch.device("cuda", 2)
    assert distributed.device_for(torch.device("cpu"), two) == torch.device("cpu")
    with pytest.raises(ValueError, match="local rank 2 has no GPU of its own: this machine has 2"):
        distributed.device_for(torch.device("cuda"), World(rank=2, local_rank=2, size=3))


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_is_bf16_only_where_the_cpu_has_it(monkeypatch, native):
    monkeypatch.setattr("training.runtime.precision.native_bf16", lambda device: native)
    cpu, ones = torch.device("cpu"), torch.ones(2, 2)
    expected = {"auto": torch.bfloat16 if native else torch.float32}
    expected |= {"fp32": torch.float32, "bf16": torch.bfloat16}
    for precision, dtype in expected.items():
        with autocast(cpu, precision):
            assert (ones @ ones).dtype == dtype, precision
    with autocast(cpu):  # the default: fp32, what the tests that compare exactly rely on
        assert (ones @ ones).dtype == torch.float32
    with pytest.raises(ValueError, match="train.precision must be one of auto, fp32, bf16"):
        TrainConfig(precision="fp16")


def test_ranks_join_gloo_on_cpus_and_nccl_on_gpus_with_a_timeout(monkeypatch):
    joined = []
    monkeypatch.setattr(
        distributed.dist, "init_process_group", lambda *a, **kw: joined.append((a, kw))
    )
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    distributed.join(World(), torch.device("cpu"), 7)  # one process: no group at all
    assert joined == []
    two = World(rank=1, local_rank=1, size=2)
    distributed.join(two, torch.device("cpu"), 7)
    distributed.join(two, torch.device("cuda", 1), 7)
    (cpu_args, cpu), (gpu_args, gpu) = joined
    assert cpu_args == ("gloo",) and gpu_args == ("nccl",)
    assert cpu["timeout"] == gpu["timeout"] == timedelta(seconds=7)  # a stalled peer fails all
    assert cpu["device_id"] is None and gpu["device_id"] == torch.device("cuda", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_training_step_on_the_gpu_never_waits_for_it():
    from tests.helpers.model import tiny

    model = tiny().cuda().train()
    spec = model.encoder.spec
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    grid = torch.randn(4, spec.grid**2, spec.channels).half().cuda()  # features on the GPU
    batch = grid, torch.randint(1, 50, (4, 7)), torch.arange(4)  # captions on the CPU
    cfg, device = TrainConfig(), torch.device("cuda")
    train_step(model, optimizer, scheduler, batch, cfg, device)  # warm-up: lazy inits sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            loss = train_step(model, optimizer, scheduler, batch, cfg, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert loss.device.type == "cuda" and torch.isfinite(loss)


# --- the stages under torchrun ------------------------------------------------------------------


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """After `define`: 24 synthetic images, the tiny preset, batches of 8 (2 steps per epoch)."""
    root = workspace_after_define(tmp_path_factory.mktemp("ddp"), num_images=24)
    # fp32: the runs are compared to 1e-4, and bf16's rounding depends on the batch's sharding
    set_params(root, {"train.epochs": EPOCHS, "train.precision": "fp32"})
    return root


def copy_of(workspace: Path, dest: Path, **params) -> Path:
    shutil.copytree(workspace, dest)
    set_params(dest, params)
    return dest


def run_stage(root: Path, stage: str, env: dict[str, str] | None = None, timeout: int = 300):
    p = subprocess.run(
        [sys.executable, "-m", f"training.stages.{stage}"],
        cwd=root,
        env=env or trainer_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    return p


@pytest.fixture(scope="module")
def one_process(workspace, tmp_path_factory) -> Path:
    root = copy_of(workspace, tmp_path_factory.mktemp("one") / "ws")
    run_stage(root, "train")
    return root


# Records, per process, what it opened for writing or changed under the workspace (the audit
# events of open, os.open and the os calls that rename, remove or create), into its own file.
AUDIT = """
import os, sys
_log = os.environ.get("IMGTOCAP_AUDIT_DIR")
if _log:
    _root = os.environ["IMGTOCAP_AUDIT_ROOT"]
    _who = os.environ.get("RANK", "launcher")
    _fd = os.open(os.path.join(_log, f"{_who}-{os.getpid()}"), os.O_WRONLY | os.O_CREAT, 0o644)
    _write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    _changes = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.truncate"}

    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not (mode and set(mode) & set("wax+")) and not (mode is None and flags & _write):
                return
        elif event not in _changes:
            return
        else:
            path = args[1] if event == "os.rename" else args[0]  # a rename: where it lands
        if isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(_root):
                os.write(_fd, (event + " " + path[len(_root):] + "\\n").encode())

    sys.addaudithook(_hook)
"""


def writes(audit: Path) -> dict[str, set[str]]:
    """Who (a rank, or the launcher) wrote what, from the audit files."""
    seen: dict[str, set[str]] = {}
    for f in audit.iterdir():
        who = f.name.rsplit("-", 1)[0]
        seen.setdefault(who, set()).update(f.read_text().split("\n"))
    return {who: {line.split(" ", 1)[1] for line in lines if line} for who, lines in seen.items()}


@pytest.mark.slow
def test_two_processes_train_as_one_and_only_rank_0_writes(workspace, one_process, tmp_path):
    root = copy_of(workspace, tmp_path / "ws", **{"train.nproc_per_node": 2})
    hook, audit = tmp_path / "hook", tmp_path / "audit"
    hook.mkdir(), audit.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(AUDIT))
    env = trainer_env(root)
    env.update(
        PYTHONPATH=f"{hook}{os.pathsep}{env['PYTHONPATH']}",
        IMGTOCAP_AUDIT_DIR=str(audit),
        IMGTOCAP_AUDIT_ROOT=str(root.resolve()),
    )
    p = run_stage(root, "train", env)
    assert "2 processes (DDP)" in p.stderr

    one, two = history(one_process), history(root)
    assert [r["epoch"] for r in two] == [str(e) for e in range(1, EPOCHS + 1)]
    for a, b in zip(one, two):
        for key in ("train_loss", "val_loss"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4), (key, a, b)
    m1, m2 = (json.loads((r / "metrics/train.json").read_text()) for r in (one_process, root))
    assert m1["best_epoch"] == m2["best_epoch"] and m1["epochs_run"] == m2["epochs_run"]
    s1, s2 = (
        torch.load(r / "artifacts/model/model.pth", weights_only=True)["state_dict"]
        for r in (one_process, root)
    )
    assert s1.keys() == s2.keys()
    diff = max((s1[k].double() - s2[k].double()).abs().max().item() for k in s1)
    assert diff <= WEIGHTS_ATOL, f"max abs weight difference {diff}"

    wrote = writes(audit)
    assert set(wrote) == {"launcher", "0", "1"}, wrote  # every process was watched
    assert wrote["1"] == set(), f"rank 1 wrote {wrote['1']}"
    # the stage's own process holds the workspace's lock; rank 0 writes the rest
    assert wrote["launcher"] == {"/artifacts/resume", "/artifacts/resume/train.lock"}
    outputs = {"/artifacts/model/model.pth", "/metrics/train.json", "/metrics/train_history.csv"}
    assert outputs <= wrote["0"], wrote["0"]
    assert any(p.endswith("/last.pth") for p in wrote["0"]), wrote["0"]  # the resume state


@pytest.mark.slow
def test_sharded_transform_writes_the_one_process_store_byte_for_byte(workspace, tmp_path):
    root = copy_of(workspace, tmp_path / "ws", **{"transform.nproc_per_node": 2})
    shutil.rmtree(root / "data/features")
    p = run_stage(root, "transform")
    assert "torchrun" in p.stderr
    stores = [
        sorted(str(f.relative_to(r / "data/features")) for f in (r / "data/features").rglob("*.*"))
        for r in (workspace, root)
    ]
    assert stores[0] == stores[1]
    # the splits, the augmented training views and the perturbed test copies alike
    assert {"train.npy", "train_views.npy", "robust/jpeg.npy"} <= set(stores[0]), stores[0]
    for name in stores[0]:
        if name != "encoder.pth":
            a, b = (r / "data/features" / name for r in (workspace, root))
            assert a.read_bytes() == b.read_bytes(), name
    e1, e2 = (
        torch.load(r / "data/features/encoder.pth", weights_only=True) for r in (workspace, root)
    )
    assert all(torch.equal(e1[k], e2[k]) for k in e1)
    assert np.load(root / "data/features/train.npy").std() > 0  # not an empty store twice


def ranks_of(proc: psutil.Process) -> dict[int, psutil.Process]:
    """The torchrun workers below `proc`, by rank."""
    ranks = {}
    for child in proc.children(recursive=True):
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None and "training.stages.train" in " ".join(child.cmdline()):
            ranks[int(rank)] = child
    return ranks


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_dvc_repro_resumes(tmp_path):
    repo = project_copy(tmp_path / "repo")
    set_params(repo, {**SHRUNK, "train.epochs": KILL_EPOCHS, "train.batch_size": 8})
    set_params(repo, {"train.patience": KILL_EPOCHS, "train.nproc_per_node": 2})
    dvc(repo, "repro", "transform", "define")  # what train reads
    straight = tmp_path / "straight"  # the same run in one process, for comparison
    shutil.copytree(repo, straight, symlinks=True)
    set_params(straight, {"train.nproc_per_node": 1})

    state = repo / "artifacts/resume"
    proc = subprocess.Popen(
        ["dvc", "repro", "train"],
        cwd=repo,
        env=environment(repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for_epoch(proc, state, 2, timeout_s=240, poll_s=0.05)
    assert proc.poll() is None, "training finished before a rank could be killed"
    stage = psutil.Process(proc.pid).children(recursive=True)
    ranks = ranks_of(psutil.Process(proc.pid))
    assert set(ranks) == {0, 1}, "dvc repro did not run the stage under torchrun"
    ranks[1].send_signal(signal.SIGKILL)  # mid-epoch: epoch 3 has just begun
    killed = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    stopped_s = time.monotonic() - killed
    assert proc.returncode != 0
    assert "training.stages.train stopped: a worker failed" in out, out[-4000:]
    assert "Signal 9 (SIGKILL)" in out and "rank      : 1" in out, out[-4000:]
    _, alive = psutil.wait_procs(stage, timeout=30)
    for orphan in alive:
        orphan.kill()
    assert not alive, f"outlived the job: {[p.cmdline() for p in alive]}"
    assert stopped_s < 60, f"the job took {stopped_s:.0f} s to stop"
    print(f"rank 1 killed: the job stopped {stopped_s:.1f} s later")
    (saved,) = state.glob("*/last.pth")
    killed_at = torch.load(saved, weights_only=True)["epoch"]
    assert 2 <= killed_at < KILL_EPOCHS and not (repo / "metrics/train.json").exists()

    log = dvc(repo, "repro", "train")
    assert f"resuming after epoch {killed_at} of {KILL_EPOCHS}" in log
    assert "2 processes (DDP)" in log
    run_stage(straight, "train", trainer_env(straight))
    a, b = history(straight), history(repo)
    assert [r["epoch"] for r in b] == [str(e) for e in range(1, KILL_EPOCHS + 1)]
    for x, y in zip(a, b):
        for key in ("train_loss", "val_loss"):
            assert float(y[key]) == pytest.approx(float(x[key]), rel=1e-4), (key, x, y)
    assert "train" in (repo / "dvc.lock").read_text()
    assert not [p for p in state.iterdir() if p.is_dir()], "the finished run's state is left"
