"""``App``: a Worker, its bindings, limits and billing, and how to serve it (``run``,
``serve``). What serves it is the runtime (``sockworker._runtime``)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import resource
import signal
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from . import _loop
from ._runtime import SHUTDOWN_GRACE, ExecutionContext, Runtime
from .billing import BillingHook, Meter, Pricing
from .cluster import Cluster
from .durable import DurableObjectNamespace
from .env import Env
from .http import Request, Response
from .limits import Limits
from .logs import TEXT_FORMAT, CoreLogs

__all__ = ["App", "Env", "ExecutionContext"]

logger = logging.getLogger("sockworker")

#: Accounts with metrics labels of their own by default (``App(metrics_accounts=)``).
DEFAULT_METRICS_ACCOUNTS = 20
#: The clients that may use the metrics listener by default (``App(metrics_allow=)``): this
#: machine only.
DEFAULT_METRICS_ALLOW = ("127.0.0.0/8", "::1/128")


def metrics_networks(networks: Iterable[str], name: str = "metrics_allow") -> list[str]:
    """``networks`` (``10.0.0.0/8``, ``::1``...) as the core reads them; a malformed one is a
    ``ValueError`` naming it and ``name``."""
    if isinstance(networks, str):
        raise ValueError(f"{name} is a list of networks, not the string {networks!r}")
    out = []
    for network in networks:
        try:
            out.append(str(ipaddress.ip_network(str(network).strip(), strict=False)))
        except ValueError:
            raise ValueError(
                f"{name}: {network!r} is not an IP network (e.g. 10.0.0.0/8, ::1, 0.0.0.0/0)"
            ) from None
    if not out:
        raise ValueError(f"{name} needs one network at least (default: loopback only)")
    return out


FetchHandler = Callable[[Request, Env, ExecutionContext], Awaitable[Response] | Response]
AccountOf = Callable[[Request], str]


class App:
    """A Worker: ``fetch(request, env, ctx)`` (a ``def`` or an ``async def``) handles every
    HTTP request and returns a ``Response``, which may carry a WebSocket (status 101). With no
    ``fetch``, every request gets 404.

    An uncaught exception in ``fetch`` is logged (logger ``sockworker``, with its traceback) and
    answered ``500 Internal Server Error`` with no detail in the body; returning something else
    than a ``Response`` is treated the same way. ``CpuLimitExceeded`` (the event passed
    ``Limits.cpu_ms``) is answered ``503 Service Unavailable``.

    ``app.meter.totals()`` is a ``UsageRecord`` of everything counted since the app was made.
    """

    def __init__(
        self,
        fetch: FetchHandler | None = None,
        *,
        limits: Limits | None = None,
        env: Mapping[str, Any] | None = None,
        durable_objects: Mapping[str, type] | None = None,
        account: AccountOf | None = None,
        billing: BillingHook | None = None,
        pricing: Pricing | None = None,
        metrics_path: str | None = None,
        metering: bool = True,
        data_dir: str | os.PathLike[str] | None = None,
        durability: str = "full",
        allowed_origins: Iterable[str] | None = None,
        compression: bool = False,
        cluster: Cluster | str | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
        metrics_accounts: int = DEFAULT_METRICS_ACCOUNTS,
        metrics_allow: Iterable[str] = DEFAULT_METRICS_ALLOW,
        dashboard: bool = False,
        access_log: bool = False,
        stream_request_bodies: bool = False,
    ) -> None:
        """
        Args:
            fetch: the Worker's handler, ``fetch(request, env, ctx) -> Response``.
            limits: the app's ``Limits``; a Durable Object class may override fields for its
                namespace with a class attribute ``limits``.
            env: items that become attributes of the ``env`` argument.
            durable_objects: ``{"BINDING": DurableObjectSubclass}``; each becomes
                ``env.BINDING``, a ``DurableObjectNamespace``. A binding may not also be in
                ``env`` (``ValueError``).
            account: ``account(request) -> str``, the label every unit the request causes is
                billed to (default ``"default"``). Raising, or returning something else than a
                ``str``, answers 500.
            billing: a ``BillingHook``: receives the usage records, and may refuse requests.
            pricing: the ``Pricing`` ratios.
            metrics_path: a path answered with the totals as Prometheus text (off by default;
                not billed, not admitted).
            metering: False turns CPU accounting, CPU limits and the meter off.
            data_dir: where Durable Object storage lives (default ``./.sockworker/data``).
            durability: ``"full"`` (a commit is on disk before what depends on it is sent) or
                ``"normal"`` (in the operating system's cache: it survives a crash of the
                server, not of the machine).
            allowed_origins: e.g. ``["https://example.com"]``: a WebSocket upgrade whose
                ``Origin`` header is not one of them is answered 403 by the core before any
                handler runs (requests without ``Origin``, which browsers always send, are let
                through).
            compression: True accepts permessage-deflate (RFC 7692) when a client offers it.
            cluster: cluster mode (SPEC §7): a ``sw.Cluster`` or a ``postgresql://`` DSN. The
                objects' leases, KV pairs and alarms live in that PostgreSQL database, shared
                by every node of the app; see docs/topics/cluster.md.
            metrics_port: serve ``/metrics`` (Prometheus text) on this port of
                ``metrics_host``, from a thread of the core's own: a scrape never waits for the
                application (0 picks a free port; it is logged). A port in use raises
                ``ServerStartError`` when the server starts.
            metrics_host: where the metrics listener binds (default ``127.0.0.1``: this
                machine only).
            metrics_accounts: accounts with metrics labels of their own (the busiest, by
                billable requests); the rest are summed as ``account="_other"``.
            metrics_allow: the client networks (``"10.0.0.0/8"``, ``"::1"``) that may use the
                metrics listener (default: loopback only, ``127.0.0.0/8`` and ``::1``); another
                client is answered 403 before its request is read. ``"0.0.0.0/0"`` and
                ``"::/0"`` let everyone in. A malformed network is a ``ValueError``.
            dashboard: also serve the live dashboard at ``/_sockworker`` on the metrics
                listener (needs ``metrics_port``).
            access_log: one record per HTTP request and per closed WebSocket, to the logger
                ``sockworker.access`` (see docs/topics/logging.md).
            stream_request_bodies: True hands a request with a body to ``fetch`` as soon as
                its head has arrived: its body is then read with ``await request.read()``,
                ``text()``, ``json()`` or piece by piece with ``request.stream()`` (``body``
                is available only once read). Off: the core reads the whole body first, as
                ``request.body``. See docs/topics/streaming.md.
        """
        if metrics_port is not None and not (
            isinstance(metrics_port, int) and 0 <= metrics_port <= 65535
        ):
            raise ValueError(f"metrics_port is a port number (0 to 65535), not {metrics_port!r}")
        if not isinstance(metrics_accounts, int) or metrics_accounts < 1:
            raise ValueError(f"metrics_accounts is 1 or more, not {metrics_accounts!r}")
        allow = metrics_networks(metrics_allow)
        if dashboard and metrics_port is None:
            raise ValueError("dashboard=True needs metrics_port: the dashboard is served there")
        if durability not in ("full", "normal"):
            raise ValueError(f'durability is "full" or "normal", not {durability!r}')
        self.fetch = fetch
        self.limits = limits or Limits()
        self.account = account
        self.billing = billing
        self.pricing = pricing or Pricing()
        self.meter = Meter(self.pricing)
        self.metrics_path = metrics_path
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.metrics_accounts = metrics_accounts
        self.metrics_allow = allow
        self.dashboard = dashboard
        self.access_log = access_log
        self.metering = metering
        self.data_dir = data_dir
        self.durability = durability
        self.allowed_origins = None if allowed_origins is None else list(allowed_origins)
        self.compression = compression
        self.stream_request_bodies = stream_request_bodies
        self.cluster = Cluster(cluster) if isinstance(cluster, str) else cluster
        if self.cluster is not None and not isinstance(self.cluster, Cluster):
            raise TypeError("cluster is a sockworker.Cluster or a postgresql:// DSN")
        if isinstance(allowed_origins, str):
            raise TypeError("allowed_origins is a list of origins, not one string")
        self.namespaces = {
            binding: DurableObjectNamespace(binding, cls, self.limits)
            for binding, cls in (durable_objects or {}).items()
        }
        clash = set(self.namespaces) & set(env or {})
        if clash:
            raise ValueError(f"env and durable_objects both bind {sorted(clash)}")
        self.env = Env({**(env or {}), **self.namespaces})

    def run(
        self,
        host: str = "127.0.0.1",
        port: int = 8787,
        *,
        io_threads: int | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        shutdown_timeout: float = SHUTDOWN_GRACE,
        reuse_port: bool = False,
        link_port: int | None = None,
    ) -> None:
        """Serves until SIGINT or SIGTERM, then closes every socket with 1001 and returns
        (after ``shutdown_timeout`` seconds at most).

        With ``certfile`` (a PEM certificate chain) and ``keyfile`` (its PEM key) it serves
        ``https://`` and ``wss://`` (rustls; TLS 1.2 and 1.3). A missing or unreadable file, or
        one without a usable certificate or key, raises ``ServerStartError`` before anything
        is served, as does an address in use. ``io_threads`` is the number of threads doing
        socket I/O besides the one Python thread that runs the application; with 0 that thread
        does the I/O too (the single-thread mode). The default is ``$SOCKWORKER_IO_THREADS``,
        else 0 when the process has one core to itself (its CPU affinity or cgroup quota) and 1
        otherwise. Logging is set up (INFO, to stderr) unless the program configured it.

        ``reuse_port`` binds the port with ``SO_REUSEPORT`` (several processes share it) and
        ``link_port`` opens a second, plain port on the same host where the other nodes of a
        cluster reach this one (0 picks one): what ``--workers`` gives each worker.
        """
        if not logging.getLogger().handlers:
            logging.basicConfig(level=logging.INFO, format=TEXT_FORMAT)
        threads = _loop.io_threads(io_threads)
        serving = self.serve(
            host,
            port,
            io_threads=threads,
            certfile=certfile,
            keyfile=keyfile,
            shutdown_timeout=shutdown_timeout,
            reuse_port=reuse_port,
            link_port=link_port,
        )
        _loop.run(serving, single_thread=threads == 0)

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8787,
        *,
        io_threads: int | None = None,
        certfile: str | None = None,
        keyfile: str | None = None,
        shutdown_timeout: float = SHUTDOWN_GRACE,
        reuse_port: bool = False,
        link_port: int | None = None,
    ) -> None:
        """``run``, on the running asyncio loop: serves until SIGINT or SIGTERM. The
        single-thread mode (``io_threads=0``) needs the loop ``run`` makes; on another loop the
        server gets one I/O thread instead."""
        if not isinstance(shutdown_timeout, int | float) or shutdown_timeout < 0:
            raise ValueError("shutdown_timeout is a number of seconds >= 0")
        _raise_fd_limit()
        # A file past RLIMIT_FSIZE is then an error (a full disk for that object), not a kill.
        with contextlib.suppress(ValueError, OSError, AttributeError):
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        # First, so that what the core logs while it starts is delivered too.
        core_logs = CoreLogs(asyncio.get_running_loop())
        core_logs.start()
        try:
            threads = _loop.io_threads(io_threads)
            runtime = Runtime(
                self,
                host,
                port,
                threads,
                certfile,
                keyfile,
                float(shutdown_timeout),
                reuse_port=reuse_port,
                link_port=link_port,
            )
            await runtime.run()
        finally:
            core_logs.stop()


def _raise_fd_limit() -> None:
    """Every socket is a descriptor: take the hard limit, not the (often 1024) soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            logger.warning("could not raise the open-file limit from %d", soft)
