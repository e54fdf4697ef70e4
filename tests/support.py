"""Test harness: a real `sockworker serve` process on an ephemeral port, and small client helpers.

Tests talk to the server only over sockets; the server's log (stderr) is kept for assertions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import aiohttp
import trustme
from websockets.asyncio.client import connect as ws_connect

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(r"listening on https?://127\.0\.0\.1:(\d+)")
START_TIMEOUT = 30.0

P = ParamSpec("P")
T = TypeVar("T")


class Certs:
    """A CA and a certificate for 127.0.0.1 and localhost made at test time (trustme), in PEM
    files under `root`, with the SSL contexts of a server and a client that trusts the CA."""

    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.certfile = root / "server-chain.pem"
        self.keyfile = root / "server-key.pem"
        self.cafile = root / "ca.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.certfile))
        cert.private_key_pem.write_to_path(str(self.keyfile))
        self.ca.cert_pem.write_to_path(str(self.cafile))
        self.server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self.server_context)
        self.client_context = ssl.create_default_context()
        self.ca.configure_trust(self.client_context)
        self.other_ca = root / "other-ca.pem"
        trustme.CA().cert_pem.write_to_path(str(self.other_ca))

    def serve_args(self) -> tuple[str, ...]:
        """What `sockworker serve` takes to serve https:// and wss:// with the certificate."""
        return ("--certfile", str(self.certfile), "--keyfile", str(self.keyfile))


class ServerProcess:
    """One `python -m sockworker serve APP --port 0` child, with its log drained in a thread.
    Unless `extra` names one, it gets a data directory of its own (`self.data_dir`), kept
    until the test session ends so that a restarted server can be pointed at it."""

    def __init__(
        self,
        app: str,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        if "--data-dir" in extra:
            self.data_dir = Path(extra[extra.index("--data-dir") + 1])
        else:
            self.data_dir = Path(tempfile.mkdtemp(prefix="sw-data-"))
            extra = (*extra, "--data-dir", str(self.data_dir))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.argv = [
            sys.executable,
            "-m",
            "sockworker",
            "serve",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *extra,
        ]
        self.proc = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,
        )
        self.lines: list[str] = []
        self._eof = False
        self._cond = threading.Condition()
        self._drainer = threading.Thread(target=self._drain, name=f"log-{app}", daemon=True)
        self._drainer.start()
        try:
            match = self.wait_for_log(LISTENING, timeout=START_TIMEOUT)
        except BaseException:
            self.kill()
            raise
        self.port = int(match.group(1))
        self.http = f"http://127.0.0.1:{self.port}"
        self.ws = f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def log_text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def log_tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def wait_for_log(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, start: int = 0
    ) -> re.Match[str]:
        """Block until a log line (from index `start` on) matches `pattern`; fail with the log."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                while seen < len(self.lines):
                    match = regex.search(self.lines[seen])
                    seen += 1
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._cond.wait(remaining)
        state = "exited" if self.proc.poll() is not None else "running"
        raise AssertionError(
            f"server {self.app} ({state}, rc={self.proc.returncode}) never logged "
            f"{regex.pattern!r} within {timeout}s; log tail:\n{self.log_tail()}"
        )

    def log_mark(self) -> int:
        """Index to pass as `start=` to `wait_for_log` to see only lines logged after now."""
        with self._cond:
            return len(self.lines)

    async def wait_for_log_async(
        self, pattern: str, within: float = 10.0, start: int = 0
    ) -> re.Match[str]:
        return await asyncio.to_thread(self.wait_for_log, pattern, within, start)

    def rss_kib(self) -> int:
        """Resident set size of the server process (VmRSS from /proc), in KiB."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", status, re.MULTILINE)
        assert match, status
        return int(match.group(1))

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the server and wait; returns its exit status (None if it had to be killed)."""
        rc: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
            rc = self.wait_exit(timeout)
            if rc is None:
                self.kill()
        else:
            rc = self.proc.returncode
        self._close_pipe()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_pipe()

    def _close_pipe(self) -> None:
        self._drainer.join(timeout=5)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


async def get_json(url: str) -> Any:
    """GET a JSON document from the server with aiohttp."""
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        body = await resp.text()
        assert resp.status == 200, (url, resp.status, body)
        return json.loads(body)


async def wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    within: float,
    interval: float = 0.02,
    what: str = "condition",
) -> T:
    """Poll an external observable until it is truthy, with a hard deadline."""
    deadline = time.monotonic() + within
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}; last: {value!r}")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def healthy_client(server: ServerProcess) -> AsyncIterator[Any]:
    """A well-behaved `websockets` client that must echo before and after the test's mischief;
    afterwards a brand-new `aiohttp` connection must work too."""
    async with ws_connect(f"{server.ws}/ws?id=healthy-{uuid.uuid4().hex}") as ws:
        await ws.send("before")
        assert await asyncio.wait_for(ws.recv(), 10) == "before"
        yield ws
        await ws.send("after")
        assert await asyncio.wait_for(ws.recv(), 10) == "after"
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{server.ws}/ws?id=fresh-{uuid.uuid4().hex}") as fresh,
    ):
        await fresh.send_str("fresh")
        msg = await fresh.receive(timeout=10)
        assert (msg.type, msg.data) == (aiohttp.WSMsgType.TEXT, "fresh")
