"""The pod, on this machine: TorchServe started with the image's command, k8s/torchserve.properties
and the Deployment's environment; the proxy on the nginx template the pod runs (tests/test_proxy.py
checks k8s/nginx.conf is its rendering); the kubelet's probes. Only ports and paths are this
test's. A random tiny captioner behind the real handler serves.

What the cluster relies on: nothing but the proxy and the metrics listens beyond the pod's
loopback, so the management API (scale workers, describe) is out of reach of every other pod
without a Kubernetes credential (kubectl port-forward/exec); the public `curl -T` works through
the proxy without a token; a worker killed under load fails only the batch it held and is READY
again well inside the readiness probe's patience.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import psutil
import pytest
import requests
import yaml

from serve import proxy
from serve.runner import APIS, TorchServe, private_config, read_config, write_config
from tests.helpers import deployment
from tests.helpers import model as model_helpers
from tests.helpers.dockerfile import Dockerfile
from tests.helpers.marks import needs
from tests.helpers.project import closed_port

pytestmark = [pytest.mark.slow, pytest.mark.java, pytest.mark.nginx]  # TorchServe, nginx

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BIN = Path(sys.executable).parent
BATCH = 4
SERVE = {"batch_size": BATCH, "max_batch_delay_ms": 20, "max_length": {"default": 12, "max": 20}}


def _deployment() -> dict:
    return yaml.safe_load((K8S / "deployment.yaml").read_text())


def _torchserve_container() -> dict:
    (container,) = [
        c
        for c in _deployment()["spec"]["template"]["spec"]["containers"]
        if c["name"] == "torchserve"
    ]
    return container


def _env(tmp: Path) -> dict[str, str]:
    """The Deployment's environment for TorchServe, its /tmp volume moved to `tmp`."""
    env = {}
    for entry in _torchserve_container()["env"]:
        value = entry["value"]
        if value == "/tmp" or value.startswith("/tmp/"):
            value = str(tmp) + value[len("/tmp") :]
        env[entry["name"]] = value
    del env["TS_CONFIG_FILE"]  # TorchServe below points it at this test's copy of the config
    return env


def _config(path: Path, store: Path) -> Path:
    """k8s/torchserve.properties on free ports, each API on the host the cluster binds it to."""
    cluster = read_config(K8S / "torchserve.properties")
    vmargs = cluster["vmargs"].replace("file:///etc/imgtocap/", f"file://{K8S}/")
    assert vmargs != cluster["vmargs"], "the log config is no longer under /etc/imgtocap"
    config = private_config(path, store, source=K8S / "torchserve.properties", vmargs=vmargs)
    ports = {api: urlsplit(read_config(config)[f"{api}_address"]).port for api in APIS}
    hosts = {api: urlsplit(cluster[f"{api}_address"]).hostname for api in APIS}
    return write_config(
        config, config, **{f"{api}_address": f"http://{hosts[api]}:{ports[api]}" for api in APIS}
    )


def _probe(*args: str) -> subprocess.CompletedProcess:
    """k8s/probe.py as the kubelet runs it (the Deployment's exec probes)."""
    return subprocess.run(
        [sys.executable, str(K8S / "probe.py"), *args], capture_output=True, text=True, timeout=30
    )


class Pod:
    def __init__(self, torchserve: TorchServe, nginx: proxy.Nginx, cwd: Path, tmp: Path):
        self.torchserve, self.nginx, self.cwd, self.tmp = torchserve, nginx, cwd, tmp
        self.ready_url = f"{torchserve.management}/models/imgtocap"
        self.ping_url = f"{torchserve.inference}/ping"

    def caption(self, data: bytes, base: str | None = None) -> requests.Response:
        """`curl -T image URL/predictions/imgtocap`, through the proxy unless `base` says."""
        url = f"{base or self.nginx.url}/predictions/imgtocap"
        return requests.put(url, data=data, timeout=120)

    def frontend(self) -> psutil.Process:
        return psutil.Process(int((self.tmp / ".model_server.pid").read_text().split()[0]))

    def worker_pid(self) -> int | None:
        ready = [w["pid"] for w in self.torchserve.describe()["workers"] if w["status"] == "READY"]
        return ready[0] if ready else None


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
    if shutil.which("java") is None:
        pytest.skip("java is not installed: TorchServe's frontend needs Java 17")
    if proxy.binary() is None:
        pytest.skip(f"nginx is not installed ({proxy.INSTALL_HINT})")
    base = tmp_path_factory.mktemp("pod")
    tmp, cwd = base / "tmp", base / "cwd"  # the emptyDir; the image's read-only working dir
    for d in (tmp, cwd):
        d.mkdir()
    store = model_helpers.model_store(base / "store", **SERVE)
    torchserve = TorchServe(_config(base / "cluster.properties", store), cwd=cwd, env=_env(tmp),
                            console=base / "stdout.log")  # fmt: skip
    assert not torchserve.token_auth
    command = Dockerfile(ROOT / "Dockerfile").cmd  # the image's own; TS_CONFIG_FILE overrides
    cluster = read_config(K8S / "torchserve.properties")
    with (
        torchserve.start(command=[str(BIN / command[0]), *command[1:]]),
        proxy.Nginx.configure(
            base / "nginx",
            inference=proxy.host_port(torchserve.inference),
            max_body=int(cluster["max_request_size"]),
        ) as nginx,
    ):
        yield Pod(torchserve, nginx, cwd, tmp)


def _image() -> bytes:
    return (ROOT / "tests" / "deploy_smoke.jpg").read_bytes()


def _other_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, if it has one."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback:
                return a.address
    return None


def test_only_metrics_listen_beyond_the_pods_loopback(pod):
    listening: dict[int, set[str]] = {}
    for c in pod.frontend().net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN:
            listening.setdefault(c.laddr.port, set()).add(c.laddr.ip)
    port = {api: urlsplit(pod.torchserve.urls[api]).port for api in APIS}
    for api in ("management", "inference"):
        assert listening[port[api]] <= {"127.0.0.1", "::ffff:127.0.0.1"}, (api, listening)
    assert listening[port["metrics"]] & {"0.0.0.0", "::"}, listening
    assert all(
        ips <= {"127.0.0.1", "::ffff:127.0.0.1"}
        for p, ips in listening.items()
        if p != port["metrics"]
    ), listening  # fmt: skip  (gRPC too)

    # From another host or pod: management refuses the connection; metrics answer.
    address = _other_address()
    if address is not None:
        for api in ("management", "inference"):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port[api]), timeout=5).close()
        metrics = requests.get(f"http://{address}:{port['metrics']}/metrics", timeout=10)
        assert metrics.status_code == 200

    # The kubelet's probes, run inside the pod, still get through.
    for url in (pod.ready_url, pod.ping_url):
        probe = _probe(url)
        assert probe.returncode == 0, probe.stdout + probe.stderr


def test_the_proxy_serves_curl_without_a_token_and_hides_the_rest(pod):
    direct = pod.caption(_image(), base=pod.torchserve.inference)
    through = pod.caption(_image())
    assert through.status_code == direct.status_code == 200, through.text
    assert through.headers["Content-Type"] == "application/json"
    for key in ("caption", "score", "num_beams", "max_length"):
        assert through.json()[key] == direct.json()[key], key
    assert requests.get(f"{pod.nginx.url}/ping", timeout=10).json()["status"] == "Healthy"

    # TorchServe describes its whole API to anyone who asks; through the proxy nobody can.
    assert "openapi" in requests.options(f"{pod.torchserve.inference}/", timeout=10).text
    hidden = requests.options(f"{pod.nginx.url}/", timeout=10)
    assert hidden.status_code == 405 and "openapi" not in hidden.text
    big = pod.caption(
        bytes(int(read_config(K8S / "torchserve.properties")["max_request_size"]) + 1)
    )
    assert big.status_code == 413 and "larger than" in big.json()["error"]
    register = requests.post(f"{pod.torchserve.management}/models?url=x.mar", timeout=10)
    assert register.status_code == 405, "the model registration API must stay off"

    # The pod's working directory is read-only: everything goes to the TMPDIR/TEMP volume, and
    # TorchServe's logs (the access log too) to stdout.
    assert list(pod.cwd.iterdir()) == []
    assert (pod.tmp / ".model_server.pid").exists() and (pod.tmp / "models").is_dir()
    assert not (pod.tmp / "logs").exists() or not any((pod.tmp / "logs").iterdir())
    assert "PUT /predictions/imgtocap" in pod.torchserve.console.read_text()


def test_a_killed_worker_is_ready_again_in_seconds_under_load(pod, record_property):
    # The pod stays in the Service while readiness has not failed failureThreshold times in a
    # row: the worker must be back within that, so that queued requests are answered there.
    readiness = _torchserve_container()["readinessProbe"]
    patience = readiness["periodSeconds"] * readiness["failureThreshold"]
    results: list[tuple[float, int, str]] = []  # (sent, status, body)
    stop = threading.Event()
    image = _image()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = pod.caption(image)
                if response.status_code == 429:  # the proxy's per-address limit: 16 clients on
                    # one address ask more than 10 a second; they wait as Retry-After says
                    time.sleep(float(response.headers["Retry-After"]))
                    continue
                results.append((sent, response.status_code, response.text))
            except requests.RequestException as e:
                results.append((sent, 0, str(e)))

    clients = [threading.Thread(target=client) for _ in range(16)]
    for thread in clients:
        thread.start()
    recoveries = []
    try:
        time.sleep(2)
        for _ in range(2):  # twice: TorchServe's restart back-off must start over each time
            old = pod.worker_pid()
            killed = time.monotonic()
            os.kill(old, signal.SIGKILL)
            while pod.worker_pid() in (None, old):
                assert time.monotonic() - killed < patience, f"no READY worker after {patience} s"
                time.sleep(0.1)
            recoveries.append((killed, time.monotonic()))
            time.sleep(3)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=150)

    seconds = [round(ready - killed, 1) for killed, ready in recoveries]
    failed = [(sent, status, body) for sent, status, body in results if status != 200]
    print(f"\nworker killed twice under 16 clients: READY again after {seconds} s; "
          f"{len(results)} requests, {len(failed)} failed: {sorted({s for _, s, _ in failed})}")  # fmt: skip
    record_property("seconds_to_ready", seconds)
    record_property("failed_requests", len(failed))
    # Only the batch each dead worker held fails: "Worker died.", with 507, or 500 when TorchServe
    # has not yet seen the process's exit status. Requests queued while the worker restarted,
    # and everything after, are answered.
    for _, status, body in failed:
        assert status in (500, 507) and "Worker died" in body, (status, body)
    assert len(failed) <= 2 * BATCH, failed
    assert all(sent < recoveries[-1][0] for sent, _, _ in failed), "a later request failed"
    assert any(sent > recoveries[-1][1] and status == 200 for sent, status, _ in results)


def test_the_readiness_probe_tracks_the_worker(pod):
    scale = f"{pod.ready_url}?min_worker=0&max_worker=0&synchronous=true"
    assert requests.put(scale, timeout=60).status_code == 200
    probe = _probe(pod.ready_url)
    assert probe.returncode == 1 and "no READY worker" in probe.stdout, probe.stdout
    assert _probe(pod.ping_url).returncode == 0, "liveness: the frontend itself is fine"
    scale = f"{pod.ready_url}?min_worker=1&max_worker=1&synchronous=true"
    assert requests.put(scale, timeout=120).status_code == 200
    assert _probe(pod.ready_url).returncode == 0


# --- The pod played by podman -------------------------------------------------------------------
# `kubectl kustomize` of k8s/ through a local overlay, run by `podman kube play`: the image built
# from a trained archive (tests/helpers/deployment.py), the proxy from Debian's nginx (serve/bases.sh),
# and only what podman needs changed. podman plays the ConfigMap and the Deployment and ignores
# the Services, HPA, PDB and NetworkPolicy (tests/test_deploy.py validates those) and the probes,
# whose commands are run here instead.


def _overlay(directory: Path, image: str, nginx: str, port: int) -> Path:
    """A kustomize overlay on k8s/ for podman: local images, the proxy's port on 127.0.0.1:`port`,
    and restartPolicy OnFailure (podman 4.3 restarts a finished init container under Always).
    podman publishes every containerPort on the host, on all interfaces and the same port number
    unless a hostPort says otherwise: metrics (the pod IP's, for Prometheus) go to a free port on
    127.0.0.1."""
    directory.mkdir()
    name, _, tag = image.rpartition(":")
    nginx_name, _, nginx_tag = nginx.rpartition(":")
    proxy_image = next(
        c["image"] for c in _deployment()["spec"]["template"]["spec"]["containers"]
        if c["name"] == "proxy"
    ).split("@")[0].rpartition(":")[0]  # fmt: skip
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "imgtocap"},
        "spec": {"template": {"spec": {
            "restartPolicy": "OnFailure",
            "containers": [
                {"name": "proxy", "ports": [
                    {"containerPort": 5000, "hostPort": port, "hostIP": "127.0.0.1"},
                ]},
                {"name": "torchserve", "ports": [
                    {"containerPort": 8082, "hostPort": closed_port(), "hostIP": "127.0.0.1"},
                ]},
            ],
        }}},
    }  # fmt: skip
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(K8S, directory)],
        "images": [
            {"name": "imgtocap", "newName": name, "newTag": tag},
            {"name": proxy_image, "newName": nginx_name, "newTag": nginx_tag},
        ],
        "patches": [{"patch": yaml.safe_dump(patch)}],
    }
    (directory / "kustomization.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    return directory


class Played:
    """The Deployment's pod under podman, its proxy on 127.0.0.1:`port`."""

    def __init__(self, manifest: Path, port: int, pod: str):
        self.manifest, self.url, self.pod = manifest, f"http://127.0.0.1:{port}", pod
        names = deployment.podman("ps", "--all", "--filter", f"pod={pod}", "--format",
                                  "{{.Names}}").stdout.split()  # fmt: skip
        # podman names them <pod>-<container>; the pod after the Deployment (imgtocap-pod-0)
        (self.torchserve,) = [n for n in names if n.endswith("-torchserve")]
        (self.proxy,) = [n for n in names if n.endswith("-proxy")]

    def exec(self, container: str, *command: str) -> subprocess.CompletedProcess:
        return deployment.podman("exec", container, *command, check=False, timeout=60)

    def probe(self, container: dict, probe: str) -> subprocess.CompletedProcess:
        """A Deployment exec probe's command, run in its container as the kubelet would."""
        return self.exec(self.torchserve, *container[probe]["exec"]["command"])


@pytest.fixture(scope="module")
@needs("kubectl", "subprocess")
def played(tmp_path_factory):
    trained = deployment.trained_pipeline(tmp_path_factory)
    image = deployment.serving_image(trained)
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the kustomize base in k8s/")
    base = tmp_path_factory.mktemp("played")
    port = closed_port()
    overlay = _overlay(base / "overlay", image.tag, deployment.BASES["NGINX_IMAGE"], port)
    rendered = subprocess.run([kubectl, "kustomize", overlay], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    manifest = base / "pod.yaml"
    manifest.write_text(rendered)
    deployment.podman("kube", "down", str(manifest), check=False)  # a crashed run's leftover
    started = time.monotonic()
    play = deployment.podman("kube", "play", str(manifest), timeout=300)
    try:
        # "Pod:\n<id>\nContainers:\n<id>..."
        pod = Played(manifest, port, play.stdout.split("Pod:")[1].split()[0])
        container = _torchserve_container()
        deadline = time.monotonic() + 300
        while pod.probe(container, "readinessProbe").returncode != 0:
            logs = deployment.podman("logs", pod.torchserve, check=False)
            assert time.monotonic() < deadline, f"not ready in 300 s:\n{logs.stderr[-3000:]}"
            time.sleep(1)
        print(f"\npod played: READY {time.monotonic() - started:.0f} s after `podman kube play`")
        yield pod, trained
    finally:
        deployment.podman("kube", "down", str(manifest), check=False, timeout=120)
        # podman 4.3 leaves the volume it made of the ConfigMap
        for doc in yaml.safe_load_all(rendered):
            if doc and doc["kind"] == "ConfigMap":
                deployment.podman("volume", "rm", "--force", doc["metadata"]["name"], check=False)


def test_the_played_pod_serves_the_page_and_captions_through_nginx(played):
    pod, trained = played
    page = requests.get(f"{pod.url}/", timeout=30)
    assert page.status_code == 200 and 'src="app.js"' in page.text
    data, expected = trained.test_image()
    answer = requests.put(f"{pod.url}/predictions/imgtocap", data=data, timeout=120)
    assert answer.status_code == 200, answer.text
    assert answer.json()["caption"] == expected["caption"], (answer.json(), expected)
    print(f"\ncaption through the pod's nginx: {answer.json()['caption']!r}")
    assert requests.get(f"{pod.url}/ping", timeout=30).json()["status"] == "Healthy"

    # Management and metrics are out of reach through the pod's only published port.
    for path in ("/models", "/models/imgtocap", "/metrics"):
        assert requests.get(f"{pod.url}{path}", timeout=30).status_code == 404, path
    assert requests.options(f"{pod.url}/", timeout=30).status_code == 405
    # and nothing of the pod is published beyond this machine's loopback.
    published = deployment.podman("port", pod.torchserve).stdout.splitlines()
    assert published and all("-> 127.0.0.1:" in line for line in published), published


def test_the_played_pods_probes_pass_and_its_roots_are_read_only(played):
    pod, _ = played
    container = _torchserve_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = pod.probe(container, probe)
        assert p.returncode == 0, (probe, p.stdout, p.stderr)
    # The proxy's httpGet probes, on its published port.
    (proxy_container,) = [c for c in _deployment()["spec"]["template"]["spec"]["containers"]
                          if c["name"] == "proxy"]  # fmt: skip
    for probe in ("readinessProbe", "livenessProbe"):
        path = proxy_container[probe]["httpGet"]["path"]
        assert requests.get(f"{pod.url}{path}", timeout=30).status_code == 200, probe

    for name, path in ((pod.torchserve, "/home/model-server/x"), (pod.proxy, "/etc/x")):
        p = pod.exec(name, "touch", path)
        assert p.returncode != 0 and "Read-only file system" in p.stderr, (name, p.stderr)
        assert pod.exec(name, "touch", "/tmp/x").returncode == 0, f"{name}: /tmp is its emptyDir"
        assert pod.exec(name, "id", "-u").stdout.strip() == "1000", name
