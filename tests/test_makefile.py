"""The documented make targets (README.md, docs/development.md): what they run finds the venv's
python, DVC (not make) decides whether the model archive is out of date, and `make setup` can
install within the lock.

`make demo` builds the archive with `dvc repro`, whose stages run `python -m training.<stage>`:
a plain `python` on PATH. From a fresh clone nobody has activated `.venv`, so the Makefile
must put it first on PATH (a fresh clone once failed at `ingest`: no tqdm in the system python).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
