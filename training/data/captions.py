"""The raw dataset layout every stage after ingest reads, and its caption rows.

```
data/raw/Images/<file>      the images, flat
data/raw/captions.txt       `image,caption` header, then one caption per line
data/raw/splits.json        optional: {"train": [...], "val": [...], "test": [...]} image names
data/raw/scenes.json        synthetic only: image -> scene (objects, relation)
```

captions.txt is read as the CSV a CSV writer (pandas, Kaggle's) produces, with one leniency
Kaggle's Flickr8k file needs: an unquoted caption is the rest of the line after the FIRST comma,
commas included. A quoted field (`"img.png","a caption"`) is unquoted (`""` is a quote), and a
quoted caption may run over several lines (joined with a space). What cannot be parsed (no
comma, not UTF-8, a quote that never closes, text after a closing quote) comes back as a row
with a problem, for validation to report; `\n`, `\r\n` and old Macs' `\r` all end a line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from training.data.checksums import file_sha256

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
                f"(got {row.caption[:80]!r}). Fix the line or run `python -m training.stages.validate`, "
                "which reports and drops such lines"
            )
        rows.append(row)
    return rows


def parse_caption_lines(path: Path) -> list[tuple[CaptionRow, str | None]]:
    """Every record after the header as (row, problem), problem None when well formed.

    Lenient on purpose: validation reports a malformed record instead of stopping at it (its
    row then holds the raw line as the caption). A line that is not UTF-8 is decoded with
    replacement characters so the report can show it.
    """
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run `python -m training.stages.ingest` first (it writes the raw layout)"
        )
    lines = [_decode(raw) for raw in path.read_bytes().splitlines()]  # \n, \r\n and \r
    header = lines[0][0].lstrip("\ufeff") if lines else ""
    image, caption, _, _ = _record([header], 0)
    if (image.lower(), caption.strip().lower()) != tuple(HEADER.split(",")):
        raise ValueError(
            f"{path}, line 1: the first line must be the header {HEADER!r}, got {header[:80]!r}; "
            "add the header line (image name, comma, caption)"
        )
    texts = [text for text, _ in lines]
    parsed = []
    i = 1
    while i < len(lines):
        text, problem = lines[i]
        if not text.strip():  # blank lines (a trailing newline, spacing) hold no row
            i += 1
            continue
        image, caption, malformed, used = _record(texts, i)
        problems = [p for _, p in lines[i : i + used] if p] + ([malformed] if malformed else [])
        parsed.append((CaptionRow(i + 1, image, caption), problems[0] if problems else None))
        i += used
    return parsed


# A line that starts a new `name.ext,...` row: a quoted caption never continues onto one
_ROW_START = re.compile(r'[^",\s][^,]*\.[A-Za-z0-9]{2,5}\s*,')


def _record(lines: list[str], i: int) -> tuple[str, str, str | None, int]:
    """The record starting at lines[i]: (image, caption, problem or None, lines it spans)."""
    line = lines[i]
    if line.startswith('"'):  # a quoted image name (a CSV writer quoting every field)
        image, rest, closed = _quoted(line)
        if not closed or not rest.startswith(","):
            problem = "the quoted image name is not followed by a comma" if closed else None
            return "", line, problem or "the image name opens a quote that never closes", 1
        rest = rest[1:]
    else:
        image, comma, rest = line.partition(",")
        if not comma:
            return "", line, "no comma between image name and caption", 1
    image = image.strip()
    if not rest.lstrip().startswith('"'):  # unquoted: the rest of the line, commas included
        return image, rest.strip(), None, 1
    text, used = rest.lstrip(), 1
    while True:
        caption, after, closed = _quoted(text)
        if closed and after.strip():
            return image, rest.strip(), f"text after the caption's closing quote: {after!r}", 1
        if closed:
            return image, " ".join(caption.splitlines()).strip(), None, used
        if i + used == len(lines) or _ROW_START.match(lines[i + used]):
            return image, rest.strip(), "the caption opens a quote that never closes", 1
        text += "\n" + lines[i + used]  # a quoted newline: the caption goes on
        used += 1


def _quoted(text: str) -> tuple[str, str, bool]:
    """A CSV-quoted field at the start of `text`: (value, the text after it, closed?)."""
    parts, j = [], 1
    while (k := text.find('"', j)) >= 0:
        parts.append(text[j:k])
        if text.startswith('"', k + 1):  # "" inside quotes is one quote
            parts.append('"')
            j = k + 2
            continue
        return "".join(parts), text[k + 1 :], True
    return "".join(parts) + text[j:], "", False


def _decode(raw: bytes) -> tuple[str, str | None]:
    """A line as text, and the problem when it is not UTF-8 (then decoded with U+FFFD)."""
    try:
        return raw.decode("utf-8"), None
    except UnicodeDecodeError as exc:
        text = raw.decode("utf-8", errors="replace")
        return text, f"not UTF-8 text ({exc.reason} at byte {exc.start})"


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
            caption = " ".join(caption.splitlines()).strip()
            if caption.startswith('"'):
                caption = '"' + caption.replace('"', '""') + '"'
            f.write(f"{image},{caption}\n")
            count += 1
    return count


def valid_rows(raw_dir: str | Path, report_path: str | Path) -> list[CaptionRow]:
    """Exactly the caption rows validation kept, checked against the report it wrote; a report
    of a failed validation (on_invalid: fail) is refused."""
    report_path = Path(report_path)
    if not report_path.is_file():
        raise FileNotFoundError(
            f"{report_path} not found: run `python -m training.stages.validate` before preprocessing"
        )
    report = json.loads(report_path.read_text(encoding="utf-8"))
    if report.get("passed") is not True:
        raise ValueError(
            f"{report_path} records a validation that did not pass (passed: "
            f"{report.get('passed')}; data.on_invalid: {report.get('on_invalid')} found the "
            "problems it lists): fix the data, or set data.on_invalid: drop to train on the "
            "rest, then run `python -m training.stages.validate` (or `dvc repro`) again"
        )
    path = captions_path(raw_dir)
    if report["captions_sha256"] != file_sha256(path):
        raise ValueError(
            f"{path} changed after {report_path} was written: run `python -m training.stages.validate` "
            "again (or `dvc repro`)"
        )
    dropped = {row["line"] for row in report["dropped_rows"]}
    kept = [row for row, _ in parse_caption_lines(path) if row.line not in dropped]
    if len(kept) != report["counts"]["kept"]:
        raise ValueError(
            f"{report_path} says {report['counts']['kept']} rows were kept but {len(kept)} "
            f"rows of {path} are not listed as dropped: run `python -m training.stages.validate` again"
        )
    return kept
