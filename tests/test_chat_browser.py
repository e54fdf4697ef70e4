"""The chat example in a real browser: headless Chromium (tests/browser.py) driven with
Selenium. Two people join one room, talk, and leave, through the page the worker serves and the
browser's own WebSocket; after the server restarts, a newcomer sees what was said (the room's
history is in its storage)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import WAIT, browsers, needs_chromium
from tests.support import ServerProcess

pytestmark = needs_chromium


@pytest.fixture
def two_browsers() -> Iterator[tuple[WebDriver, WebDriver]]:
    with browsers(2) as (first, second):
        yield first, second


def _log(driver: WebDriver) -> str:
    return str(driver.find_element(By.ID, "log").text)


def _wait_log(driver: WebDriver, text: str) -> None:
    WebDriverWait(driver, WAIT).until(lambda d: text in _log(d), f"{text!r} never appeared")


def _join(driver: WebDriver, url: str, name: str) -> None:
    driver.get(url)
    driver.find_element(By.ID, "user").send_keys(name)
    driver.find_element(By.CSS_SELECTOR, "#join button").click()
    _wait_log(driver, f"connected as {name}")


@pytest.mark.timeout(120)
def test_two_people_chat_in_the_browser(two_browsers: tuple[WebDriver, WebDriver]) -> None:
    chat = ServerProcess("examples.chat:app")
    ann, bob = two_browsers
    url = f"{chat.http}/room/browser-test"
    _join(ann, url, "ann")
    _join(bob, url, "bob")
    _wait_log(ann, "bob joined")

    ann.find_element(By.ID, "text").send_keys("hello from ann")
    ann.find_element(By.CSS_SELECTOR, "#say button").click()
    _wait_log(bob, "ann: hello from ann")
    _wait_log(ann, "ann: hello from ann")

    # The page's keep-alive: "ping" is answered "pong" by the core's auto-response.
    pong = bob.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        const ws = new WebSocket(location.href.replace(/^http/, "ws") + "?user=probe");
        ws.onopen = () => ws.send("ping");
        ws.onmessage = (event) => { if (event.data === "pong") { ws.close(); done(event.data); } };
        """
    )
    assert pong == "pong"

    bob.execute_script("ws.close(1000)")  # what closing the tab does (no bfcache questions)
    _wait_log(ann, "bob left")
    assert "bob: " not in _log(ann)

    # The room keeps its history: after a restart of the server, a newcomer reads it.
    assert chat.stop() == 0
    again = ServerProcess("examples.chat:app", ("--data-dir", str(chat.data_dir)))
    try:
        _join(bob, f"{again.http}/room/browser-test", "cy")
        _wait_log(bob, "earlier in this room:")
        _wait_log(bob, "ann: hello from ann")
    finally:
        assert again.stop() == 0


@pytest.mark.timeout(120)
def test_two_tabs_on_two_nodes_chat_in_one_room(
    two_browsers: tuple[WebDriver, WebDriver], pg_dsn: str
) -> None:
    """The cluster demo's chat (examples/cluster_chat.py): each browser on its own node."""
    nodes = [
        ServerProcess("examples.cluster_chat:app", ("--cluster", pg_dsn, "--node-id", name))
        for name in ("a", "b")
    ]
    try:
        ann, bob = two_browsers
        _join(ann, f"{nodes[0].http}/room/cluster-test", "ann")
        _join(bob, f"{nodes[1].http}/room/cluster-test", "bob")
        _wait_log(ann, "bob joined")
        bob.find_element(By.ID, "text").send_keys("hello from the other node")
        bob.find_element(By.CSS_SELECTOR, "#say button").click()
        _wait_log(ann, "bob: hello from the other node")
        _wait_log(bob, "bob: hello from the other node")
        bob.execute_script("ws.close(1000)")
        _wait_log(ann, "bob left")
    finally:
        for node in nodes:
            assert node.stop() == 0
