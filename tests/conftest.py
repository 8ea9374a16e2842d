"""Test-wide settings (offline, no telemetry, passive OpenMP threads, a fixed seed), the markers
of what a test starts (see pyproject.toml) and the fixtures many tests share. The helpers tests
call with arguments are in tests/helpers/."""

import os
import shutil
import socket
import subprocess
from pathlib import Path

# Before anything imports transformers / huggingface_hub / mlflow / dvc.
os.environ.update(
    HF_HUB_OFFLINE="1",
    TRANSFORMERS_OFFLINE="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    DVC_NO_ANALYTICS="1",
    MLFLOW_DISABLE_TELEMETRY="true",
    DO_NOT_TRACK="1",
    # OpenMP threads that spin while waiting stall 10x and worse as soon as another process
    # (a TorchServe worker, a pipeline stage) holds one of the two cores
    OMP_WAIT_POLICY="PASSIVE",
)

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.marks import needs  # noqa: E402

# --- markers ------------------------------------------------------------------------------------
# A test that starts one of these programs itself (or through a fixture) carries its marker:
# `make test-fast` leaves those tests out, and the check below fails a test that starts one
# unmarked, so the fast loop stays fast as tests are added.
PROGRAM_MARKERS = {"java": "java", "torchserve": "java", "nginx": "nginx", "kubectl": "kubectl"}
PROGRAM_MARKERS |= {"chromium": "browser", "chromium-browser": "browser"}
UNMARKED = pytest.StashKey[list[str]]()
_running: list[pytest.Item] = []  # the test whose setup or call runs now


def _marker_of(args) -> str | None:
    """The marker a program needs, from its command line (Popen's first argument)."""
    argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
    if not argv:
        return None
    program = Path(os.fsdecode(argv[0])).name
    if "ts.model_server" in map(str, argv[1:3]):  # TorchServe's launcher starts its JVM
        return "java"
    if "playwright" in os.fsdecode(argv[0]):  # Playwright's driver, which starts Chromium
        return "browser"
    return PROGRAM_MARKERS.get(program)


_popen_init = subprocess.Popen.__init__


def _checked_popen_init(self, args, *rest, **kwargs):
    marker = _marker_of(args) if _running else None
    if marker and _running[-1].get_closest_marker(marker) is None:
        item = _running[-1]
        message = (
            f"{item.nodeid} starts {args if isinstance(args, str) else list(args)[0]} but is not "
            f"marked {marker}: add @pytest.mark.{marker} to it, or @needs({marker!r}) "
            "(tests.helpers.marks) to the fixture that starts it"
        )
        item.stash.setdefault(UNMARKED, []).append(message)
        raise RuntimeError(message)
    _popen_init(self, args, *rest, **kwargs)


subprocess.Popen.__init__ = _checked_popen_init


def pytest_collection_modifyitems(config, items):
    """Markers from fixtures: a test gets those its fixtures declare with `needs`."""
    known = {line.split(":")[0].strip() for line in config.getini("markers")}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        if info is None:
            continue
        needed = set()
        for name in item.fixturenames:
            for fixturedef in info.name2fixturedefs.get(name, ()):
                needed.update(getattr(fixturedef.func, "needs", ()))
        for marker in sorted(needed):
            if marker not in known:
                raise pytest.UsageError(f"needs({marker!r}): not a marker in pyproject.toml")
            if item.get_closest_marker(marker) is None:
                item.add_marker(marker)


def _checking(item):
    """Hook body: check what `item` starts while its fixtures set up and while it runs (not in
    teardown, where a module's fixture may stop its program after a test that did not use it)."""
    _running.append(item)
    try:
        return (yield)
    finally:
        _running.pop()


pytest_runtest_setup = pytest.hookimpl(wrapper=True)(_checking)
pytest_runtest_call = pytest.hookimpl(wrapper=True)(_checking)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    unmarked = item.stash.get(UNMARKED, [])
    if unmarked and report.passed:  # started a marked program, and caught what Popen raised
        report.outcome = "failed"
        report.longrepr = "\n".join(unmarked)
    if unmarked:
        item.stash[UNMARKED] = []
    return report


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tokenizer():
    from model import load_tokenizer

    return load_tokenizer("packaged")


@pytest.fixture
def no_network(monkeypatch):
    """Any socket this test opens fails it: what it does must work offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access: socket{args}")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
@needs("browser")
def chromium():
    """Debian's headless Chromium driven by Playwright (tests/helpers/browser.py), reaching
    nothing beyond loopback; the test is skipped where either is missing."""
    playwright = pytest.importorskip("playwright.sync_api", reason="requirements/dev.txt has it")
    from tests.helpers import browser

    if shutil.which(browser.CHROMIUM) is None:
        pytest.skip("no chromium (apt-get install chromium; .ci/run installs it)")
    with playwright.sync_playwright() as p:
        launched = browser.launch(p)
        yield launched
        launched.close()
