"""Deployment checks that run offline.

The validators (hadolint, kustomize + kubernetes-validate, check-jsonschema, actionlint, zizmor)
must report nothing. Then what the pieces must mean together: the Dockerfile serves what a clone
plus `dvc repro` provides, with the command serve/config.properties expects; the cluster config
differs from it only where a cluster needs it; the manifests expose inference alone, fence
management, and probe the right things; and TorchServe really runs on the cluster config.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml
from dockerfile import Dockerfile

from serve.runner import TorchServe, private_config

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
MODEL = "imgtocap"
# The EKS version README.md (Deployment) creates, and the newest schemas kubernetes-validate bundles,
# so that a cluster upgrade finds no removed API.
K8S_VERSIONS = ("1.35.0", "1.37.0")
# Keys where k8s/torchserve.properties may differ from serve/config.properties, and why:
# bind addresses (the ClusterIP Service must reach the pod), token auth (the public curl; the
# read-only working directory), the absolute model store, worker count, JVM arguments.
K8S_OVERRIDES = {
    "management_address",
    "metrics_address",
    "disable_token_authorization",
    "model_store",
    "default_workers_per_model",
    "vmargs",
}


def _run(*args: str | Path, cwd: Path = ROOT, stdin: str | None = None):
    # The venv's bin first: actionlint finds shellcheck/pyflakes there when they are installed.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _report(p: subprocess.CompletedProcess) -> str:
    return f"{' '.join(p.args)} exited {p.returncode}\n{p.stdout}\n{p.stderr}"


def _tool(name: str) -> Path:
    path = BIN / name
    assert path.exists(), f"{name} is not in {BIN}: `make setup` installs requirements/dev.txt"
    return path


def _properties(path: Path) -> dict[str, str]:
    """The subset of java.util.Properties that TorchServe configs use: key=value lines."""
    props = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        assert sep and not line.endswith("\\"), f"{path}:{n}: not a key=value line: {line}"
        assert key.strip() not in props, f"{path}:{n}: {key.strip()} set twice"
        props[key.strip()] = value.strip().replace("\\\\", "\\")
    return props


def _port(address: str) -> int:
    return urlsplit(address).port


def _host(address: str) -> str:
    return urlsplit(address).hostname


@pytest.fixture(scope="module")
def serve_config() -> dict[str, str]:
    return _properties(ROOT / "serve" / "config.properties")


@pytest.fixture(scope="module")
def k8s_config() -> dict[str, str]:
    return _properties(K8S / "torchserve.properties")


# --- Dockerfile ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return Dockerfile(ROOT / "Dockerfile")


def _dvc_outs() -> set[str]:
    path = ROOT / "dvc.yaml"
    outs = set()
    for stage in yaml.safe_load(path.read_text())["stages"].values():
        for out in stage.get("do", stage).get("outs", []):
            outs.add((next(iter(out)) if isinstance(out, dict) else out).rstrip("/"))
    return outs


def _git_ignored(path: str) -> bool:
    p = _run("git", "check-ignore", "--quiet", path)
    if p.returncode == 128 and "not a git repository" in p.stderr:
        return False  # an unpacked tarball: existence is all there is to check
    assert p.returncode in (0, 1), _report(p)
    return p.returncode == 0


_GLOB = {"**": ".*", "*": "[^/]*", "?": "[^/]"}


def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents wins."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.removeprefix("!").strip("/")
        rx = "".join(_GLOB.get(tok) or re.escape(tok) for tok in re.split(r"(\*\*|\*|\?)", glob))
        if any(re.fullmatch(rx, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_hadolint_finds_nothing():
    p = _run(_tool("hadolint"), "--no-color", "Dockerfile")
    assert p.returncode == 0 and not p.stdout.strip(), _report(p)


def test_dockerfile_copies_only_what_a_clone_and_the_pipeline_provide(dockerfile):
    outs = _dvc_outs()
    for source in dockerfile.sources:
        if any(source == out or source.startswith(out + "/") for out in outs):
            continue
        assert (ROOT / source).exists() and not _git_ignored(source), (
            f"COPY {source}: neither in a fresh clone nor a dvc.yaml output ({sorted(outs)})"
        )


def test_dockerignore_admits_the_copies_and_keeps_the_rest_out(dockerfile):
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for source in dockerfile.sources:
        assert not _dockerignore_excludes(source, patterns), f".dockerignore excludes {source}"
    heavy = [".git/HEAD", ".venv/bin/python", "data/raw/Images/1.jpg", "artifacts/model/model.pth"]
    heavy += ["mlflow.db", ".dvc/cache/files/md5/00/1", "model-store/old.mar", "logs/ts_log.log"]
    for path in heavy:
        assert _dockerignore_excludes(path, patterns), f".dockerignore lets {path} into the context"


def test_container_command_matches_serve_config(dockerfile, serve_config):
    command = dockerfile.entrypoint + dockerfile.cmd
    # PID 1 must forward SIGTERM: the torchserve launcher installs no handler for it.
    assert command[:2] == ["dumb-init", "--"], command
    args = command[command.index("torchserve") + 1 :]
    assert "--foreground" in args, (
        "the server must stay in the foreground as the container's main process"
    )
    assert "--ncs" in args, "snapshots (no property turns them off) would restore stale state"
    assert args[args.index("--ts-config") + 1] == dockerfile.destination("serve/config.properties")

    store = str(PurePosixPath(dockerfile.workdir, serve_config["model_store"]))
    name, _, archive = serve_config["load_models"].partition("=")
    assert (name, archive) == (MODEL, f"{MODEL}.mar"), serve_config["load_models"]
    assert dockerfile.destination("model-store/imgtocap.mar") == f"{store}/{archive}"
    for flag, expected in (("--model-store", store), ("--models", serve_config["load_models"])):
        if flag in args:
            assert args[args.index(flag) + 1] == expected, f"{flag} disagrees with the config"

    inference = serve_config["inference_address"]
    assert _host(inference) == "0.0.0.0", "inference must be reachable through `docker run -p`"
    assert dockerfile.expose == {_port(inference)}, dockerfile.expose
    url = re.search(r"http://127\.0\.0\.1:(\d+)/(\w+)", dockerfile.healthcheck)
    assert url, dockerfile.healthcheck
    assert (int(url[1]), url[2]) == (_port(serve_config["metrics_address"]), "metrics")


# --- TorchServe configs -------------------------------------------------------------------------


def test_serve_config_is_locked_down(serve_config):
    for key in ("management_address", "metrics_address"):
        assert _host(serve_config[key]) == "127.0.0.1", f"{key} must stay on loopback"
    for api in ("inference", "management"):
        assert serve_config[f"grpc_{api}_address"] == "127.0.0.1"
        assert int(serve_config[f"grpc_{api}_port"]) > 0
    assert serve_config["disable_token_authorization"] == "false"
    assert serve_config["enable_model_api"] == "false"
    assert serve_config["enable_envvars_config"] == "false"
    assert serve_config["install_py_dep_per_model"] == "false"
    assert serve_config["metrics_mode"] == "prometheus"
    assert 1 << 20 <= int(serve_config["max_request_size"]) <= 10 << 20
    assert 0 < int(serve_config["max_response_size"]) <= int(serve_config["max_request_size"])

    # TorchServe matches these (case-insensitively, whole string) against model URLs; a bare
    # archive name that matched would be "downloaded" instead of read from the model store.
    allowed = serve_config["allowed_urls"].split(",")

    def permits(url: str) -> bool:
        return any(re.fullmatch(rx, url, re.IGNORECASE) for rx in allowed)

    assert permits("file:///home/model-server/model-store/imgtocap.mar")
    for url in ("http://example.com/m.mar", "HTTPS://example.com/m.mar", "imgtocap.mar"):
        assert not permits(url), f"allowed_urls admits {url}"
    assert not permits("file:///etc/passwd")


def test_cluster_config_is_serve_config_with_declared_overrides(
    serve_config, k8s_config, dockerfile
):
    for key in (serve_config.keys() | k8s_config.keys()) - K8S_OVERRIDES:
        assert serve_config.get(key) == k8s_config.get(key), f"k8s/torchserve.properties: {key}"
    for key in ("inference_address", "management_address", "metrics_address"):
        assert _port(serve_config[key]) == _port(k8s_config[key]), key
    image_store = str(PurePosixPath(dockerfile.workdir, serve_config["model_store"]))
    assert k8s_config["model_store"] == image_store
    assert k8s_config["disable_token_authorization"] == "true"


# --- Kubernetes manifests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the kustomize base in k8s/")
    p = _run(kubectl, "kustomize", K8S)
    assert p.returncode == 0, _report(p)
    return p.stdout


@pytest.fixture(scope="module")
def objects(rendered) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(rendered) if d}


@pytest.fixture(scope="module")
def pod(objects) -> dict:
    return objects[("Deployment", MODEL)]["spec"]["template"]


@pytest.fixture(scope="module")
def container(pod) -> dict:
    (container,) = pod["spec"]["containers"]
    return container


def _config_mount(pod: dict, container: dict) -> str:
    """Where the generated ConfigMap (cluster config, log config, probe) is mounted."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    return mount["mountPath"]


def _target_ports(service: dict, container: dict) -> list[tuple[int, int]]:
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    return [
        (p["port"], named.get(p["targetPort"], p["targetPort"])) for p in service["spec"]["ports"]
    ]


def _selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"check by hand: {selector}"
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_pass_kubernetes_validate_strict(rendered, objects, version):
    p = _run(_tool("kubernetes-validate"), "--strict", "-k", version, "-", stdin=rendered)
    # An unknown kind or apiVersion is only a WARN with exit 0: every object must have passed.
    passed = (p.stdout + p.stderr).count(" passed for resource ")
    assert p.returncode == 0 and passed == len(objects), _report(p)


def test_load_balancer_exposes_inference_only(objects, container, pod, k8s_config):
    public = [
        s
        for (kind, _), s in objects.items()
        if kind == "Service" and s["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    assert len(public) == 1, [s["metadata"]["name"] for s in public]
    assert _target_ports(public[0], container) == [(5000, _port(k8s_config["inference_address"]))]
    assert _selects({"matchLabels": public[0]["spec"]["selector"]}, pod["metadata"]["labels"])


def test_management_and_metrics_stay_inside_the_cluster(objects, container, pod, k8s_config):
    internal = {_port(k8s_config[k]) for k in ("management_address", "metrics_address")}
    reached = set()
    for (kind, name), obj in objects.items():
        assert kind not in ("Ingress", "Gateway", "HTTPRoute"), f"{kind} {name}"
        if kind != "Service":
            continue
        targets = {target for _, target in _target_ports(obj, container)}
        exposed = obj["spec"].get("type") in ("LoadBalancer", "NodePort") or obj["spec"].get(
            "externalIPs"
        )
        assert not (exposed and targets & internal), (
            f"Service {name} publishes {targets & internal}"
        )
        if targets & internal:
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", name
            reached |= targets & internal
    assert reached == internal, "management and metrics need their ClusterIP Service"
    assert not pod["spec"].get("hostNetwork")
    assert not any("hostPort" in p for p in container["ports"])


def test_network_policy_fences_management(objects, pod, k8s_config):
    (policy,) = [o for (kind, _), o in objects.items() if kind == "NetworkPolicy"]
    assert _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    assert "Ingress" in policy["spec"]["policyTypes"]
    inference, management, metrics = (
        _port(k8s_config[k]) for k in ("inference_address", "management_address", "metrics_address")
    )
    admitted = set()
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])} or None  # None: every port
        if not rule.get("from"):
            assert ports is not None and ports <= {inference}, f"open to everyone: {rule}"
            admitted |= ports
            continue
        if ports is None or ports & {management, metrics}:
            for peer in rule["from"]:
                assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), (
                    f"management/metrics must be limited to labelled pods: {rule}"
                )
        admitted |= ports or {management, metrics}
    assert {inference, management} <= admitted, "the rules shut out inference or every client"


def test_probes_ask_the_right_questions(objects, pod, container, k8s_config):
    mount = _config_mount(pod, container)
    url = f"http://127.0.0.1:{_port(k8s_config['management_address'])}/models/{MODEL}"
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["python", f"{mount}/probe.py", url], probe
    liveness = container["livenessProbe"]["httpGet"]
    assert (liveness["path"], liveness["port"]) == ("/ping", _port(k8s_config["inference_address"]))

    (config_map,) = [o for (kind, _), o in objects.items() if kind == "ConfigMap"]
    assert set(config_map["data"]) == {"torchserve.properties", "log4j2.xml", "probe.py"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TS_CONFIG_FILE"] == f"{mount}/torchserve.properties"
    assert f"-Dlog4j.configurationFile=file://{mount}/log4j2.xml" in k8s_config["vmargs"].split()
    assert {p["containerPort"] for p in container["ports"]} == {
        _port(k8s_config[k]) for k in ("inference_address", "management_address", "metrics_address")
    }

    drain = container["lifecycle"]["preStop"]["exec"]["command"]
    assert drain[0] == "sleep" and int(drain[1]) < pod["spec"]["terminationGracePeriodSeconds"]


def test_pod_runs_unprivileged_on_a_read_only_root(pod, container, dockerfile, k8s_config):
    spec, security = pod["spec"], container["securityContext"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    uid = spec["securityContext"]["runAsUser"]
    assert uid != 0 and str(uid) == dockerfile.user.split(":")[0], (uid, dockerfile.user)
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert spec["automountServiceAccountToken"] is False

    # Every directory TorchServe writes to must be on a writable volume; its working directory
    # is not, which is why token auth (key_file.json in the cwd) is off in the cluster config.
    volumes = {v["name"]: v for v in spec["volumes"]}
    writable = [
        m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    for var in ("TMPDIR", "TEMP", "HOME", "LOG_LOCATION", "METRICS_LOCATION"):
        assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), var
    assert k8s_config["disable_token_authorization"] == "true"
    for resource in ("cpu", "memory"):
        assert container["resources"]["requests"][resource], resource
        assert container["resources"]["limits"][resource], resource


def test_image_is_a_placeholder_the_deploy_job_pins(container, tmp_path):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]
    name, _, tag = container["image"].rpartition(":")
    assert name == image["name"] and tag and tag != "latest", container["image"]

    # What cd.yml's Deploy step does: an overlay naming the ECR repository and the commit sha.
    repository, sha = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/imgtocap", "0123abc"
    overlay = {
        "resources": [os.path.relpath(K8S, tmp_path)],
        "images": [{"name": image["name"], "newName": repository, "newTag": sha}],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the kustomize base in k8s/")
    p = _run(kubectl, "kustomize", tmp_path)
    assert p.returncode == 0, _report(p)
    deployment = next(d for d in yaml.safe_load_all(p.stdout) if d["kind"] == "Deployment")
    (deployed,) = deployment["spec"]["template"]["spec"]["containers"]
    assert deployed["image"] == f"{repository}:{sha}"
    cd = (ROOT / ".github" / "workflows" / "cd.yml").read_text()
    assert f"- name: {image['name']}" in cd and "newTag: $GITHUB_SHA" in cd


def test_autoscaling_and_disruption_budget_cover_the_deployment(objects, pod):
    deployment = objects[("Deployment", MODEL)]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (hpa,) = [o for (kind, _), o in objects.items() if kind == "HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": MODEL,
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (pdb,) = [o for (kind, _), o in objects.items() if kind == "PodDisruptionBudget"]
    assert _selects(pdb["spec"]["selector"], pod["metadata"]["labels"])
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"], "a drain could never proceed"


# --- Workflows ----------------------------------------------------------------------------------


def test_workflows_match_the_github_schema():
    p = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *WORKFLOWS)
    assert p.returncode == 0, _report(p)


def test_actionlint_finds_nothing():
    p = _run(_tool("actionlint"), "-no-color", *WORKFLOWS)
    assert p.returncode == 0 and not p.stdout.strip(), _report(p)


def test_zizmor_finds_nothing():
    p = _run(_tool("zizmor"), "--offline", "--no-progress", "--persona=pedantic", ".")
    assert p.returncode == 0, _report(p)


def test_every_action_is_pinned_to_a_commit():
    for path in WORKFLOWS:
        for ref in re.findall(r"uses:\s*(\S+)", path.read_text()):
            if ref.startswith(("$/", "./")):
                continue
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{path.name}: {ref}"


# --- TorchServe on the cluster config -----------------------------------------------------------


def _probe(url: str) -> subprocess.CompletedProcess:
    return _run(sys.executable, K8S / "probe.py", url)


@pytest.mark.slow
def test_cluster_config_serves_and_the_probe_tracks_the_worker(tmp_path, dockerfile, k8s_config):
    if shutil.which("java") is None:
        pytest.skip("java is not installed: TorchServe's frontend needs Java 17")
    store, tmp, cwd = tmp_path / "store", tmp_path / "tmp", tmp_path / "cwd"
    for d in (store, tmp, cwd):
        d.mkdir()
    (tmp_path / "handler.py").write_text(
        "def handle(data, context):\n"
        "    return None if data is None else [{'caption': 'a red circle'} for _ in data]\n"
    )
    p = _run(
        _tool("torch-model-archiver"),
        *("--model-name", MODEL, "--version", "1.0", "--handler", "handler.py"),
        *("--export-path", store),
        cwd=tmp_path,
    )
    assert p.returncode == 0, _report(p)

    # The cluster config as the pod gets it, on free loopback ports and this test's paths.
    vmargs = k8s_config["vmargs"].replace("file:///etc/imgtocap/", f"file://{K8S}/")
    assert vmargs != k8s_config["vmargs"], "the log config is no longer under /etc/imgtocap"
    config = private_config(
        tmp_path / "cluster.properties", store, source=K8S / "torchserve.properties", vmargs=vmargs
    )
    env = {"TMPDIR": tmp, "TEMP": tmp, "HOME": tmp, "LOG_LOCATION": tmp / "logs"}
    env["METRICS_LOCATION"] = tmp / "logs"
    log = tmp_path / "server.log"
    server = TorchServe(config, cwd=cwd, env={k: str(v) for k, v in env.items()}, console=log)
    assert not server.token_auth
    describe = f"{server.management}/models/{MODEL}"

    # The image's own command. TS_CONFIG_FILE (the Deployment sets it; so does TorchServe here,
    # to the same file) overrides its --ts-config.
    command = dockerfile.cmd
    with server.start(command=[str(BIN / command[0]), *command[1:]]):  # until a worker is READY
        probe = _probe(describe)
        assert probe.returncode == 0, _report(probe)

        # No token: the public LoadBalancer's plain `curl -T` must work.
        request = urllib.request.Request(
            f"{server.inference}/predictions/{MODEL}",
            data=b"not really an image",
            method="PUT",
            headers={"Content-Type": "application/octet-stream"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.load(response) == {"caption": "a red circle"}
        register = urllib.request.Request(f"{server.management}/models?url=x.mar", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(register, timeout=10)
        assert refused.value.code == 405, "the model registration API must stay off"

        scale = urllib.request.Request(
            f"{describe}?min_worker=0&max_worker=0&synchronous=true", method="PUT"
        )
        urllib.request.urlopen(scale, timeout=60).close()
        probe = _probe(describe)
        assert probe.returncode == 1 and "no READY worker" in probe.stdout, _report(probe)

        # The pod's working directory is read-only: everything goes to the TMPDIR/TEMP volume.
        assert list(cwd.iterdir()) == [], list(cwd.iterdir())
        assert (tmp / ".model_server.pid").exists() and (tmp / "models").is_dir()

    assert list(cwd.iterdir()) == [], list(cwd.iterdir())
    assert not (tmp / "logs").exists() or not any((tmp / "logs").iterdir()), "logs go to stdout"
    assert f"PUT /predictions/{MODEL}" in log.read_text(), "k8s/log4j2.xml lost the access log"
