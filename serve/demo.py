"""`make demo`: serve model-store/imgtocap.mar in the background, caption sample images, and
put the page (serve/web/) in front of it with nginx at http://127.0.0.1:5000/.

The demo server listens on 127.0.0.1 only and has token auth off, so that afterwards a plain
`curl -T image.jpg http://127.0.0.1:8080/predictions/imgtocap` works. serve/config.properties
keeps token auth on for `make serve` and the Docker image. The page needs nginx (serve/proxy.py);
without it the demo still serves the API and says how to install it. DEMO_PAGE_PORT moves the
page off port 5000. `make stop` stops both.

Images: DEMO_IMAGES (paths or globs, space-separated), else the first 3 of the test split
(data/processed/captions.json), else the first 3 of data/raw/Images/. Run from the repository
root as `python -m serve.demo`: the standard library, serve/runner.py and psutil (TorchServe's).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from serve import proxy
from serve.runner import TorchServe, TorchServeError, read_config, write_config
from training.paths import ARCHIVE_PATH, MODEL_NAME

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ARCHIVE_PATH
LOGS = Path("logs/torchserve")
RUN = ROOT / LOGS / "run"  # TorchServe's TMPDIR (serve/serve.mk's RUN)
PROCESSED = Path("data/processed/captions.json")
IMAGES = Path("data/raw/Images")
PROXY = Path("logs/nginx")  # the page's nginx: config, pid, logs


def main() -> int:
    os.chdir(ROOT)
    if not ARCHIVE.is_file():
        sys.exit(f"no {ARCHIVE}: build it with `dvc repro` (or `make demo`, which runs it)")
    images = demo_images()
    if not images:
        sys.exit("no sample images: run `dvc repro`, or set DEMO_IMAGES='a.jpg b.png'")
    RUN.mkdir(parents=True, exist_ok=True)
    server = TorchServe(
        demo_config(Path(os.environ.get("TS_CONFIG_FILE", "serve/config.properties"))),
        # TMPDIR: TorchServe's pid file in this checkout, where `make stop` looks (serve/serve.mk)
        env={"LOG_LOCATION": str(LOGS), "METRICS_LOCATION": str(LOGS), "TMPDIR": str(RUN)},
        console=LOGS / "console.log",
    )
    inference, management, metrics = server.inference, server.management, server.metrics
    try:
        server.start(detach=True)  # Ctrl-C here won't stop it; `make stop` will
        print(f"waiting for a READY worker ({management}/models/{MODEL_NAME}) ...", flush=True)
        server.wait_ready()
    except TorchServeError as exc:
        sys.exit(f"{exc}\n`make stop` stops a TorchServe that is still running.")

    url = f"{inference}/predictions/{MODEL_NAME}"
    print(f"\nCaptions from {url}:\n")
    for image, reference in images:
        print(f"  {image}: {caption(image, url)}")
        if reference:
            print(f"  {' ' * len(image)}  (a reference caption: {reference})")
    print(f"\n{start_page(inference)}")
    print(f"""
TorchServe keeps running in the background (127.0.0.1 only, token auth off; logs in {LOGS}/):
  caption:   curl -T image.jpg {url}
  options:   curl -F data=@image.jpg -F num_beams=5 -F max_length=30 {url}
  describe:  curl {management}/models/{MODEL_NAME}
  scale:     curl -X PUT "{management}/models/{MODEL_NAME}?min_worker=2&synchronous=true"
  metrics:   curl {metrics}/metrics
`make stop` stops it and the page. `make serve` runs the secure configuration (token auth on):
docs/serving.md
""")
    return 0


def start_page(inference: str) -> str:
    """nginx with the page in front of TorchServe's `inference` URL, on 127.0.0.1:5000 (or
    DEMO_PAGE_PORT), left running; what to tell the user: where the page is, or why it is not."""
    if proxy.binary() is None:
        return (
            f"The page needs nginx, which is not installed ({proxy.INSTALL_HINT}); "
            "then run `make demo` again. The API above works without it."
        )
    proxy.stop(PROXY)  # a page a previous `make demo` left running
    port = int(os.environ.get("DEMO_PAGE_PORT", "5000"))
    page = proxy.Nginx.configure(PROXY, inference=proxy.host_port(inference), port=port)
    try:
        page.start(detach=True)  # keeps running after this process; `make stop` stops it
    except proxy.ProxyError as exc:
        return (
            f"The page did not start: {exc}\nIf port {port} is taken, choose another: "
            f"DEMO_PAGE_PORT={port + 1} make demo"
        )
    return (
        f"The page: open {page.url}/ in a browser, drop an image, and see its caption and where "
        "the model looked for each word."
    )


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


def demo_config(path: Path) -> Path:
    """The server's config with inference moved to 127.0.0.1 and token auth off, beside its logs."""
    inference = urllib.parse.urlsplit(read_config(path)["inference_address"])
    LOGS.mkdir(parents=True, exist_ok=True)
    return write_config(
        LOGS / "demo.properties",
        path,
        inference_address=f"{inference.scheme}://127.0.0.1:{inference.port or 8080}",
        disable_token_authorization="true",  # loopback only: a plain `curl -T` works
    )


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


if __name__ == "__main__":
    sys.exit(main())
