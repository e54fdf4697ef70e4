"""A worker whose answers make the core and the runtime log, for the tests of logging.

Routes
  GET /bad-header   a response header the core refuses (a line break in its value): 500
  GET /boom         raises (logged with its traceback): 500
  anything else     200 "ok"
"""

from __future__ import annotations

from typing import Any

import sockworker as sw


def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    if request.path == "/bad-header":
        return sw.Response("never sent", headers={"x-broken": "line\nbreak"})
    if request.path == "/boom":
        raise RuntimeError("loud-boom")
    return sw.Response("ok")


app = sw.App(fetch=fetch)
