"""A private TorchServe for the tests and benchmarks: serve/config.properties on free loopback
ports, with its own temp dir and logs, so it never meets the user's server on 8080-8082."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil  # a TorchServe dependency

CONFIG = Path(__file__).resolve().parents[1] / "serve" / "config.properties"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together, so never the same one twice)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def write_private_config(workdir: Path, model_store: Path, **settings: Any) -> dict[str, str]:
    """Write workdir/config.properties: serve/config.properties on free 127.0.0.1 ports serving
    `model_store`, `settings` replacing or adding keys. Returns the inference, management and
    metrics base URLs."""
    ports = free_ports(5)
    urls = {
        api: f"http://127.0.0.1:{port}"
        for api, port in zip(("inference", "management", "metrics"), ports, strict=False)
    }
    overrides = {
        **{f"{api}_address": url for api, url in urls.items()},
        "grpc_inference_port": ports[3],
        "grpc_management_port": ports[4],
        "model_store": model_store,
        **settings,
    }
    lines = []
    for line in CONFIG.read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if not line.startswith("#") and key in overrides:
            line = f"{key}={overrides.pop(key)}"
        lines.append(line)
    lines += [f"{key}={value}" for key, value in overrides.items()]
    (workdir / "config.properties").write_text("\n".join(lines) + "\n")
    return urls


def private_env(workdir: Path) -> dict[str, str]:
    """The server's environment: pid file, worker sockets, extracted archives and logs all under
    `workdir`; OpenMP threads that wait passively, as `make serve` runs them (spinning ones
    stall badly when another process holds a core)."""
    tmp = workdir / "tmp"
    tmp.mkdir(exist_ok=True)
    return {
        **os.environ,
        "TMPDIR": str(tmp),
        "TEMP": str(tmp),
        "LOG_LOCATION": str(workdir / "logs"),
        "METRICS_LOCATION": str(workdir / "logs"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }


def stop_server(
    process: subprocess.Popen, workdir: Path, env: dict[str, str], python: str = sys.executable
) -> None:
    """`torchserve --stop` as a user would, for the server `process` started in `workdir`; then
    kill whatever it started that is still alive (the JVM, workers), and nothing else."""
    try:
        started = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    subprocess.run(
        [python, "-m", "ts.model_server", "--stop", "--foreground"],
        cwd=workdir,
        env=env,
        timeout=90,
        capture_output=True,
    )
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    _, alive = psutil.wait_procs(started, timeout=10)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
