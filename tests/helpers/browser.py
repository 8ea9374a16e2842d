"""Headless Chromium for the page (serve/web/): Debian's `chromium` driven by Playwright (its own
browser download fails offline), reaching nothing beyond loopback. Used by the `chromium` fixture
(tests/conftest.py) and tests/screenshots.py (the pictures in docs/)."""

from __future__ import annotations

import base64
import shutil

from playwright.sync_api import Browser, Page, Playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # every host name fails except loopback: the page must need nothing else
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
]
WIDE = {"width": 1100, "height": 760}
PHONE = {"width": 390, "height": 844}


def launch(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS)


def choose(page: Page, name: str, data: bytes, mime: str = "image/png") -> None:
    """Pick a file with the page's file picker."""
    page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])


def drop(page: Page, name: str, data: bytes, mime: str = "image/png") -> None:
    """Drag a file onto the drop zone and let go, as from a file manager."""
    transfer = page.evaluate_handle(
        """([data, name, type]) => {
            const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type }));
            return transfer;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    for event in ("dragenter", "dragover", "drop"):
        page.dispatch_event("#drop", event, {"dataTransfer": transfer})


def answered(page: Page) -> None:
    """Wait until the page shows a caption or an error."""
    page.wait_for_selector("#facts:not([hidden]), #error:not([hidden])", timeout=60_000)


def overlay(page: Page) -> dict | None:
    """The heat map as drawn: None while hidden, else its size, the word it shows, and its
    alpha channel as a rows x cols grid of means (how much each region is dimmed)."""
    return page.evaluate(
        """() => {
            const canvas = document.getElementById("overlay");
            if (canvas.hidden || !canvas.width) return null;
            const { width, height } = canvas;
            const data = canvas.getContext("2d").getImageData(0, 0, width, height).data;
            const n = 4, alpha = Array.from({ length: n }, () => new Array(n).fill(0));
            for (let y = 0; y < height; y++)
                for (let x = 0; x < width; x++)
                    alpha[Math.floor((y * n) / height)][Math.floor((x * n) / width)] +=
                        data[4 * (y * width + x) + 3] / ((width * height) / (n * n));
            const picture = document.getElementById("picture");
            return { width, height, word: canvas.dataset.word, alpha,
                     shown: [picture.clientWidth, picture.clientHeight] };
        }"""
    )
