#!/usr/bin/env python3
"""Memory per socket: N sockets held open against a server, its RSS growth per socket, and where
the allocators say it went (jemalloc's live allocations per size class for the Rust side, glibc's
mallinfo2 and Python's allocated blocks for the Python side), with the peers' RSS per idle socket
in the same rounds.

Cases (bench/apps/memory_bench.py):

- **hibernated**: the sockets spread over 100 Durable Objects that accept them as hibernatable
  and hibernate after 0.5 s; measured once every room has hibernated.
- **idle**: the standard API (`server.accept()` and a listener), the objects stay in Python.
- **wss-hibernated**, **wss-idle**: the same over TLS (`--certfile`/`--keyfile`, a certificate
  made for the run with trustme). The load generator speaks no TLS: this script holds the sockets
  itself (`--hold-wss`, a child process with one echo per socket, like the idle scenario).
- **picows**, **websockets**: the peers' echo servers (bench/peers), idle sockets.

sockworker runs in the single-thread mode (`--io-threads 0`) and with one I/O thread
(`--io-threads 1`). The load generator's idle scenario opens the sockets (one echo each, source
addresses spread over 127.0.1.x); the script waits until the server has accepted all of them, the
rooms have hibernated and the RSS has settled (jemalloc purges freed pages after a second), then
reads the figures. `--baseline DIR` adds another build (a copy of its python/ folder, made with
`cp -r python DIR` after building it) to the same rounds.

    python bench/memory.py                        # 5,000 sockets, 3 rounds
    python bench/memory.py -n 10000 --rounds 1 --cases hibernated
    python bench/memory.py -n 3000 --rounds 1 --cases wss-idle,wss-hibernated --modes 0,2
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # the runner's helpers
    HOST,
    LOADGEN_CPU,
    PEERS,
    ROOT,
    SERVER_CPU,
    build_loadgen,
    free_port,
    pin,
    raise_nofile,
    stop,
    wait_for_port,
)

APP = "bench.apps.memory_bench:app"
SETTLE_LIMIT = 60.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Certs:
    """A CA and a server certificate for 127.0.0.1, in PEM files under `root` (trustme)."""

    def __init__(self, root: Path) -> None:
        import trustme  # a test dependency: only the TLS cases need it

        ca = trustme.CA()
        cert = ca.issue_cert(HOST)
        self.certfile, self.keyfile, self.cafile = (
            root / "server-chain.pem",
            root / "server-key.pem",
            root / "ca.pem",
        )
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.certfile))
        cert.private_key_pem.write_to_path(str(self.keyfile))
        ca.cert_pem.write_to_path(str(self.cafile))

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile))


def memory(port: int, certs: Certs | None = None) -> dict[str, Any]:
    scheme, context = ("https", certs.client_context()) if certs else ("http", None)
    url = f"{scheme}://{HOST}:{port}/memory"
    with urllib.request.urlopen(url, timeout=30, context=context) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


async def hold_wss(port: int, path: str, n: int, cafile: Path, ready_file: Path) -> None:
    """Opens `n` wss:// sockets (one echo each), writes `ready_file`, and holds them until
    killed: the TLS counterpart of the load generator's idle scenario."""
    context = ssl.create_default_context(cafile=str(cafile))
    limit = asyncio.Semaphore(100)
    held: list[asyncio.StreamWriter] = []

    async def one(index: int) -> None:
        async with limit:
            # Source addresses spread over 127.0.1.x, as the load generator's are.
            source = (f"127.0.1.{1 + index % 200}", 0)
            reader, writer = await asyncio.open_connection(
                HOST, port, ssl=context, local_addr=source
            )
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise RuntimeError(f"no upgrade: {head[:80]!r}")
            # A masked text frame "ping" (mask 0), echoed unmasked.
            writer.write(b"\x81\x84\x00\x00\x00\x00ping")
            if await reader.readexactly(6) != b"\x81\x04ping":
                raise RuntimeError("no echo")
            held.append(writer)

    await asyncio.gather(*(one(i) for i in range(n)))
    await asyncio.to_thread(ready_file.write_text, str(len(held)))
    await asyncio.Event().wait()


def start(cmd: list[str], env: dict[str, str], port: int, pinned: bool) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        pin(SERVER_CPU, cmd, pinned),
        cwd=ROOT,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    problem = wait_for_port(port, proc, timeout=60)
    if problem:
        stop(proc)
        raise RuntimeError(problem)
    return proc


def settle(pid: int, ready: Any) -> int:
    """Polls until `ready()` holds and two RSS readings half a second apart agree within 1%."""
    deadline = time.monotonic() + SETTLE_LIMIT
    last = -1
    while time.monotonic() < deadline:
        if ready():
            now = rss_kib(pid)
            if last > 0 and abs(now - last) <= last / 100:
                return now
            last = now
        time.sleep(0.5)
    raise RuntimeError("the server did not settle")


def open_sockets(
    binary: Path, port: int, path: str, n: int, pid: int, pinned: bool, hold: float
) -> subprocess.Popen[bytes]:
    cmd = [
        str(binary), "idle", "--url", f"ws://{HOST}:{port}{path}", "--server-pid", str(pid),
        "-c", str(n), "--hold", str(hold), "--duration", "1", "--warmup", "0",
    ]  # fmt: skip
    return subprocess.Popen(
        pin(LOADGEN_CPU, cmd, pinned), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def open_wss_sockets(
    port: int, path: str, n: int, certs: Certs, pinned: bool, ready_file: Path
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--hold-wss", str(port), "--path", path,
        "-n", str(n), "--cafile", str(certs.cafile), "--ready-file", str(ready_file),
    ]  # fmt: skip
    return subprocess.Popen(
        pin(LOADGEN_CPU, cmd, pinned), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def classes_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[int, int]:
    b = dict(map(tuple, before["jemalloc"]["classes"]))
    a = dict(map(tuple, after["jemalloc"]["classes"]))
    return {size: a.get(size, 0) - b.get(size, 0) for size in sorted(set(a) | set(b))}


def measure_sockworker(
    python_dir: Path, io_threads: int, case: str, n: int, binary: Path, pinned: bool
) -> dict[str, Any]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "sockworker", "serve", APP, "--host", HOST, "--port", str(port),
        "--io-threads", str(io_threads), "--log-level", "warning",
    ]  # fmt: skip
    workdir = Path(tempfile.mkdtemp(prefix="sw-memory-"))
    certs = Certs(workdir) if case.startswith("wss-") else None
    if certs:
        cmd += ["--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile)]
    env = {"PYTHONPATH": f"{python_dir}{os.pathsep}{ROOT}"}
    proc = start(cmd, env, port, pinned)
    path = "/rooms" if case.endswith("hibernated") else "/echo"

    def hold(count: int, seconds: float, name: str) -> tuple[subprocess.Popen[bytes], Any]:
        """Opens `count` sockets held for `seconds` (TLS: until killed); and when they are."""
        if certs is None:
            return open_sockets(binary, port, path, count, proc.pid, pinned, hold=seconds), None
        ready_file = workdir / name
        holder = open_wss_sockets(port, path, count, certs, pinned, ready_file)
        return holder, ready_file.exists

    try:
        # A warm-up through a whole cycle (open, hibernate, close), so first-use allocations
        # and caches are there before the baseline.
        warm, warm_opened = hold(200, 1.5, "warm")
        if warm_opened is not None:
            settle(proc.pid, warm_opened)
            warm.kill()
        warm.wait(timeout=120)
        settle(proc.pid, lambda: memory(port, certs)["resident_rooms"] == 0)
        before = memory(port, certs)
        rss0, fds0 = rss_kib(proc.pid), fds(proc.pid)
        want = before["accepted"] + n
        loader, opened = hold(n, SETTLE_LIMIT + 60, "held")
        try:
            if case.endswith("hibernated"):

                def ready() -> bool:
                    m = memory(port, certs)
                    return bool(m["accepted"] >= want and m["resident_rooms"] == 0)
            else:

                def ready() -> bool:
                    return bool(memory(port, certs)["accepted"] >= want)

            rss1 = settle(proc.pid, lambda: (opened is None or opened()) and ready())
            after = memory(port, certs)
            fds1 = fds(proc.pid)
        finally:
            loader.kill()
            loader.wait()
    finally:
        stop(proc)
    je0, je1 = before["jemalloc"], after["jemalloc"]
    keys = ("allocated", "active", "resident", "metadata")
    per = {key: (je1[key] - je0[key]) / n for key in keys}
    glibc = {
        key: (after["glibc"].get(key, 0) - before["glibc"].get(key, 0)) / n
        for key in ("in_use", "free")
    }
    return {
        "rss_per_socket": (rss1 - rss0) * 1024 / n,
        "fds_per_socket": (fds1 - fds0) / n,
        "jemalloc_per_socket": per,
        "glibc_per_socket": glibc,
        "python_blocks_per_socket": (after["python_blocks"] - before["python_blocks"]) / n,
        "python_objects_per_socket": (after["python_objects"] - before["python_objects"]) / n,
        "classes_per_socket": {
            size: count / n for size, count in classes_delta(before, after).items() if count
        },
    }


def measure_peer(name: str, n: int, binary: Path, pinned: bool) -> dict[str, Any]:
    port = free_port()
    cmd = [sys.executable, str(PEERS / f"{name}_echo.py"), "--port", str(port)]
    proc = start(cmd, {}, port, pinned)
    try:
        rss0 = rss_kib(proc.pid)
        loader = open_sockets(binary, port, "/", n, proc.pid, pinned, hold=SETTLE_LIMIT + 60)
        try:
            want = fds(proc.pid) + n
            rss1 = settle(proc.pid, lambda: fds(proc.pid) >= want)
        finally:
            loader.kill()
            loader.wait()
    finally:
        stop(proc)
    return {"rss_per_socket": (rss1 - rss0) * 1024 / n}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("-n", type=int, default=5000, help="sockets (default 5,000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", default="hibernated,idle,wss-hibernated,wss-idle,picows,websockets")
    ap.add_argument("--modes", default="0,1", help="--io-threads values for sockworker")
    ap.add_argument("--baseline", type=Path, help="another build's python/ folder, measured too")
    ap.add_argument("--no-pin", action="store_true")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--json", type=Path, help="write every measurement here")
    # The TLS cases' holder of sockets, run by this script in a child process.
    ap.add_argument("--hold-wss", type=int, metavar="PORT", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--cafile", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ready-file", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    raise_nofile()
    if args.hold_wss:
        asyncio.run(hold_wss(args.hold_wss, args.path, args.n, args.cafile, args.ready_file))
        return 0
    pinned = not args.no_pin
    binary = build_loadgen(args.no_build) / "loadgen"
    builds = {"sockworker": ROOT / "python"}
    if args.baseline:
        builds["baseline"] = args.baseline.resolve()
    runs: dict[str, list[dict[str, Any]]] = {}
    for round_no in range(args.rounds):
        print(f"round {round_no + 1}/{args.rounds}", flush=True)
        for case in args.cases.split(","):
            if case in ("picows", "websockets"):
                labels = [(case, None, 0)]
            else:
                labels = [
                    (f"{build} {case} io-threads={mode}", path, int(mode))
                    for mode in args.modes.split(",")
                    for build, path in builds.items()
                ]
            for label, path, mode in labels:
                try:
                    if path is None:
                        result = measure_peer(label, args.n, binary, pinned)
                    else:
                        result = measure_sockworker(path, mode, case, args.n, binary, pinned)
                except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                    print(f"  {label}: failed: {e}", flush=True)
                    continue
                runs.setdefault(label, []).append(result)
                extra = ""
                if "jemalloc_per_socket" in result:
                    je = result["jemalloc_per_socket"]
                    extra = (
                        f"; jemalloc allocated {je['allocated']:,.0f} active {je['active']:,.0f}"
                        f" resident {je['resident']:,.0f}; glibc in use"
                        f" {result['glibc_per_socket']['in_use']:,.0f};"
                        f" {result['python_objects_per_socket']:.2f} Python objects,"
                        f" {result['fds_per_socket']:.2f} fds"
                    )
                print(f"  {label}: RSS {result['rss_per_socket']:,.0f} B/socket{extra}", flush=True)
    print(f"\nmedians over {args.rounds} round(s), {args.n:,} sockets:")
    for label, results in runs.items():
        rss = statistics.median(r["rss_per_socket"] for r in results)
        print(f"  {label}: RSS {rss:,.0f} B/socket")
        if "classes_per_socket" in results[-1]:
            classes = results[-1]["classes_per_socket"]
            shown = ", ".join(
                f"{count:.2f} x {size}" for size, count in classes.items() if abs(count) >= 0.05
            )
            rest = sum(
                size * count for size, count in classes.items() if abs(count) < 0.05
            )  # tables and vectors shared by all sockets, grown with them
            print(f"    jemalloc live allocations per socket (size classes, last round): {shown}")
            print(f"    and {rest:,.0f} B/socket in shared tables and vectors")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
