"""The GAIR studio page, driven in a real headless Chromium (Debian's chromium + chromium-driver, through
selenium) against the real Serve app on the embedded default, with the app's required key.

One walk through the page, as a person would: give the key, see the concepts with their reference
thumbnails, search, pick one, run GAIR, check every preview and result image decodes, move α with the
keyboard and see the results change, use a preview, classify an uploaded image; no console errors.
Screenshots land in build/studio/.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.serve.conftest import CLIENT_KEY

SHOTS = Path(__file__).resolve().parents[2] / "build" / "studio"
pytestmark = pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian's chromium and chromium-driver (make setup installs them)",
)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    profile = tempfile.mkdtemp(prefix="studio-chromium-")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,800",
        f"--user-data-dir={profile}",
    ):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    driver.set_script_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, predicate, timeout=180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(lambda d: predicate(d))


def _decoded(driver, css: str) -> list[int]:
    """naturalWidth of every image matching ``css`` (0 means it did not decode)."""
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(i => i.complete ? i.naturalWidth : 0)", css
    )


def _texts(driver, css: str) -> list[str]:
    return driver.execute_script("return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)", css)


def test_a_person_composes_sees_refines_and_classifies(service, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    SHOTS.mkdir(parents=True, exist_ok=True)
    d = browser
    d.get(f"{service.url}/studio")
    # The key is asked for once, kept in session storage, never in the URL.
    _wait(d, lambda d: d.find_element(By.ID, "key-form").is_displayed())
    d.find_element(By.ID, "api-key").send_keys(CLIENT_KEY + Keys.ENTER)
    served = {s.concept_id for s in service.specs}
    _wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#concept-list .concept")) >= len(served))
    assert (
        "key" not in d.current_url
        and d.execute_script("return sessionStorage.getItem('tokenfactory.apiKey')") == CLIENT_KEY
    )
    assert not d.find_element(By.ID, "key-form").is_displayed()  # asked once
    _wait(d, lambda d: _decoded(d, "#concept-list img.thumb") and all(_decoded(d, "#concept-list img.thumb")))
    # Every input is labelled (a screen reader and the keyboard can reach each control).
    unlabelled = d.execute_script(
        "return [...document.querySelectorAll('input')].filter(i => !i.labels.length"
        " && !i.getAttribute('aria-label')).map(i => i.id)"
    )
    assert unlabelled == []

    spec = service.specs[0]
    search = d.find_element(By.ID, "concept-search")
    search.send_keys(spec.parent)
    shown = _texts(d, "#concept-list .concept label")
    assert shown and all(spec.parent in t for t in shown)
    search.clear()
    search.send_keys(spec.concept_id)
    d.find_element(By.ID, f"pick-{spec.concept_id}").send_keys(Keys.SPACE)  # keyboard, not a mouse click
    intent = d.find_element(By.ID, "intent")
    intent.clear()
    intent.send_keys("on the beach")
    d.find_element(By.ID, "run-gair").click()
    _wait(d, lambda d: d.find_element(By.ID, "progress").is_displayed())  # progress while GAIR runs
    _wait(
        d,
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "#results .result")
            and not d.find_element(By.ID, "progress").is_displayed()
        ),
    )
    assert len(d.find_elements(By.CSS_SELECTOR, "#steps .step")) == 5
    assert len(d.find_elements(By.CSS_SELECTOR, "#steps .step.chosen")) == 1
    assert all(_decoded(d, "#steps img.preview")) and len(_decoded(d, "#steps img.preview")) == 10
    _wait(d, lambda d: all(_decoded(d, "#results img.thumb")))
    d.save_screenshot(str(SHOTS / "studio-1280x800.png"))
    before = _texts(d, "#results .result span")

    slider = d.find_element(By.ID, "alpha")
    start_alpha = float(slider.get_attribute("value"))
    slider.send_keys(Keys.ARROW_LEFT if start_alpha > 0 else Keys.ARROW_RIGHT)
    _wait(
        d,
        lambda d: _texts(d, "#results .result span") != before and not d.find_element(By.ID, "progress").is_displayed(),
    )
    assert len(d.find_elements(By.CSS_SELECTOR, "#steps .step")) == 1  # manual mode: the one α
    assert all(_decoded(d, "#steps img.preview"))  # data: URLs, decoded with the page
    _wait(d, lambda d: all(_decoded(d, "#results img.thumb")))  # fetched with the key, one by one

    manual = _texts(d, "#results .result span")
    d.find_element(By.CSS_SELECTOR, "#steps figure button").click()  # use this preview: the query expands
    _wait(
        d,
        lambda d: _texts(d, "#results .result span") != manual and not d.find_element(By.ID, "progress").is_displayed(),
    )

    d.find_element(By.ID, "classify-file").send_keys(str(Path(spec.heldout_uris[0]).resolve()))
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#classify-results .classified"))
    _wait(d, lambda d: all(_decoded(d, "#classify-results img.thumb")))
    assert any(spec.concept_id in t for t in _texts(d, "#classify-results .classified span"))
    assert not d.find_element(By.ID, "error").is_displayed()

    Select(d.find_element(By.ID, "refine")).select_by_value("1")  # one round of bisection around the best α
    d.find_element(By.ID, "run-gair").click()
    _wait(
        d,
        lambda d: (
            len(d.find_elements(By.CSS_SELECTOR, "#steps .step")) > 5
            and not d.find_element(By.ID, "progress").is_displayed()
        ),
    )
    shown = [float(e.get_attribute("data-alpha")) for e in d.find_elements(By.CSS_SELECTOR, "#steps .step")]
    assert shown == sorted(shown) and len(shown) in (6, 7) and set(shown) > {0.0, 0.25, 0.5, 0.75, 1.0}

    d.set_window_size(390, 844)  # phone width: one column, nothing wider than the screen
    assert d.execute_script("return document.documentElement.scrollWidth") <= 390 + 1
    d.save_screenshot(str(SHOTS / "studio-phone.png"))
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []


def test_errors_appear_inline_in_words(service, browser):
    from selenium.webdriver.common.by import By

    d = browser
    d.set_window_size(1280, 800)
    d.get(f"{service.url}/studio")
    _wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#concept-list .concept"))  # the key is remembered
    d.find_element(By.ID, "run-gair").click()  # nothing picked
    _wait(d, lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "Pick at least one concept" in d.find_element(By.ID, "error").text
