"""Headless Chromium for the browser tests: Debian's chromium and chromium-driver (installed by
`make browser-deps`, which CI runs), driven with Selenium. A module of browser tests marks itself
``pytestmark = needs_chromium`` and starts its browsers with ``launch()`` or ``browsers(n)``."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = shutil.which("chromium")
WAIT = 15.0  # seconds a test waits for something to show on a page

needs_chromium = pytest.mark.skipif(
    CHROMEDRIVER is None or CHROMIUM is None,
    reason="needs chromium and chromium-driver: run `make browser-deps`",
)


def launch(window_size: tuple[int, int] | None = None) -> WebDriver:
    """One headless Chromium; the caller quits it."""
    options = Options()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    if window_size is not None:
        options.add_argument(f"--window-size={window_size[0]},{window_size[1]}")
    return webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)


@contextlib.contextmanager
def browsers(n: int, window_size: tuple[int, int] | None = None) -> Iterator[list[WebDriver]]:
    """``n`` browsers, all quit on the way out (also those started before one failed to)."""
    started: list[WebDriver] = []
    try:
        for _ in range(n):
            started.append(launch(window_size))
        yield started
    finally:
        for driver in started:
            driver.quit()
