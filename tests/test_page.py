"""The page in a real headless Chromium, served as `make demo` serves it: nginx (serve/proxy.py) in
front of the real TorchServe (serve/config.properties with token auth off, on free loopback
ports) and the real handler, serving a tiny captioner that memorised a caption per picture.

A person picks or drops an image and reads its caption, score and timings; pointing at a word
shows that word's heat map over the image; a bad file shows the API's own error; a phone-width
screen works without sideways scrolling.
"""

from __future__ import annotations

import io
import json
import math
import shutil

import pytest
import requests

from serve import proxy
from serve.proxy import Nginx
from serve.runner import TorchServe
from tests.helpers import model as model_helpers
from tests.helpers.model import picture

pytest.importorskip("playwright.sync_api", reason="requirements/dev.txt has it")
from tests.helpers import browser as browser_tools  # noqa: E402  (needs playwright)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.java,
    pytest.mark.nginx,
    pytest.mark.skipif(shutil.which("java") is None, reason="TorchServe needs Java 17"),
    pytest.mark.skipif(proxy.binary() is None, reason=f"no nginx ({proxy.INSTALL_HINT})"),
]

CAPTIONS = ["a red circle", "two blue squares"]
SERVE = {"num_beams": {"default": 1, "max": 3}, "max_length": {"default": 12, "max": 20}}


def png(i: int) -> bytes:
    buffer = io.BytesIO()
    picture(i).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def site(tmp_path_factory, tokenizer) -> str:
    """The page's address: nginx in front of TorchServe, as `make demo` starts them."""
    base = tmp_path_factory.mktemp("site")
    store = model_helpers.model_store(
        base / "store", captions=CAPTIONS, tokenizer=tokenizer, **SERVE
    )
    with (
        TorchServe.private(base / "torchserve", store, disable_token_authorization="true") as ts,
        Nginx.configure(base / "nginx", inference=proxy.host_port(ts.inference)) as nginx,
    ):
        yield nginx.url


@pytest.fixture
def page(chromium, site):
    context = chromium.new_context(viewport=browser_tools.WIDE)
    tab = context.new_page()
    errors = []
    tab.on("pageerror", lambda e: errors.append(str(e)))
    tab.goto(f"{site}/")
    yield tab
    context.close()
    assert errors == [], f"the page's script failed: {errors}"


def api(site: str, data: bytes) -> dict:
    """What the API says for the same bytes, as the page asks it (with attention)."""
    response = requests.post(
        f"{site}/predictions/imgtocap", files={"data": data}, data={"attention": "true"}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json()


def shown_caption(page) -> str:
    return " ".join(page.inner_text("#caption").split())


def test_a_chosen_and_a_dropped_image_get_their_captions(page, site):
    browser_tools.choose(page, "circle.png", png(0))
    browser_tools.answered(page)
    assert page.is_hidden("#error")
    assert shown_caption(page) == CAPTIONS[0]
    answer = api(site, png(0))
    assert page.inner_text("#score") == f"{answer['score']:.3f}".replace("-", "−")
    assert page.inner_text("#model-ms").endswith(" ms") and page.inner_text("#total-ms")
    assert page.inner_text("#beams") == "1"
    assert page.get_attribute("#picture", "src").startswith("blob:")

    browser_tools.drop(page, "squares.png", png(1))
    page.wait_for_function(
        "(want) => document.getElementById('caption').innerText.replace(/\\s+/g, ' ') === want",
        arg=CAPTIONS[1],
        timeout=60_000,
    )
    assert page.is_hidden("#error")


def test_pointing_at_a_word_shows_its_heat_map_over_the_image(page, site, tmp_path):
    answer = api(site, png(0))
    attention = answer["attention"]
    rows, cols = attention["grid"]
    assert [t["token"] for t in attention["tokens"]] == CAPTIONS[0].split()
    assert all(math.isclose(sum(t["weights"]), 1, abs_tol=1e-3) for t in attention["tokens"])

    browser_tools.choose(page, "circle.png", png(0))
    browser_tools.answered(page)
    words = page.locator("#caption button.word")
    assert words.all_inner_texts() == CAPTIONS[0].split()
    assert browser_tools.overlay(page) is None, "no heat map before a word is chosen"

    words.nth(1).hover()
    drawn = browser_tools.overlay(page)
    assert drawn is not None and drawn["word"] == "1"
    assert [drawn["width"], drawn["height"]] == drawn["shown"]  # covers the picture exactly
    alphas = [a for row in drawn["alpha"] for a in row]
    assert max(alphas) - min(alphas) > 1, "a map, not a uniform veil"
    assert "“red”" in page.inner_text("#looking")
    page.screenshot(path=tmp_path / "page.png")

    # A click pins the word; moving away keeps its map, a second click lets go.
    words.nth(2).click()
    page.mouse.move(0, 0)
    assert browser_tools.overlay(page)["word"] == "2"
    assert words.nth(2).get_attribute("aria-pressed") == "true"
    words.nth(2).click()
    page.mouse.move(0, 0)
    assert browser_tools.overlay(page) is None


def test_the_heat_map_is_brightest_where_the_weights_are(page):
    # A recorded answer (not the model's): all of "circle"'s weight in the top-right cell of a
    # 7x7 grid, "a"'s in the bottom-left. The browser answers the page's request itself.
    def weights(cell: int) -> list[float]:
        return [1.0 if k == cell else 0.0 for k in range(49)]

    recorded = {
        "caption": "a circle", "score": -0.5, "num_beams": 3, "max_length": 20,
        "inference_ms": 12.0, "batch_size": 1,
        "attention": {"grid": [7, 7], "tokens": [
            {"token": "a", "weights": weights(42)}, {"token": "circle", "weights": weights(6)},
        ]},
    }  # fmt: skip
    page.route(
        "**/predictions/imgtocap",
        lambda route: route.fulfill(
            status=200, content_type="application/json", body=json.dumps(recorded)
        ),
    )
    browser_tools.choose(page, "circle.png", png(0))
    browser_tools.answered(page)
    for word, (row, col) in ((1, (0, 3)), (0, (3, 0))):  # on a 4x4 reading of the overlay
        page.locator("#caption button.word").nth(word).hover()
        alpha = browser_tools.overlay(page)["alpha"]
        least_dimmed = min((a, r, c) for r, line in enumerate(alpha) for c, a in enumerate(line))
        assert least_dimmed[1:] == (row, col), alpha


def test_a_bad_file_shows_the_api_s_error(page):
    browser_tools.choose(page, "notes.txt", b"these are not pixels", mime="text/plain")
    browser_tools.answered(page)
    assert page.is_hidden("#result")
    error = page.inner_text("#error")
    assert "notes.txt was not captioned" in error
    assert "HTTP 415" in error and "not a readable image" in error  # the handler's own words


def test_a_phone_sized_screen_needs_no_sideways_scrolling(chromium, site, tmp_path):
    context = chromium.new_context(
        viewport=browser_tools.PHONE, device_scale_factor=2, is_mobile=True, has_touch=True
    )
    page = context.new_page()
    page.goto(f"{site}/")
    browser_tools.choose(page, "circle.png", png(0))
    browser_tools.answered(page)
    assert shown_caption(page) == CAPTIONS[0]
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= browser_tools.PHONE["width"], width
    picture_box = page.locator("#picture").bounding_box()
    assert picture_box["width"] > 0.8 * browser_tools.PHONE["width"]
    page.screenshot(path=tmp_path / "phone.png", full_page=True)
    context.close()


def test_the_answer_shows_the_model_version_and_the_beam_field_obeys_the_server(page, site):
    browser_tools.choose(page, "circle.png", png(0))
    browser_tools.answered(page)
    answer = api(site, png(0))
    assert page.inner_text("#model-version") == answer["model_version"]
    assert answer["limits"] == {"num_beams": 3, "max_length": 20}  # SERVE's maxima
    assert page.get_attribute("#num_beams", "max") == "3"
    assert page.get_attribute("#max_length", "max") == "20"
    # this archive has no domain check: nothing to warn about, and the page says so
    assert answer["in_domain"] is None and page.is_hidden("#domain-warning")
    assert page.inner_text("#in-domain") == "not checked"

    page.click("details.options summary")
    page.fill("#num_beams", "10")  # above the server's 3: sent as 3, not refused
    browser_tools.choose(page, "squares.png", png(1))
    browser_tools.answered(page)
    assert page.is_hidden("#error") and page.inner_text("#beams") == "3"


def test_an_example_photograph_gets_the_out_of_domain_warning(page):
    # The example buttons send the page's own files; the browser answers as a served model
    # with a domain check answers a photograph (in_domain false).
    recorded = {
        "caption": "a red circle", "score": -1.2, "num_beams": 3, "max_length": 20,
        "inference_ms": 12.0, "batch_size": 1, "model_version": "4",
        "limits": {"num_beams": 5, "max_length": 40},
        "in_domain": False, "domain_distance": 9.5,
    }  # fmt: skip
    sent = []

    def answer(route):
        sent.append(route.request.post_data_buffer)
        route.fulfill(status=200, content_type="application/json", body=json.dumps(recorded))

    page.route("**/predictions/imgtocap", answer)
    assert page.locator(".example").count() >= 4
    assert page.is_hidden("#domain-warning")
    page.click(".example[data-src$='astronaut.jpg']")
    browser_tools.answered(page)
    assert b'filename="astronaut.jpg"' in sent[0]
    assert page.is_visible("#domain-warning")
    assert "does not look like the images the model was trained on" in page.inner_text(
        "#domain-warning"
    )
    assert page.inner_text("#in-domain") == "no" and page.inner_text("#model-version") == "4"
    assert page.get_attribute("#num_beams", "max") == "5"

    recorded["in_domain"] = True  # an in-domain answer takes the warning away again
    page.click(".example[data-src$='shapes_00026.png']")
    page.wait_for_function("() => document.getElementById('in-domain').innerText === 'yes'")
    assert page.is_hidden("#domain-warning")
