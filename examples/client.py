"""A resilient client for the echo example: sends a few messages and prints the echoes.

Start the server, then run this script (stop and restart the server meanwhile to see it
reconnect and deliver what was sent while the server was down)::

    sockworker serve examples.echo:app --port 8787
    python examples/client.py [ws://127.0.0.1:8787/echo]
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from sockworker.client import Client, ConnectFailed

URL = "ws://127.0.0.1:8787/echo"
COUNT = 5


async def main(url: str) -> int:
    client = Client(url, max_attempts=10, backoff_max=2.0, idle_timeout=30.0)
    client.on("open", lambda event: print(f"open (attempt {event.attempt})"))
    client.on("reconnecting", lambda event: print(f"retrying in {event.delay:.2f}s: {event.error}"))

    def closed(event: Any) -> None:
        print(f"close {event.code} {event.reason!r}")

    client.on("close", closed)
    async with client:
        try:
            for i in range(COUNT):
                client.send(f"hello {i}")  # queued until the (lazy) connection is open
            client.send(b"\x00binary\xff")
            for _ in range(COUNT + 1):
                echo = await asyncio.wait_for(client.receive(), 30)
                print(f"echo: {echo!r}")
        except ConnectFailed as exc:
            print(f"gave up: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else URL)))
