"""granian echo peer: an RSGI app under `granian --interface rsgi --ws` (uvloop), echo on any path.

`python granian_echo.py --port P` runs the same as, from this folder,
`granian --interface rsgi --ws --loop uvloop --workers 1 --port P granian_echo:app`.
"""

import argparse
from pathlib import Path
from typing import Any

from granian.rsgi import WebsocketMessageType


async def app(scope: Any, proto: Any) -> None:
    if scope.proto != "ws":
        proto.response_str(200, [("content-type", "text/plain")], "granian echo\n")
        return
    transport = await proto.accept()
    while True:
        msg = await transport.receive()
        if msg.kind == WebsocketMessageType.bytes:
            await transport.send_bytes(msg.data)
        elif msg.kind == WebsocketMessageType.string:
            await transport.send_str(msg.data)
        else:
            break


if __name__ == "__main__":
    from granian import Granian
    from granian.constants import Interfaces, Loops

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    Granian(
        f"{Path(__file__).stem}:app",
        address="127.0.0.1",
        port=parser.parse_args().port,
        interface=Interfaces.RSGI,
        websockets=True,
        loop=Loops.uvloop,
        workers=1,
        working_dir=Path(__file__).parent,
    ).serve()
