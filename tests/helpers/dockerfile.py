"""A reader for the Dockerfile: what the image copies from the build context and where, and
the command, user, ports and healthcheck of its last (runtime) stage. Enough of Dockerfile
syntax for ours; the tests check the image against the project with it."""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath


def _instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in text.splitlines():
        if line.strip().startswith("#") or (not line.strip() and not pending):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


class Dockerfile:
    """The parsed Dockerfile at `path`."""

    def __init__(self, path: Path):
        self.copies: list[tuple[list[str], str]] = []  # (sources, absolute destination[/])
        self.sources: list[str] = []  # build-context files, every stage
        self.expose: set[int] = set()
        self.entrypoint: list[str] = []
        self.cmd: list[str] = []
        self.user = self.healthcheck = ""
        workdir = "/"
        for keyword, args in _instructions(path.read_text()):
            if keyword == "FROM":  # destinations: only the last (runtime) stage matters
                self.copies, workdir = [], "/"
            elif keyword == "WORKDIR":
                workdir = str(PurePosixPath(workdir, args))
            elif keyword in ("COPY", "ADD"):
                words = json.loads(args) if args.startswith("[") else args.split()
                if any(w.startswith("--from") for w in words):
                    continue  # from another image or stage, not the build context
                *sources, dest = [w for w in words if not w.startswith("--")]
                slash = "/" if dest.endswith("/") else ""
                self.copies.append((sources, str(PurePosixPath(workdir, dest)) + slash))
                self.sources += sources
            elif keyword == "EXPOSE":
                self.expose |= {int(p.split("/")[0]) for p in args.split()}
            elif keyword == "USER":
                self.user = args
            elif keyword == "HEALTHCHECK":
                self.healthcheck = args
            elif keyword in ("ENTRYPOINT", "CMD"):
                assert args.startswith("["), f"{keyword} must be exec (JSON) form: {args}"
                setattr(self, keyword.lower(), json.loads(args))
        self.workdir = workdir

    def destination(self, source: str) -> str:
        """Where a build-context file lands in the image."""
        for sources, dest in self.copies:
            if source in sources:
                into_dir = dest.endswith("/") or len(sources) > 1
                return str(PurePosixPath(dest, PurePosixPath(source).name) if into_dir else dest)
        raise AssertionError(f"the Dockerfile does not COPY {source}")
