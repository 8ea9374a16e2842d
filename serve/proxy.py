"""nginx in front of TorchServe: the page in serve/web/ and the inference API on one address.

TorchServe serves no pages, and on its own port it also answers `OPTIONS /` with its whole API
description and takes any body up to max_request_size. serve/nginx.conf.template is the one
proxy configuration; this module renders it and runs nginx:

    with Nginx.configure(workdir, inference="127.0.0.1:8080") as proxy:   # a free port
        requests.put(f"{proxy.url}/predictions/imgtocap", data=...)

`make demo` starts one on 127.0.0.1:5000 that outlives it (`make stop` stops it), and the pod
runs k8s/nginx.conf, the template rendered for the cluster:

    python -m serve.proxy cluster > k8s/nginx.conf     # after editing the template
    python -m serve.proxy stop logs/nginx              # what `make stop` runs

Standard library and psutil (a TorchServe dependency) only, like serve/runner.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psutil

from serve.runner import free_ports, read_config

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "nginx.conf.template"
WEB = HERE / "web"  # the page: the same files locally and in the pod (the image carries them)
K8S = HERE.parent / "k8s"
# Where the pod has things (k8s/deployment.yaml): the proxy listens on the pod's port 5000, the
# page is copied from the image to /srv/web, /tmp is an emptyDir, logs go to the container's
# stdout/stderr. TorchServe's address and body cap come from k8s/torchserve.properties.
CLUSTER = {"listen": "5000", "root": "/srv/web", "run_dir": "/tmp"}
CLUSTER_LOGS = {"error_log": "/dev/stderr", "access_log": "/dev/stdout"}
GENERATED = (
    "# Generated from serve/nginx.conf.template by `python -m serve.proxy cluster > k8s/nginx.conf`:\n"
    "# edit the template, then regenerate (tests/test_proxy.py fails while the two disagree).\n"
)
INSTALL_HINT = "Debian/Ubuntu: sudo apt-get install nginx; macOS: brew install nginx"
# Straight to loopback, whatever HTTP(S)_PROXY the environment carries.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ProxyError(RuntimeError):
    """nginx is missing, or did not start; the message says why (with its error log)."""


def render(
    *,
    listen: str,
    inference: str,
    root: Path | str,
    run_dir: Path | str,
    error_log: Path | str,
    access_log: Path | str,
    max_body: int,
    template: Path = TEMPLATE,
) -> str:
    """The template with its ${NAMES} filled in: `listen` ("127.0.0.1:5000" or "5000"),
    TorchServe's inference `host:port`, the page's `root`, `run_dir` for the pid and temporary
    files, the two logs, and the body cap in bytes (TorchServe's max_request_size)."""
    values = {
        "LISTEN": listen,
        "INFERENCE": inference,
        "ROOT": str(root),
        "RUN_DIR": str(run_dir),
        "ERROR_LOG": str(error_log),
        "ACCESS_LOG": str(access_log),
        "MAX_BODY": str(max_body),
        "MAX_BODY_TEXT": f"{max_body:,} bytes ({max_body / 2**20:g} MiB)",
    }

    def fill(match: re.Match) -> str:
        if match[1] not in values:
            raise KeyError(f"{template}: unknown placeholder ${{{match[1]}}}")
        return values[match[1]]

    return re.sub(r"\$\{(\w+)\}", fill, Path(template).read_text())


def cluster_config() -> str:
    """k8s/nginx.conf: the template rendered for the pod."""
    torchserve = read_config(K8S / "torchserve.properties")
    return GENERATED + render(
        inference=host_port(torchserve["inference_address"]),
        max_body=int(torchserve["max_request_size"]),
        **CLUSTER,
        **CLUSTER_LOGS,
    )


def binary() -> str | None:
    """The nginx executable: on PATH, or where Debian puts it (/usr/sbin, not on users' PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


class Nginx:
    """One nginx on the config file `config` (rendered from the template, `daemon off`)."""

    def __init__(self, config: Path, url: str):
        self.config, self.url = Path(config).resolve(), url
        settings = self.config.read_text()
        self.pid_file = Path(re.search(r"^pid (\S+);", settings, re.MULTILINE)[1])
        self.error_log = Path(re.search(r"^error_log (\S+)", settings, re.MULTILINE)[1])
        self.process: subprocess.Popen | None = None

    @classmethod
    def configure(
        cls,
        run_dir: Path,
        *,
        inference: str,
        host: str = "127.0.0.1",
        port: int | None = None,
        root: Path = WEB,
        max_body: int | None = None,
    ) -> Nginx:
        """Render a config into `run_dir` (pid, temporary files and logs there too) for nginx on
        host:port (a free port if None) in front of TorchServe's `inference` host:port.
        `max_body` defaults to serve/config.properties' max_request_size."""
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        port = port or free_ports(1)[0]
        if max_body is None:
            max_body = int(read_config(HERE / "config.properties")["max_request_size"])
        config = run_dir / "nginx.conf"
        config.write_text(
            render(
                listen=f"{host}:{port}",
                inference=inference,
                root=Path(root).resolve(),
                run_dir=run_dir,
                error_log=run_dir / "error.log",
                access_log=run_dir / "access.log",
                max_body=max_body,
            )
        )
        return cls(config, f"http://{host}:{port}")

    def command(self) -> list[str]:
        nginx = binary()
        if nginx is None:
            raise ProxyError(f"nginx is not installed ({INSTALL_HINT})")
        command = [nginx, "-e", str(self.error_log), "-c", str(self.config)]
        if os.geteuid() == 0:
            # As root, nginx would run its workers as `nobody`, who may not read a checkout in
            # root's home. This nginx listens on loopback for a demo or a test; the pod runs as
            # its own unprivileged user.
            command += ["-g", "user root;"]
        return command

    def start(self, *, detach: bool = False) -> Nginx:
        """Start nginx; `detach` leaves it running in a session of its own after this process
        exits (`make demo`). Returns once it answers, or raises ProxyError with its error log."""
        command = self.command()
        self.error_log.parent.mkdir(parents=True, exist_ok=True)
        with self.error_log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=detach,
            )
        deadline = time.monotonic() + 15
        while True:
            if self.process.poll() is not None:
                raise ProxyError(f"nginx exited at start ({' '.join(command)}):\n{self.log_tail()}")
            with contextlib.suppress(OSError), _OPENER.open(f"{self.url}/", timeout=2) as answer:
                if answer.status == 200:
                    return self
            if time.monotonic() > deadline:
                self.stop()
                raise ProxyError(f"nginx did not answer at {self.url}/:\n{self.log_tail()}")
            time.sleep(0.1)

    def running(self) -> psutil.Process | None:
        """The nginx master named by the pid file, if it is running."""
        try:
            process = psutil.Process(int(self.pid_file.read_text().split()[0]))
            return process if "nginx" in process.name() else None  # not a reused pid
        except (OSError, ValueError, IndexError, psutil.Error):
            return None

    def stop(self) -> bool:
        """Stop gracefully (SIGQUIT: requests in flight finish), then kill what is left.
        Whether an nginx was running."""
        master = self.running()
        if master is None and self.process is not None and self.process.poll() is None:
            master = psutil.Process(self.process.pid)  # not yet written its pid file
        if master is None:
            return False
        processes = [master, *master.children(recursive=True)]
        with contextlib.suppress(psutil.NoSuchProcess):
            master.send_signal(signal.SIGQUIT)
        _, alive = psutil.wait_procs(processes, timeout=10)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)
        return True

    def log_tail(self, lines: int = 20) -> str:
        if not self.error_log.is_file():
            return f"(no {self.error_log})"
        text = self.error_log.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {self.error_log}\n" + "\n".join(text)

    def __enter__(self) -> Nginx:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def stop(run_dir: Path) -> bool:
    """Stop the nginx whose config `configure` wrote into `run_dir`; whether one was running."""
    config = Path(run_dir) / "nginx.conf"
    return config.is_file() and Nginx(config, "").stop()


def host_port(address: str) -> str:
    """An address's host:port, as nginx's `server` takes it: http://127.0.0.1:8080 -> 127.0.0.1:8080."""
    url = urllib.parse.urlsplit(address)
    return f"{url.hostname}:{url.port}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["cluster"]:
        sys.stdout.write(cluster_config())
        return 0
    if argv[:1] == ["stop"] and len(argv) <= 2:
        run_dir = Path(argv[1] if len(argv) == 2 else "logs/nginx")
        if stop(run_dir):
            print(f"stopped nginx ({run_dir / 'nginx.conf'})")
        return 0
    sys.exit("usage: python -m serve.proxy cluster | stop [RUN_DIR]")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
