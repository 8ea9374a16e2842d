"""DVC stage `validate`: check the raw dataset and report every row and image it drops.

Every image a caption names is decoded with the decoder training and serving use
(`model.image.open_image`), so a truncated file is caught here and not at transform. Every
caption is checked (malformed line, no or bad image name, empty, not text, absurdly long), both
directions are cross-referenced (a caption for a missing file, a file with no captions), a
repeated caption of the same image is dropped and identical image files are reported.

`reports/validation.json` holds the counts, every dropped row (line, image, caption, reason,
detail) and every dropped image. kept + dropped == rows, always. `data.on_invalid: drop` trains
on the rest; `fail` stops the pipeline with a summary, and the report it still writes says
`"passed": false`, so that a later stage run by hand refuses it too.
`training.data.captions.valid_rows` gives later stages exactly the kept rows of a passed validation.
"""

from __future__ import annotations

import json
import logging
import os
import unicodedata
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from model.image import ImageError, open_image
from training import StageError
from training.data.captions import IMAGES_DIR, CaptionRow, captions_path, parse_caption_lines
from training.data.checksums import file_sha256
from training.params import DataConfig, load_params, stage_main
from training.paths import RAW_DIR, REPORT_PATH

log = logging.getLogger(__name__)

# Flickr8k's longest caption is a few hundred characters; beyond this it is not a caption.
MAX_CAPTION_CHARS = 500
_POOL_MIN_IMAGES = 64  # below this, starting worker processes costs more than it saves


def validate(
    raw_dir: str | Path,
    report_path: str | Path,
    on_invalid: str = "drop",
    max_caption_chars: int = MAX_CAPTION_CHARS,
    workers: int | None = None,
) -> dict[str, Any]:
    """Validate `raw_dir`, write the report and return it; `fail` raises StageError on problems
    (after writing the report)."""
    if on_invalid not in ("drop", "fail"):
        raise ValueError(f"on_invalid is {on_invalid!r}; use drop or fail")
    raw_dir, report_path = Path(raw_dir), Path(report_path)
    images_dir = raw_dir / IMAGES_DIR
    if not images_dir.is_dir():
        raise FileNotFoundError(
            f"{images_dir} not found: run `python -m training.stages.ingest` first (it writes the raw "
            "layout)"
        )
    parsed = parse_caption_lines(captions_path(raw_dir))
    files = sorted(p.name for p in images_dir.iterdir() if p.is_file())
    candidates, dropped_rows = _check_rows(parsed, set(files), max_caption_chars)
    checked = _check_images(images_dir, sorted({row.image for row in candidates}), workers)
    unreadable = {name: error for name, (_, error) in checked.items() if error}
    kept, first_line = [], {}
    for row in candidates:
        key = (row.image, " ".join(row.caption.lower().split()))
        if row.image in unreadable:
            dropped_rows.append(_dropped(row, "unreadable_image", unreadable[row.image]))
        elif key in first_line:
            detail = f"same caption for this image as line {first_line[key]}"
            dropped_rows.append(_dropped(row, "duplicate_caption", detail))
        else:
            first_line[key] = row.line
            kept.append(row)
    dropped_rows.sort(key=lambda r: r["line"])
    dropped_images = _dropped_images(files, {row.image for row, _ in parsed}, kept, unreadable)
    by_hash: dict[str, list[str]] = {}
    for name, (digest, error) in checked.items():
        if not error:
            by_hash.setdefault(digest, []).append(name)
    duplicates = sorted(names for names in by_hash.values() if len(names) > 1)

    assert len(kept) + len(dropped_rows) == len(parsed), "a caption row was lost"
    kept_images = {row.image for row in kept}
    per_image = Counter(Counter(row.image for row in kept).values())
    problems = bool(dropped_rows or dropped_images)
    report = {
        "raw_dir": str(raw_dir),
        "on_invalid": on_invalid,
        # false: `fail` found problems; every later stage refuses this data (valid_rows)
        "passed": not (problems and on_invalid == "fail"),
        "captions_sha256": file_sha256(captions_path(raw_dir)),
        "counts": {
            "images": len(files),
            "images_kept": len(kept_images),
            "images_dropped": len(dropped_images),
            "captions": len(parsed),
            "kept": len(kept),
            "dropped": len(dropped_rows),
            "dropped_by_reason": dict(sorted(Counter(r["reason"] for r in dropped_rows).items())),
            "images_dropped_by_reason": dict(
                sorted(Counter(i["reason"] for i in dropped_images).items())
            ),
            "duplicate_image_groups": len(duplicates),
            "kept_captions_per_image": {str(k): per_image[k] for k in sorted(per_image)},
        },
        "dropped_rows": dropped_rows,
        "dropped_images": dropped_images,
        # Same bytes under different names: worth keeping in one split (no train/test leak).
        "duplicate_images": duplicates,
    }
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", "utf-8")

    counts = report["counts"]
    log.info(
        "%d/%d caption rows kept, %d/%d images kept; report: %s",
        counts["kept"],
        counts["captions"],
        counts["images_kept"],
        counts["images"],
        report_path,
    )
    if duplicates:
        log.warning("%d groups of identical image files (see duplicate_images)", len(duplicates))
    if problems:
        summary = _summary(report, report_path)
        if on_invalid == "fail":
            raise StageError(summary + " Fix the data, or set data.on_invalid: drop to go on.")
        log.warning(summary)
    return report


@stage_main
def main() -> None:
    """`python -m training.stages.validate`: validate data/raw into reports/validation.json."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = DataConfig.from_dict(load_params().get("data"))
    validate(RAW_DIR, REPORT_PATH, cfg.on_invalid)


def _check_rows(
    parsed: list[tuple[CaptionRow, str | None]], present: set[str], max_chars: int
) -> tuple[list[CaptionRow], list[dict[str, Any]]]:
    """Split rows into those worth decoding an image for and dropped ones (with reasons)."""
    candidates, dropped = [], []
    for row, problem in parsed:
        reason, detail = (
            ("malformed_line", problem) if problem else _row_problem(row, present, max_chars)
        )
        if reason:
            dropped.append(_dropped(row, reason, detail))
        else:
            candidates.append(row)
    return candidates, dropped


def _dropped(row: CaptionRow, reason: str, detail: str) -> dict[str, Any]:
    return {
        "line": row.line,
        "image": row.image,
        "caption": row.caption,
        "reason": reason,
        "detail": detail,
    }


def _dropped_images(
    files: list[str], named: set[str], kept: list[CaptionRow], unreadable: dict[str, str]
) -> list[dict[str, str]]:
    """Every file in Images/ that no kept row uses, and why."""
    kept_images = {row.image for row in kept}
    dropped = []
    for name in files:
        if name in unreadable:
            reason, detail = "unreadable", unreadable[name]
        elif name not in named:
            reason, detail = "no_captions", "no caption row names it"
        elif name not in kept_images:
            reason, detail = "no_valid_captions", "all its rows dropped"
        else:
            continue
        dropped.append({"image": name, "reason": reason, "detail": detail})
    return dropped


def _row_problem(row: CaptionRow, present: set[str], max_chars: int) -> tuple[str | None, str]:
    """(reason, detail) for a well-formed line whose content is unusable, else (None, "")."""
    if not row.image:
        return "no_image_name", "nothing before the first comma"
    if "/" in row.image or "\\" in row.image or row.image in (".", ".."):
        # A path, not a file name: it could point outside Images/.
        return "bad_image_name", "must be a file name inside Images/, not a path"
    if not row.caption.strip():
        return "empty_caption", "caption is empty or whitespace"
    if "\ufffd" in row.caption:
        return "not_text", "caption holds undecodable bytes (U+FFFD)"
    if any(unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c != "\t" for c in row.caption):
        return "not_text", "caption holds control or unassigned characters"
    if not any(c.isalpha() for c in row.caption):
        return "not_text", "caption has no letters"
    if len(row.caption) > max_chars:
        return "caption_too_long", f"{len(row.caption)} characters, the limit is {max_chars}"
    if row.image not in present:
        return "missing_image", f"{IMAGES_DIR}/{row.image} does not exist"
    return None, ""


def _check_image(path: str) -> tuple[str, str | None]:
    """(sha256 of the file, decode error or None). Top level: process pools pickle it."""
    digest = file_sha256(path)
    try:
        open_image(path)
    except (ImageError, Image.DecompressionBombError) as exc:
        return digest, str(exc)
    return digest, None


def _check_images(
    images_dir: Path, names: list[str], workers: int | None
) -> dict[str, tuple[str, str | None]]:
    """Hash and fully decode each named image, on a process pool when there are many."""
    paths = [str(images_dir / name) for name in names]
    workers = workers or os.cpu_count() or 1
    progress = {"total": len(paths), "desc": "decoding images", "unit": "img"}
    if workers > 1 and len(paths) >= _POOL_MIN_IMAGES:
        with ProcessPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(_check_image, paths, chunksize=32), **progress))
    else:
        results = [_check_image(p) for p in tqdm(paths, **progress)]
    return dict(zip(names, results, strict=True))


def _summary(report: dict[str, Any], report_path: Path) -> str:
    counts = report["counts"]
    rows = ", ".join(f"{n} {r}" for r, n in counts["dropped_by_reason"].items()) or "none"
    images = ", ".join(f"{n} {r}" for r, n in counts["images_dropped_by_reason"].items()) or "none"
    return (
        f"validation of {report['raw_dir']} dropped {counts['dropped']} of {counts['captions']} "
        f"caption rows ({rows}) and {counts['images_dropped']} of {counts['images']} images "
        f"({images}); every one is listed with its reason in {report_path}."
    )


if __name__ == "__main__":
    main()
