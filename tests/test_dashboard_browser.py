"""The dashboard (``--dashboard``, at ``/_sockworker`` on the metrics listener) in a real
browser: headless Chromium (tests/browser.py) driven with Selenium. The page loads,
shows an account once it has traffic, and its numbers follow the traffic live. With
SOCKWORKER_DASHBOARD_SCREENSHOT set to a path it also saves a screenshot there: the one in
docs/topics/billing.md is made with

    SOCKWORKER_DASHBOARD_SCREENSHOT=docs/images/dashboard.png \
        .venv/bin/python -m pytest tests/test_dashboard_browser.py

(not on every run: the tracked image would change with each one)."""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait
from websockets.asyncio.client import connect
from websockets.sync.client import connect as sync_connect

from tests.browser import WAIT, browsers, needs_chromium
from tests.support import ROOT, ServerProcess

pytestmark = needs_chromium

SCREENSHOT = os.environ.get("SOCKWORKER_DASHBOARD_SCREENSHOT")


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    with browsers(1, window_size=(1200, 1000)) as (driver,):
        yield driver


def _cells(driver: WebDriver, account: str) -> list[str]:
    """The cells of the account's row in the accounts table ([] while it has none)."""
    # (Read in one script: the page replaces its rows every second, so elements found one by
    # one could be gone by the next call.)
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#accounts tr')]"
        ".map((tr) => [...tr.cells].map((td) => td.textContent));"
    )
    for cells in rows:
        if cells and cells[0] == account:
            return [str(cell) for cell in cells]
    return []


async def _chat(server: ServerProcess, account: str, room: str, messages: int) -> None:
    async with connect(f"{server.ws}/room/{room}?account={account}") as ws:
        for n in range(messages):
            await ws.send(f"m{n}")
            assert await ws.recv() == f"m{n}"


@pytest.mark.timeout(120)
def test_the_dashboard_shows_accounts_live(browser: WebDriver) -> None:
    server = ServerProcess("tests.apps.observed:app", ("--metrics-port", "0", "--dashboard"))
    try:
        port = server.wait_for_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1)
        browser.get(f"http://127.0.0.1:{port}/_sockworker")
        WebDriverWait(browser, WAIT).until(
            lambda d: "updated" in d.find_element(By.ID, "status").text, "the page never polled"
        )
        alice, bob = f"alice-{uuid.uuid4().hex[:4]}", f"bob-{uuid.uuid4().hex[:4]}"
        asyncio.run(_chat(server, alice, "lobby", 5))
        asyncio.run(_chat(server, bob, "kitchen", 2))
        # The row of alice appears, with her 5 messages in (column 4) and 5 out.
        WebDriverWait(browser, WAIT).until(
            lambda d: _cells(d, alice)[4:6] == ["5", "5"], "alice's messages never showed"
        )
        asyncio.run(_chat(server, alice, "lobby", 7))
        # The numbers update without a reload.
        WebDriverWait(browser, WAIT).until(
            lambda d: _cells(d, alice)[4] == "12", "alice's count never updated"
        )
        # A few more rounds, each seen by the page, so that the charts have a shape to show.
        expected = 12
        for extra in (9, 3, 6):
            asyncio.run(_chat(server, alice, "lobby", extra))
            asyncio.run(_chat(server, bob, "kitchen", extra // 3))
            expected += extra
            WebDriverWait(browser, WAIT).until(
                lambda d, n=expected: _cells(d, alice)[4] == str(n), "a round never showed"
            )
        objects = browser.execute_script("return document.getElementById('objects').textContent")
        assert alice in objects and re.search(r"ROOMS:[0-9a-f]{12}", objects)
        # Sockets open while the page looks: its sockets column counts them.
        with (
            sync_connect(f"{server.ws}/room/lobby?account={alice}"),
            sync_connect(f"{server.ws}/room/lobby?account={alice}"),
            sync_connect(f"{server.ws}/room/kitchen?account={bob}"),
        ):
            WebDriverWait(browser, WAIT).until(
                lambda d: _cells(d, alice)[1:2] == ["2"] and _cells(d, bob)[1:2] == ["1"],
                "the open sockets never showed",
            )
            if SCREENSHOT:
                browser.save_screenshot(str(ROOT / SCREENSHOT))
    finally:
        assert server.stop() == 0, server.log_tail()
