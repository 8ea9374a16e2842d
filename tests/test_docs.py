"""The docs site (docs/, mkdocs.yml) builds with `mkdocs build --strict`: a link to a page or
anchor that does not exist, an absolute link or a page left out of nav is a warning, and the
strict build fails on it. README.md, the front page, links only to files that exist."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_docs_site_builds_strict_without_warnings(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's banner, not about the pages
    p = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", tmp_path / "site"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = p.stdout + p.stderr
    assert p.returncode == 0, log
    assert "WARNING" not in log, log
    # every page in nav was written, and none of docs/plots/ (DVC's template, not a page)
    assert (tmp_path / "site/index.html").is_file()
    assert (tmp_path / "site/experiments/index.html").is_file()
    assert not (tmp_path / "site/plots").exists()


def test_readme_links_point_at_files_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert any(t.startswith("docs/") for t in local)
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to files that do not exist: {missing}"
