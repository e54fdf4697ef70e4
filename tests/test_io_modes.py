"""The two ways a server does its socket I/O: on the application thread itself (the single-thread
mode, ``--io-threads 0``, the default when the process has one core to itself) or on I/O threads
beside it (``--io-threads N``). The whole suite runs in both (``make test``); this checks that the
mode asked for is the mode served, and how the default is chosen."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.support import ServerProcess

ECHO = "tests.apps.echo:app"
MODE = re.compile(r"listening on http://\S+ \((single-thread|(\d+) I/O threads?)\)")


def io_threads(server: ServerProcess) -> int:
    """The core's I/O threads running in the server process (by their thread names)."""
    tasks = Path(f"/proc/{server.pid}/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return sum(name.startswith("sockworker-io") for name in names)


def mode(server: ServerProcess) -> int:
    """What the server said it runs with: 0 for the single-thread mode, else its I/O threads."""
    match = server.wait_for_log(MODE)
    return 0 if match.group(1) == "single-thread" else int(match.group(2))


async def echoes(server: ServerProcess) -> None:
    async with connect(f"{server.ws}/ws") as ws:
        for message in ("one", b"two", "three" * 1000):
            await ws.send(message)
            assert await ws.recv() == message


@pytest.mark.parametrize(
    ("env", "args", "expected"),
    [
        ("0", (), 0),
        ("2", (), 2),
        ("0", ("--io-threads", "1"), 1),  # the command line wins over the environment
        ("3", ("--io-threads", "0"), 0),
    ],
)
async def test_the_mode_asked_for_is_the_mode_served(
    make_server: Callable[..., ServerProcess], env: str, args: tuple[str, ...], expected: int
) -> None:
    server = make_server(ECHO, *args, env={"SOCKWORKER_IO_THREADS": env})
    assert mode(server) == expected
    await echoes(server)
    assert io_threads(server) == expected


def one_core() -> None:
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


async def test_one_core_to_itself_means_single_thread(
    make_server: Callable[..., ServerProcess],
) -> None:
    server = make_server(ECHO, env={"SOCKWORKER_IO_THREADS": ""}, preexec=one_core)
    assert mode(server) == 0
    await echoes(server)
    assert io_threads(server) == 0


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
async def test_more_cores_mean_an_io_thread(make_server: Callable[..., ServerProcess]) -> None:
    server = make_server(ECHO, env={"SOCKWORKER_IO_THREADS": ""})
    assert mode(server) == 1
    await echoes(server)
    assert io_threads(server) == 1


def test_a_bad_setting_is_refused(make_server: Callable[..., ServerProcess]) -> None:
    with pytest.raises(AssertionError, match="SOCKWORKER_IO_THREADS"):
        make_server(ECHO, env={"SOCKWORKER_IO_THREADS": "many"})
