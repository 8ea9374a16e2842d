"""Run a TorchServe from Python: start it, wait for a READY worker, talk to it, stop it.

Used by `make demo` (serve/demo.py), bench/serving.py and the tests. Two ways to run one:

    with TorchServe.private(workdir, model_store) as server:  # tests, benchmarks
        requests.put(f"{server.inference}/predictions/imgtocap", data=..., headers=server.headers())

starts serve/config.properties on free loopback ports with its own working directory, TMPDIR
(TorchServe's pid file lives there: one server per TMPDIR) and logs, in this process group (a
Ctrl-C stops it too), and stops it on exit. `start(detach=True)` then `wait_ready()` leave a
server running in a session of its own (`make demo`; `make stop` stops it).

Standard library and psutil (a TorchServe dependency) only, and the model's name.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from training.paths import MODEL_NAME

CONFIG = Path(__file__).resolve().parent / "config.properties"
APIS = ("inference", "management", "metrics")
# TorchServe's own test for "this pid is a TorchServe frontend" (ts/model_server.py)
FRONTEND = "org.pytorch.serve.ModelServer"
# Straight to loopback, whatever HTTP(S)_PROXY the environment carries.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class TorchServeError(RuntimeError):
    """TorchServe exited, or never got a READY worker; the message ends with its logs."""


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held together, so never the same one twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def read_config(path: Path) -> dict[str, str]:
    """The key=value settings of a TorchServe config (comments and blank lines skipped)."""
    settings = {}
    for line in Path(path).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith(("#", "!")):
            settings[key.strip()] = value.strip()
    return settings


def write_config(path: Path, source: Path = CONFIG, **settings: Any) -> Path:
    """Write `source` to `path` with `settings` replacing its keys' values or added at the end;
    comments and every other line are kept as they are."""
    lines = []
    for line in Path(source).read_text().splitlines():
        key = line.partition("=")[0].strip()
        if not line.lstrip().startswith(("#", "!")) and key in settings:
            line = f"{key}={settings.pop(key)}"
        lines.append(line)
    lines += [f"{key}={value}" for key, value in settings.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def private_config(path: Path, model_store: Path, source: Path = CONFIG, **settings: Any) -> Path:
    """`source` on free 127.0.0.1 ports (the two gRPC ports too: TorchServe always binds them)
    serving `model_store`, written to `path`; `settings` replace or add keys."""
    ports = free_ports(5)
    loopback = {f"{api}_address": f"http://127.0.0.1:{port}" for api, port in zip(APIS, ports)}
    return write_config(
        path,
        source,
        **loopback,
        grpc_inference_port=ports[3],
        grpc_management_port=ports[4],
        model_store=model_store,
        **settings,
    )


class TorchServe:
    """One TorchServe on the config file `config`, run from `cwd` (key_file.json goes there).

    `env` is added to this process's environment; `python` runs the launcher, and TorchServe
    starts its workers with the same one; the server's console output goes to `console`.
    Token auth is on unless the config says `disable_token_authorization=true`.
    """

    def __init__(
        self,
        config: Path,
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
        console: Path | None = None,
        model: str = MODEL_NAME,
    ):
        self.config, self.python, self.model = Path(config).resolve(), python, model
        self.cwd = Path(cwd or Path.cwd())
        self.env = {
            **os.environ,
            # OpenMP threads that spin while idle stall badly when another process holds a core
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            **(env or {}),
            # the launcher reads TS_CONFIG_FILE before --ts-config: it must run the file read here
            "TS_CONFIG_FILE": str(self.config),
        }
        self.console = Path(console or self.cwd / "console.log")
        self.settings = read_config(self.config)
        self.urls = {api: _client_url(self.settings[f"{api}_address"]) for api in APIS}
        self.inference, self.management, self.metrics = (self.urls[api] for api in APIS)
        self.token_auth = self.settings.get("disable_token_authorization", "false") != "true"
        self.keys: dict[str, str] = {}  # API name -> token, once READY with token auth on
        self.process: subprocess.Popen | None = None  # the launcher, when in the foreground
        self._started = False

    @classmethod
    def private(
        cls, workdir: Path, model_store: Path, *, python: str = sys.executable, **settings: Any
    ) -> TorchServe:
        """serve/config.properties on free loopback ports serving `model_store` (`settings`
        replace keys), with config, key file, TMPDIR, TEMP and logs all under `workdir`."""
        workdir = Path(workdir)
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        config = private_config(workdir / "config.properties", model_store, **settings)
        env = {
            "TMPDIR": str(workdir / "tmp"),  # the pid file, worker sockets, extracted archives
            "TEMP": str(workdir / "tmp"),
            "LOG_LOCATION": str(workdir / "logs"),
            "METRICS_LOCATION": str(workdir / "logs"),
        }
        return cls(config, cwd=workdir, env=env, python=python)

    # --- running ------------------------------------------------------------------------------

    def start(self, *, detach: bool = False, command: list[str] | None = None) -> TorchServe:
        """Start the server. In the foreground (the default) the launcher stays this process's
        child, in its process group; `detach` starts it in a session of its own and returns once
        the launcher has handed over to the frontend, which keeps running after this process.
        `command` replaces the launcher's command line (e.g. a container image's CMD)."""
        if command is None:
            command = [self.python, "-m", "ts.model_server", "--start", "--ncs"]
            command += ["--ts-config", str(self.config)] + ([] if detach else ["--foreground"])
        self.console.parent.mkdir(parents=True, exist_ok=True)
        with self.console.open("ab") as console:  # a pipe would fill up and stall the server
            if detach:
                launched = subprocess.run(
                    command,
                    cwd=self.cwd,
                    env=self.env,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C in this terminal leaves it running
                )
                if launched.returncode != 0:
                    raise TorchServeError(
                        f"TorchServe did not start (already running?):\n{self.log_tail()}"
                    )
            else:
                self.process = subprocess.Popen(
                    command,
                    cwd=self.cwd,
                    env=self.env,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    # no session of its own: whatever stops this process group (Ctrl-C, a test
                    # runner killing it) stops the server too, even when no teardown runs
                )
        self._started = True
        return self

    def wait_ready(self, timeout: float = 300) -> TorchServe:
        """Wait until a worker of the model is READY (/ping says Healthy long before, even while
        workers crash-loop); with token auth on, read the keys from key_file.json first."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.running():
                raise TorchServeError(f"TorchServe exited while starting:\n{self.log_tail()}")
            try:  # the key file appears first (maybe half written), then the worker
                if self.token_auth:
                    self.keys = self._read_keys()
                if any(w["status"] == "READY" for w in self.describe()["workers"]):
                    return self
            except (OSError, ValueError, KeyError, IndexError):
                pass  # not listening yet, the model not registered yet, no key file yet
            if time.monotonic() > deadline:
                raise TorchServeError(f"no READY worker after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def running(self) -> bool:
        """Whether the server is up: the launcher in the foreground, else the frontend."""
        if self.process is not None:
            return self.process.poll() is None
        return self._frontend() is not None

    def stop(self) -> None:
        """`torchserve --stop` as a user would; then kill whatever it started that is still
        alive (the frontend JVM, workers), and nothing else."""
        started = []  # the launcher, the frontend JVM, workers: whichever are alive now
        roots = [self._frontend()] + ([_process(self.process.pid)] if self.process else [])
        for root in filter(None, roots):
            with contextlib.suppress(psutil.NoSuchProcess):
                started += [root, *root.children(recursive=True)]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [self.python, "-m", "ts.model_server", "--stop", "--foreground"],
                cwd=self.cwd,
                env=self.env,
                timeout=90,
                capture_output=True,
            )
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=30)
        _, alive = psutil.wait_procs(set(started), timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)

    def __enter__(self) -> TorchServe:
        if not self._started:
            self.start()
        try:
            return self.wait_ready()
        except BaseException:  # no __exit__ will run for us: stop what we started
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- talking to it ------------------------------------------------------------------------

    def headers(self, api: str = "inference") -> dict[str, str]:
        """The Authorization header for `api` (none when token auth is off)."""
        return {"Authorization": f"Bearer {self.keys[api]}"} if self.keys else {}

    def describe(self) -> dict:
        """The management API's description of the model (its workers and their status)."""
        request = urllib.request.Request(
            f"{self.management}/models/{self.model}", headers=self.headers("management")
        )
        with _OPENER.open(request, timeout=10) as response:
            return json.load(response)[0]

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the console output and of the model (worker) log."""
        logs = [self.console, self.cwd / self.env.get("LOG_LOCATION", "logs") / "model_log.log"]
        return "\n".join(
            f"--- {path}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            for path in logs
            if path.is_file()
        )

    # --- private ------------------------------------------------------------------------------

    def _read_keys(self) -> dict[str, str]:
        key_file = json.loads((self.cwd / "key_file.json").read_text())
        return {api: entry["key"] for api, entry in key_file.items()}

    def _frontend(self) -> psutil.Process | None:
        """The frontend JVM named by the pid file in the server's TMPDIR, if it is running."""
        tmp = self.env.get("TMPDIR") or tempfile.gettempdir()
        try:
            process = psutil.Process(int((Path(tmp) / ".model_server.pid").read_text().split()[0]))
            return process if FRONTEND in process.cmdline() else None  # not a reused pid
        except (OSError, ValueError, IndexError, psutil.Error):
            return None


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _client_url(address: str) -> str:
    """Where a client on this machine reaches a bind address (0.0.0.0 means every interface)."""
    url = urllib.parse.urlsplit(address)
    host = "127.0.0.1" if url.hostname in ("0.0.0.0", None) else url.hostname
    return f"{url.scheme}://{host}" + (f":{url.port}" if url.port else "")
