"""`make ui`: `mlflow ui` on the configured store, on the first free loopback port from
UI_PORT (default 5050; 5000 is the demo page's), failing loudly when it cannot bind (MLflow
itself prints "Address already in use" and exits with status 0).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from training.tracking import runs

TRIES = 50  # ports tried from UI_PORT up


def free_port(start: int, tries: int = TRIES) -> int:
    """The first port from `start` that 127.0.0.1 can bind."""
    for port in range(start, start + tries):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit(
        f"error: no free port in {start}-{start + tries - 1}: set UI_PORT to another start "
        "(UI_PORT=6000 make ui)"
    )


def main() -> None:
    uri = runs.configure()  # also moves a copied checkout's artifact paths home
    port = free_port(int(os.environ.get("UI_PORT", "5050")))
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(command)
    while process.poll() is None:  # up when the port answers, or failed when it exited
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    if process.poll() is not None:
        raise SystemExit(
            f"error: mlflow ui did not start on 127.0.0.1:{port} (exit status "
            f"{process.returncode}, output above): try another UI_PORT"
        )
    print(f"MLflow UI for {uri}: http://127.0.0.1:{port}/ (Ctrl-C stops it)", flush=True)
    try:
        raise SystemExit(process.wait())
    except KeyboardInterrupt:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
