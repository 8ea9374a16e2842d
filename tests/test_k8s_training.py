"""The training manifests (k8s/training/): rendered by kustomize, valid against the Kubernetes
schemas offline, and consistent with what torchrun and the train stage need: one pod per node
of an indexed Job, NODE_RANK its index, node 0's rendezvous reachable through a headless
Service at the endpoint docs/training.md tells params.yaml, a GPU per process. Kept out of the
serving base (k8s/), which CD applies."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers.marks import needs
from training.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
K8S_VERSIONS = ("1.35.0", "1.37.0")  # as tests/test_deploy.py: EKS's and the newest schemas
INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def _kustomize(folder: Path) -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: it renders the kustomize bases in k8s/")
    p = subprocess.run([kubectl, "kustomize", folder], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
@needs("kubectl")
def rendered() -> str:
    return _kustomize(ROOT / "k8s/training")


@pytest.fixture(scope="module")
def objects(rendered) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(rendered) if d}


@pytest.fixture(scope="module")
def readme_params() -> TrainConfig:
    """The `train:` params the docs' EKS section (docs/training.md) gives params.yaml."""
    page = (ROOT / "docs/training.md").read_text()
    section = page[page.index("### On EKS") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return TrainConfig.from_dict(yaml.safe_load(block)["train"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_training_manifests_pass_kubernetes_validate_strict(rendered, objects, version):
    p = subprocess.run(
        [BIN / "kubernetes-validate", "--strict", "-k", version, "-"],
        input=rendered,
        capture_output=True,
        text=True,
        timeout=120,
    )
    passed = (p.stdout + p.stderr).count(" passed for resource ")
    assert p.returncode == 0 and passed == len(objects) == 3, p.stdout + p.stderr


def test_one_pod_per_node_meets_at_node_zero(objects, readme_params):
    job, service = objects["Job"], objects["Service"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == readme_params.nnodes > 1
    # torchrun stops every rank when one fails: the Job fails as a whole and is resubmitted
    assert spec["backoffLimit"] == 0 and pod["restartPolicy"] == "Never"
    (node_rank,) = [e for e in container["env"] if e["name"] == "NODE_RANK"]
    assert node_rank["valueFrom"]["fieldRef"]["fieldPath"] == INDEX

    # node 0's DNS name under the headless Service, and its rendezvous port
    assert (
        service["spec"]["clusterIP"] == "None" and pod["subdomain"] == service["metadata"]["name"]
    )
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    host, port = readme_params.rdzv_endpoint.rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    (rendezvous,) = container["ports"]
    assert int(port) == rendezvous["containerPort"] == service["spec"]["ports"][0]["port"]
    assert service["spec"]["ports"][0]["targetPort"] == rendezvous["name"]


def test_node_zero_runs_dvc_and_every_node_a_gpu_per_process(objects, readme_params):
    pod = objects["Job"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = container["args"][0]
    assert 'if [ "$NODE_RANK" = 0 ]; then exec dvc repro train; fi' in script
    assert script.strip().endswith("exec python -m training.stages.train")
    assert container["workingDir"] == "/workspace"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claim = volumes["workspace"]["persistentVolumeClaim"]["claimName"]
    assert objects["PersistentVolumeClaim"]["metadata"]["name"] == claim
    assert objects["PersistentVolumeClaim"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert mounts["workspace"] == "/workspace"
    gpus = container["resources"]["limits"]["nvidia.com/gpu"]
    assert gpus == readme_params.nproc_per_node
    assert mounts["shm"] == "/dev/shm" and volumes["shm"]["emptyDir"]["medium"] == "Memory"


def test_training_pods_run_unprivileged_on_a_read_only_root(objects):
    pod = objects["Job"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    context = container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    writable = {m["mountPath"] for m in container["volumeMounts"]}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HOME"].startswith("/tmp/") and "/tmp" in writable  # caches land somewhere


@pytest.mark.kubectl
def test_the_serving_base_leaves_training_out():
    serving = [d for d in yaml.safe_load_all(_kustomize(ROOT / "k8s")) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in serving}
    assert ("Job", "imgtocap-train") not in kinds and not any("train" in n for _, n in kinds)
