"""Deployment checks that run offline.

The validators (hadolint, kustomize + kubernetes-validate, check-jsonschema, actionlint, zizmor)
must report nothing. Then what the pieces must mean together: the Dockerfile serves what a clone
plus `dvc repro` provides, with the command serve/config.properties expects; the cluster config
differs from it only where a cluster needs it; the manifests expose the proxy alone (the page and
the inference API), keep management inside the pod, and probe the right things. tests/test_pod.py
runs TorchServe and the proxy on the cluster configs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

from tests.helpers.dockerfile import Dockerfile
from tests.helpers.marks import needs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S = ROOT / "k8s"
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
MODEL = "imgtocap"
# The EKS version docs/deployment.md creates, and the newest schemas kubernetes-validate bundles,
# so that a cluster upgrade finds no removed API.
K8S_VERSIONS = ("1.35.0", "1.37.0")
# Keys where k8s/torchserve.properties may differ from serve/config.properties, and why:
# bind addresses (inference on the pod's loopback behind the proxy; metrics on the pod IP for
# Prometheus), token auth and its keys' lifetime (the public curl; the read-only working
# directory), the absolute model store, worker count, JVM arguments. Management binds to
# loopback in both.
K8S_OVERRIDES = {
    "inference_address",
    "metrics_address",
    "disable_token_authorization",
    "token_expiration_min",
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
    # the HEALTHCHECK captions: the probe the image carries, on the inference port
    url = re.search(r"http://127\.0\.0\.1:(\d+)/predictions/(\w+)", dockerfile.healthcheck)
    assert url, dockerfile.healthcheck
    assert (int(url[1]), url[2]) == (_port(inference), MODEL)
    assert dockerfile.destination("k8s/probe.py") in dockerfile.healthcheck


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
    # Token auth can be off only because nothing that would need a key is reachable from outside
    # the pod: inference sits behind the proxy, management is never published.
    assert k8s_config["disable_token_authorization"] == "true"
    for key in ("inference_address", "management_address"):
        assert _host(k8s_config[key]) == "127.0.0.1", f"k8s/torchserve.properties: {key}"


# --- Kubernetes manifests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
@needs("kubectl")
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


def _named(containers: list[dict], name: str) -> dict:
    (container,) = [c for c in containers if c["name"] == name]
    return container


@pytest.fixture(scope="module")
def container(pod) -> dict:
    """TorchServe's container."""
    assert {c["name"] for c in pod["spec"]["containers"]} == {"torchserve", "proxy"}
    return _named(pod["spec"]["containers"], "torchserve")


@pytest.fixture(scope="module")
def proxy(pod) -> dict:
    """nginx's container: the page and the inference API (k8s/nginx.conf)."""
    return _named(pod["spec"]["containers"], "proxy")


def _every_container(pod: dict) -> list[dict]:
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def _config_mount(pod: dict, container: dict) -> str:
    """Where the generated ConfigMap (cluster config, log config, probe) is mounted."""
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "configMap" in volumes[m["name"]]]
    return mount["mountPath"]


def _target_ports(service: dict, pod: dict) -> list[tuple[int, int]]:
    named = {
        p["name"]: p["containerPort"] for c in _every_container(pod) for p in c.get("ports", [])
    }
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


def test_load_balancer_exposes_the_proxy_only(objects, proxy, pod, k8s_config):
    public = [
        s
        for (kind, _), s in objects.items()
        if kind == "Service" and s["spec"].get("type") in ("LoadBalancer", "NodePort")
    ]
    assert len(public) == 1, [s["metadata"]["name"] for s in public]
    (port,) = proxy["ports"]
    assert _target_ports(public[0], pod) == [(5000, port["containerPort"])]
    assert _selects({"matchLabels": public[0]["spec"]["selector"]}, pod["metadata"]["labels"])
    # The proxy's config (tests/test_proxy.py: the template rendered for the pod) listens there
    # and forwards to TorchServe's inference address, which listens on the pod's loopback.
    nginx = (K8S / "nginx.conf").read_text()
    assert re.search(rf"^\s*listen {port['containerPort']};", nginx, re.MULTILINE)
    assert f"server {urlsplit(k8s_config['inference_address']).netloc};" in nginx
    assert proxy["command"][:1] == ["nginx"] and "daemon off;" in nginx
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", proxy["image"]), proxy["image"]


def test_management_never_leaves_the_pod(objects, pod, k8s_config):
    # Bound to the pod's loopback: no Service, NetworkPolicy or CNI decides who reaches it.
    assert _host(k8s_config["management_address"]) == "127.0.0.1"
    private = {_port(k8s_config[k]) for k in ("inference_address", "management_address")}
    metrics = _port(k8s_config["metrics_address"])
    reached = set()
    for (kind, name), obj in objects.items():
        assert kind not in ("Ingress", "Gateway", "HTTPRoute"), f"{kind} {name}"
        if kind != "Service":
            continue
        targets = {target for _, target in _target_ports(obj, pod)}
        assert not targets & private, f"Service {name} targets loopback-only ports"
        exposed = obj["spec"].get("type") in ("LoadBalancer", "NodePort") or obj["spec"].get(
            "externalIPs"
        )
        assert not (exposed and metrics in targets), f"Service {name} publishes metrics"
        if metrics in targets:
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", name
            reached.add(metrics)
    assert reached == {metrics}, "metrics need their ClusterIP Service"
    assert not pod["spec"].get("hostNetwork")
    assert not any("hostPort" in p for c in _every_container(pod) for p in c.get("ports", []))


def test_network_policy_admits_the_proxy_and_scrapers_only(objects, pod, proxy, k8s_config):
    (policy,) = [o for (kind, _), o in objects.items() if kind == "NetworkPolicy"]
    assert _selects(policy["spec"]["podSelector"], pod["metadata"]["labels"])
    assert "Ingress" in policy["spec"]["policyTypes"]
    (public,) = [p["containerPort"] for p in proxy["ports"]]
    metrics = _port(k8s_config["metrics_address"])
    admitted = set()
    for rule in policy["spec"].get("ingress", []):
        ports = {p["port"] for p in rule.get("ports", [])} or None  # None: every port
        assert ports is not None, f"a rule for every port: {rule}"
        if not rule.get("from"):
            assert ports <= {public}, f"open to everyone: {rule}"
        else:
            for peer in rule["from"]:
                assert "ipBlock" not in peer and peer.get("podSelector", {}).get("matchLabels"), (
                    f"metrics must be limited to labelled pods: {rule}"
                )
        admitted |= ports
    assert admitted == {public, metrics}, admitted


def test_probes_ask_the_right_questions(objects, pod, container, proxy, k8s_config):
    mount = _config_mount(pod, container)
    url = f"http://127.0.0.1:{_port(k8s_config['management_address'])}/models/{MODEL}"
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["python", f"{mount}/probe.py", url], probe
    # TorchServe listens on loopback: an httpGet from the kubelet could not reach /ping.
    ping = f"http://127.0.0.1:{_port(k8s_config['inference_address'])}/ping"
    assert container["livenessProbe"]["exec"]["command"] == ["python", f"{mount}/probe.py", ping]
    # The proxy: ready once it reaches TorchServe; alive while it serves the page itself.
    assert (
        proxy["readinessProbe"]["httpGet"]["path"],
        proxy["livenessProbe"]["httpGet"]["path"],
    ) == (
        "/ping",
        "/",
    )
    for probe in ("readinessProbe", "livenessProbe"):
        assert proxy[probe]["httpGet"]["port"] == proxy["ports"][0]["name"], probe

    (config_map,) = [o for (kind, _), o in objects.items() if kind == "ConfigMap"]
    assert set(config_map["data"]) == {
        "torchserve.properties",
        "log4j2.xml",
        "probe.py",
        "nginx.conf",
    }
    assert config_map["data"]["nginx.conf"] == (K8S / "nginx.conf").read_text()
    assert f"{_config_mount(pod, proxy)}/nginx.conf" in proxy["command"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TS_CONFIG_FILE"] == f"{mount}/torchserve.properties"
    assert f"-Dlog4j.configurationFile=file://{mount}/log4j2.xml" in k8s_config["vmargs"].split()
    # Ports declared for what listens beyond the pod's loopback, and only that.
    assert {p["containerPort"] for p in container["ports"]} == {
        _port(k8s_config[k])
        for k in ("inference_address", "management_address", "metrics_address")
        if _host(k8s_config[k]) != "127.0.0.1"
    }

    for c in (container, proxy):  # both keep serving while load balancers catch up
        drain = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert 0 < drain < pod["spec"]["terminationGracePeriodSeconds"], c["name"]
    assert pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "torchserve"


def test_the_pod_serves_the_page_the_image_carries(pod, proxy, dockerfile):
    # serve/web/ is the one copy of the page: `make demo` serves it from the checkout, the image
    # carries it, the init container copies it to the volume the proxy's nginx serves.
    (page,) = pod["spec"]["initContainers"]
    image_copy = dockerfile.destination("serve/web")
    volumes = {m["name"]: m["mountPath"] for m in page["volumeMounts"]}
    (volume,) = volumes
    assert page["image"] == _named(pod["spec"]["containers"], "torchserve")["image"]
    assert page["command"] == ["cp", "-R", f"{image_copy}/.", f"{volumes[volume]}/"]
    served = [m for m in proxy["volumeMounts"] if m["name"] == volume]
    assert [(m["mountPath"], m.get("readOnly")) for m in served] == [("/srv/web", True)]
    assert re.search(r"^\s*root /srv/web;", (K8S / "nginx.conf").read_text(), re.MULTILINE)


def test_pod_runs_unprivileged_on_a_read_only_root(pod, container, proxy, dockerfile, k8s_config):
    spec = pod["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    uid = spec["securityContext"]["runAsUser"]
    assert uid != 0 and str(uid) == dockerfile.user.split(":")[0], (uid, dockerfile.user)
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for c in _every_container(pod):
        security = c["securityContext"]
        assert "runAsUser" not in security and "runAsNonRoot" not in security, c["name"]
        assert security["readOnlyRootFilesystem"] is True, c["name"]
        assert security["allowPrivilegeEscalation"] is False, c["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, c["name"]
        # Requests equal limits in every container: the pod's QoS class is Guaranteed.
        for resource in ("cpu", "memory"):
            assert c["resources"]["requests"][resource] == c["resources"]["limits"][resource]

    # Every directory TorchServe writes to must be on a writable volume; its working directory
    # is not, which is why token auth (key_file.json in the cwd) is off in the cluster config.
    writable = [
        m["mountPath"] for m in container["volumeMounts"] if "emptyDir" in volumes[m["name"]]
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    for var in ("TMPDIR", "TEMP", "HOME", "LOG_LOCATION", "METRICS_LOCATION"):
        assert any(env[var] == w or env[var].startswith(w + "/") for w in writable), var
    assert k8s_config["disable_token_authorization"] == "true"
    # nginx writes its pid and request bodies under run_dir (k8s/nginx.conf), on an emptyDir.
    nginx = (K8S / "nginx.conf").read_text()
    run_dir = re.search(r"^pid (\S+)/nginx\.pid;", nginx, re.MULTILINE)[1]
    assert [m["mountPath"] for m in proxy["volumeMounts"] if "emptyDir" in volumes[m["name"]]
            and not m.get("readOnly")] == [run_dir]  # fmt: skip
    for path in re.findall(r"^\s*\w+_temp_path (\S+);", nginx, re.MULTILINE):
        assert path.startswith(run_dir + "/"), path


@pytest.mark.kubectl
def test_image_is_a_placeholder_the_deploy_job_pins(container, tmp_path):
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    (image,) = kustomization["images"]  # the proxy's image is pinned by digest instead
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
    spec = deployment["spec"]["template"]["spec"]
    ours = [c for c in spec["initContainers"] + spec["containers"] if c["name"] != "proxy"]
    assert [c["name"] for c in ours] == ["page", "torchserve"]
    assert {c["image"] for c in ours} == {f"{repository}:{sha}"}
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
