"""websockets broadcast peer (uvloop): a message goes to every other socket on the same path."""

import argparse
import asyncio
from collections import defaultdict

import uvloop
from websockets.asyncio.server import ServerConnection, broadcast, serve

rooms: defaultdict[str, set[ServerConnection]] = defaultdict(set)


async def member(ws: ServerConnection) -> None:
    room = rooms[ws.request.path if ws.request else "/"]
    room.add(ws)
    try:
        async for message in ws:
            broadcast([other for other in room if other is not ws], message)
    finally:
        room.discard(ws)


async def main(port: int) -> None:
    async with serve(member, "127.0.0.1", port, compression=None, max_size=16 << 20):
        print(f"websockets broadcast listening on http://127.0.0.1:{port}", flush=True)
        await asyncio.get_running_loop().create_future()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=9001)
    uvloop.run(main(parser.parse_args().port))
