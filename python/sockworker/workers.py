"""``sockworker serve --workers N --cluster DSN``: N nodes of one cluster on one port, each its
own process with its own Python thread (SPEC §7, "every core of one machine").

The supervisor starts N children of the same ``serve`` command. Each binds the port with
``SO_REUSEPORT`` (the kernel spreads connections over them) and a private port of its own on
the same host, where the other nodes reach it; each is node ``BASE-wI`` (BASE: ``--node-id``,
else ``HOST:PORT``), the same name across restarts, so that a restarted worker takes its
objects back at once. A worker that exits on its own is started again after a second. SIGINT
and SIGTERM go to every worker (each shuts down gracefully) and end the supervisor; SIGHUP
restarts them one after the other.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType

from .reload import EXIT_GRACE

logger = logging.getLogger("sockworker.workers")

#: Seconds before a worker that exited on its own is started again.
RESTART_DELAY = 1.0


def die_with_parent() -> None:
    """In a child, before it runs: SIGTERM when the parent dies (even by SIGKILL), so that no
    worker is left serving on its own; and SIGINT and SIGTERM unblocked (a parent that waits
    for them with ``sigwait`` blocks them, and a child would inherit that and never stop)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


#: prctl(2): the signal a process gets when its parent dies (Linux).
PR_SET_PDEATHSIG = 1


class Workers:
    """Runs one child per command line and keeps them running until told to stop."""

    def __init__(self, argvs: Sequence[Sequence[str]], shutdown_timeout: float) -> None:
        self.argvs = [list(argv) for argv in argvs]
        self.children: list[subprocess.Popen[bytes] | None] = [None] * len(self.argvs)
        self.wait = shutdown_timeout + EXIT_GRACE
        self.stop = threading.Event()
        self.changed = threading.Event()
        self.lock = threading.Lock()

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        self.changed.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        # Each worker closes its sockets with 1012 and exits; the loop starts it again.
        for child in self.children:
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGHUP)

    def _start(self, index: int) -> None:
        child = subprocess.Popen(self.argvs[index], preexec_fn=die_with_parent)
        self.children[index] = child

        def watch() -> None:
            child.wait()
            self.changed.set()

        threading.Thread(target=watch, name=f"worker-{index}", daemon=True).start()

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)
        for index in range(len(self.argvs)):
            self._start(index)
        logger.info("%d workers started", len(self.argvs))
        while not self.stop.is_set():
            self.changed.wait()
            self.changed.clear()
            if self.stop.is_set():
                break
            for index, child in enumerate(self.children):
                if child is not None and child.poll() is not None:
                    logger.warning(
                        "worker %d exited with %s; starting it again", index, child.returncode
                    )
                    if self.stop.wait(RESTART_DELAY):
                        break
                    self._start(index)
        return self._end()

    def _end(self) -> int:
        for child in self.children:
            if child is not None and child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.wait
        failed = False
        for child in self.children:
            if child is None:
                continue
            try:
                rc = child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("a worker did not exit within %.0f s: killed", self.wait)
                child.kill()
                rc = child.wait()
            failed = failed or rc not in (0, -signal.SIGTERM)
        return 1 if failed else 0
