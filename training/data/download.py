"""Download a file once: resume via HTTP Range into `<dest>.part`, progress bar, checksums.

Used for every file the pipeline fetches: the Flickr8k archives (ingest) and the pretrained
weights (training.data.weights). A server that cannot be reached at all (no network, a name that
does not resolve, a refused or timed-out connection) fails at once with `Unreachable`:
retrying that only makes an offline user wait. A transfer cut in the middle is retried.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import requests
from tqdm import tqdm

from training.data.checksums import hash_file

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0  # seconds to reach the server; reading then waits `timeout`


class Unreachable(ConnectionError):
    """The server of a URL could not be reached at all; the message says why in a few words."""


def download(
    url: str,
    dest: Path,
    sha256: str | None = None,
    md5: str | None = None,
    key: str = "the download",
    retries: int = 3,
    timeout: float = 60.0,
) -> Path:
    """Download `url` to `dest` once: resume `dest.part` via HTTP Range, verify, keep.

    With no sha256 given, the computed one is written to `dest.sha256` (sha256sum format) on
    first download and later reuses of the cached file are checked against it.
    """
    dest = Path(dest)
    if dest.is_file():
        verify(dest, url, sha256, md5, key)
        log.info("using cached %s", dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch(url, part, timeout, key)
            break
        except requests.RequestException as exc:  # network trouble: the .part is kept
            have = part.stat().st_size if part.exists() else 0
            why = _unreachable(exc)
            if why and attempt == 0:
                raise Unreachable(f"cannot reach {urlparse(url).hostname} ({why})") from exc
            if attempt == retries:
                raise ConnectionError(
                    f"downloading {url} stopped after {have} bytes ({exc}); run again to resume "
                    f"from {part}, or download the file yourself (see {key}_url)"
                ) from exc
            log.warning("download of %s interrupted at %d bytes (%s); resuming", url, have, exc)
            time.sleep(min(2**attempt, 30))
    actual = verify(part, url, sha256, md5, key)
    part.replace(dest)
    dest.with_name(dest.name + ".sha256").write_text(f"{actual}  {dest.name}\n")
    if not sha256:
        log.info("%s sha256 %s (recorded in %s.sha256)", dest, actual, dest.name)
    return dest


def _fetch(url: str, part: Path, timeout: float, key: str) -> None:
    """One GET of the rest of `url` appended to `part`, with a progress bar."""
    have = part.stat().st_size if part.exists() else 0
    # identity: Range offsets and Content-Length must count the bytes we store
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    timeouts = (min(CONNECT_TIMEOUT, timeout), timeout)
    with requests.get(url, headers=headers, stream=True, timeout=timeouts) as response:
        if have and response.status_code == 416:
            return  # nothing left to send: the .part is complete (the checksum decides)
        if 400 <= response.status_code < 500:
            raise ConnectionError(
                f"{url} answered HTTP {response.status_code} {response.reason}: check {key}_url "
                "in params.yaml, or download the file yourself"
            )
        response.raise_for_status()
        if have and response.status_code == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(have):
                part.unlink()
                raise requests.RequestException(f"asked for bytes {have}- but got {start}-")
            mode = "ab"
        else:  # 200: no Range asked, or the server ignores it: start over
            have, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = have + int(length) if length else None
        bar = tqdm(
            total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=part.stem
        )
        with part.open(mode) as f, bar:
            for chunk in response.iter_content(chunk_size=1 << 16):
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size < total:
        raise requests.RequestException(f"connection closed at {part.stat().st_size} of {total}")


def _unreachable(exc: BaseException) -> str | None:
    """Why the server was never reached ("the name does not resolve", ...), or None when the
    failure came later (a transfer cut in the middle is worth a retry)."""
    if isinstance(exc, requests.ConnectTimeout):
        return f"no answer within {CONNECT_TIMEOUT:.0f} s"
    seen = set()
    while exc is not None and id(exc) not in seen:  # requests wraps urllib3 wraps socket
        seen.add(id(exc))
        if isinstance(exc, socket.gaierror):
            return "the name does not resolve: no network?"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused"
        causes = [getattr(exc, "reason", None), exc.__cause__, exc.__context__, *exc.args]
        exc = next((c for c in causes if isinstance(c, BaseException)), None)
    return None


def verify(path: Path, url: str, sha256: str | None, md5: str | None, key: str) -> str:
    """Check `path` against the expected (or recorded) hashes; returns its sha256.

    `key` names the params: a mismatch points at `<key>_sha256` (or `_md5`) in params.yaml."""
    hashes = {"sha256": hashlib.sha256()}
    if md5:
        hashes["md5"] = hashlib.md5(usedforsecurity=False)
    hash_file(path, *hashes.values())  # one read of a ~1 GB archive for both
    actual = {name: h.hexdigest() for name, h in hashes.items()}
    recorded = path.with_name(path.name.removesuffix(".part") + ".sha256")
    expected = {"sha256": sha256, "md5": md5}
    where = {"sha256": f"{key}_sha256 in params.yaml", "md5": f"{key}_md5 in params.yaml"}
    if not sha256 and recorded.is_file() and not path.name.endswith(".part"):
        expected["sha256"] = recorded.read_text().split()[0]
        where["sha256"] = f"{recorded} (recorded on first download)"
    for name, want in expected.items():
        if want and want.lower() != actual[name]:
            raise ValueError(
                f"checksum mismatch for {url}: {path} has {name} {actual[name]} but "
                f"{where[name]} expects {want}. The download is corrupt or the file changed "
                f"upstream: delete {path} and run again to download it afresh; if you trust the "
                f"new file, set {key}_{name}: {actual[name]} in params.yaml"
            )
    return actual["sha256"]


def url_file_name(url: str) -> str:
    """The last path segment of a URL: the name a download is cached under."""
    name = PurePosixPath(urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot tell a file name from the URL {url!r}: end it with the file")
    return name
