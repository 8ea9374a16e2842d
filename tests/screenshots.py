"""The page's pictures in docs/: `make demo`, then `.venv/bin/python tests/screenshots.py`.

Opens the page at --url (default: `make demo`'s, http://127.0.0.1:5000) in headless Chromium,
captions --image (default: the first two-object image of the test split) and points at --word
(default: the caption's last colour word, so that the picture shows attention moving to the
second object). Writes docs/page.png (a laptop-sized window) and docs/page-phone.png (a phone).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: tests/ is on sys.path, the checkout is not

from tests.helpers import browser  # noqa: E402

COLOURS = {"red", "green", "blue", "yellow", "purple", "orange", "black"}


def default_image() -> Path:
    """The first test image whose reference caption names two colours (two objects)."""
    split = json.loads((ROOT / "data/processed/captions.json").read_text())["splits"]["test"]
    for entry in split:
        if len(COLOURS & set(entry["captions"][0].split())) == 2:
            return ROOT / "data/raw/Images" / entry["image"]
    sys.exit("no two-object image in the test split: pass --image")


def shoot(page, image: Path, word: str | None, path: Path, *, full_page: bool) -> str:
    page.set_input_files("#file", str(image))
    browser.answered(page)
    words = page.locator("#caption button.word").all_inner_texts()
    if not words:
        sys.exit(f"no per-word attention in the answer: {page.inner_text('#result')}")
    if word is None:
        colours = [w for w in words if w in COLOURS]
        word = colours[-1] if colours else max(words, key=len)
    page.locator("#caption button.word").nth(words.index(word)).click()
    page.mouse.move(0, 0)
    page.screenshot(path=path, full_page=full_page)
    return f"{path}: {' '.join(words)} (showing {word!r})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:5000")
    parser.add_argument("--image", type=Path)
    parser.add_argument("--word")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    image = args.image or default_image()
    with sync_playwright() as p:
        chromium = browser.launch(p)
        for name, viewport, scale, full in (
            ("page.png", {"width": 1100, "height": 800}, 1, True),
            ("page-phone.png", browser.PHONE, 2, True),
        ):
            context = chromium.new_context(viewport=viewport, device_scale_factor=scale)
            page = context.new_page()
            page.goto(f"{args.url}/")
            print(shoot(page, image, args.word, args.out / name, full_page=full))
            context.close()
        chromium.close()


if __name__ == "__main__":
    main()
