"""Limits, Pricing and UsageRecord in-process: validation, layering, pricing arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
from sockworker import Limits, Pricing, UsageRecord, _native


def test_defaults_and_equality() -> None:
    assert Limits() == Limits()
    assert Limits(cpu_ms=5) != Limits()
    assert Limits().given == frozenset()
    assert Limits(cpu_ms=5, wall_ms=None).given == {"cpu_ms", "wall_ms"}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("cpu_ms", 0, "positive int"),
        ("cpu_ms", 1.5, "positive int"),
        ("max_message_size", -1, "positive int"),
        ("wall_ms", 0, "positive int or None"),
        ("hibernate_after", -0.1, "seconds >= 0"),
        ("idle_timeout", "5", "seconds >= 0"),
        ("ping_interval", 0, "> 0 or None"),
        ("handshake_timeout", 0, "must be > 0"),
    ],
)
def test_invalid_values_raise_value_error(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Limits(**{field: value})  # type: ignore[arg-type]


def test_over_takes_exactly_the_given_fields() -> None:
    base = Limits(cpu_ms=100, max_message_size=1000, idle_timeout=7)
    # A field given with the default value still overrides the base.
    top = Limits(cpu_ms=Limits().cpu_ms, hibernate_after=2)
    merged = top.over(base)
    assert merged.cpu_ms == Limits().cpu_ms
    assert merged.hibernate_after == 2
    assert merged.max_message_size == 1000
    assert merged.idle_timeout == 7
    assert merged.given == {"cpu_ms", "max_message_size", "idle_timeout", "hibernate_after"}


def test_server_wide_fields_are_refused_on_a_namespace() -> None:
    Limits(cpu_ms=5)._for_namespace("ROOMS")
    with pytest.raises(ValueError, match="max_connections"):
        Limits(max_connections=5)._for_namespace("ROOMS")


def test_socket_limits_are_made_once_per_value() -> None:
    one = Limits(max_message_size=4096)._socket_limits()
    assert one is Limits(max_message_size=4096)._socket_limits()
    assert one is not Limits(max_message_size=4097)._socket_limits()


@pytest.mark.parametrize("field", ["messages_per_request", "memory_mb"])
def test_pricing_refuses_non_positive(field: str) -> None:
    with pytest.raises(ValueError, match="positive"):
        Pricing(**{field: 0})


def _units(**counts: int) -> list[int]:
    """A vector of the core's counters, in the core's order."""
    units = [0] * _native.UNITS
    for name, value in counts.items():
        units[getattr(_native, f"UNIT_{name.upper()}")] = value
    return units


def test_a_usage_record_is_priced_by_the_ratios() -> None:
    units = _units(
        requests=3,
        connections=2,
        messages_in=45,
        cpu_ns=2_500_000,
        duration_us=4_000_000,
        storage_rows_read=7,
    )
    record = UsageRecord._from_units(("acct", "NS", "id"), 1.0, 2.0, units, Pricing(10, 256))
    assert (record.account, record.namespace, record.object_id) == ("acct", "NS", "id")
    assert record.requests == 3 and record.ws_connections == 2 and record.ws_messages_in == 45
    assert record.cpu_ms == 2.5
    assert record.duration_gb_s == 4.0 * 256 / 1024
    assert record.billable_requests == 3 + 2 + 45 / 10
    assert record.storage_rows_read == 7
    assert record.as_dict() == dataclasses.asdict(record)


def test_a_record_of_the_wrong_width_is_refused() -> None:
    with pytest.raises(ValueError):
        UsageRecord._from_units((None, None, None), 0, 0, [0, 1], Pricing())
