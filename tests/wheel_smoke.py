"""Smoke test of an installed sockworker (``make test-wheel``): run it with the Python of a venv
that has only the wheel installed, from outside the source tree.

It checks that the package imported is the installed one (with its native module, ``py.typed``
and the stub), serves an echo app with the installed ``sockworker`` command, talks to it with
``websockets`` (a dependency of the wheel) and stops it with SIGTERM (exit status 0).
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from websockets.asyncio.client import connect

ECHO_APP = """
import sockworker as sw

def fetch(request, env, ctx):
    client, server = sw.WebSocketPair()
    server.accept()
    server.add_event_listener("message", lambda event: server.send(event.data))
    return sw.Response(status=101, websocket=client)

app = sw.App(fetch=fetch)
"""


def check_installed_package() -> None:
    import sockworker
    from sockworker import _native

    package = Path(sockworker.__file__).parent
    prefix = Path(sys.prefix).resolve()
    assert prefix in package.resolve().parents, f"{package} is not installed in {prefix}"
    assert Path(_native.__file__).name.endswith(".abi3.so"), _native.__file__
    for shipped in ("py.typed", "_native.pyi"):
        assert (package / shipped).is_file(), f"{shipped} is missing from the wheel"


async def talk(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.send("hello from the wheel")
        assert await asyncio.wait_for(ws.recv(), 10) == "hello from the wheel"
        await ws.send(b"\x00\xffbinary")
        assert await asyncio.wait_for(ws.recv(), 10) == b"\x00\xffbinary"


def main() -> int:
    check_installed_package()
    command = Path(sys.executable).parent / "sockworker"
    with tempfile.TemporaryDirectory() as app_dir:
        Path(app_dir, "echo_app.py").write_text(ECHO_APP)
        server = subprocess.Popen(
            [str(command), "serve", "echo_app:app", "--port", "0"],
            cwd=app_dir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert server.stdout is not None
        try:
            lines = []
            for line in server.stdout:
                lines.append(line)
                match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
                if match:
                    break
            else:
                raise AssertionError(f"the server did not start:\n{''.join(lines)}")
            asyncio.run(talk(int(match.group(1))))
            server.send_signal(signal.SIGTERM)
            rest, _ = server.communicate(timeout=15)
            assert server.returncode == 0, f"exit status {server.returncode}:\n{rest}"
        finally:
            if server.poll() is None:
                server.kill()
    print(f"wheel smoke test passed: {Path(sys.prefix).name} served and echoed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
