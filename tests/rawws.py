"""A deliberately minimal WebSocket client on asyncio streams, for hand-made (and broken) frames.

Third-party clients refuse to send malformed frames or to stop reading, so these tests build the
bytes themselves: opcodes, RSV bits, masking and fragmentation are all under the test's control.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import struct
from dataclasses import dataclass
from types import TracebackType

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
RSV1, RSV2, RSV3 = 0x4, 0x2, 0x1


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def mask_payload(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    n = len(payload)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


def encode_frame(
    opcode: int,
    payload: bytes = b"",
    *,
    fin: bool = True,
    rsv: int = 0,
    mask: bool = True,
    length: int | None = None,
) -> bytes:
    """One frame as a client would send it. `length` overrides the announced payload length."""
    n = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if n < 126:
        header = bytes([first, mask_bit | n])
    elif n < 1 << 16:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", n)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", n)
    if not mask:
        return header + payload
    key = os.urandom(4)
    return header + key + mask_payload(payload, key)


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


@dataclass
class Frame:
    fin: bool
    rsv: int
    opcode: int
    payload: bytes


@dataclass
class HttpReply:
    status: int
    reason: str
    headers: dict[str, str]  # names lower-cased; repeated headers joined with ", "
    raw: bytes


async def read_http_head(reader: asyncio.StreamReader, within: float = 10.0) -> HttpReply:
    """Read a response status line and headers; fails clearly if the server just hangs up."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), within)
    except asyncio.IncompleteReadError as exc:
        raise AssertionError(f"no HTTP response, connection closed after {exc.partial!r}") from None
    lines = head.decode("latin-1").split("\r\n")
    version, status, *reason = lines[0].split(" ", 2)
    assert version.startswith("HTTP/1."), lines[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return HttpReply(int(status), reason[0] if reason else "", headers, head)


async def open_tcp(
    port: int, *, rcvbuf: int | None = None, sndbuf: int | None = None, limit: int = 1 << 20
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to 127.0.0.1:port; socket buffer sizes are set before connecting so they stick."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if sndbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return await asyncio.open_connection(sock=sock, limit=limit)
    except BaseException:
        sock.close()
        raise


def upgrade_request(
    port: int,
    path: str,
    key: str | None,
    version: str | None = "13",
    extra: dict[str, str] | None = None,
) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
    ]
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWebSocket:
    """A connected, upgraded socket. Use `async with await RawWebSocket.connect(...)`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, reply: HttpReply
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.reply = reply

    @classmethod
    async def connect(
        cls,
        port: int,
        path: str = "/ws",
        *,
        rcvbuf: int | None = None,
        sndbuf: int | None = None,
        headers: dict[str, str] | None = None,
        limit: int = 1 << 20,
        first: bytes = b"",
    ) -> RawWebSocket:
        """`limit` bounds what asyncio reads ahead into user space (it buffers up to 2 x limit
        before it stops reading the socket). `first` (frames) is written in the same write as
        the upgrade request, before the 101 is read."""
        reader, writer = await open_tcp(port, rcvbuf=rcvbuf, sndbuf=sndbuf, limit=limit)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(upgrade_request(port, path, key, extra=headers) + first)
            reply = await read_http_head(reader)
            assert reply.status == 101, reply.raw
            assert reply.headers.get("sec-websocket-accept") == accept_for(key), reply.raw
            assert reply.headers.get("upgrade", "").lower() == "websocket", reply.raw
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer, reply)

    async def __aenter__(self) -> RawWebSocket:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drop the TCP connection (no Close frame)."""
        self.writer.close()
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(self.writer.wait_closed(), 5)

    def abort(self) -> None:
        """Drop the TCP connection immediately, discarding anything unsent."""
        self.writer.transport.abort()

    def write_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def send_frame(self, opcode: int, payload: bytes = b"", **kw: object) -> None:
        self.writer.write(encode_frame(opcode, payload, **kw))  # type: ignore[arg-type]
        await self.writer.drain()

    async def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            await self.send_frame(OP_TEXT, message.encode())
        else:
            await self.send_frame(OP_BINARY, message)

    async def recv_frame(self, within: float = 10.0) -> Frame:
        try:
            return await asyncio.wait_for(self._recv_frame(), within)
        except TimeoutError:
            raise AssertionError(f"no frame from the server within {within} s") from None

    async def _recv_frame(self) -> Frame:
        b0, b1 = await self.reader.readexactly(2)
        assert not b1 & 0x80, "server frames must not be masked"
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(n) if n else b""
        return Frame(bool(b0 & 0x80), (b0 >> 4) & 0x7, b0 & 0x0F, payload)

    async def recv_message(self, within: float = 10.0) -> str | bytes:
        """Next whole data message (reassembling fragments); control frames other than close are
        skipped. A close frame raises AssertionError."""
        parts: list[bytes] = []
        opcode = None
        while True:
            frame = await self.recv_frame(within)
            if frame.opcode in (OP_PING, OP_PONG):
                continue
            assert frame.opcode != OP_CLOSE, f"got close {parse_close(frame.payload)}"
            if opcode is None:
                opcode = frame.opcode
            parts.append(frame.payload)
            if frame.fin:
                data = b"".join(parts)
                return data.decode() if opcode == OP_TEXT else data

    async def recv_close(self, within: float = 10.0) -> tuple[int | None, str]:
        """Skip data frames until the server's Close frame; returns (code, reason)."""
        try:
            while True:
                frame = await self.recv_frame(within)
                if frame.opcode == OP_CLOSE:
                    return parse_close(frame.payload)
        except asyncio.IncompleteReadError as exc:
            raise AssertionError(
                f"connection ended without a Close frame (after {len(exc.partial)} bytes)"
            ) from None

    async def wait_eof(self, within: float = 10.0) -> bytes:
        """Read until the server closes the TCP connection; returns what came before EOF."""
        chunks = []
        async with asyncio.timeout(within):
            while True:
                try:
                    chunk = await self.reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def parse_close(payload: bytes) -> tuple[int | None, str]:
    if len(payload) < 2:
        return None, ""
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode()
