"""DVC stage `source`: a fingerprint of the dataset outside the repository, so that editing it
re-ingests.

`data.flickr8k.path`, `data.folder.path` and `data.karpathy.json`/`.images` point outside the
repository, where DVC does not look (a null path cannot be a dvc.yaml dependency). This stage
runs on every `dvc repro` (`always_changed`: it lists files, it reads none) and writes
`data/source.json`: the source, its paths, and a sha256 over every file's relative path, size
and modification time. ingest depends on that file, so DVC re-runs ingest exactly when the
external data changed and skips it, and everything after it, when it did not. `dvc status`
lists `source` as "always changed" for the same reason: it cannot know without looking.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from training.params import DataConfig, load_params, stage_main
from training.paths import SOURCE_PATH

log = logging.getLogger(__name__)


def external_paths(cfg: DataConfig) -> dict[str, str]:
    """The params that name data outside the repository for this source: {param: path}."""
    paths = {
        "flickr8k": {"data.flickr8k.path": cfg.flickr8k.path},
        "folder": {"data.folder.path": cfg.folder.path},
        "karpathy": {
            "data.karpathy.json": cfg.karpathy.json,
            "data.karpathy.images": cfg.karpathy.images,
        },
    }.get(cfg.source, {})
    return {key: path for key, path in paths.items() if path}


def fingerprint(cfg: DataConfig) -> dict[str, Any]:
    """What the external source holds, as far as a listing tells: files, bytes, a sha256."""
    digest = hashlib.sha256()
    files = size = 0
    for key, path in external_paths(cfg).items():
        root = Path(path).expanduser()
        digest.update(f"{key}={path}\n".encode())
        for name, stat in _listing(root):
            digest.update(f"{name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
            files, size = files + 1, size + stat.st_size
    return {
        "source": cfg.source,
        "paths": external_paths(cfg),
        "files": files,
        "bytes": size,
        "sha256": digest.hexdigest(),
    }


def _listing(root: Path):
    """(relative posix path, stat) of `root` itself when a file, else of every file under it,
    in a fixed order; nothing when it does not exist (ingest then says so)."""
    if root.is_file():
        yield root.name, root.stat()
        return
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            yield path.relative_to(root).as_posix(), path.stat()


@stage_main
def main() -> None:
    """`python -m training.stages.source`: params.yaml `data` -> data/source.json."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    found = fingerprint(DataConfig.from_dict(load_params().get("data")))
    SOURCE_PATH.parent.mkdir(parents=True, exist_ok=True)
    SOURCE_PATH.write_text(json.dumps(found, indent=1) + "\n")
    if found["paths"]:
        log.info(
            "%s: %d files, %d bytes",
            ", ".join(found["paths"].values()),
            found["files"],
            found["bytes"],
        )


if __name__ == "__main__":
    main()
