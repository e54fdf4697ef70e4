"""``Limits``: the per-app limits of SPEC §3 and how each is enforced."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["Limits"]


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits for an app. Durations are seconds, sizes bytes, ``cpu_ms`` milliseconds.

    - ``max_message_size``: a larger message from a peer closes its socket with 1009.
    - ``max_buffered_bytes``: a socket whose send queue passes it is closed with 1008.
    - ``handshake_timeout``: a client that has not sent its request head by then is dropped.
    - ``idle_timeout``: no frame at all from the peer for this long closes with 1001 (0 = off).
    - ``max_connections``: open WebSockets in the whole server; an upgrade past it gets 503.
    - ``max_body_size``: a larger HTTP request body gets 413.
    - ``cpu_ms``: CPU one event may use; past it ``CpuLimitExceeded`` is raised inside the
      handler, the object resets and an HTTP event answers 503.
    - ``hibernate_after``: an idle Durable Object drops its instance after this long.

    Invalid values (a size or ``cpu_ms`` that is not a positive int, a negative duration, a zero
    ``handshake_timeout``) raise ``ValueError`` when the ``Limits`` is built.
    """

    cpu_ms: int = 30_000
    max_message_size: int = 1 << 20
    max_buffered_bytes: int = 16 << 20
    hibernate_after: float = 10.0
    handshake_timeout: float = 10.0
    idle_timeout: float = 0.0
    max_connections: int = 100_000
    max_body_size: int = 16 << 20

    def __post_init__(self) -> None:
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
        for name in ("hibernate_after", "handshake_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or value < 0:
                raise ValueError(f"Limits.{name} must be a number of seconds >= 0, not {value!r}")
        if self.handshake_timeout == 0:
            raise ValueError("Limits.handshake_timeout must be > 0")

    def over(self, base: Limits) -> Limits:
        """These limits laid over ``base``: a field left at its default takes ``base``'s value
        (how a Durable Object class's ``limits`` overrides the app's)."""
        default = Limits()
        changed = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if getattr(self, f.name) != getattr(default, f.name)
        }
        return replace(base, **changed)
