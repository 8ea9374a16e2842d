"""`make demo`: serve model-store/imgtocap.mar in the background and caption sample images.

The demo server listens on 127.0.0.1 only and has token auth off, so that afterwards a plain
`curl -T image.jpg http://127.0.0.1:8080/predictions/imgtocap` works. serve/config.properties
keeps token auth on for `make serve` and the Docker image. `make stop` stops the server.

Images: DEMO_IMAGES (paths or globs, space-separated), else the first 3 of the test split
(data/processed/captions.json), else the first 3 of data/raw/Images/. Standard library only.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = Path("model-store/imgtocap.mar")
LOGS = Path("logs/torchserve")
PROCESSED = Path("data/processed/captions.json")
IMAGES = Path("data/raw/Images")


def main() -> int:
    os.chdir(ROOT)
    if not ARCHIVE.is_file():
        sys.exit(f"no {ARCHIVE}: build it with `dvc repro` (or `make demo`, which runs it)")
    images = demo_images()
    if not images:
        sys.exit("no sample images: run `dvc repro`, or set DEMO_IMAGES='a.jpg b.png'")
    config = local_config(Path(os.environ.get("TS_CONFIG_FILE", "serve/config.properties")))
    inference = config["inference_address"]
    management, metrics = config["management_address"], config["metrics_address"]
    start(config["_path"])
    print(f"waiting for a READY worker ({management}/models/imgtocap) ...", flush=True)
    wait_ready(f"{management}/models/imgtocap")

    url = f"{inference}/predictions/imgtocap"
    print(f"\nCaptions from {url}:\n")
    for image, reference in images:
        print(f"  {image}: {caption(image, url)}")
        if reference:
            print(f"  {' ' * len(image)}  (a reference caption: {reference})")
    print(f"""
TorchServe keeps running in the background (127.0.0.1 only, token auth off; logs in {LOGS}/):
  caption:   curl -T image.jpg {url}
  options:   curl -F data=@image.jpg -F num_beams=5 -F max_length=30 {url}
  describe:  curl {management}/models/imgtocap
  scale:     curl -X PUT "{management}/models/imgtocap?min_worker=2&synchronous=true"
  metrics:   curl {metrics}/metrics
`make stop` stops it. `make serve` runs the secure configuration (token auth on): README.md (Serving)
""")
    return 0


def demo_images() -> list[tuple[str, str | None]]:
    """(path, a reference caption or None): DEMO_IMAGES, else 3 test images, else 3 raw images."""
    if os.environ.get("DEMO_IMAGES"):
        paths = sorted(
            p for pattern in os.environ["DEMO_IMAGES"].split() for p in glob.glob(pattern)
        )
        return [(p, None) for p in paths]
    if PROCESSED.is_file():  # the preprocess stage's split by image
        test = json.loads(PROCESSED.read_text())["splits"].get("test") or []
        found = [(IMAGES / e["image"], e["captions"][0]) for e in test[:3]]
        if found and all(path.is_file() for path, _ in found):
            return [(str(path), reference) for path, reference in found]
    return [(p, None) for p in sorted(glob.glob(str(IMAGES / "*")))[:3]]


def local_config(path: Path) -> dict[str, str]:
    """The server's config with inference moved to 127.0.0.1, written beside its logs."""
    lines, config = [], {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        if line.strip() and not line.lstrip().startswith("#"):
            if key.strip() == "inference_address":  # loopback only: token auth is off
                url = urllib.parse.urlsplit(value.strip())
                value = f"{url.scheme}://127.0.0.1:{url.port or 8080}"
                line = f"{key}={value}"
            config[key.strip()] = value.strip()
        lines.append(line)
    LOGS.mkdir(parents=True, exist_ok=True)
    demo_config = LOGS / "demo.properties"
    demo_config.write_text("\n".join(lines) + "\n")
    config["_path"] = str(demo_config)
    return config


def start(config: str) -> None:
    """Start TorchServe detached from this terminal (Ctrl-C here won't stop it; make stop will)."""
    torchserve = Path(sys.executable).parent / "torchserve"
    command = [str(torchserve), "--start", "--ncs", "--disable-token-auth", "--ts-config", config]
    env = {
        **os.environ,
        "LOG_LOCATION": str(LOGS),
        "METRICS_LOCATION": str(LOGS),
        # OpenMP threads that spin while idle stall badly when another process holds a core
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }
    with open(LOGS / "console.log", "ab") as console:
        launched = subprocess.run(
            command, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
        )
    if launched.returncode != 0:
        sys.exit(f"TorchServe did not start ({LOGS / 'console.log'}); already running? `make stop`")


def wait_ready(describe_url: str, timeout: float = 300) -> None:
    """Poll the management API until a worker is READY (/ping says Healthy long before)."""
    pid_file = Path(tempfile.gettempdir()) / ".model_server.pid"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(describe_url, timeout=5) as response:
                workers = json.load(response)[0]["workers"]
            if any(w["status"] == "READY" for w in workers):
                return
        except (OSError, ValueError, KeyError, IndexError):
            pass  # not listening yet, or the model not registered yet
        if not _alive(pid_file):
            sys.exit(f"TorchServe exited while starting:\n{_tail(LOGS / 'console.log')}")
        time.sleep(1)
    sys.exit(f"no READY worker after {timeout:.0f} s:\n{_tail(LOGS / 'model_log.log')}")


def caption(image: str, url: str) -> str:
    """`curl -T image url`, as a user would type it; the caption, or the error it got."""
    if shutil.which("curl"):
        out = subprocess.run(["curl", "-sS", "-T", image, url], capture_output=True, text=True)
        body = out.stdout or out.stderr
    else:  # no curl on this machine: the same PUT with urllib
        # urllib would label the body form-urlencoded, which TorchServe then fails to parse (500)
        headers = {"Content-Type": "application/octet-stream"}
        request = urllib.request.Request(
            url, data=Path(image).read_bytes(), method="PUT", headers=headers
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                body = response.read().decode()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
    try:
        answer = json.loads(body)
    except ValueError:
        return f"(no JSON answer: {body.strip()[:200]})"
    return answer.get("caption") or f"(error: {answer.get('error', answer)})"


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().split()[0]), 0)
        return True
    except (OSError, ValueError, IndexError):
        return False


def _tail(path: Path, lines: int = 30) -> str:
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""
    )


if __name__ == "__main__":
    sys.exit(main())
