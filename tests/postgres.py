"""A throwaway PostgreSQL cluster for the cluster-mode tests and demo, and a TCP proxy that can
cut one node off from it. `Postgres` owns a directory (data, socket, log); `TcpProxy` owns sockets.

`python -m tests.postgres serve DIR [--port 55432]` runs a cluster in DIR until Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import pwd
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg

# initdb refuses to run as root; Debian's packages make this user.
SERVER_USER = "postgres"
# What the fixtures' error says, so that nobody has to guess how to get the binaries.
INSTALL_HINT = "run `make postgres-deps` (it installs Debian's postgresql package; needs root)"
PG_CTL_TIMEOUT = 60
LOG_TAIL_LINES = 40

# A test server: durability off (a crash of the machine loses nothing a test needs), room for
# many nodes' connection pools, little memory, and no replication to set up.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "full_page_writes": "off",
    "synchronous_commit": "on",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "timezone": "UTC",
    "log_timezone": "UTC",
}


class PostgresError(RuntimeError):
    """A PostgreSQL program failed; the message carries its output and the server log's tail."""


class PostgresNotFound(PostgresError):
    """No PostgreSQL server binaries (initdb, pg_ctl, postgres) on this machine."""


def find_bindir() -> Path:
    """The directory of initdb/pg_ctl/postgres: `pg_config --bindir` if pg_config is on PATH
    (and that directory has a server: Debian's libpq-dev ships pg_config without one), else the
    newest /usr/lib/postgresql/*/bin, else the directory of an initdb found on PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.CalledProcessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
            if out:
                candidates.append(Path(out))
    versions = Path("/usr/lib/postgresql").glob("*/bin")
    candidates += sorted(versions, key=_version_key, reverse=True)
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    for bindir in candidates:
        if all((bindir / name).is_file() for name in ("initdb", "pg_ctl", "postgres", "createdb")):
            return bindir
    raise PostgresNotFound(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found via pg_config, in "
        f"/usr/lib/postgresql/*/bin or on PATH: {INSTALL_HINT}"
    )


def _version_key(bindir: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", bindir.parent.name)) or (0,)


def free_port() -> int:
    """An ephemeral port free at the time of asking (start() retries if it is taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def sql(dsn: str, query: str, *params: Any) -> list[tuple[Any, ...]]:
    """Run one statement on an autocommit connection; its rows, or [] if it returns none."""
    with (
        psycopg.connect(dsn, autocommit=True, connect_timeout=10) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(query, params or None)
        return cursor.fetchall() if cursor.description is not None else []


class Postgres:
    """One PostgreSQL cluster in `directory` (a new temporary one by default, removed by
    close()), on 127.0.0.1:`port` (an ephemeral one by default, kept across restarts).
    Nothing runs until start(); a context manager starts it and closes it."""

    sql = staticmethod(sql)

    def __init__(self, directory: str | Path | None = None, port: int | None = None) -> None:
        self.bindir = find_bindir()
        self._owns_directory = directory is None
        if directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="sw-pg-"))
        else:
            self.directory = Path(directory).resolve()
            self.directory.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.directory / "data"
        self.log_path = self.directory / "postgres.log"
        self._port_given = port is not None
        self.port = port if port is not None else free_port()
        # As root, the server runs as SERVER_USER, which must own what it writes.
        self._as_server_user: list[str] = []
        if os.geteuid() == 0:
            self._as_server_user = ["runuser", "-u", SERVER_USER, "--"]
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.directory, user.pw_uid, user.pw_gid)
        self._closed = False
        # A test run that dies before close() should not leave a postmaster behind.
        atexit.register(self.close)

    # -- the server's life

    def start(self) -> None:
        """initdb on first use, then `pg_ctl -w start`: returns once it accepts connections."""
        if self._closed:
            raise PostgresError("this Postgres is closed")
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb()
        for attempt in range(3):
            try:
                self._pg_ctl(
                    "start",
                    "-w",
                    "-t",
                    str(PG_CTL_TIMEOUT),
                    "-l",
                    str(self.log_path),
                    "-o",
                    f"-p {self.port}",
                )
                return
            except PostgresError as error:
                # Another process can take an ephemeral port between free_port() and the bind.
                if self._port_given or attempt == 2 or "could not bind" not in str(error):
                    raise
                self.port = free_port()

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl -m MODE stop` (smart, fast or immediate); waits until the server is gone.
        A server that is already stopped is fine."""
        if not self.running:
            return
        self._pg_ctl("stop", "-w", "-t", str(PG_CTL_TIMEOUT), "-m", mode)

    def restart(self) -> None:
        """stop(), then start(): same port, same data."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend, as a crash would; start() recovers from
        the WAL. Returns once none of them runs."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        # Stopped first, so that it forks no backend between the listing and the kill.
        os.kill(pid, signal.SIGSTOP)
        victims = [pid, *_children(pid)]
        # These are not our children (pg_ctl detaches the postmaster), so there is no waitpid;
        # a pidfd (Linux) becomes readable when its process has exited, zombie or not.
        exits = []
        for victim in victims:
            with contextlib.suppress(ProcessLookupError):
                exits.append(os.pidfd_open(victim))
                os.kill(victim, signal.SIGKILL)
        try:
            deadline = time.monotonic() + 10
            for fd in exits:
                ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise PostgresError(f"postmaster {pid} survived SIGKILL\n{self.log_tail()}")
        finally:
            for fd in exits:
                os.close(fd)
        # A dead postmaster whose zombie nobody has reaped yet still looks alive to the next
        # postmaster's lock-file checks (kill(pid, 0) succeeds); it is dead, so its locks go.
        for lock in (self.data_dir / "postmaster.pid", self._socket_path(".lock")):
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()

    @property
    def running(self) -> bool:
        """Whether a postmaster runs on this data directory (`pg_ctl status`)."""
        if not (self.data_dir / "PG_VERSION").is_file():
            return False
        status = self._run(
            [
                *self._as_server_user,
                str(self.bindir / "pg_ctl"),
                "status",
                "-D",
                str(self.data_dir),
            ],
            check=False,
        )
        return status.returncode == 0

    def close(self) -> None:
        """Stop the server (fast) and remove the directory if it is a temporary one."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        try:
            if self.running:
                try:
                    self.stop()
                except PostgresError:
                    self.kill()
        finally:
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> Postgres:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- databases

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new, empty, uniquely named database; its DSN."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        self._run(
            [
                str(self.bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                SERVER_USER,
                name,
            ]
        )
        return self.dsn(name)

    def drop_database(self, dsn: str) -> None:
        """Drop the database a DSN of this server names, closing the sessions still on it."""
        name = dsn.rsplit("/", 1)[1].split("?", 1)[0]
        sql(self.dsn(), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # -- diagnostics

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no server log at {self.log_path})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"server log ({self.log_path}), last {lines} lines:\n{tail}"

    def _socket_path(self, suffix: str = "") -> Path:
        return self.directory / f".s.PGSQL.{self.port}{suffix}"

    # -- programs

    def _initdb(self) -> None:
        self._run(
            [
                *self._as_server_user,
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                SERVER_USER,
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        settings = {
            **SERVER_SETTINGS,
            "unix_socket_directories": str(self.directory),
        }
        lines = [
            f"{key} = '{value.replace(chr(39), chr(39) * 2)}'" for key, value in settings.items()
        ]
        # Appending keeps the file's owner (the server user, who made it).
        with (self.data_dir / "postgresql.conf").open("a") as config:
            config.write("\n# tests/postgres.py\n" + "\n".join(lines) + "\n")

    def _pg_ctl(self, *args: str) -> None:
        self._run(
            [*self._as_server_user, str(self.bindir / "pg_ctl"), *args, "-D", str(self.data_dir)]
        )

    def _run(self, argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        # PG* variables of the caller's shell (PGHOST, PGDATA...) would redirect the programs.
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                env=env,
                cwd=self.directory,
                timeout=PG_CTL_TIMEOUT + 30,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise PostgresError(f"{' '.join(argv)} timed out\n{self.log_tail()}") from error
        if check and result.returncode != 0:
            raise PostgresError(
                f"{' '.join(argv)} exited with {result.returncode}\n"
                f"{result.stdout}{result.stderr}\n{self.log_tail()}"
            )
        return result

    def _postmaster_pid(self) -> int | None:
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        pid = int(first_line)
        return pid if _alive(pid) else None


def _children(pid: int) -> list[int]:
    """Direct children of a process (a postmaster's backends and auxiliary processes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if _stat_fields(int(entry.name))[1] == str(pid):
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def _stat_fields(pid: int) -> list[str]:
    # The command name sits in parentheses and may itself contain spaces or parentheses.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()


class TcpProxy:
    """127.0.0.1:`port` forwarded to target_host:target_port, one thread per direction of each
    connection. cut() drops every connection and refuses new ones (accepted, then closed at
    once) until restore(): a node behind it loses PostgreSQL while the others keep it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._connections: set[_ProxiedConnection] = set()
        self._cut = False
        self._closed = False
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True
        )
        self._acceptor.start()

    def dsn_for(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{dbname}"

    def cut(self) -> None:
        """Close every connection through the proxy (their peers see EOF before this returns)
        and refuse new ones."""
        with self._lock:
            self._cut = True
            connections = list(self._connections)
        for connection in connections:
            connection.shut()

    def restore(self) -> None:
        """Forward new connections again (the ones cut stay closed)."""
        with self._lock:
            self._cut = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.cut()
        # shutdown() wakes the thread blocked in accept(); close() alone would not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join()
        self._listener.close()
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.join()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was shut down by close()
            with self._lock:
                refuse = self._cut or self._closed
            if refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            connection = _ProxiedConnection(client, upstream, self._forget)
            with self._lock:
                # cut() may have run while this one was connecting upstream.
                refuse = self._cut or self._closed
                if not refuse:
                    self._connections.add(connection)
            if refuse:
                connection.shut()
                connection.close_sockets()
            else:
                connection.start()

    def _forget(self, connection: _ProxiedConnection) -> None:
        with self._lock:
            self._connections.discard(connection)


class _ProxiedConnection:
    """A client socket and its upstream socket, pumped both ways. Either side ending ends
    both; the sockets are closed by the last pump to finish, never under a running recv()."""

    def __init__(
        self,
        client: socket.socket,
        upstream: socket.socket,
        on_closed: Callable[[_ProxiedConnection], None],
    ) -> None:
        self.client = client
        self.upstream = upstream
        self._on_closed = on_closed
        self._lock = threading.Lock()
        self._running = 2
        self._threads = [
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True),
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True),
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            if thread.ident is not None:
                thread.join()

    def shut(self) -> None:
        """Both sockets, both directions: the peers see EOF and both pumps' recv() returns."""
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close_sockets(self) -> None:
        self.client.close()
        self.upstream.close()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self.shut()
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self.close_sockets()
                self._on_closed(self)


def _serve(directory: str, port: int) -> None:
    signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before the server starts, so that a signal during start-up still stops it.
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    server = Postgres(directory, port=port)
    try:
        server.start()
        print(server.dsn(), flush=True)
        print(
            f"PostgreSQL {server.bindir} serving {server.data_dir}; Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        signal.sigwait(signals)
    finally:
        server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.postgres")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="start (or reuse) a cluster in DIR, print its DSN, run until Ctrl-C/SIGTERM"
    )
    serve.add_argument("directory", metavar="DIR")
    serve.add_argument("--port", type=int, default=55432)
    args = parser.parse_args(argv)
    try:
        _serve(args.directory, args.port)
    except PostgresError as error:
        sys.exit(f"python -m tests.postgres: {error}")


if __name__ == "__main__":
    main()
