"""``sockworker serve --reload``: a supervisor that runs the server as a child process and
starts it again when a Python file changes (watchfiles, as uvicorn and granian use).

On a change the new code is checked first: a short-lived ``python`` imports the MODULE:APP
target (as ``serve`` does) and exits. If that fails (a syntax error in the edit, an exception
at import, no such App), its traceback is logged (logger ``sockworker.reload``, ERROR) and the
old child keeps serving, its sockets open; the next change is checked again. If it loads, the
child gets SIGHUP: it closes every socket with 1012 (service restart), so that clients
reconnect at once, and exits; a new child then serves the new code on the same port. Objects'
storage is kept (it is on disk, in the same data directory). A child that fails to start all
the same (the port taken meanwhile) is logged and started again at the next change.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

logger = logging.getLogger("sockworker.reload")

#: How long a child may take past its shutdown timeout before it is killed.
EXIT_GRACE = 5.0
#: How long the check of an edit may take (importing the app) before it counts as failed.
CHECK_TIMEOUT = 60.0
#: What the check runs: the import of ``serve`` (``cli.load_app``), and nothing else.
CHECK = "import sys; from sockworker.cli import check_app; sys.exit(check_app(sys.argv[1]))"


def free_port(host: str) -> int:
    """A port free now on ``host`` (for ``--port 0``: every child must bind the same one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class Reloader:
    """Runs ``argv`` (a ``sockworker serve`` without ``--reload``) and restarts it on changes."""

    def __init__(
        self, argv: Sequence[str], dirs: Sequence[str], shutdown_timeout: float, target: str
    ) -> None:
        try:
            import watchfiles
        except ImportError:
            raise SystemExit(
                "sockworker: --reload needs watchfiles: pip install 'sockworker[reload]'"
            ) from None
        self.watchfiles = watchfiles
        self.argv = list(argv)
        self.target = target
        self.dirs = [str(Path(d).resolve()) for d in dirs]
        for directory in self.dirs:
            if not Path(directory).is_dir():
                raise SystemExit(f"sockworker: --reload-dir {directory} is not a directory")
        self.wait = shutdown_timeout + EXIT_GRACE
        self.stop = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()

    @staticmethod
    def _env() -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not k.startswith("SOCKWORKER_RELOAD")}

    def start(self) -> None:
        self.child = subprocess.Popen(self.argv, env=self._env())

    def loads(self) -> bool:
        """Whether the app's code, as it is now, imports (in a process of its own, which exits);
        if not, what went wrong is logged."""
        try:
            done = subprocess.run(
                [sys.executable, "-c", CHECK, self.target],
                env=self._env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                timeout=CHECK_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            logger.error(
                "the new code of %s did not load within %.0f s; %s",
                self.target,
                CHECK_TIMEOUT,
                self._kept(),
            )
            return False
        if done.returncode == 0:
            return True
        if self.stop.is_set():  # (a Ctrl-C reached the check too: it says nothing of the code)
            return False
        logger.error(
            "the new code of %s does not load; %s:\n%s",
            self.target,
            self._kept(),
            (done.stderr or done.stdout).rstrip() or f"exit status {done.returncode}",
        )
        return False

    def _kept(self) -> str:
        if self.child is not None and self.child.poll() is None:
            return "the old code keeps serving"
        return "nothing serves until an edit that loads"

    def end(self, signum: int) -> int | None:
        """Signals the child and waits for it; kills it after the grace."""
        child = self.child
        if child is None or child.poll() is not None:
            return None if child is None else child.returncode
        child.send_signal(signum)
        try:
            return child.wait(self.wait)
        except subprocess.TimeoutExpired:
            logger.warning("the server did not exit within %.0f s: killed", self.wait)
            child.kill()
            return child.wait()

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        logger.info("watching %s for changes", ", ".join(self.dirs))
        self.start()
        try:
            for changes in self.watchfiles.watch(
                *self.dirs,
                watch_filter=self.watchfiles.PythonFilter(),
                stop_event=self.stop,
                raise_interrupt=False,
            ):
                names = sorted({os.path.relpath(path) for _, path in changes})
                logger.info("changed: %s; checking the new code", ", ".join(names))
                if not self.loads():
                    continue
                child = self.child
                if child is not None and child.poll() is not None:
                    logger.warning(
                        "the server had exited (status %s); starting it again", child.returncode
                    )
                else:
                    logger.info("the new code loads; restarting")
                self.end(signal.SIGHUP)
                self.start()
        finally:
            rc = self.end(signal.SIGTERM)
        return 0 if rc in (None, 0) else 1


def child_argv(
    argv: Sequence[str], drop: Sequence[str], drop_valued: Sequence[str], extra: Sequence[str]
) -> list[str]:
    """A child ``sockworker`` command line (for ``--reload`` and ``--workers``): ``argv``
    without the flags in ``drop`` and the options (with their values) in ``drop_valued``, then
    ``extra``."""
    out: list[str] = [sys.executable, "-m", "sockworker"]
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in drop:
            continue
        name = arg.split("=", 1)[0]
        if name in drop_valued:
            skip = "=" not in arg
            continue
        out.append(arg)
    return [*out, *extra]


def reload_argv(argv: Sequence[str], port: int) -> list[str]:
    """The child's command line: ``argv`` without ``--reload`` and ``--reload-dir``, with a
    fixed ``--port``."""
    return child_argv(argv, ("--reload",), ("--reload-dir", "--port"), ("--port", str(port)))
