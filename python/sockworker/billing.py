"""Metering and billing hooks (SPEC §4): ``Pricing``, ``UsageRecord``, ``BillingHook`` and the
app's ``Meter``. The counting itself is the core's (``_native.Meter``): sockets count their
messages, auto-responses and bytes on the I/O threads; this module labels, drains and prices.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import _native

if TYPE_CHECKING:
    from .http import Request, Response
    from .limits import Limits

__all__ = ["BillingHook", "Meter", "Pricing", "UsageRecord"]

logger = logging.getLogger("sockworker")

# The core's counters, in the order of its usage vectors (the core owns both).
_UNITS: tuple[str, ...] = _native.UNIT_NAMES


@dataclass(frozen=True)
class Pricing:
    """The ratios of SPEC §4: how many incoming messages make one billable request, and the
    memory allotment of one resident Durable Object (for GB-s). Non-positive values raise
    ``ValueError``."""

    messages_per_request: int = 20
    memory_mb: int = 128

    def __post_init__(self) -> None:
        if self.messages_per_request <= 0:
            raise ValueError("messages_per_request must be a positive number")
        if self.memory_mb <= 0:
            raise ValueError("memory_mb must be a positive number")


@dataclass(frozen=True)
class UsageRecord:
    """Usage of one (account, namespace, object_id) over ``[start, end]`` (seconds since the
    epoch). ``namespace`` and ``object_id`` are None for the Worker itself; all three are None
    in ``app.meter.totals()``."""

    account: str | None
    namespace: str | None
    object_id: str | None
    start: float
    end: float
    requests: int = 0
    ws_connections: int = 0
    ws_messages_in: int = 0
    ws_messages_out: int = 0
    auto_responses: int = 0
    cpu_ms: float = 0.0
    duration_gb_s: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    #: Pings the core answered or sent (keepalive): counted, free, never seen by handlers.
    protocol_pings: int = 0
    storage_rows_read: int = 0
    storage_rows_written: int = 0
    #: Outgoing HTTP requests (``sw.fetch``), each a subrequest: counted, not billed.
    subrequests: int = 0
    #: The node that counted it (SPEC §7); None on a single node.
    node: str | None = None
    billable_requests: float = 0.0
    #: Bytes of storage on disk now: a gauge, set in ``app.meter.totals()`` only (not billed).
    storage_bytes: int = 0

    @classmethod
    def _from_units(
        cls,
        label: tuple[str | None, str | None, str | None],
        start: float,
        end: float,
        units: Iterable[int],
        pricing: Pricing,
        node: str | None = None,
    ) -> UsageRecord:
        counts = dict(zip(_UNITS, units, strict=True))
        return cls(
            *label,
            start=start,
            end=end,
            node=node,
            requests=counts["requests"],
            ws_connections=counts["connections"],
            ws_messages_in=counts["messages_in"],
            ws_messages_out=counts["messages_out"],
            auto_responses=counts["auto_responses"],
            cpu_ms=counts["cpu_ns"] / 1e6,
            duration_gb_s=counts["duration_us"] / 1e6 * pricing.memory_mb / 1024,
            bytes_in=counts["bytes_in"],
            bytes_out=counts["bytes_out"],
            protocol_pings=counts["protocol_pings"],
            storage_rows_read=counts["storage_rows_read"],
            storage_rows_written=counts["storage_rows_written"],
            subrequests=counts["subrequests"],
            billable_requests=counts["requests"]
            + counts["connections"]
            + counts["messages_in"] / pricing.messages_per_request,
        )

    def as_dict(self) -> dict[str, object]:
        """The fields as a dict (for JSON)."""
        return dataclasses.asdict(self)


class BillingHook:
    """Subclass and give as ``App(billing=...)``. Both methods run on the application thread."""

    #: Seconds between calls of ``on_usage`` (and one more at shutdown).
    flush_interval: float = 1.0

    def on_usage(self, records: list[UsageRecord]) -> None:
        """Usage since the previous call, one record per (account, namespace, object id) that
        used anything. If it raises, the same records are offered again at the next call."""

    def admit(self, request: Request, account: str) -> Response | None:
        """Called before a request or WebSocket connection is counted; a Response returned is
        sent instead of running the Worker, and nothing is billed (quotas, rate limits)."""
        return None


class Meter:
    """``app.meter``: the app's running totals, counted in the core."""

    def __init__(self, pricing: Pricing) -> None:
        self._native = _native.Meter()
        self._pricing = pricing
        self._started = time.time()
        self._last_drain = self._started
        self._unsent: list[UsageRecord] = []
        # The storage gauge, and the storage counters, of the server running the app (set while
        # it serves).
        self._storage_bytes: Callable[[], int] = lambda: 0
        self._storage_stats: Callable[[], tuple[int, ...]] = lambda: (0,) * 7
        #: The cluster node counting (cluster mode), named in every record.
        self._node: str | None = None
        #: Events that held the event loop for ``Limits.log_blocked_after`` (the watchdog's).
        self._blocked_events = 0
        #: Also gets every record drained (``sockworker.testing``), if set.
        self._tap: list[UsageRecord] | None = None

    def totals(self) -> UsageRecord:
        """Everything counted since the app was made, delivered to the hook or not, and the
        bytes its storage holds now (``storage_bytes``, counted at most 10 s ago)."""
        record = UsageRecord._from_units(
            (None, None, None),
            self._started,
            time.time(),
            self._native.totals(),
            self._pricing,
            self._node,
        )
        return dataclasses.replace(record, storage_bytes=self._storage_bytes())

    def _drain(self) -> list[UsageRecord]:
        """What was counted since the last drain, plus records the hook failed to take."""
        start, end = self._last_drain, time.time()
        self._last_drain = end
        drained = [
            UsageRecord._from_units(
                (account, namespace, object_id), start, end, units, self._pricing, self._node
            )
            for account, namespace, object_id, units in self._native.drain()
        ]
        if self._tap is not None:
            self._tap.extend(drained)
        records = self._unsent + drained
        self._unsent = []
        return records

    def _deliver(self, hook: BillingHook | None) -> None:
        records = self._drain()
        if hook is None or not records:
            return
        try:
            hook.on_usage(records)
        except Exception:
            logger.exception("the billing hook's on_usage raised; its records are kept for later")
            self._unsent = records

    # -- for the runtime serving the app ------------------------------------------------------

    def _serve(self, server: _native.Server | None) -> None:
        """Reads the storage gauge and counters of ``server`` while it serves (None: stopped)."""
        if server is None:
            self._storage_bytes = lambda: 0
            self._storage_stats = lambda: (0,) * 7
        else:
            self._storage_bytes = lambda: server.storage_bytes
            self._storage_stats = server.storage_stats
            cluster = server.cluster_stats()
            self._node = cluster[0] if cluster is not None else None

    def _slot(
        self, account: str, namespace: str | None, object_id: str | None, limits: Limits
    ) -> _native.Slot:
        """Where the core counts what one account's code of one object (or the Worker) uses."""
        return self._native.slot(
            account, namespace, object_id, limits.cpu_ms, float(limits.wall_ms or 0)
        )

    def _blocked(self) -> None:
        self._blocked_events += 1

    def _prometheus(self) -> str:
        """The totals in the Prometheus text exposition format, and the storage's counters."""
        totals = self.totals()
        lines = []
        for field, kind, help_text in _METRICS:
            name = f"sockworker_{field}_total"
            lines += [
                f"# HELP {name} {help_text}",
                f"# TYPE {name} {kind}",
                f"{name} {getattr(totals, field)}",
            ]
        stats = (*self._storage_stats(), totals.storage_bytes)
        for (name, kind, help_text), value in zip(_STORAGE_METRICS, stats, strict=True):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        memory = _native.allocator_stats()
        for (name, help_text), value in zip(_MEMORY_METRICS, memory, strict=True):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name} {value}"]
        name = "sockworker_blocked_events_total"
        lines += [
            f"# HELP {name} Events that held the event loop for Limits.log_blocked_after or more.",
            f"# TYPE {name} counter",
            f"{name} {self._blocked_events}",
        ]
        return "\n".join(lines) + "\n"


_METRICS = (
    ("requests", "counter", "HTTP requests, RPC calls and alarms handled."),
    ("ws_connections", "counter", "WebSocket connections accepted."),
    ("ws_messages_in", "counter", "WebSocket messages received and handled."),
    ("ws_messages_out", "counter", "WebSocket messages sent."),
    ("auto_responses", "counter", "Messages answered by an auto-response pair."),
    ("cpu_ms", "counter", "CPU milliseconds of handlers."),
    ("duration_gb_s", "counter", "GB-seconds of billable Durable Object residency."),
    ("bytes_in", "counter", "WebSocket bytes received."),
    ("bytes_out", "counter", "WebSocket bytes sent."),
    ("storage_rows_read", "counter", "Durable Object storage rows (KV keys) read."),
    ("storage_rows_written", "counter", "Durable Object storage rows (KV keys) written."),
    ("protocol_pings", "counter", "Protocol pings answered or sent by the core (free)."),
    ("subrequests", "counter", "Outgoing HTTP requests (sw.fetch), counted, not billed."),
    ("billable_requests", "counter", "Requests as billed, messages at the configured ratio."),
)

# In the order of _native.allocator_stats(): the Rust side's and SQLite's allocator (jemalloc).
_MEMORY_METRICS = (
    ("sockworker_memory_allocated_bytes", "Bytes held by the core's allocations (jemalloc)."),
    ("sockworker_memory_active_bytes", "Bytes in the allocator's pages that hold allocations."),
    ("sockworker_memory_resident_bytes", "Bytes the core's allocator keeps resident."),
    ("sockworker_memory_metadata_bytes", "Bytes of the allocator's own bookkeeping."),
    ("sockworker_memory_mapped_bytes", "Bytes of address space the allocator has mapped."),
)

# In the order of _native.Server.storage_stats(), then the storage gauge.
_STORAGE_METRICS = (
    ("sockworker_storage_commit_points_total", "counter", "Commit points that committed writes."),
    ("sockworker_storage_commits_total", "counter", "Object databases committed."),
    ("sockworker_storage_fsyncs_total", "counter", "Write-ahead logs synced to disk."),
    ("sockworker_storage_sync_rounds_total", "counter", "Rounds of the committer thread."),
    ("sockworker_storage_failed_commits_total", "counter", "Commits that failed."),
    ("sockworker_storage_open_databases", "gauge", "Object databases open now."),
    ("sockworker_alarms_armed", "gauge", "Alarms waiting to fire."),
    ("sockworker_storage_bytes", "gauge", "Bytes in the data directory (counted every 10 s)."),
)
