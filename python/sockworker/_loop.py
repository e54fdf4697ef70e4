"""The event loop of the single-thread mode, and how many I/O threads a server gets.

With ``io_threads=0`` the application thread does the socket I/O too: its asyncio loop is a
``SelectorEventLoop`` whose selector is the core's reactor (``_native.Reactor``). Each
``select()`` releases the GIL and runs the core's sockets and timers, and the descriptors asyncio
watches, in one ``epoll_wait``, until something is ready; the server's event queue is reported
as its descriptor being readable, so the batch is dispatched in the same loop iteration. No
thread hand-off: what wins when the server has one core to itself.
"""

from __future__ import annotations

import asyncio
import math
import os
import selectors
from collections.abc import Coroutine, Iterator, Mapping
from typing import Any, Final, TypeVar

from . import _native

__all__ = ["ReactorSelector", "io_threads", "new_event_loop", "reactor_of", "run", "usable_cores"]

T = TypeVar("T")

#: The environment variable that sets ``--io-threads`` when neither the command line nor
#: ``App.run(io_threads=)`` does.
ENV = "SOCKWORKER_IO_THREADS"


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, cpusets), bounded by a
    cgroup v2 CPU quota (``docker --cpus``) when there is one."""
    cores = len(os.sched_getaffinity(0))
    try:
        with open("/sys/fs/cgroup/cpu.max") as limit:
            quota, period = limit.read().split()
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


def io_threads(asked: int | None = None) -> int:
    """The I/O threads to use: ``asked`` if given, else ``$SOCKWORKER_IO_THREADS``, else 0 (the
    single-thread mode) when the process has one core to itself and 1 otherwise."""
    if asked is None:
        value = os.environ.get(ENV, "").strip()
        if value:
            try:
                asked = int(value)
            except ValueError:
                raise ValueError(f"{ENV} is a number of threads >= 0, not {value!r}") from None
    if asked is None:
        return 0 if usable_cores() == 1 else 1
    if asked < 0:
        raise ValueError(f"io_threads is a number >= 0, not {asked}")
    return asked


class _Keys(Mapping[Any, selectors.SelectorKey]):
    """``get_map()``: the keys by file object (or descriptor)."""

    def __init__(self, keys: dict[int, selectors.SelectorKey]) -> None:
        self._keys = keys

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, fileobj: Any) -> selectors.SelectorKey:
        return self._keys[_fd(fileobj)]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._keys)


#: Added by the reactor to the events of an event queue's descriptor.
_SOURCE: Final = 4


def _run_reader(key: selectors.SelectorKey) -> bool:
    """Runs the reader callback of ``key`` as the loop would (``asyncio.Handle._run``, which
    reports its exceptions to the loop's handler); False if the key holds none."""
    data = key.data
    reader = data[0] if isinstance(data, tuple) else None
    if not isinstance(reader, asyncio.Handle) or reader.cancelled():
        return False
    reader._run()
    return True


def _fd(fileobj: Any) -> int:
    fd = fileobj if isinstance(fileobj, int) else int(fileobj.fileno())
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


class ReactorSelector(selectors.BaseSelector):
    """A selector whose ``select`` runs the core's reactor (see the module's docstring)."""

    def __init__(self) -> None:
        self.reactor = _native.Reactor()
        self._keys: dict[int, selectors.SelectorKey] = {}
        self._map = _Keys(self._keys)

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
            raise ValueError(f"Invalid events: {events!r}")
        key = selectors.SelectorKey(fileobj, _fd(fileobj), events, data)
        if key.fd in self._keys:
            raise KeyError(f"{fileobj!r} (FD {key.fd}) is already registered")
        self.reactor.watch(key.fd, events)
        self._keys[key.fd] = key
        return key

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        try:
            fd = _fd(fileobj)
        except ValueError:  # closed: found by identity, as the standard selectors do
            fd = next((k.fd for k in self._keys.values() if k.fileobj is fileobj), -1)
        try:
            key = self._keys.pop(fd)
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        self.reactor.watch(fd, 0)
        return key

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        try:
            key = self._keys[_fd(fileobj)]
        except KeyError:
            raise KeyError(f"{fileobj!r} is not registered") from None
        if events != key.events:
            if not events or events & ~(selectors.EVENT_READ | selectors.EVENT_WRITE):
                raise ValueError(f"Invalid events: {events!r}")
            self.reactor.watch(key.fd, events)
        key = key._replace(events=events, data=data)
        self._keys[key.fd] = key
        return key

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        keys = self._keys
        ready = []
        for fd, events in self.reactor.select(timeout):
            key = keys.get(fd)
            if key is None:
                continue
            # The server's event queue, with no callback waiting (asyncio asks for no wait
            # when one does): its reader runs here, as it would first thing after select,
            # without the round through the loop's ready queue; the callbacks it schedules
            # (its handlers' tasks) then run in this same loop iteration.
            if events & _SOURCE and timeout != 0 and _run_reader(key):
                continue
            ready.append((key, events & key.events))
        return ready

    def close(self) -> None:
        self.reactor.close()
        self._keys.clear()

    def get_map(self) -> Mapping[Any, selectors.SelectorKey]:
        return self._map


def new_event_loop() -> asyncio.AbstractEventLoop:
    """An asyncio loop that drives the core's reactor (single-thread mode)."""
    return asyncio.SelectorEventLoop(ReactorSelector())


def reactor_of(loop: asyncio.AbstractEventLoop) -> _native.Reactor | None:
    """The reactor of ``loop`` if it is one of ours, else None (a server on it then needs I/O
    threads)."""
    selector = getattr(loop, "_selector", None)
    return selector.reactor if isinstance(selector, ReactorSelector) else None


def run(main: Coroutine[Any, Any, T], *, single_thread: bool) -> T:
    """``asyncio.run(main)``, on the reactor's loop when ``single_thread``."""
    with asyncio.Runner(loop_factory=new_event_loop if single_thread else None) as runner:
        return runner.run(main)
