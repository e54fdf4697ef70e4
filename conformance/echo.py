"""The echo app the Autobahn|Testsuite fuzzing client is run against (`make conformance`).

Every message is echoed as it came; limits are raised so that the suite's largest cases (16 MiB
messages in 9.*) are within them, as the suite expects of a server under test. Compression
(permessage-deflate) is on, for cases 12 and 13; the others offer none.
"""

from __future__ import annotations

from typing import Any

import sockworker as sw


def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    client, server = sw.WebSocketPair()
    server.accept()
    server.add_event_listener("message", lambda event: server.send(event.data))
    return sw.Response(status=101, websocket=client)


app = sw.App(fetch=fetch, limits=sw.Limits(max_message_size=32 << 20), compression=True)
