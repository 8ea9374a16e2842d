"""What a test copies of the checkout (tests/helpers/project.py): the files a clone has, as the
developer edited them, and the developer's new files, but nothing a pipeline run left behind.
After `make demo` a checkout holds dvc.lock and metrics/ (which git does not ignore) besides the
ignored data/, artifacts/, mlflow.db...: a copy with them would be an already reproduced
workspace (tests/test_brief_model.py then found transform in dvc.lock)."""

import shutil
import subprocess

from tests.helpers.project import GIT, ROOT, project_copy, tracked_files

# what `make demo` leaves, as dvc.yaml and .gitignore name it
DEMO_LEFTOVERS = [
    "dvc.lock",
    "metrics/.gitignore",
    "metrics/eval.json",
    "metrics/train.json",
    "metrics/train_history.csv",
    "metrics/finetune.json",
    "metrics/finetune_history.csv",
    "data/source.json",
    "data/.gitignore",
    "data/raw/Images/shapes_00000.png",
    "artifacts/model/model.pth",
    "artifacts/finetune/model.pth",
    "model-store/imgtocap.mar",
    "reports/samples.png",
    "reports/model_size.json",
    "mlflow.db",
    "mlruns/0/meta.yaml",
    "logs/ts_log.log",
    ".dvc/tmp/lock",
    "model/__pycache__/io.cpython-311.pyc",
]


def test_a_copy_has_the_tracked_files_as_edited_and_new_ones_but_no_pipeline_output(tmp_path):
    checkout = tmp_path / "checkout"
    for name in ("dvc.yaml", ".gitignore", ".dvc/.gitignore", "params.yaml", "model/io.py"):
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, checkout / name)
    subprocess.run([*GIT, "init", "-q"], cwd=checkout, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=checkout, check=True)
    subprocess.run([*GIT, "commit", "-qm", "clone"], cwd=checkout, check=True)
    (checkout / "params.yaml").write_text("edited: true\n")  # uncommitted work is tested
    (checkout / "model" / "new.py").write_text("NEW = 1\n")  # and so is a new file
    for name in DEMO_LEFTOVERS:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("left by the last run\n")

    expected = [".dvc/.gitignore", ".gitignore", "dvc.yaml", "model/io.py", "model/new.py"]
    expected.append("params.yaml")
    assert tracked_files(root=checkout) == expected
    assert tracked_files("model", root=checkout) == ["model/io.py", "model/new.py"]

    copy = project_copy(tmp_path / "copy", root=checkout)
    files = sorted(
        p.relative_to(copy).as_posix()
        for p in copy.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(copy).parts[:1]
    )
    assert files == expected
    assert (copy / "params.yaml").read_text() == "edited: true\n"
    status = subprocess.run(
        [*GIT, "status", "--porcelain"], cwd=copy, capture_output=True, text=True, check=True
    )
    assert status.stdout == ""  # all of it committed
