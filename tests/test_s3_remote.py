"""The model through a real S3 API: moto's S3 server on loopback as the DVC remote.

The road to production's middle hop: the developer's `dvc push` of a trained (small) pipeline,
then, on a machine with no cache and no outputs, the CD job's own `dvc pull` command (read from
.github/workflows/cd.yml) must give back the archive's exact bytes. A wrong credential and a
missing bucket must each fail with a message that says which.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.deployment import trained_pipeline
from tests.helpers.project import closed_port, dvc, dvc_run

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BUCKET = "imgtocap-models"
ARCHIVE = "model-store/imgtocap.mar"


def _cd_step(name: str) -> str:
    """The `run:` script of the CD workflow's step `name`."""
    import yaml

    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "cd.yml").read_text())
    (step,) = [s for s in workflow["jobs"]["deploy"]["steps"] if s.get("name") == name]
    return step["run"]


@pytest.mark.subprocess
def test_dvc_speaks_s3_and_ci_installs_the_same_dvc():
    # Without dvc-s3, `dvc exp run` after `dvc remote add -d ... s3://...` fails ("requires
    # 'dvc-s3' to be installed") and leaves params.yaml rewritten: `make setup` installs it now.
    doctor = subprocess.run([BIN / "dvc", "doctor"], capture_output=True, text=True, timeout=120)
    assert re.search(r"^\s*s3 \(", doctor.stdout, re.MULTILINE), doctor.stdout
    pinned = re.search(r"^(dvc\[s3\]==\S+)$", (ROOT / "requirements/train.txt").read_text(), re.M)
    assert pinned and f'"{pinned[1]}"' in _cd_step("Fetch the model archive")


class S3:
    """moto's S3 server on a free loopback port, with IAM on: only the user made here gets in."""

    def __init__(self, workdir: Path):
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The first 4 requests (the user, its key, its policy, the bucket) go unchecked;
        # every later one must be signed with a key moto knows.
        env = {"INITIAL_NO_AUTH_ACTION_COUNT": "4", "PATH": f"{BIN}:/usr/bin:/bin"}
        self.log = (workdir / "moto.log").open("wb")
        self.process = subprocess.Popen(
            [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            assert self.process.poll() is None, (workdir / "moto.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto_server did not listen in 60 s"
                time.sleep(0.2)
        import boto3

        def client(service: str, **keys: str):
            return boto3.client(service, endpoint_url=self.url, region_name="us-east-1", **keys)

        dummy = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}
        iam = client("iam", **dummy)
        iam.create_user(UserName="ci")
        key = iam.create_access_key(UserName="ci")["AccessKey"]
        iam.put_user_policy(
            UserName="ci",
            PolicyName="all",
            PolicyDocument='{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", '
            '"Action": "*", "Resource": "*"}]}',
        )
        client("s3", **dummy).create_bucket(Bucket=BUCKET)
        self.credentials = {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()


@pytest.mark.slow
@pytest.mark.subprocess
def test_push_then_the_cd_jobs_pull_gives_the_same_archive(tmp_path_factory, tmp_path):
    trained = trained_pipeline(tmp_path_factory)
    repo = tmp_path / "repo"  # a copy: the session's pipeline keeps its cache and outputs
    shutil.copytree(trained.repo, repo, symlinks=True)
    archive = (repo / ARCHIVE).read_bytes()
    s3 = S3(tmp_path)
    try:
        env = {**s3.credentials, "AWS_DEFAULT_REGION": "us-east-1"}
        dvc(repo, "remote", "add", "-d", "storage", f"s3://{BUCKET}/imgtocap")
        dvc(repo, "remote", "modify", "storage", "endpointurl", s3.url)

        start = time.monotonic()
        dvc(repo, "push", **env)
        pushed = time.monotonic() - start
        sent = sum(f.stat().st_size for f in (repo / ".dvc" / "cache").rglob("*") if f.is_file())

        # A clean machine: no cache, no outputs. Then the CD job's command, as it is written.
        shutil.rmtree(repo / ".dvc" / "cache")
        for out in ("model-store", "artifacts", "data", "reports"):
            shutil.rmtree(repo / out, ignore_errors=True)
        (pull,) = [line.strip() for line in _cd_step("Fetch the model archive").splitlines()
                   if line.strip().startswith("dvc pull")]  # fmt: skip
        start = time.monotonic()
        dvc(repo, *pull.split()[1:], **env)
        pulled = time.monotonic() - start
        assert (repo / ARCHIVE).read_bytes() == archive
        assert not (repo / "artifacts").exists(), "the CD job pulls the archive only"
        print(f"\ndvc push {sent / 1e6:.1f} MB ({sent} B) in {pushed:.1f} s; dvc pull of "
              f"{len(archive) / 1e6:.1f} MB archive in {pulled:.1f} s")  # fmt: skip

        # A wrong secret: S3 refuses it (a HEAD request: 403 without a body, so no error code),
        # and DVC says which remote and that access was forbidden.
        (repo / ARCHIVE).unlink()
        shutil.rmtree(repo / ".dvc" / "cache")
        wrong = {**env, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}
        p = dvc_run(repo, *pull.split()[1:], **wrong)
        assert p.returncode != 0 and not (repo / ARCHIVE).exists()
        assert re.search(r"failed to connect to s3 .* Forbidden", p.stderr), p.stderr[-2000:]

        # A bucket that does not exist: `dvc push` (and `dvc status --cloud`) name it; the CD
        # job's pull of one file only learns that the file is on neither side (DVC asks for the
        # object, not the bucket) and fails on it.
        dvc(repo, "remote", "modify", "storage", "url", "s3://no-such-bucket/imgtocap")
        p = dvc_run(repo, "push", **env)
        assert p.returncode != 0 and "The specified bucket does not exist" in p.stderr, p.stderr
        p = dvc_run(repo, *pull.split()[1:], **env)
        assert p.returncode != 0 and not (repo / ARCHIVE).exists()
        assert "neither locally nor on remote" in p.stderr and ARCHIVE in p.stderr, p.stderr
    finally:
        s3.stop()
