"""The serving image, built and run: the Dockerfile around a trained archive (a small model that
gets captions right: DEPLOYED in tests/helpers/deployment.py) on the offline bases, run with
podman as `docker run` would run it.

What a user of the image relies on: the model is READY within seconds, `curl -T` with the token
answers a test image with its right caption (the one the evaluation gave it), the HEALTHCHECK
passes, the server runs as uid 1000 (what the Deployment's runAsUser names), and `podman stop` is
quick because dumb-init forwards SIGTERM. The image stays under 2 GB with CPU torch.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from tests.helpers.deployment import (
    DECODING,
    Image,
    Trained,
    podman,
    serving_image,
    trained_pipeline,
)
from tests.helpers.dockerfile import Dockerfile
from tests.helpers.project import closed_port

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # dvc repro, podman

MAX_BYTES = 2_000_000_000


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    return trained_pipeline(tmp_path_factory)


@pytest.fixture(scope="module")
def image(trained) -> Image:
    return serving_image(trained)


def _ready(container: str, timeout: float = 180) -> tuple[float, str]:
    """Wait for a READY worker (the management API inside the container, with its key); the
    seconds it took from now and the inference key."""
    ask = (
        "import json, urllib.request as u\n"
        "keys = json.load(open('key_file.json'))\n"
        "r = u.Request('http://127.0.0.1:8081/models/imgtocap',"
        " headers={'Authorization': 'Bearer ' + keys['management']['key']})\n"
        "workers = json.load(u.urlopen(r, timeout=3))[0]['workers']\n"
        "assert any(w['status'] == 'READY' for w in workers), workers\n"
        "print(keys['inference']['key'])\n"
    )
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        p = podman("exec", container, "python", "-c", ask, check=False)
        if p.returncode == 0:
            return time.monotonic() - start, p.stdout.strip()
        state = podman("inspect", "--format", "{{.State.Status}}", container).stdout.strip()
        assert state == "running", f"{container} {state}:\n{podman('logs', container).stderr}"
        time.sleep(0.5)
    raise AssertionError(f"no READY worker after {timeout} s:\n{podman('logs', container).stderr}")


def test_the_image_captions_like_the_evaluation_and_stops_at_once(image, trained, tmp_path):
    assert image.size < MAX_BYTES, f"{image.size / 1e9:.2f} GB"
    port = closed_port()
    name = f"imgtocap-test-{port}"
    started = time.monotonic()
    podman("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:8080", image.tag)
    try:
        seconds, key = _ready(name, timeout=180)
        ready = time.monotonic() - started
        data, expected = trained.test_image()
        (tmp_path / "test.png").write_bytes(data)
        curl = subprocess.run(
            ["curl", "--silent", "--show-error", "--fail-with-body", "--max-time", "60",
             "-H", f"Authorization: Bearer {key}", "-T", str(tmp_path / "test.png"),
             f"http://127.0.0.1:{port}/predictions/imgtocap"],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert curl.returncode == 0, curl.stdout + curl.stderr
        answer = json.loads(curl.stdout)
        assert {k: answer[k] for k in DECODING} == DECODING
        assert answer["caption"] == expected["caption"], (answer, expected)
        assert answer["score"] == pytest.approx(expected["score"], abs=1e-3)
        without = subprocess.run(
            ["curl", "--silent", "--output", "/dev/null", "--write-out", "%{http_code}",
             "-T", str(tmp_path / "test.png"), f"http://127.0.0.1:{port}/predictions/imgtocap"],
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert without.stdout == "400", "token auth must be on in the image"

        # The Dockerfile's HEALTHCHECK, as podman (or docker) runs it.
        healthcheck = podman("inspect", "--format", "{{json .Config.Healthcheck}}", name)
        assert "probe.py" in healthcheck.stdout and "/predictions/" in healthcheck.stdout
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        user = Dockerfile(trained.repo / "Dockerfile").user.split(":")[0]
        assert user == "1000"
        top = podman("top", name, "user", "args").stdout.splitlines()[1:]
        assert top and all(line.split()[0] in ("model-server", "1000") for line in top), top
        assert podman("exec", name, "id", "-u").stdout.strip() == user

        stopping = time.monotonic()
        podman("stop", "--time", "30", name)
        stop = time.monotonic() - stopping
        assert stop < 2, f"podman stop took {stop:.1f} s: SIGTERM is not reaching TorchServe"
        print(f"\nimage {image.size / 1e6:.0f} MB built in {image.build_seconds:.0f} s; READY "
              f"{ready:.1f} s after `podman run`; caption {answer['caption']!r} for "
              f"{expected['references'][0]!r}; stop {stop:.1f} s")  # fmt: skip
    finally:
        podman("rm", "--force", name, check=False)
