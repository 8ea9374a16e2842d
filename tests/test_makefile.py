"""The documented make targets (README.md, docs/development.md): what they run finds the venv's
python, DVC (not make) decides whether the model archive is out of date, and `make setup` can
install within the lock.

`make demo` builds the archive with `dvc repro`, whose stages run `python -m training.<stage>`:
a plain `python` on PATH. From a fresh clone nobody has activated `.venv`, so the Makefile
must put it first on PATH (a fresh clone once failed at `ingest`: no tqdm in the system python).
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from serve.runner import private_config, read_config
from tests.helpers.project import copy_tracked

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = "model-store/imgtocap.mar"


@pytest.fixture
def project(tmp_path) -> Path:
    """The Makefile and what it reads, with a `make setup` already done: a .venv whose python
    is this one and whose dvc is a stand-in that logs its arguments to dvc-calls, then does
    what a stage does: run `python` from PATH (it writes its sys.executable to stage-python)."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    copy_tracked(tmp_path, "Makefile", "setup.py", "serve/serve.mk", "requirements")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    dvc = bin_dir / "dvc"
    dvc.write_text(
        '#!/bin/sh\necho "$*" >> dvc-calls\n'
        'exec python -c \'import sys; open("stage-python", "w").write(sys.executable)\'\n'
    )
    dvc.chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # `make setup` done, after the requirements
    return tmp_path


def make(project: Path, *targets: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(  # no venv on PATH, as in a fresh shell
        p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir()
    )
    p = subprocess.run(["make", *targets], cwd=project, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_the_pipeline_target_runs_stages_with_the_venvs_python(project):
    make(project, ARCHIVE)
    assert Path((project / "stage-python").read_text()).parent == project / ".venv" / "bin"


def test_dvc_decides_whether_the_archive_is_rebuilt_not_its_timestamp(project):
    # An archive newer than every file make can see: make alone would call it up to date and
    # serve it after an edit to handler/. DVC is asked every time (a no-op when nothing
    # changed; tests/test_pipeline.py checks that it repackages after a handler edit).
    handler = project / "handler" / "imgtocap_handler.py"
    handler.parent.mkdir()
    handler.write_text("# the handler\n")
    (project / ARCHIVE).parent.mkdir()
    (project / ARCHIVE).write_bytes(b"an archive built before the edit")
    make(project, ARCHIVE)
    handler.write_text("# the handler, edited\n")
    make(project, ARCHIVE)
    assert (project / "dvc-calls").read_text().splitlines() == ["repro", "repro"]


def pins(path: Path) -> dict[str, str]:
    """name -> version of the `name==version` lines of a requirements file (names normalised,
    extras dropped: `dvc[s3]` is locked as `dvc`, its extras' packages by their own names)."""
    found = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        name = name.split("[", 1)[0]
        if sep:
            found[re.sub(r"[-_.]+", "-", name).lower()] = version
    return found


def test_the_lock_holds_every_pin_of_the_requirements():
    # `make setup` installs requirements/dev.txt within the lock: a pin edited without
    # `make lock` would make it fail with a conflict.
    lock = pins(ROOT / "requirements" / "constraints.txt")
    for name in ("serve.txt", "train.txt", "dev.txt"):
        for package, version in pins(ROOT / "requirements" / name).items():
            assert lock.get(package) == version, (
                f"requirements/{name} pins {package}=={version}, requirements/constraints.txt "
                f"{lock.get(package)}: run `make lock`"
            )
    assert "imgtocap" not in lock, "the lock is for dependencies, not the project itself"


def _answers(url: str) -> bool:
    """Whether a server answers at `url` at all (a 400 for the missing token counts)."""
    try:
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _checkout(root: Path) -> Path:
    """The make targets' files with a venv whose python and torchserve are this one's (a dvc
    that does nothing: the archive is not needed to start and stop a server)."""
    copy_tracked(root, "Makefile", "setup.py", "serve", "requirements")
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    scripts = {
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',  # this venv's, with its packages
        "torchserve": f'#!/bin/sh\nexec "{Path(sys.executable).parent / "torchserve"}" "$@"\n',
        "dvc": "#!/bin/sh\nexit 0\n",
    }
    for tool, script in scripts.items():
        (bin_dir / tool).write_text(script)
        (bin_dir / tool).chmod(0o755)
    (root / ".venv" / ".installed").touch()
    return root


@pytest.mark.java
@pytest.mark.slow
def test_make_stop_stops_its_own_checkout_s_server_and_no_other(tmp_path):
    """`make serve` in one checkout, `make stop` in another: the first server keeps running
    (they used to share TorchServe's $TMPDIR/.model_server.pid); its own `make stop` stops it."""
    if shutil.which("make") is None or shutil.which("java") is None:
        pytest.skip("needs make and java")
    first, second = _checkout(tmp_path / "first"), _checkout(tmp_path / "second")
    (first / "model-store").mkdir()
    config = private_config(tmp_path / "ts.properties", first / "model-store", load_models="")
    management = f"{read_config(config)['management_address']}/models"
    shared_tmp = tmp_path / "tmp"  # the TMPDIR of the user's shell, the same in both checkouts
    shared_tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(shared_tmp), "TS_CONFIG_FILE": str(config)}
    env.pop("VIRTUAL_ENV", None)
    server = subprocess.Popen(
        ["make", "serve"], cwd=first, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not _answers(management):
            assert server.poll() is None and time.monotonic() < deadline, "no TorchServe started"
            time.sleep(0.5)
        other = subprocess.run(
            ["make", "stop"], cwd=second, env=env, capture_output=True, text=True, timeout=120
        )
        assert other.returncode == 0, other.stdout + other.stderr
        time.sleep(2)
        assert _answers(management) and server.poll() is None, "the other checkout stopped it"
        stopped = subprocess.run(
            ["make", "stop"], cwd=first, env=env, capture_output=True, text=True, timeout=120
        )
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert server.wait(timeout=60) is not None and not _answers(management)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
