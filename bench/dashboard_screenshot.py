"""The dashboard under load, for the docs: serves tests/apps/observed.py with the dashboard on,
drives 4 accounts (50 sockets each, every socket echoing as fast as it is answered) for
`--seconds`, and saves what headless Chromium shows to docs/images/dashboard-load.png.

    .venv/bin/python bench/dashboard_screenshot.py [--seconds 20] [--out PATH]

Needs Debian's chromium and chromium-driver (`make browser-deps`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import connect  # noqa: E402

from tests.browser import launch  # noqa: E402
from tests.support import ServerProcess  # noqa: E402

ACCOUNTS = {"acme": 80, "globex": 40, "initech": 20, "umbrella": 10}  # sockets of each


async def socket_loop(url: str, until: float, pace: float) -> int:
    sent = 0
    async with connect(url, ping_interval=None) as ws:
        while time.monotonic() < until:
            await ws.send(f"m{sent}")
            await ws.recv()
            sent += 1
            await asyncio.sleep(pace)  # pacing of the load, not synchronization
    return sent


async def load(server: ServerProcess, seconds: float) -> int:
    until = time.monotonic() + seconds
    tasks = [
        socket_loop(f"{server.ws}/room/{account}-{i % 5}?account={account}", until, 0.02)
        for account, sockets in ACCOUNTS.items()
        for i in range(sockets)
    ]
    return sum(await asyncio.gather(*tasks))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images" / "dashboard-load.png"))
    args = parser.parse_args()
    server = ServerProcess("tests.apps.observed:app", ("--metrics-port", "0", "--dashboard"))
    browser = launch((1280, 900))
    try:
        port = server.wait_for_log(r"metrics on http://127\.0\.0\.1:(\d+)/metrics").group(1)
        browser.get(f"http://127.0.0.1:{port}/_sockworker")

        async def run() -> int:
            loading = asyncio.create_task(load(server, args.seconds))
            # The page while the load runs (the charts fill over the last seconds).
            await asyncio.sleep(args.seconds - 2)  # pacing: the screenshot near the end
            await asyncio.to_thread(browser.save_screenshot, args.out)
            return await loading

        messages = asyncio.run(run())
        print(f"{messages:,} messages in {args.seconds:g} s; screenshot: {args.out}")
    finally:
        browser.quit()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
