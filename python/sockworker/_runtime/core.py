"""``Runtime``: one run of an app. It owns the native server, the one Python thread's part of
it (the asyncio loop), and the lifecycle (serve, graceful shutdown); it dispatches each batch of
the core's events to the part of the runtime that handles it:

- ``Requests`` (requests.py): HTTP requests, to the Worker's ``fetch``;
- the sockets (``Services.sockets``) and ``Objects`` (host.py): socket events, alarms, commits;
- ``Outgoing`` (connecting.py): outgoing sockets being opened;
- ``Gate`` (gate.py) and ``Metering`` (metering.py): the output gate and the meter.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterable
from typing import Final

from .. import _current, _loop, _native, cpu
from ..websocket import CloseCode, WebSocket
from . import access
from .cluster import CLUSTER_PATH, Nodes
from .connecting import Outgoing
from .contract import AppLike
from .host import ObjectHost, Objects, adopt_by_current_host
from .requests import Requests
from .services import Services

logger = logging.getLogger("sockworker")

#: Seconds a graceful shutdown waits for sockets to close (``--shutdown-timeout``).
SHUTDOWN_GRACE = 10.0
#: Where Durable Object storage lives when neither App(data_dir=) nor --data-dir says.
DEFAULT_DATA_DIR = "./.sockworker/data"

# The event kinds, as module constants (a global is read faster than a module attribute).
_EV_REQUEST: Final = _native.EV_REQUEST
_EV_MESSAGE: Final = _native.EV_MESSAGE
_EV_CLOSE: Final = _native.EV_CLOSE
_EV_ERROR: Final = _native.EV_ERROR
_EV_DRAINED: Final = _native.EV_DRAINED
_EV_ALL_CLOSED: Final = _native.EV_ALL_CLOSED
_EV_CONNECTED: Final = _native.EV_CONNECTED
_EV_FETCHED: Final = _native.EV_FETCHED
_EV_ALARM: Final = _native.EV_ALARM
_EV_RELEASED: Final = _native.EV_RELEASED
_EV_COMMIT_FAILED: Final = _native.EV_COMMIT_FAILED
_EV_BODY: Final = _native.EV_BODY
_EV_REQUEST_BODY: Final = _native.EV_REQUEST_BODY


def _cluster_args(app: AppLike) -> tuple[str, str, str, float, float] | None:
    """What the core needs of ``app.cluster`` (empty node id and address: the bound address)."""
    settings = app.cluster
    if settings is None:
        return None
    if not app.namespaces:
        raise ValueError("cluster mode is for apps with Durable Objects (durable_objects=...)")
    return (
        settings.dsn,
        settings.node_id or "",
        settings.advertise or "",
        float(settings.lease),
        float(settings.renew),
    )


def _metrics_args(app: AppLike) -> tuple[str, int, bool, int, float, list[str]] | None:
    """The metrics listener's (host, port, dashboard, top accounts, messages per request,
    allowed client networks)."""
    if app.metrics_port is None:
        return None
    return (
        app.metrics_host,
        app.metrics_port,
        app.dashboard,
        app.metrics_accounts,
        float(app.pricing.messages_per_request),
        list(app.metrics_allow),
    )


class Runtime:
    """Owns the native server for one run of an app and dispatches its events."""

    def __init__(
        self,
        app: AppLike,
        host: str,
        port: int,
        io_threads: int,
        certfile: str | None = None,
        keyfile: str | None = None,
        shutdown_timeout: float = SHUTDOWN_GRACE,
        *,
        reuse_port: bool = False,
        link_port: int | None = None,
    ) -> None:
        limits = app.limits
        self.app = app
        every = [limits] + [kind.limits for kind in app.namespaces.values()]
        reactor = _loop.reactor_of(asyncio.get_running_loop()) if io_threads == 0 else None
        if io_threads == 0 and reactor is None:
            logger.debug("not on sockworker's event loop: one I/O thread instead of none")
            io_threads = 1
        self.io_threads = io_threads
        self.server = _native.Server(
            host,
            port,
            limits=limits._socket_limits(),
            io_threads=io_threads,
            metering=app.metering,
            certfile=certfile,
            keyfile=keyfile,
            # The watchdog looks every tenth of the smallest CPU or wall limit (5 to 100 ms).
            smallest_cpu_limit=min(
                [lim.cpu_ms for lim in every] + [lim.wall_ms for lim in every if lim.wall_ms]
            )
            / 1000,
            # Storage exists for apps with Durable Objects.
            data_dir=os.fspath(app.data_dir or DEFAULT_DATA_DIR) if app.namespaces else None,
            durability=app.durability,
            allowed_origins=app.allowed_origins,
            log_blocked_after=float(limits.log_blocked_after),
            on_blocked=lambda kind, seconds: self.services.metering.on_blocked(kind, seconds),
            compression=app.compression,
            reactor=reactor,
            cluster=_cluster_args(app),
            reuse_port=reuse_port,
            link_port=link_port,
            metrics=_metrics_args(app),
            meter=app.meter._native,
            access_log=app.access_log,
            stream_request_bodies=app.stream_request_bodies,
        )
        self.access_log = app.access_log
        self.shutdown_timeout = float(shutdown_timeout)
        self.scheme = "https" if certfile else "http"
        self.loop = asyncio.get_running_loop()
        self.services = Services(app, self.server, self.loop)
        self.objects = Objects(self.services, app.namespaces)
        self.requests = Requests(self.services)
        self.outgoing = Outgoing(self.services, self.objects)
        if app.cluster is not None:
            self.services.nodes = Nodes(self.services, self.objects, app.cluster, self.outgoing)
        self.stopped = self.loop.create_future()
        #: Done once ``run`` serves (its dispatcher and meter are set up).
        self.started: asyncio.Future[None] = self.loop.create_future()
        self.shutting_down = False

    # -- what `_current.Serving` asks of the runtime --------------------------------------------

    def current_slot(self) -> _native.Slot | None:
        return self.services.metering.current_slot()

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = self.loop
        server = self.server
        host, port = server.address
        shown = f"[{host}]" if ":" in host else host
        loop.add_reader(server.fileno(), self.dispatch)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.shutdown)
        loop.add_signal_handler(signal.SIGHUP, self.restart)
        previous_factory = loop.get_task_factory()
        _current.set_serving(self)
        metering = self.services.metering
        metering.start()
        loop.set_task_factory(
            cpu.task_factory(server if metering.on else None, adopt_by_current_host)
        )
        threads = self.io_threads
        mode = "single-thread" if threads == 0 else f"{threads} I/O thread{'s' * (threads > 1)}"
        logger.info("listening on %s://%s:%d (%s)", self.scheme, shown, port, mode)
        metrics = server.metrics_address
        if metrics is not None:
            mhost = f"[{metrics[0]}]" if ":" in metrics[0] else metrics[0]
            pages = " and the dashboard at /_sockworker" if self.app.dashboard else ""
            logger.info("metrics on http://%s:%d/metrics%s", mhost, metrics[1], pages)
        nodes = self.services.nodes
        if nodes is not None:
            nodes.start()
            logger.info(
                "cluster node %s (lease %g s, renewed every %g s)",
                nodes.node_id,
                nodes.settings.lease,
                nodes.settings.renew,
            )
        self.started.set_result(None)
        try:
            await self.stopped
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            loop.remove_reader(server.fileno())
            # Before the server: the hosts' open databases hold its storage (and the lock of
            # its data directory).
            if self.services.nodes is not None:
                self.services.nodes.stop()
            self.objects.retire_all()
            server.stop()
            self.services.cancel_tasks()
            _current.set_serving(None)
            self.outgoing.stop()
            loop.set_task_factory(previous_factory)
            self.services.gate.stop()
            metering.stop()
            logger.info("stopped")

    def shutdown(
        self, code: int = CloseCode.GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Stops accepting and closes every socket with ``code`` (1001; 1012 for a restart,
        SIGHUP); the run ends when all are closed."""
        if self.shutting_down or self.stopped.done():
            return
        self.shutting_down = True
        logger.info("shutting down: closing %d sockets with %d", self.server.open_sockets, code)
        self.server.shutdown(code, reason)
        self.loop.call_later(self.shutdown_timeout, self._stop)

    def restart(self) -> None:
        """SIGHUP (``--reload`` sends it): a shutdown whose sockets are closed with 1012
        (service restart), so that clients reconnect at once."""
        self.shutdown(CloseCode.SERVICE_RESTART, "service restart")

    def _stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    # -- the hot path: one call per batch of core events -----------------------------------------

    def dispatch(self) -> None:
        try:
            self._dispatch(self.server.drain())
        finally:
            # Charges the batch's CPU time, and writes what its handlers sent in as few system
            # calls as it can.
            self.server.flush()

    def _dispatch(self, events: Iterable[_native.Event]) -> None:
        sockets = self.services.sockets
        done = False
        while not done:
            event: _native.Event | None = None
            # One try around the loop (free in CPython 3.11) rather than one per event: a bug of
            # ours in one event is logged and must not cost the rest of the batch. Handlers' own
            # exceptions are handled where they run. Iterating the batch tells the core which
            # event runs (CPU accounting, the CPU-limit watchdog). Each test reads event[0], so
            # that mypy knows the event's shape in its branch (the stub types each kind).
            try:
                for event in events:
                    if event[0] == _EV_MESSAGE:
                        socket = sockets.get(event[1]) or self.revive(event[1])
                        if socket is not None:
                            socket._on_message(event[2])
                    elif event[0] == _EV_REQUEST:
                        self.requests.on_request(*event[1:])
                    elif event[0] == _EV_CLOSE:
                        socket = sockets.pop(event[1], None)
                        if socket is None and event[5] is not None:
                            socket = self.revive_closed(event[5])
                        if socket is not None:
                            socket._on_close(event[2], event[3], event[4])
                            if self.access_log:
                                self.log_closed(socket, event[2])
                    elif event[0] == _EV_ERROR:
                        socket = sockets.get(event[1]) or self.revive(event[1])
                        if socket is not None:
                            socket._on_error(event[2])
                    elif event[0] == _EV_DRAINED:
                        socket = sockets.get(event[1])
                        if socket is not None:
                            socket._on_drained()
                    elif event[0] == _EV_RELEASED:
                        self.services.gate.on_released(event[1], event[2])
                    elif event[0] == _EV_ALARM:
                        self.objects.on_alarm(event[1], event[2], event[3], event[4])
                    elif event[0] == _EV_COMMIT_FAILED:
                        self.objects.on_commit_failed(event[1], event[2])
                    elif event[0] == _EV_ALL_CLOSED:
                        self._stop()
                    elif event[0] == _EV_CONNECTED:
                        self.outgoing.on_connected(*event[1:])
                    elif event[0] == _EV_BODY:
                        self.requests.streams.on_body(event[1], event[2])
                    elif event[0] == _EV_REQUEST_BODY:
                        self.requests.streams.on_request_body(event[1], event[2], event[3])
                    elif event[0] == _EV_FETCHED:
                        self.outgoing.on_fetched(event[1], event[2], event[3])
                done = True
            except Exception:
                shown = event[:2] if event is not None else None
                logger.exception("internal error dispatching event %r", shown)

    def log_closed(self, socket: WebSocket, code: int) -> None:
        """The access log's record of a closed WebSocket (not of the cluster's own links)."""
        url = socket.url
        if url is not None and url.partition("://")[2].partition("/")[2] == CLUSTER_PATH[1:]:
            return
        host = socket._object
        name = f"{host.kind.binding}:{host.id}" if isinstance(host, ObjectHost) else None
        # (A socket revived from hibernation for its close has no slot of its own: the close
        # event's, billed now, is the socket's.)
        slot = socket._slot or self.services.metering.current_slot()
        access.websocket_closed(socket._handle, url, code, slot, name)

    def revive(self, socket_id: int) -> WebSocket | None:
        """The socket of a hibernated object: a new Python object for it (the object itself
        is rebuilt by the handler call that follows)."""
        handle = self.server.socket(socket_id)
        nodes = self.services.nodes
        if nodes is not None and handle is not None:
            relayed = nodes.relay(handle)
            if relayed is not None:
                return relayed
        host = self.objects.of_socket(handle) if handle is not None else None
        if host is None or handle is None:
            return None
        return host.revive(handle)

    def revive_closed(self, handle: _native.SocketHandle) -> WebSocket | None:
        nodes = self.services.nodes
        if nodes is not None:
            relayed = nodes.relay(handle)
            if relayed is not None:
                return relayed
        host = self.objects.of_socket(handle)
        return WebSocket._revive(handle, self.services, host) if host is not None else None
