"""The README's make targets work without an activated venv: what they run finds the venv's python.

`make demo` builds the archive with `dvc repro`, whose stages run `python -m training.<stage>`:
a plain `python` on PATH. From a fresh clone nobody has activated `.venv`, so the Makefile
must put it first on PATH (a fresh clone once failed at `ingest`: no tqdm in the system python).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_pipeline_target_runs_stages_with_the_venvs_python(tmp_path):
    for name in ("Makefile", "setup.py", "serve/serve.mk", "requirements"):
        source, dest = ROOT / name, tmp_path / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, dest)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    # a stand-in for dvc that does what a stage does: run `python` from PATH
    dvc = bin_dir / "dvc"
    dvc.write_text(
        '#!/bin/sh\nexec python -c \'import sys; open("stage-python", "w").write(sys.executable)\'\n'
    )
    dvc.chmod(0o755)
    (tmp_path / ".venv" / ".installed").touch()  # `make setup` done, after the requirements

    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(  # no venv on PATH, as in a fresh shell
        p for p in ("/usr/local/bin", "/usr/bin", "/bin") if Path(p).is_dir()
    )
    p = subprocess.run(
        ["make", "model-store/imgtocap.mar"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert Path((tmp_path / "stage-python").read_text()).parent == bin_dir
