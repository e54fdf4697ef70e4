"""Server-Sent Events: GET /clock streams the time once a second (text/event-stream), each
event sent as it is yielded; a browser's ``new EventSource("/clock")`` shows them.

    sockworker serve examples.sse:app --port 8787
    curl -N http://127.0.0.1:8787/clock
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import sockworker as sw


async def clock() -> AsyncIterator[str]:
    # When the client goes away, the generator is closed (a finally here would run then).
    while True:
        yield f"data: {time.strftime('%H:%M:%S')}\n\n"
        await asyncio.sleep(1)


def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    if request.path == "/clock":
        return sw.Response(clock(), headers={"content-type": "text/event-stream"})
    return sw.Response("try /clock\n", status=404)


app = sw.App(fetch=fetch)
