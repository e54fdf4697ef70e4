"""Logs: the core's records handed to Python's ``logging`` on the application thread, and the
text and JSON formats of ``sockworker serve --log-format``.

The core (and the Rust crates under it) log through the ``log`` crate into a bounded queue; the
event loop reads it when its descriptor becomes readable, so a record never makes an I/O thread
wait for the Python thread. Records go to the logger ``sockworker`` (those of other crates to
``sockworker.CRATE``, e.g. ``sockworker.rustls``). The level of the ``sockworker`` logger when the
server starts is applied in the core too: a record below it is never even formatted.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from typing import Literal

from . import _native

__all__ = ["LOGGER", "JsonFormatter", "configure"]

#: The name of the logger that every sockworker record goes to (or to a child of it).
LOGGER = "sockworker"
TEXT_FORMAT = "%(levelname)s %(name)s: %(message)s"

logger = logging.getLogger(LOGGER)


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``; ``target`` (the Rust module) for the core's records; ``exception`` (the
    formatted traceback) when there is one; and the fields of an access-log record
    (``kind``, ``method``, ``path``, ``status``, ...: docs/topics/logging.md)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        created = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": created.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            # An access-log record (``--access-log``): its fields, beside the message.
            entry.update(access)
        target = getattr(record, "target", None)
        if isinstance(target, str):
            entry["target"] = target
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "info", format: Literal["text", "json"] = "text") -> None:
    """Logs every record at ``level`` or above to stderr, as text (``LEVEL logger: message``)
    or as JSON lines (``JsonFormatter``): what ``sockworker serve --log-level --log-format``
    does."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if format == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler])


class CoreLogs:
    """Delivers the core's queued records to ``logging`` while a server runs on ``loop``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.fd: int | None = None

    def start(self) -> None:
        """Applies the ``sockworker`` logger's level in the core and watches the queue."""
        try:
            self.fd = _native.install_log_queue(logger.getEffectiveLevel())
        except OSError as error:
            logger.warning("the core's log records will not be shown: %s", error)
            return
        self.loop.add_reader(self.fd, self.deliver)
        self.deliver()  # what was logged before (by a previous server in this process)

    def stop(self) -> None:
        """Delivers what is left; call it once the core's threads have stopped."""
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            self.fd = None
            self.deliver()

    def deliver(self) -> None:
        """Hands every waiting record to its logger (called when the queue's fd is readable)."""
        records, dropped = _native.take_log_records()
        for level, target, message, file, line in records:
            crate = target.partition("::")[0]
            name = LOGGER if crate.startswith("sockworker") else f"{LOGGER}.{crate}"
            destination = logging.getLogger(name)
            if destination.isEnabledFor(level):
                # No args: the message is final, and a "%" in it must stay as it is.
                record = destination.makeRecord(
                    name,
                    level,
                    file or target,
                    line or 0,
                    message,
                    (),
                    None,
                    extra={"target": target},
                )
                destination.handle(record)
        if dropped:
            logger.warning(
                "%d log records of the core were dropped: the application thread fell behind",
                dropped,
            )
