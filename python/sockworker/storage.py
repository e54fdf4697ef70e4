"""Durable Object storage (SPEC §6): ``ctx.storage`` with its KV and SQL APIs, transactions and
the alarm. The database is the core's (one SQLite file per object); this module pickles values,
keeps a read cache per resident object, and checks that the instance using it is still the live
one. Writes are committed by the core at the end of the event (the output gate holds what the
event sends until then), so every call here is synchronous.
"""

from __future__ import annotations

import datetime
import math
import pickle
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar, overload

from . import _native
from .errors import InvalidArgument, StorageError

__all__ = ["AlarmInfo", "DurableObjectStorage", "SqlCursor", "SqlStorage"]

T = TypeVar("T")

MAX_KEY_BYTES: int = _native.STORAGE_MAX_KEY_BYTES
MAX_VALUE_BYTES: int = _native.STORAGE_MAX_VALUE_BYTES
MAX_KEYS_PER_CALL: int = _native.STORAGE_MAX_KEYS_PER_CALL

# In the read cache: a key known to be absent (a pickle is never empty).
_ABSENT = b""


class AlarmInfo:
    """What ``alarm(info)`` is told: how many times this alarm failed before this call."""

    __slots__ = ("retry_count",)

    def __init__(self, retry_count: int) -> None:
        self.retry_count = retry_count

    @property
    def is_retry(self) -> bool:
        return self.retry_count > 0

    # Cloudflare's names.
    @property
    def retryCount(self) -> int:
        return self.retry_count

    isRetry = is_retry

    def __repr__(self) -> str:
        return f"AlarmInfo(retry_count={self.retry_count})"


def _pickle(key: str, value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        raise TypeError(f"the value of {key!r} cannot be stored (pickled): {error}") from error


def _unpickle(key: str, data: bytes) -> Any:
    try:
        return pickle.loads(data)
    except Exception as error:
        raise StorageError(f"the value of {key!r} cannot be read (unpickled): {error}") from error


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a storage key is a str, not {type(key).__name__}")
    return key


def _keys(keys: Iterable[str]) -> list[str]:
    listed = [_check_key(key) for key in keys]
    if len(listed) > MAX_KEYS_PER_CALL:
        raise InvalidArgument(f"at most {MAX_KEYS_PER_CALL} keys per call, not {len(listed)}")
    return listed


def _epoch_seconds(when: float | datetime.datetime) -> float:
    if isinstance(when, datetime.datetime):
        if when.tzinfo is None or when.utcoffset() is None:
            raise InvalidArgument("an alarm datetime must be aware (have a tzinfo)")
        return when.timestamp()
    if isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when):
        raise InvalidArgument(
            f"an alarm time is seconds since the epoch or a datetime, not {when!r}"
        )
    return float(when)


class StorageHost(Protocol):
    """What storage needs of the host of its object (the runtime's ``ObjectHost``)."""

    @property
    def cache(self) -> dict[str, bytes]:
        """The read cache: pickled values, ``b""`` for a key known to be absent."""
        ...

    @property
    def id_name(self) -> str | None: ...

    def store_for(self, generation: int) -> _native.Store:
        """The open database, or ``StorageError`` if that instance is no longer the live one."""
        ...

    def remember(self, key: str, data: bytes) -> None: ...
    def read(self, rows: int) -> None: ...
    def wrote(self, rows: int) -> None:
        """Counts written rows and has the core commit soon."""
        ...

    async def sync(self) -> None:
        """Commits now and waits until the commit is durable."""
        ...

    def account(self) -> str:
        """The account the code running now bills to."""
        ...


class DurableObjectStorage:
    """``self.ctx.storage``: this object's own database. Keys are ``str`` (at most 2 KiB of
    UTF-8), values anything picklable (at most 128 KiB pickled), at most 128 keys per call;
    past a limit ``ValueError`` and nothing is written."""

    __slots__ = ("_generation", "_host", "sql")

    def __init__(self, host: StorageHost, generation: int) -> None:
        self._host = host
        self._generation = generation
        self.sql = SqlStorage(self)

    def _store(self) -> _native.Store:
        """The open database, after checking this instance is still the object's live one."""
        return self._host.store_for(self._generation)

    def _wrote(self, rows: int) -> None:
        self._host.wrote(rows)

    # -- KV ----------------------------------------------------------------------------------------

    @overload
    def get(self, key: str) -> Any: ...
    @overload
    def get(self, key: Iterable[str]) -> dict[str, Any]: ...

    def get(self, key: str | Iterable[str]) -> Any:
        """The value of ``key`` (None if absent), or for a list of keys a dict of those found."""
        store = self._store()
        cache = self._host.cache
        if isinstance(key, str):
            self._host.read(1)
            data = cache.get(key)
            if data is None:
                data = store.get([key])[0] or _ABSENT
                self._host.remember(key, data)
            return _unpickle(key, data) if data else None
        keys = _keys(key)
        self._host.read(len(keys))
        missing = [k for k in keys if k not in cache]
        found = dict(zip(missing, store.get(missing), strict=True)) if missing else {}
        values = {}
        for k in keys:
            data = cache[k] if k in cache else found[k] or _ABSENT
            self._host.remember(k, data)
            if data:
                values[k] = _unpickle(k, data)
        return values

    @overload
    def put(self, key: str, value: Any) -> None: ...
    @overload
    def put(self, key: Mapping[str, Any]) -> None: ...

    def put(self, key: str | Mapping[str, Any], value: Any = None) -> None:
        """Stores ``value`` under ``key``, or every pair of a mapping (all or nothing)."""
        store = self._store()
        if isinstance(key, str):
            pairs = [(key, _pickle(key, value))]
        elif isinstance(key, Mapping):
            checked = _keys(key)
            pairs = [(k, _pickle(k, key[k])) for k in checked]
        else:
            raise TypeError(
                f"put() takes a str key and a value, or a dict, not {type(key).__name__}"
            )
        store.put(pairs)
        for k, data in pairs:
            self._host.remember(k, data)
        self._wrote(len(pairs))

    @overload
    def delete(self, key: str) -> bool: ...
    @overload
    def delete(self, key: Iterable[str]) -> int: ...

    def delete(self, key: str | Iterable[str]) -> bool | int:
        """Deletes ``key`` (True if it existed), or a list of keys (how many existed)."""
        store = self._store()
        keys = [key] if isinstance(key, str) else _keys(key)
        deleted = store.delete(keys)
        for k in keys:
            self._host.remember(k, _ABSENT)
        self._wrote(len(keys))
        return deleted > 0 if isinstance(key, str) else deleted

    def delete_all(self) -> None:
        """Deletes every key and every table of the object's own SQL (the alarm stays: use
        ``delete_alarm``), as Cloudflare's ``deleteAll`` does for SQLite-backed objects."""
        deleted = self._store().delete_all()
        self._host.cache.clear()
        self._wrote(deleted)

    def list(
        self,
        *,
        prefix: str | None = None,
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> dict[str, Any]:
        """Pairs in key order (``reverse``: descending): keys starting with ``prefix``, from
        ``start`` (inclusive) or after ``start_after``, before ``end`` (exclusive), at most
        ``limit`` of them."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise InvalidArgument(f"limit is a positive int, not {limit!r}")
        for bound in (prefix, start, start_after, end):
            if bound is not None:
                _check_key(bound)
        pairs = self._store().list_range(prefix, start, start_after, end, limit, reverse)
        self._host.read(len(pairs))
        return {key: _unpickle(key, data) for key, data in pairs}

    # -- transactions --------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[DurableObjectStorage]:
        """``with ctx.storage.transaction():`` an exception in the block undoes the block's
        writes (KV and SQL) and propagates; nothing else is undone. Blocks nest."""
        store = self._store()
        store.begin_block()
        self._wrote(0)
        try:
            yield self
        except BaseException:
            store.end_block(True)
            # What the block wrote may be cached: forget the cache rather than track it.
            self._host.cache.clear()
            raise
        store.end_block(False)

    def transaction_sync(self, fn: Callable[[], T]) -> T:
        """Runs ``fn()`` in a transaction (Cloudflare's ``transactionSync``)."""
        with self.transaction():
            return fn()

    async def sync(self) -> None:
        """Waits until every write made so far is durable (what the output gate waits for)."""
        await self._host.sync()

    # -- the alarm -----------------------------------------------------------------------------

    def get_alarm(self) -> float | None:
        """When the alarm is set for (seconds since the epoch), or None."""
        alarm = self._store().get_alarm()
        self._host.read(1)
        return None if alarm is None else alarm[0]

    def set_alarm(self, when: float | datetime.datetime) -> None:
        """Sets the object's one alarm: ``alarm()`` runs at or after ``when`` (seconds since the
        epoch, or an aware datetime), waking the object if it hibernated, also after a restart."""
        at = _epoch_seconds(when)
        host = self._host
        self._store().set_alarm(at, host.account(), host.id_name)
        self._wrote(1)

    def delete_alarm(self) -> None:
        self._store().set_alarm(None)
        self._wrote(1)

    # Cloudflare's names, for code ported from Workers.
    deleteAll = delete_all
    transactionSync = transaction_sync
    getAlarm = get_alarm
    setAlarm = set_alarm
    deleteAlarm = delete_alarm


class SqlCursor:
    """The result of ``sql.exec``: iterate it for rows as dicts. The statement has run to its end
    when ``exec`` returns; the rows are kept here."""

    __slots__ = ("_position", "_rows", "column_names", "rows_read", "rows_written")

    def __init__(
        self, columns: list[str], rows: list[list[Any]], rows_read: int, rows_written: int
    ) -> None:
        self.column_names = columns
        self._rows = rows
        self._position = 0
        self.rows_read = rows_read
        self.rows_written = rows_written

    def __iter__(self) -> SqlCursor:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._position >= len(self._rows):
            raise StopIteration
        row = self._rows[self._position]
        self._position += 1
        return dict(zip(self.column_names, row, strict=True))

    next = __next__

    def to_list(self) -> list[dict[str, Any]]:
        """The remaining rows, as dicts."""
        return list(self)

    def one(self) -> dict[str, Any]:
        """The one row; ``ValueError`` unless there is exactly one."""
        rows = self.to_list()
        if len(rows) != 1:
            raise InvalidArgument(f"expected exactly one row, got {len(rows)}")
        return rows[0]

    def raw(self) -> Iterator[tuple[Any, ...]]:
        """The remaining rows, as tuples."""
        while self._position < len(self._rows):
            row = self._rows[self._position]
            self._position += 1
            yield tuple(row)

    # Cloudflare's names.
    toArray = to_list
    toList = to_list

    @property
    def columnNames(self) -> list[str]:
        return self.column_names

    @property
    def rowsRead(self) -> int:
        return self.rows_read

    @property
    def rowsWritten(self) -> int:
        return self.rows_written


class SqlStorage:
    """``ctx.storage.sql``: SQL on the object's own SQLite database. Tables named ``_sw_*`` are
    reserved; transactions are made with ``ctx.storage.transaction()``, not in SQL."""

    __slots__ = ("_storage",)

    def __init__(self, storage: DurableObjectStorage) -> None:
        self._storage = storage

    def exec(self, query: str, *bindings: Any) -> SqlCursor:
        """Runs ``query`` (one statement, or several separated by ``;``), the ``?`` placeholders
        taken in order from ``bindings`` (None, int, float, str, bytes). The cursor holds the rows
        of the last statement that returns any. SQL errors raise ``sw.StorageError``."""
        if not isinstance(query, str):
            raise TypeError(f"the query is a str, not {type(query).__name__}")
        storage = self._storage
        store = storage._store()
        columns, rows, rows_read, rows_written = store.exec(query, list(bindings))
        # (The KV cache stays right: the application's SQL cannot reach the KV table.)
        storage._host.read(rows_read)
        storage._wrote(rows_written)
        return SqlCursor(columns, rows, rows_read, rows_written)

    @property
    def database_size(self) -> int:
        """The size of the database in bytes."""
        return self._storage._store().database_size

    databaseSize = database_size
