"""picows echo peer (uvloop): every text or binary frame is sent back, on any path."""

import argparse

import uvloop
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server


class Echo(WSListener):
    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif frame.msg_type != WSMsgType.PONG:  # pings are answered by picows (auto pong)
            transport.send(frame.msg_type, frame.get_payload_as_memoryview(), frame.fin)


async def main(port: int) -> None:
    def factory(request: WSUpgradeRequest) -> Echo:
        return Echo()

    server = await ws_create_server(factory, "127.0.0.1", port, max_frame_size=16 << 20)
    print(f"picows echo listening on http://127.0.0.1:{port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    uvloop.run(main(parser.parse_args().port))
