"""Streamed HTTP bodies (SPEC §2.1). A ``Response`` whose body is an iterator is answered with
its head once the first chunk is there, then one chunk at a time, each pulled from the iterator
once the core has room for it (a BODY event says so when it had none). A client that goes away
ends the stream: the iterator is closed (``aclose``), its ``finally`` runs.

A request body read as it arrives (``App(stream_request_bodies=True)``) is asked of the core a
piece at a time; a REQUEST_BODY event brings each."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from .. import _native
from ..errors import RequestBodyError
from ..http import Response

logger = logging.getLogger("sockworker")

_ROOM = _native.STREAM_ROOM
_FULL = _native.STREAM_FULL


def _bytes(chunk: object) -> bytes:
    if isinstance(chunk, bytes):
        return chunk
    if isinstance(chunk, str):
        return chunk.encode("utf-8")
    if isinstance(chunk, bytearray | memoryview):
        return bytes(chunk)
    raise TypeError(f"a streamed body yields bytes or str chunks, not {type(chunk).__name__}")


class _Pump:
    """One body being streamed: its task, and what it waits for."""

    __slots__ = ("gone", "room", "task")

    def __init__(self, task: asyncio.Task[object] | None) -> None:
        self.task = task
        self.room: asyncio.Future[bool] | None = None
        self.gone = False


class _Feed:
    """A request body read as it arrives (``http.BodyFeed``)."""

    __slots__ = ("native", "streams")

    def __init__(self, native: _native.RequestFeed, streams: Streams) -> None:
        self.native = native
        self.streams = streams

    async def read(self) -> bytes | None:
        streams = self.streams
        native = self.native
        piece: asyncio.Future[tuple[bytes | None, str | None]] = streams.loop.create_future()
        streams.pieces[native.id] = piece
        native.read()
        data, error = await piece
        if error is not None:
            raise RequestBodyError(error)
        return data


class Streams:
    """The bodies being streamed, by the core's stream id."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.pumps: dict[int, _Pump] = {}
        self.pieces: dict[int, asyncio.Future[tuple[bytes | None, str | None]]] = {}

    def feed(self, native: _native.RequestFeed) -> _Feed:
        return _Feed(native, self)

    def on_request_body(self, feed_id: int, data: bytes | None, error: str | None) -> None:
        """The core's REQUEST_BODY event: the piece asked for (``None``: the end), or why the
        body cannot be read."""
        piece = self.pieces.pop(feed_id, None)
        if piece is not None and not piece.done():
            piece.set_result((data, error))

    def on_body(self, stream_id: int, open_: bool) -> None:
        """The core's BODY event: room again (``open_``), or the client is gone."""
        pump = self.pumps.get(stream_id)
        if pump is None:
            return
        room = pump.room
        if room is not None and not room.done():
            room.set_result(open_)
        elif not open_:
            # Waiting for the iterator (which may wait for anything): it is cancelled, so that
            # its finally runs now rather than at its next chunk.
            pump.gone = True
            if pump.task is not None:
                pump.task.cancel()

    async def respond(
        self,
        reply: _native.PendingReply,
        response: Response,
        what: str,
        failed: Callable[[BaseException], None],
    ) -> None:
        """Answers ``reply`` with ``response``'s streamed body; ``what`` names the request in
        the log; ``failed(error)`` answers an exception raised before the first chunk."""
        iterator = response.stream
        assert iterator is not None
        ok = False
        writer: _native.ResponseStream | None = None
        pump: _Pump | None = None
        try:
            try:
                first = _bytes(await anext(iterator))
            except StopAsyncIteration:
                ok = True
                reply.respond(response.status, response.headers.raw(), b"")
                return
            except Exception as error:
                failed(error)
                return
            writer = reply.respond_stream(response.status, response.headers.raw())
            pump = _Pump(asyncio.current_task())
            stream_id = writer.id
            self.pumps[stream_id] = pump
            ok = await self._pump(writer, pump, iterator, first)
        except asyncio.CancelledError:
            if pump is None or not pump.gone:
                raise
            logger.debug("the client of %s went away during its streamed body", what)
        except Exception:
            logger.exception("exception streaming the body of %s (the connection is closed)", what)
        finally:
            if writer is not None:
                self.pumps.pop(writer.id, None)
                writer.finish(ok)
            await _close(iterator, what)

    async def _pump(
        self,
        writer: _native.ResponseStream,
        pump: _Pump,
        iterator: AsyncIterator[bytes | str],
        chunk: bytes,
    ) -> bool:
        """Writes ``chunk`` and the rest; true once the iterator is exhausted, false if the
        client went away."""
        while True:
            written = writer.write(chunk)
            if written == _FULL:
                room = pump.room = self.loop.create_future()
                try:
                    if not await room:
                        return False
                finally:
                    pump.room = None
            elif written != _ROOM:
                return False
            try:
                chunk = _bytes(await anext(iterator))
            except StopAsyncIteration:
                return True


async def _close(iterator: AsyncIterator[object], what: str) -> None:
    close = getattr(iterator, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception:
        logger.exception("exception closing the streamed body of %s", what)
