"""picows broadcast peer (uvloop): a message goes to every other socket on the same path."""

import argparse
from collections import defaultdict

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_create_server

rooms: defaultdict[bytes, set[WSTransport]] = defaultdict(set)


class Member(WSListener):
    def __init__(self, path: bytes) -> None:
        self.room = rooms[path]

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.room.add(transport)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.room.discard(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type in (WSMsgType.TEXT, WSMsgType.BINARY):
            payload = frame.get_payload_as_bytes()
            for other in self.room:
                if other is not transport:
                    other.send(frame.msg_type, payload)


async def main(port: int) -> None:
    server = await ws_create_server(lambda r: Member(r.path), "127.0.0.1", port)
    print(f"picows broadcast listening on http://127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    uvloop.run(main(parser.parse_args().port))
