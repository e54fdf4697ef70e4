"""The meter as the runtime drives it (SPEC §3, §4): the slot of each account's code, the
billable duration of resident objects, the hook's flushes, and the watchdog's report of a
blocked loop. The counting is the core's; this decides what is billed to whom."""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from typing import Protocol

from .. import _native
from ..billing import BillingHook
from ..limits import Limits
from .contract import AppLike

logger = logging.getLogger("sockworker")

_EVENT_KINDS = {
    _native.EV_REQUEST: "request",
    _native.EV_MESSAGE: "message",
    _native.EV_CLOSE: "close",
    _native.EV_ERROR: "error",
    _native.EV_DRAINED: "drained",
    _native.EV_CONNECTED: "connected",
    _native.EV_FETCHED: "fetched",
    _native.EV_STEP: "async step",
}


class Billed(Protocol):
    """A resident object billed for duration (SPEC §4)."""

    def settle(self, force: bool = False) -> None:
        """Accrues its duration up to now (``force``: and stops, at shutdown)."""
        ...


class Metering:
    """What is billed to whom, for one run of an app (everything is off with metering off)."""

    def __init__(
        self, app: AppLike, server: _native.Server, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.on = app.metering
        self.server = server
        self.loop = loop
        self.meter = app.meter
        self.hook = app.billing
        self.limits = app.limits
        # The Worker's slot per account.
        self.worker_slots: dict[str, _native.Slot] = {}
        # Objects resident and billed for duration now.
        self.billed: set[Billed] = set()
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.meter._serve(self.server)
        if self.on:
            self._schedule_flush()

    def stop(self) -> None:
        """Every object stops accruing duration; the hook gets the last records."""
        if self.timer is not None:
            self.timer.cancel()
        self.meter._serve(None)
        if self.on:
            for resident in list(self.billed):
                resident.settle(force=True)
            self.meter._deliver(self.hook)

    # -- slots ----------------------------------------------------------------------------------

    def current_slot(self) -> _native.Slot | None:
        """The slot of the code running now (None with metering off)."""
        return self.server.current_slot() if self.on else None

    def current_account(self) -> str:
        """The account of the code running now (the caller of a stub, say)."""
        slot = self.current_slot()
        return slot.account if slot is not None else "default"

    def slot(
        self, account: str, namespace: str | None, object_id: str | None, limits: Limits
    ) -> _native.Slot:
        return self.meter._slot(account, namespace, object_id, limits)

    def worker_slot(self, account: str) -> _native.Slot:
        slot = self.worker_slots.get(account)
        if slot is None:
            slot = self.slot(account, None, None, self.limits)
            self.worker_slots[account] = slot
        return slot

    # -- duration -------------------------------------------------------------------------------

    def bill(self, resident: Billed) -> None:
        self.billed.add(resident)

    def unbill(self, resident: Billed) -> None:
        self.billed.discard(resident)

    def _schedule_flush(self) -> None:
        interval = self.hook.flush_interval if self.hook is not None else BillingHook.flush_interval
        self.timer = self.loop.call_later(interval, self._flush)

    def _flush(self) -> None:
        self.flush()
        self._schedule_flush()

    def flush(self) -> None:
        """Brings every resident object's duration up to now, then gives the hook its records."""
        for resident in list(self.billed):
            resident.settle()
        self.meter._deliver(self.hook)

    # -- a blocked loop -------------------------------------------------------------------------

    def on_blocked(self, kind: int, seconds: float) -> None:
        """Called by the core's watchdog, on its own thread, when one event has held the loop
        for ``Limits.log_blocked_after``: logs what runs, where, and the Python stack."""
        frame = sys._current_frames().get(self.server.thread_ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)\n"
        slot = self.current_slot()
        where = "the Worker"
        if slot is not None and slot.namespace is not None:
            where = f"object {slot.object_id} of {slot.namespace}"
        self.meter._blocked()
        logger.warning(
            "the event loop is blocked: a %s event of %s has run for %.1f s (every other socket "
            "and request waits; run blocking calls with `await asyncio.to_thread(...)`); "
            "Python stack:\n%s",
            _EVENT_KINDS.get(kind, "?"),
            where,
            seconds,
            stack.rstrip(),
        )
