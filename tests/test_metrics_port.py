"""The metrics listener (``--metrics-port``), served by the core on a port of its own, and the
access log (``--access-log``), observed from outside: aiohttp scrapes, ``websockets`` clients
make the traffic, and the access records are read from the server's log (stderr)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from websockets.asyncio.client import connect

from tests.support import ROOT, ServerProcess, wait_until

APP = "tests.apps.observed:app"
METRICS = re.compile(r"metrics on http://127\.0\.0\.1:(\d+)/metrics")


def metrics_url(server: ServerProcess) -> str:
    port = int(server.wait_for_log(METRICS).group(1))
    assert port != server.port
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def observed() -> Iterator[ServerProcess]:
    server = ServerProcess(APP, ("--metrics-port", "0", "--access-log", "--dashboard"))
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log_tail()


async def scrape(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/plain; version=0.0.4")
        return await resp.text()


def value(text: str, name: str, labels: str = "") -> float:
    """The sample ``name{labels}`` of a scrape (0 when absent)."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, number = line.rpartition(" ")
        if sample == wanted:
            return float(number)
    return 0.0


def account() -> str:
    return f"acct-{uuid.uuid4().hex[:8]}"


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        return resp.status, await resp.text()


async def test_every_metric_has_help_and_type(observed: ServerProcess) -> None:
    text = await scrape(metrics_url(observed))
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    helped = {line.split()[2] for line in text.splitlines() if line.startswith("# HELP")}
    assert names == helped
    for name in (
        "sockworker_sockets",
        "sockworker_objects",
        "sockworker_event_queue_depth",
        "sockworker_batch_size",
        "sockworker_loop_lag_seconds",
        "sockworker_cpu_limit_kills_total",
        "sockworker_bytes_in_total",
        "sockworker_bytes_out_total",
        "sockworker_account_requests_total",
        "sockworker_account_cpu_ms_total",
        "sockworker_account_billable_requests_total",
        "sockworker_storage_commits_total",
        "sockworker_storage_commit_seconds",
        "sockworker_storage_sync_seconds",
        "sockworker_storage_bytes",
        "sockworker_duration_seconds_total",
        "sockworker_protocol_pings_total",
        "sockworker_memory_resident_bytes",
    ):
        assert name in names, name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            float(line.rpartition(" ")[2])  # every sample has a number


async def test_values_change_after_websocket_traffic(observed: ServerProcess) -> None:
    url = metrics_url(observed)
    who = account()
    before = await scrape(url)
    async with connect(f"{observed.ws}/ws?account={who}") as ws:
        for n in range(3):
            await ws.send(f"m{n}")
            assert await ws.recv() == f"m{n}"
        during = await scrape(url)
        assert value(during, "sockworker_sockets", 'state="open"') >= 1
        assert value(during, "sockworker_account_sockets", f'account="{who}"') == 1
    after = await wait_until(
        lambda: scrape(url),
        within=10,
        what="the socket's close in the metrics",
    )
    total = "sockworker_ws_messages_in_total"
    assert value(after, total) - value(before, total) >= 3
    assert value(after, "sockworker_account_messages_in_total", f'account="{who}"') == 3
    assert value(after, "sockworker_account_messages_out_total", f'account="{who}"') == 3
    assert value(after, "sockworker_account_billable_requests_total", f'account="{who}"') > 1
    assert value(after, "sockworker_bytes_in_total") > value(before, "sockworker_bytes_in_total")
    assert value(after, "sockworker_bytes_out_total") > value(before, "sockworker_bytes_out_total")
    assert value(after, "sockworker_batch_size_count") > value(
        before, "sockworker_batch_size_count"
    )
    assert value(after, "sockworker_loop_lag_seconds_count") > 0


async def test_durable_object_traffic_counts_objects_and_commits(observed: ServerProcess) -> None:
    url = metrics_url(observed)
    who = account()
    async with connect(f"{observed.ws}/room/{who}?account={who}") as ws:
        await ws.send("hi")
        assert await ws.recv() == "hi"
        text = await scrape(url)
        objects = value(text, "sockworker_objects", 'state="resident"') + value(
            text, "sockworker_objects", 'state="hibernated"'
        )
        assert objects >= 1
    text = await scrape(url)
    assert value(text, "sockworker_account_connections_total", f'account="{who}"') == 1


async def test_hibernated_sockets_and_objects_and_their_close_in_the_access_log(
    observed: ServerProcess,
) -> None:
    url = metrics_url(observed)
    who = account()
    mark = observed.log_mark()
    async with connect(f"{observed.ws}/room/h-{who}?account={who}") as ws:
        await ws.send("before")
        assert await ws.recv() == "before"

        async def hibernated() -> str:
            text = await scrape(url)
            sockets = value(text, "sockworker_sockets", 'state="hibernated"')
            objects = value(text, "sockworker_objects", 'state="hibernated"')
            return text if sockets >= 1 and objects >= 1 else ""

        await wait_until(hibernated, within=15, what="the room to hibernate")
        await ws.close(1000)
    # Closed while hibernated: its record still has its account, object and traffic.
    line = observed.wait_for_log(
        rf"WS /room/h-{who} closed 1000 .*messages in=1 out=1 .*account={who} object=ROOMS:",
        start=mark,
    )
    assert line


async def test_a_scrape_is_answered_while_a_handler_blocks_the_python_thread(
    observed: ServerProcess, tmp_path: Path
) -> None:
    url = metrics_url(observed)
    started, release = tmp_path / "started", tmp_path / "release"
    blocked = asyncio.create_task(get(f"{observed.http}/block?started={started}&release={release}"))

    async def has_started() -> bool:
        return started.exists()

    try:
        await wait_until(has_started, within=10, what="the blocking handler to start")
        # The application thread is inside time.sleep now, and stays there until `release`.
        text = await asyncio.wait_for(scrape(url), 10)
        assert "sockworker_event_queue_depth" in text
        assert not blocked.done()
    finally:
        release.touch()
    assert await blocked == (200, "released")


async def test_the_dashboard_stats_name_the_accounts(observed: ServerProcess) -> None:
    url = metrics_url(observed)
    who = account()
    assert (await get(f"{observed.http}/hello?account={who}"))[0] == 200

    async def requests_of_who() -> int:
        # (The request is counted just after its response is sent.)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/_sockworker/stats") as resp,
        ):
            assert resp.status == 200
            assert resp.headers["content-type"] == "application/json"
            stats = await resp.json()
        rows = {row["account"]: row for row in stats["accounts"]}
        return int(rows[who]["requests"]) if who in rows else 0

    assert await wait_until(requests_of_who, within=10, what="the request in the stats") == 1
    status, page = await get(f"{url}/_sockworker")
    assert status == 200
    assert "<canvas" in page and "/_sockworker/stats" in page
    assert "<script src" not in page and "<link" not in page  # self-contained


async def test_the_access_log_has_a_line_per_request_and_per_closed_socket(
    observed: ServerProcess,
) -> None:
    who = account()
    mark = observed.log_mark()
    assert await get(f"{observed.http}/hello?account={who}") == (200, "hello")
    line = observed.wait_for_log(rf"sockworker\.access: GET /hello 200 .*account={who}", start=mark)
    assert "out=5B" in line.string
    async with connect(f"{observed.ws}/room/r-{who}?account={who}") as ws:
        for text in ("a", "bb"):
            await ws.send(text)
            assert await ws.recv() == text
        await ws.close(1000)
    line = observed.wait_for_log(
        rf"sockworker\.access: WS /room/r-{who} closed 1000 .*messages in=2 out=2 .*account={who}",
        start=mark,
    )
    assert "object=ROOMS:" in line.string
    upgrade = observed.wait_for_log(rf"GET /room/r-{who} 101 .*object=ROOMS:", start=mark)
    assert f"account={who}" in upgrade.string


def test_the_access_log_in_json(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(APP, "--access-log", "--log-format", "json")

    async def traffic() -> str:
        who = account()
        assert (await get(f"{server.http}/hello?account={who}"))[0] == 200
        async with connect(f"{server.ws}/room/j-{who}?account={who}") as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            await ws.close(4000, "bye")
        return who

    who = asyncio.run(traffic())
    server.wait_for_log(rf'"close_code": 4000.*"account": "{who}"')
    records = []
    for line in server.lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "sockworker.access" and entry.get("account") == who:
            records.append(entry)
    http = next(r for r in records if r["kind"] == "http" and r["path"] == "/hello")
    assert (http["method"], http["status"], http["bytes_out"]) == ("GET", 200, 5)
    assert http["duration_ms"] >= 0 and http["object"] is None
    ws = next(r for r in records if r["kind"] == "websocket")
    assert ws["close_code"] == 4000
    assert (ws["messages_in"], ws["messages_out"]) == (1, 1)
    assert ws["bytes_in"] > 0 and ws["bytes_out"] > 0
    assert ws["object"].startswith("ROOMS:") and ws["path"] == f"/room/j-{who}"


def test_the_access_log_without_metering(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(APP, "--access-log", "--no-metering")

    async def traffic() -> None:
        assert (await get(f"{server.http}/hello?account=ignored"))[0] == 200
        async with connect(f"{server.ws}/room/nm?account=ignored") as ws:
            await ws.send("x")
            assert await ws.recv() == "x"

    asyncio.run(traffic())
    # No meter, no account; the object is still known (from the object that holds the socket).
    server.wait_for_log(r"sockworker\.access: GET /hello 200 .*account=- object=-")
    line = server.wait_for_log(r"sockworker\.access: WS /room/nm closed 1000 .*messages in=1 out=1")
    assert "account=- object=ROOMS:" in line.string


def test_accounts_past_the_cap_are_summed_as_other(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(APP, "--metrics-port", "0", "--metrics-accounts", "3")
    url = metrics_url(server)
    tag = uuid.uuid4().hex[:6]

    async def traffic() -> str:
        async with aiohttp.ClientSession() as session:
            for n in range(6):
                for _ in range(n + 1):  # account n makes n + 1 requests: a strict order
                    async with session.get(f"{server.http}/hello?account={tag}-{n}") as resp:
                        assert resp.status == 200

        async def counted() -> str:
            text = await scrape(url)
            other = value(text, "sockworker_account_requests_total", 'account="_other"')
            return text if other == 1 + 2 + 3 else ""

        return await wait_until(counted, within=10, what="every request counted")

    text = asyncio.run(traffic())
    labels = re.findall(r'^sockworker_account_requests_total\{account="([^"]+)"\}', text, re.M)
    assert labels == [f"{tag}-5", f"{tag}-4", f"{tag}-3", "_other"]
    assert value(text, "sockworker_account_requests_total", 'account="_other"') == 1 + 2 + 3
    assert value(text, "sockworker_account_requests_total", f'account="{tag}-5"') == 6


async def test_the_dashboard_is_off_by_default(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(APP, "--metrics-port", "0")
    url = metrics_url(server)
    assert (await get(f"{url}/_sockworker"))[0] == 404
    assert (await get(f"{url}/_sockworker/stats"))[0] == 404
    assert (await get(f"{url}/metrics"))[0] == 200
    # The app's own port does not serve them either.
    assert (await get(f"{server.http}/_sockworker"))[0] == 404


def serve(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    data = tempfile.mkdtemp(prefix="sw-data-")
    argv = [sys.executable, "-m", "sockworker", "serve", APP, "--port", "0", "--data-dir", data]
    return subprocess.run(
        [*argv, *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=dict(os.environ, **(env or {})),
    )


def test_a_metrics_port_in_use_fails_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = serve("--metrics-port", str(port))
    assert result.returncode != 0
    assert "cannot start" in result.stderr
    assert f"metrics listener on 127.0.0.1:{port}" in result.stderr
    assert "in use" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--dashboard",), "--dashboard needs --metrics-port"),
        (("--metrics-port", "70000"), "--metrics-port is 0 to 65535"),
        (("--metrics-port", "0", "--metrics-accounts", "0"), "--metrics-accounts is 1 or more"),
        (
            ("--metrics-port", "0", "--metrics-allow", "127.0.0.0/8", "--metrics-allow", "10/33"),
            "--metrics-allow: '10/33' is not an IP network",
        ),
        (("--metrics-port", "0", "--metrics-allow", "localhost"), "'localhost' is not an IP"),
    ],
)
def test_bad_flags_are_usage_errors(flags: tuple[str, ...], message: str) -> None:
    result = serve(*flags)
    assert result.returncode == 2
    assert message in result.stderr


def test_the_flags_take_their_defaults_from_the_environment() -> None:
    result = serve(env={"SOCKWORKER_DASHBOARD": "1"})
    assert result.returncode == 2
    assert "--dashboard needs --metrics-port" in result.stderr
    result = serve(env={"SOCKWORKER_METRICS_PORT": "nope"})
    assert result.returncode == 2
    assert "SOCKWORKER_METRICS_PORT='nope'" in result.stderr
    result = serve("--metrics-port", "0", env={"SOCKWORKER_METRICS_ALLOW": "10.0.0.0/8, ::1/200"})
    assert result.returncode == 2
    assert "SOCKWORKER_METRICS_ALLOW" in result.stderr
    assert "'::1/200' is not an IP network" in result.stderr


async def test_metrics_path_on_the_app_port_still_works(observed: ServerProcess) -> None:
    status, text = await get(f"{observed.http}/metrics")
    assert status == 200
    assert "sockworker_requests_total" in text


def test_app_settings_are_checked() -> None:
    from sockworker import App

    app = App(metrics_port=0, dashboard=True, access_log=True)
    assert (app.metrics_port, app.metrics_host, app.dashboard) == (0, "127.0.0.1", True)
    with pytest.raises(ValueError, match="needs metrics_port"):
        App(dashboard=True)
    with pytest.raises(ValueError, match="metrics_port is a port number"):
        App(metrics_port=-1)
    assert App().metrics_allow == ["127.0.0.0/8", "::1/128"]
    assert App(metrics_allow=["10.1.2.3/8", "::1"]).metrics_allow == ["10.0.0.0/8", "::1/128"]
    with pytest.raises(ValueError, match=re.escape("'10.0.0.0/99' is not an IP network")):
        App(metrics_allow=["10.0.0.0/99"])
    with pytest.raises(ValueError, match="a list of networks"):
        App(metrics_allow="10.0.0.0/8")
    with pytest.raises(ValueError, match="one network at least"):
        App(metrics_allow=[])


async def test_only_loopback_may_use_the_listener_by_default(observed: ServerProcess) -> None:
    text = await scrape(metrics_url(observed))  # from 127.0.0.1: allowed
    assert re.search(r"^sockworker_metrics_refused_total 0$", text, re.M)


ANY_METRICS = re.compile(r"metrics on http://\S+:(\d+)/metrics")
REFUSED = "Forbidden: this address may not use the metrics listener (--metrics-allow).\n"


async def test_a_client_outside_the_allow_list_is_refused(
    make_server: Callable[..., ServerProcess],
) -> None:
    # Bound to :: (both families): 127.0.0.1 arrives as ::ffff:127.0.0.1, outside both networks
    # (given through the variable, comma-separated); ::1 is allowed.
    server = make_server(
        APP,
        *("--metrics-port", "0", "--metrics-host", "::", "--dashboard"),
        env={"SOCKWORKER_METRICS_ALLOW": "10.0.0.0/8,::1"},
    )
    port = int(server.wait_for_log(ANY_METRICS).group(1))
    for path in ("/metrics", "/_sockworker", "/_sockworker/stats", "/nothing"):
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                assert resp.status == 403, path
                assert resp.headers["content-type"].startswith("text/plain")
                assert await resp.text() == REFUSED
            async with session.post(f"http://127.0.0.1:{port}{path}", data=b"x" * 8000) as resp:
                assert resp.status == 403, path
    text = await scrape(f"http://[::1]:{port}")
    assert value(text, "sockworker_metrics_refused_total") == 8
    status, _ = await get(f"http://[::1]:{port}/_sockworker/stats")
    assert status == 200
    # The app's own port is not concerned.
    assert (await get(f"{server.http}/metrics"))[0] == 200


async def test_the_command_line_replaces_the_variables_networks(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(
        APP,
        *("--metrics-port", "0", "--metrics-allow", "10.0.0.0/8"),
        env={"SOCKWORKER_METRICS_ALLOW": "127.0.0.0/8"},
    )
    assert await get(f"{metrics_url(server)}/metrics") == (403, REFUSED)


async def test_ipv4_rules_match_ipv4_mapped_clients(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(
        APP,
        *("--metrics-port", "0", "--metrics-host", "::", "--metrics-allow", "127.0.0.1"),
    )
    port = int(server.wait_for_log(ANY_METRICS).group(1))
    assert (await get(f"http://127.0.0.1:{port}/metrics"))[0] == 200  # as ::ffff:127.0.0.1
    assert await get(f"http://[::1]:{port}/metrics") == (403, REFUSED)
