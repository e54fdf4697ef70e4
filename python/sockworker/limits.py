"""``Limits``: the limits of SPEC §3, per app and per Durable Object namespace, and how each is
enforced."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from . import _native

__all__ = ["Limits"]

# Fields that apply before a request reaches any code that could pick a namespace: they are the
# server's, set on ``App(limits=...)`` only.
SERVER_WIDE = ("handshake_timeout", "max_connections", "max_body_size", "log_blocked_after")

# A field not given to the constructor (``over`` leaves it to the base).
_UNSET: Any = object()
# The defaults: the core's for what the core enforces (sizes, timeouts, connections), and
# these for what the runtime does (CPU and wall limits per event, hibernation, the report of a
# blocked loop).
_DEFAULTS: dict[str, Any] = {
    "cpu_ms": 30_000,
    "hibernate_after": 10.0,
    "wall_ms": None,
    "log_blocked_after": 1.0,
    **_native.LIMIT_DEFAULTS,
}


@dataclass(frozen=True, slots=True, init=False)
class Limits:
    """Limits for an app, or (as a Durable Object class attribute) for one namespace.
    Durations are seconds, sizes bytes, ``cpu_ms`` and ``wall_ms`` milliseconds.

    Per socket (a socket is held to the limits of the namespace whose object accepted it):

    - ``max_message_size``: a larger message from a peer closes its socket with 1009 (each
      frame after a message's first counts 16 bytes more, so a flood of empty fragments is
      refused like a large message).
    - ``max_buffered_bytes``: a frame sent while the socket's send queue holds more than this
      (counting 64 bytes per queued frame besides its bytes) closes it with 1008; one message
      larger than the limit still goes out on a short queue.
    - ``idle_timeout``: no frame at all from the peer for this long closes with 1001 (0 = off).
    - ``ping_interval``: nothing received for this long makes the core send a Ping (None = off).
    - ``ping_timeout``: nothing received this long after that Ping closes with 1011; the
      handler sees 1006 (None = wait forever).

    Per event:

    - ``cpu_ms``: CPU one event may use; past it ``CpuLimitExceeded`` is raised inside the
      handler, the object resets and an HTTP event answers 503.
    - ``wall_ms``: wall time one event (or one step of an async one) may hold the event loop;
      past it ``WallLimitExceeded`` is raised inside it, as for ``cpu_ms`` (None = off).
    - ``hibernate_after``: an idle Durable Object drops its instance after this long.

    Server-wide (``App(limits=...)`` only; a namespace setting one is an error):

    - ``handshake_timeout``: a client that has not sent its request head by then is dropped;
      its body must then arrive within the same time again (else 408).
    - ``max_connections``: open connections of every kind; one past it is answered 503.
    - ``max_body_size``: a larger HTTP request body gets 413.
    - ``log_blocked_after``: an event holding the loop this long is logged with its kind,
      object and Python stack, and counted (0 = off).

    ``Limits(**changes).over(base)`` gives ``base`` with exactly the fields given here changed,
    also to a value equal to the default.

    Invalid values (a size or ``cpu_ms`` that is not a positive int, a negative duration, a zero
    ``handshake_timeout``) raise ``ValueError`` when the ``Limits`` is built.
    """

    cpu_ms: int
    max_message_size: int
    max_buffered_bytes: int
    hibernate_after: float
    handshake_timeout: float
    idle_timeout: float
    max_connections: int
    max_body_size: int
    ping_interval: float | None
    ping_timeout: float | None
    wall_ms: int | None
    log_blocked_after: float
    #: The fields given to the constructor (what ``over`` lays over a base).
    given: frozenset[str] = field(compare=False, repr=False)

    def __init__(
        self,
        *,
        cpu_ms: int = _UNSET,
        max_message_size: int = _UNSET,
        max_buffered_bytes: int = _UNSET,
        hibernate_after: float = _UNSET,
        handshake_timeout: float = _UNSET,
        idle_timeout: float = _UNSET,
        max_connections: int = _UNSET,
        max_body_size: int = _UNSET,
        ping_interval: float | None = _UNSET,
        ping_timeout: float | None = _UNSET,
        wall_ms: int | None = _UNSET,
        log_blocked_after: float = _UNSET,
    ) -> None:
        values: dict[str, Any] = dict(locals())
        del values["self"]
        given = frozenset(name for name, value in values.items() if value is not _UNSET)
        for name, value in values.items():
            object.__setattr__(self, name, _DEFAULTS[name] if value is _UNSET else value)
        object.__setattr__(self, "given", given)
        self._check()

    def _check(self) -> None:
        for name in (
            "cpu_ms",
            "max_message_size",
            "max_buffered_bytes",
            "max_connections",
            "max_body_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, not {value!r}")
        if self.wall_ms is not None and (not isinstance(self.wall_ms, int) or self.wall_ms <= 0):
            raise ValueError(f"Limits.wall_ms must be a positive int or None, not {self.wall_ms!r}")
        for name in ("hibernate_after", "handshake_timeout", "idle_timeout", "log_blocked_after"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"Limits.{name} must be a number of seconds >= 0, not {value!r}")
        for name in ("ping_interval", "ping_timeout"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or value <= 0):
                raise ValueError(f"Limits.{name} must be a number of seconds > 0 or None")
        if self.handshake_timeout == 0:
            raise ValueError("Limits.handshake_timeout must be > 0")

    def over(self, base: Limits) -> Limits:
        """These limits laid over ``base``: the fields given to this ``Limits`` take their
        value here, every other one ``base``'s (how a Durable Object class's ``limits``
        overrides the app's)."""
        values = {f.name: getattr(base, f.name) for f in fields(self) if f.name != "given"}
        values.update({name: getattr(self, name) for name in self.given})
        merged = Limits(**values)
        object.__setattr__(merged, "given", base.given | self.given)
        return merged

    def _for_namespace(self, binding: str) -> None:
        """Refuses server-wide fields on a namespace's limits."""
        wide = sorted(set(SERVER_WIDE) & self.given)
        if wide:
            raise ValueError(
                f"limits of durable_objects[{binding!r}] set {', '.join(wide)}, which apply to the "
                "whole server before any object is chosen: set them in App(limits=...)"
            )

    def _socket_limits(self) -> _native.SocketLimits:
        """What the core enforces, as the core holds it (made once per ``Limits``): per socket
        from any ``Limits``, server-wide from the app's."""
        try:
            return _SOCKET_LIMITS[self]
        except KeyError:
            made = _native.SocketLimits(
                max_message_size=self.max_message_size,
                max_buffered_bytes=self.max_buffered_bytes,
                idle_timeout=float(self.idle_timeout),
                ping_interval=float(self.ping_interval or 0),
                ping_timeout=float(self.ping_timeout or 0),
                handshake_timeout=float(self.handshake_timeout),
                max_connections=self.max_connections,
                max_body_size=self.max_body_size,
            )
            _SOCKET_LIMITS[self] = made
            return made


_SOCKET_LIMITS: dict[Limits, _native.SocketLimits] = {}
