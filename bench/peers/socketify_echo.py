"""socketify (uWebSockets) echo peer: every message is sent back, on any path.

socketify runs its own libuv loop (it needs the system's libuv1: `apt-get install libuv1`).
"""

import argparse
from typing import Any

from socketify import App, AppListenOptions, CompressOptions


def echo(ws: Any, message: Any, opcode: Any) -> None:
    ws.send(message, opcode)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    port = parser.parse_args().port
    app = App()
    app.ws(
        "/*",
        {
            "compression": CompressOptions.DISABLED,
            "max_payload_length": 16 << 20,
            "idle_timeout": 960,
            "max_backpressure": 64 << 20,
            "message": echo,
        },
    )
    app.any("/*", lambda res, req: res.end("socketify echo\n"))
    app.listen(
        AppListenOptions(port=port, host="127.0.0.1"),
        lambda config: print(f"socketify echo listening on http://127.0.0.1:{port}", flush=True),
    )
    app.run()
