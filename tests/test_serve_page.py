"""The web chat page of ``omnitok serve``, driven in headless Chromium against a live server on a tiny bundle.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them when it runs as root) and the
``selenium`` package; Selenium Manager is never asked to download anything (the driver and browser paths are
given). The bundle has random weights, so the checks are about the page: requests go out, replies stream into
bubbles, audio arrives, errors are shown.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
API_KEY = "page-test-key"
WAIT_S = 20

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not found (Debian package: apt-get install chromium)"),
    pytest.mark.skipif(
        CHROMEDRIVER is None, reason="chromedriver not found (Debian package: apt-get install chromium-driver)"
    ),
]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from serve_helpers import build_tiny_bundle

    return build_tiny_bundle(tmp_path_factory.mktemp("page"))


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[str]:
    from serve_helpers import live_server

    with live_server(bundle) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--autoplay-policy=no-user-gesture-required",
        "--window-size=900,800",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: webdriver.Chrome, condition: Callable[[Any], Any], what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(condition)
    except TimeoutException:
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error-text")]
        status = driver.find_element(By.ID, "status").text
        logs = [e["message"] for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
        pytest.fail(f"timed out waiting for {what}; errors shown: {errors}; status: {status!r}; console: {logs}")


def open_page(driver: webdriver.Chrome, url: str, max_tokens: int = 6) -> None:
    """Load the page with fresh settings: a small token limit and a fixed seed keep replies quick and repeatable.

    (Sampled, not greedy: greedy decoding of the random model streams only partial UTF-8, i.e. no text at all.)
    """
    driver.get(url + "/")
    driver.execute_script(
        "localStorage.clear(); localStorage.setItem('omnitok.maxTokens', arguments[0]);"
        "localStorage.setItem('omnitok.temperature', '1'); localStorage.setItem('omnitok.seed', '3');",
        str(max_tokens),
    )
    driver.refresh()
    wait_for(driver, lambda d: d.find_element(By.ID, "model-name").text not in ("", "connecting…"), "the model name")


def send(driver: webdriver.Chrome, text: str) -> None:
    box = driver.find_element(By.ID, "message")
    box.send_keys(text)
    driver.find_element(By.ID, "send-btn").click()


def replies(driver: webdriver.Chrome, state: str = "done") -> list[Any]:
    return driver.find_elements(By.CSS_SELECTOR, f".msg.assistant[data-state={state}]")


def assert_no_error(driver: webdriver.Chrome) -> None:
    shown = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".msg.error, .status.bad")]
    assert not shown, shown


def test_text_reply_streams_into_a_bubble(server: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    open_page(browser, server)
    assert browser.find_element(By.ID, "model-name").text != "offline"
    send(browser, "a large red circle in the top left")
    [user] = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    assert user.find_element(By.CSS_SELECTOR, ".text").text == "a large red circle in the top left"
    [reply] = wait_for(browser, lambda d: replies(d), "the assistant reply")
    assert reply.find_element(By.CSS_SELECTOR, ".text").text.strip(), reply.text
    assert_no_error(browser)
    # the history goes with the next request: a second turn adds two more bubbles
    send(browser, "draw a small star")
    wait_for(browser, lambda d: len(replies(d)) == 2, "the second reply")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user")) == 2
    assert browser.find_element(By.ID, "send-btn").is_displayed()
    assert not browser.find_element(By.ID, "stop-btn").is_displayed()
    browser.save_screenshot(str(tmp_path / "chat-text.png"))


def test_voice_reply_plays_chunks_and_leaves_an_audio_player(server: str, browser: webdriver.Chrome) -> None:
    open_page(browser, server, max_tokens=4)
    Select(browser.find_element(By.ID, "reply-kind")).select_by_value("voice")
    voices = [o.get_attribute("value") for o in Select(browser.find_element(By.ID, "voice")).options]
    assert voices == ["us_m1", "us_f1"], voices  # from /v1/omnitok/info
    Select(browser.find_element(By.ID, "voice")).select_by_value("us_f1")
    send(browser, "say this: hello there")
    [reply] = wait_for(browser, lambda d: replies(d), "the spoken reply")
    assert_no_error(browser)
    assert int(reply.get_attribute("data-chunks") or 0) >= 1  # PCM chunks were scheduled as they arrived
    audio = reply.find_element(By.CSS_SELECTOR, "audio")
    duration = wait_for(
        browser,
        lambda d: d.execute_script("const a = arguments[0]; return a.readyState >= 1 && a.duration", audio),
        "the reply's WAV to load",
    )
    assert duration > 0


def test_image_attachment_goes_with_the_message(server: str, browser: webdriver.Chrome, tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.full((48, 48, 3), 255, np.uint8)
    pixels[8:30, 10:34] = (220, 30, 30)
    picture = tmp_path / "square.png"
    Image.fromarray(pixels).save(picture)
    open_page(browser, server)
    browser.find_element(By.ID, "image-input").send_keys(str(picture))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#attachments img"), "the thumbnail")
    send(browser, "Describe the picture.")
    wait_for(browser, lambda d: replies(d), "the reply about the picture")
    assert_no_error(browser)
    [user] = browser.find_elements(By.CSS_SELECTOR, ".msg.user")
    src = user.find_element(By.CSS_SELECTOR, "img").get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    assert not browser.find_elements(By.CSS_SELECTOR, "#attachments img")  # the composer is empty again
    browser.save_screenshot(str(tmp_path / "chat-image.png"))


def test_api_error_is_shown_and_the_key_fixes_it(bundle: Path, browser: webdriver.Chrome) -> None:
    from serve_helpers import live_server

    with live_server(bundle, api_key=API_KEY) as url:
        open_page(browser, url)
        send(browser, "hello")
        error = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error .error-text"), "the error")
        message = error[0].text
        assert "401" in message and len(message) > len("Error: (HTTP 401 Unauthorized)"), message
        assert browser.find_element(By.ID, "settings").is_displayed()  # the page asks for the key
        key = browser.find_element(By.ID, "api-key")
        key.clear()
        key.send_keys(API_KEY)
        browser.find_element(By.CSS_SELECTOR, "#settings-form button[type=submit]").click()
        browser.find_element(By.CSS_SELECTOR, ".msg.error .actions button").click()  # "Try again"
        wait_for(browser, lambda d: replies(d), "the reply once the key is set")
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error")
        assert browser.execute_script("return localStorage.getItem('omnitok.apiKey')") == API_KEY


def test_stop_button_aborts_the_stream(server: str, browser: webdriver.Chrome) -> None:
    open_page(browser, server, max_tokens=300)  # a long spoken answer: text first, then its speech
    Select(browser.find_element(By.ID, "reply-kind")).select_by_value("voice")
    send(browser, "a large red circle in the top left")
    stop = browser.find_element(By.ID, "stop-btn")
    assert stop.is_displayed()
    assert not browser.find_element(By.ID, "send-btn").is_displayed()
    stop.click()
    wait_for(browser, lambda d: replies(d, "stopped"), "the reply to stop")
    assert_no_error(browser)
    assert browser.find_element(By.ID, "send-btn").is_displayed()
    # the page and the server both carry on
    browser.execute_script("localStorage.setItem('omnitok.maxTokens', '4')")
    Select(browser.find_element(By.ID, "reply-kind")).select_by_value("text")
    send(browser, "draw a small star")
    wait_for(browser, lambda d: replies(d), "a reply after the stop")
    assert_no_error(browser)
