"""examples/cursors.py in real browsers (headless Chromium, tests/browser.py): two windows on one
board; the mouse moving in one shows its cursor, at its place, in the other; a window that
joins later draws the cursors already there; a window that leaves takes its cursor away."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from tests.browser import WAIT, browsers, needs_chromium
from tests.support import ServerProcess

pytestmark = needs_chromium

SIZE = (1000, 800)


@pytest.fixture
def two_windows() -> Iterator[tuple[WebDriver, WebDriver]]:
    with browsers(2, window_size=SIZE) as (first, second):
        yield first, second


def _join(driver: WebDriver, url: str) -> str:
    """Opens the board; returns the id the board gave this window."""
    driver.get(url)
    WebDriverWait(driver, WAIT).until(
        lambda d: d.find_element(By.ID, "me").text, "the board never said hello"
    )
    return str(driver.find_element(By.ID, "me").text)


def _cursor_at(driver: WebDriver, who: str) -> tuple[float, float] | None:
    """Where the window draws `who`'s cursor (fractions of the board), None if it does not."""
    found = driver.execute_script(
        "const el = document.getElementById('cursor-' + arguments[0]);"
        "return el && [Number(el.dataset.x), Number(el.dataset.y),"
        " el.parentElement.id, getComputedStyle(el).left];",
        who,
    )
    if not found:
        return None
    x, y, parent, left = found
    assert parent == "board" and left.endswith("px"), found
    return float(x), float(y)


def _wait_cursor(driver: WebDriver, who: str, x: float, y: float) -> None:
    def there(d: WebDriver) -> bool:
        at = _cursor_at(d, who)
        return at is not None and abs(at[0] - x) < 0.02 and abs(at[1] - y) < 0.02

    WebDriverWait(driver, WAIT).until(there, f"{who}'s cursor never showed near ({x}, {y})")


def _move(driver: WebDriver, x: float, y: float) -> None:
    """Moves the real (WebDriver) mouse to fraction (x, y) of the board."""
    board = driver.find_element(By.ID, "board")
    width, height = board.size["width"], board.size["height"]
    # (Offsets are from the element's centre.)
    dx, dy = int((x - 0.5) * width), int((y - 0.5) * height)
    ActionChains(driver).move_to_element_with_offset(board, dx, dy).perform()


@pytest.mark.timeout(120)
def test_a_cursor_moves_in_the_other_window_and_leaves(
    two_windows: tuple[WebDriver, WebDriver],
) -> None:
    server = ServerProcess("examples.cursors:app")
    try:
        ann, bob = two_windows
        url = f"{server.http}/board/{uuid.uuid4().hex[:8]}"
        ann_id, bob_id = _join(ann, url), _join(bob, url)
        assert ann_id != bob_id

        _move(ann, 0.25, 0.5)
        _wait_cursor(bob, ann_id, 0.25, 0.5)
        _move(ann, 0.75, 0.2)
        _wait_cursor(bob, ann_id, 0.75, 0.2)
        assert _cursor_at(ann, ann_id) is None  # nobody is shown their own cursor
        _move(bob, 0.1, 0.9)
        _wait_cursor(ann, bob_id, 0.1, 0.9)

        # Bob reloads: a new participant, told where ann is before she moves again; the old
        # bob leaves ann's board.
        new_bob = _join(bob, url)
        _wait_cursor(bob, ann_id, 0.75, 0.2)
        WebDriverWait(ann, WAIT).until(
            lambda d: _cursor_at(d, bob_id) is None, "the old bob's cursor stayed"
        )

        # Ann leaves (navigates away): her cursor goes from bob's board.
        ann.get("about:blank")
        WebDriverWait(bob, WAIT).until(
            lambda d: _cursor_at(d, ann_id) is None, "ann's cursor stayed after she left"
        )
        assert bob.find_element(By.ID, "me").text == new_bob
    finally:
        assert server.stop() == 0, server.log_tail()
