"""The raw dataset layout every stage after ingest reads, and its caption rows.

```
data/raw/Images/<file>      the images, flat
data/raw/captions.txt       `image,caption` header, then one caption per line
data/raw/splits.json        optional: {"train": [...], "val": [...], "test": [...]} image names
data/raw/scenes.json        synthetic only: image -> scene (objects, relation)
```

In captions.txt the image name is everything before the FIRST comma and the caption is the
rest, commas included: that is how the Kaggle Flickr8k file reads. A caption wholly wrapped in
double quotes (what pandas/csv writers produce when it holds a comma) is unquoted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from training.checksums import file_sha256

IMAGES_DIR = "Images"
CAPTIONS_FILE = "captions.txt"
SPLITS_FILE = "splits.json"
SCENES_FILE = "scenes.json"
HEADER = "image,caption"


@dataclass(frozen=True)
class CaptionRow:
    """One caption: its 1-based line number in captions.txt, the image name and the text."""

    line: int
    image: str
    caption: str


def captions_path(raw_dir: str | Path) -> Path:
    """Path of captions.txt in a raw dataset directory."""
    return Path(raw_dir) / CAPTIONS_FILE


def read_captions(raw_dir: str | Path) -> list[CaptionRow]:
    """Every caption row of `raw_dir/captions.txt`; a malformed line is an error naming it."""
    path = captions_path(raw_dir)
    rows = []
    for row, problem in parse_caption_lines(path):
        if problem:
            raise ValueError(
                f"{path}, line {row.line}: {problem}; expected `image,caption` "
                f"(got {row.caption[:80]!r}). Fix the line or run `python -m training.validate`, "
                "which reports and drops such lines"
            )
        rows.append(row)
    return rows


def parse_caption_lines(path: Path) -> list[tuple[CaptionRow, str | None]]:
    """Every non-blank line after the header as (row, problem), problem None when well formed.

    Lenient on purpose: validation reports a malformed line instead of stopping at it. A line
    that is not UTF-8 is decoded with replacement characters so the report can show it.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `python -m training.ingest` first (it writes the raw layout)"
        )
    lines = path.read_bytes().split(b"\n")
    header = lines[0].decode("utf-8", errors="replace").lstrip("\ufeff").strip().lower()
    if header != HEADER:
        raise ValueError(
            f"{path}, line 1: the first line must be the header {HEADER!r}, got {header[:80]!r}; "
            "add the header line (image name, comma, caption)"
        )
    parsed = []
    for number, raw in enumerate(lines[1:], start=2):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue  # blank lines (a trailing newline, spacing) hold no row
        problem = None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", errors="replace")
            problem = f"not UTF-8 text ({exc.reason} at byte {exc.start})"
        image, comma, caption = text.partition(",")
        if not comma:
            problem = problem or "no comma between image name and caption"
            image, caption = "", text
        parsed.append((CaptionRow(number, image.strip(), _unquote(caption)), problem))
    return parsed


def write_captions(raw_dir: str | Path, rows: Iterable[tuple[str, str]]) -> int:
    """Write `raw_dir/captions.txt` from (image, caption) pairs; returns the number of rows."""
    path = captions_path(raw_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        f.write(HEADER + "\n")
        for image, caption in rows:
            if "," in image or "\n" in image:
                raise ValueError(
                    f"image name {image!r} holds a comma or newline, which captions.txt cannot "
                    "represent; rename the file"
                )
            # A caption never spans lines; a leading quote would be read back as CSV quoting.
            caption = " ".join(caption.splitlines())
            if caption.startswith('"'):
                caption = '"' + caption.replace('"', '""') + '"'
            f.write(f"{image},{caption}\n")
            count += 1
    return count


def valid_rows(raw_dir: str | Path, report_path: str | Path) -> list[CaptionRow]:
    """Exactly the caption rows validation kept, checked against the report it wrote."""
    report_path = Path(report_path)
    if not report_path.is_file():
        raise FileNotFoundError(
            f"{report_path} not found: run `python -m training.validate` before preprocessing"
        )
    report = json.loads(report_path.read_text(encoding="utf-8"))
    path = captions_path(raw_dir)
    if report["captions_sha256"] != file_sha256(path):
        raise ValueError(
            f"{path} changed after {report_path} was written: run `python -m training.validate` "
            "again (or `dvc repro`)"
        )
    dropped = {row["line"] for row in report["dropped_rows"]}
    kept = [row for row, _ in parse_caption_lines(path) if row.line not in dropped]
    if len(kept) != report["counts"]["kept"]:
        raise ValueError(
            f"{report_path} says {report['counts']['kept']} rows were kept but {len(kept)} "
            f"rows of {path} are not listed as dropped: run `python -m training.validate` again"
        )
    return kept


def _unquote(caption: str) -> str:
    """Strip surrounding whitespace and undo CSV quoting of a whole caption field."""
    caption = caption.strip()
    if len(caption) >= 2 and caption[0] == caption[-1] == '"':
        caption = caption[1:-1].replace('""', '"')
    return caption
