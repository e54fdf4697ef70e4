"""examples/counter.py tested the way a user tests their own Durable Objects: with the pytest
plugin of ``sockworker.testing`` (the ``sockworker_server`` fixture serves the app named by the
``sockworker_app`` fixture in-process, on an ephemeral port, with the real core), as
vitest-pool-workers tests read: requests from outside, then a look inside the objects."""

from __future__ import annotations

import pytest
import sockworker as sw
from sockworker.testing import TestServer

from examples import counter


@pytest.fixture
def sockworker_app() -> sw.App:
    return counter.app


async def test_the_rate_limiter_forgets_a_client_when_its_alarm_fires(
    sockworker_server: TestServer,
) -> None:
    server = sockworker_server
    for _ in range(3):
        assert (await server.fetch("/limited")).status == 200
    limiter = server.env.LIMITER.get_by_name("127.0.0.1")
    tokens = await server.run_in_object(limiter, lambda obj, state: state.storage.get("tokens"))
    assert counter.BUCKET - 3 <= tokens < counter.BUCKET - 2  # (a little refilled since)
    alarm_at = await server.run_in_object(limiter, lambda obj, state: state.storage.get_alarm())
    assert alarm_at is not None, "every request pushes the forgetting alarm back"
    # The minute without a request, without waiting for it.
    assert await server.run_alarm(limiter)
    assert await server.run_in_object(limiter, lambda obj, state: state.storage.list()) == {}
    assert await server.run_alarm(limiter) is False, "no alarm is left"
    # Each of the three requests was metered to the Worker (requests) and to the limiter
    # (an RPC call each).
    records = server.usage()
    worker = sum(r.requests for r in records if r.namespace is None)
    limiter_calls = sum(r.requests for r in records if r.namespace == "LIMITER")
    assert worker >= 3
    assert limiter_calls >= 3


async def test_the_counter_keeps_its_value_across_hibernation(
    sockworker_server: TestServer,
) -> None:
    server = sockworker_server
    for expected in (1, 2):
        response = await server.fetch("/counter/visits", method="POST")
        assert (response.status, response.text()) == (200, f'{{"visits": {expected}}}')
    visits = server.env.COUNTERS.get_by_name("visits")
    assert server.is_resident(visits)
    await server.hibernate_now(visits)
    assert not server.is_resident(visits)
    # Inside the object: the value is in its storage, read by a new instance.
    assert await server.run_in_object(visits, lambda obj, state: obj.value()) == 2
    await server.run_in_object(visits, lambda obj, state: state.storage.put("value", 41))
    response = await server.fetch("/counter/visits", method="POST")
    assert response.text() == '{"visits": 42}'
