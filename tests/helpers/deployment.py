"""What the deployment tests share: a small pipeline trained once per session (its archive, its
registered model, its test images with the captions the evaluation gave them), and podman:
the settings these machines need, the offline bases (serve/bases.sh) and the serving image built
once per session from that archive with serve/image.sh (what `make image` runs).

Each is made once per session, by whichever test module asks first; the image is removed when
the session ends.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.project import SHRUNK, dvc, git_commit, project_copy, set_params

ROOT = Path(__file__).resolve().parents[2]
# serve/containers.conf: runc, cgroupfs, file events, the ulimits some hosts cap (FACTS).
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(ROOT / "serve" / "containers.conf")}
BASES = {
    "PYTHON_IMAGE": "localhost/imgtocap-python:3.11-bookworm",
    "JRE_IMAGE": "localhost/imgtocap-jre:17-bookworm",
    "NGINX_IMAGE": "localhost/imgtocap-nginx:bookworm",
}
TAG = f"localhost/imgtocap-test:{os.getpid()}"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The evaluation's decoding, made the served default too: the server must then answer each test
# image with the caption evaluate wrote for it (reports/predictions.jsonl).
DECODING = {"num_beams": 2, "max_length": 12}
assert {f"evaluate.{k}": v for k, v in DECODING.items()}.items() <= SHRUNK.items()
# A model that gets captions right, so that what a deployment answers can be checked against the
# image, not only against the evaluation: the shipped encoder and one layer of the shipped
# decoder, trained for a minute or two on scenes of one shape (its colour and shape are the
# content). SHRUNK's random tiny model answers nonsense (content accuracy 0), as does the tiny
# decoder on the real encoder at 25 epochs (0.07 with two objects, 0.53 with one).
DEPLOYED = {
    **SHRUNK,
    "data.synthetic.num_images": 300,
    "data.synthetic.one_object_fraction": 1.0,
    "transform.views": 0,
    "model.preset": "default",
    "model.overrides": {"num_layers": 1},
    "train.epochs": 8,
    "train.captions_per_image": None,
}
# Of its 15 test images it gets 12 right on the machine that chose these settings.
MIN_CONTENT_ACCURACY = 0.5

_session: dict[str, object] = {}


@dataclass
class Trained:
    """The deployment pipeline's repository (DEPLOYED) after `dvc repro`, committed."""

    repo: Path
    seconds: float

    @property
    def archive(self) -> Path:
        return self.repo / "model-store" / "imgtocap.mar"

    def predictions(self) -> list[dict]:
        """reports/predictions.jsonl: the evaluation's caption of each test image."""
        lines = (self.repo / "reports" / "predictions.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    def test_image(self) -> tuple[bytes, dict]:
        """A test image the evaluation captioned right (its colour and shape), its bytes and the
        evaluation's prediction for it."""
        metrics = json.loads((self.repo / "metrics" / "eval.json").read_text())
        accuracy = metrics["content_accuracy"]
        assert accuracy >= MIN_CONTENT_ACCURACY, (
            f"the deployment model got {accuracy:.2f} of its test images right (at least "
            f"{MIN_CONTENT_ACCURACY} expected): train it longer in DEPLOYED"
        )
        first = next(p for p in self.predictions() if p["correct"])
        return (self.repo / "data" / "raw" / "Images" / first["image"]).read_bytes(), first


def trained_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The DEPLOYED pipeline, serving with the evaluation's decoding."""
    if "trained" not in _session:
        start = time.monotonic()
        repo = project_copy(tmp_path_factory.mktemp("deployed"))
        serve = {f"serve.{k}": {"default": v, "max": 5 * v} for k, v in DECODING.items()}
        set_params(repo, {**DEPLOYED, **serve})
        dvc(repo, "repro")
        git_commit(repo, "Baseline model", "params.yaml", "dvc.lock", "metrics")
        _session["trained"] = Trained(repo, time.monotonic() - start)
    return _session["trained"]


# --- podman -------------------------------------------------------------------------------------


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """`podman <args>` with the project's containers.conf; must succeed unless `check` is off."""
    p = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=PODMAN_ENV
    )
    if check:
        assert p.returncode == 0, f"podman {' '.join(args)}: {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p


def require_podman() -> None:
    """Skip, saying why, only where podman cannot run at all (.ci/run installs it on CI)."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (.ci/run: apt-get install podman buildah ...)")
    info = podman("info", check=False)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[-500:]}")


def _torch_wheels() -> Path | None:
    """A local folder holding a torch wheel (pip's find-links), used instead of the wheel index."""
    folders = os.environ.get("PIP_FIND_LINKS", "").split()
    p = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    )
    folders += [line.split("=", 1)[1].strip("'") for line in p.stdout.splitlines()
                if line.split("=", 1)[0].endswith(".find-links")]  # fmt: skip
    for folder in map(Path, folders):
        if folder.is_dir() and any(folder.glob("torch-*.whl")):
            return folder
    return None


@dataclass
class Image:
    tag: str
    build_seconds: float
    size: int  # bytes, as podman reports it


def serving_image(trained: Trained) -> Image:
    """The Dockerfile built around the trained archive by serve/image.sh, on the offline bases."""
    require_podman()
    if "image" not in _session:
        env = {**PODMAN_ENV, "ENGINE": "podman", **BASES}
        subprocess.run([ROOT / "serve" / "bases.sh"], env=env, check=True, timeout=900,
                       capture_output=True)  # fmt: skip
        wheels = _torch_wheels()
        if wheels is not None:
            env["TORCH_FIND_LINKS"] = str(wheels)
        # chroot isolation builds without a container runtime's cgroup setup; pip inside the
        # build trusts what the host trusts (a TLS-intercepting proxy's CA, say).
        options = ["--isolation", "chroot"]
        if CA_BUNDLE.exists():
            options += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
        env.update(IMAGE=TAG, BUILD_OPTS=" ".join(options))
        start = time.monotonic()
        p = subprocess.run([trained.repo / "serve" / "image.sh"], env=env, capture_output=True,
                           text=True, timeout=1200)  # fmt: skip
        assert p.returncode == 0, f"serve/image.sh failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
        seconds = time.monotonic() - start
        size = int(podman("image", "inspect", "--format", "{{.Size}}", TAG).stdout)
        _session["image"] = Image(TAG, seconds, size)
        atexit.register(podman, "rmi", "--force", TAG, check=False)
        print(f"\nimage {TAG}: built in {seconds:.0f} s, {size / 1e6:.0f} MB")
    return _session["image"]
