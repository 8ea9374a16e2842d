"""Hashing files: one read in 1 MiB chunks, whatever the size, fed to any number of digests."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Protocol

CHUNK = 1 << 20


class Digest(Protocol):
    """What `hash_file` feeds: any hashlib object (sha256, md5, a running fingerprint)."""

    def update(self, data: bytes, /) -> None: ...


def hash_file(path: str | Path, *digests: Digest) -> None:
    """Feed the bytes of `path` to every digest (hashlib objects), reading the file once."""
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            for digest in digests:
                digest.update(chunk)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    hash_file(path, digest)
    return digest.hexdigest()
