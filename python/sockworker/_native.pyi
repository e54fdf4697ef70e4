"""Type stub of the private native module (rust/py). Not part of the public API.

``mypy.stubtest`` checks it against the built module (``make lint``)."""

from collections.abc import Callable, Coroutine, Generator
from typing import Any, Final, Generic, Literal, Self, TypeVar, final

_T = TypeVar("_T")

__version__: Final[str]

# -- events: what ``Batch`` yields, one tuple per event; the first item is its kind -------------

EV_REQUEST: Final = 0
EV_MESSAGE: Final = 1
EV_CLOSE: Final = 2
EV_ERROR: Final = 3
EV_DRAINED: Final = 4
EV_ALL_CLOSED: Final = 5
EV_CONNECTED: Final = 6
EV_ALARM: Final = 7
EV_RELEASED: Final = 8
EV_COMMIT_FAILED: Final = 9
EV_BODY: Final = 10
EV_REQUEST_BODY: Final = 11
EV_FETCHED: Final = 12
#: The kind of an async step, in the watchdog's report of a blocked loop (never in a batch).
EV_STEP: Final = 255

#: (kind, reply, method, target, headers, body, peer, the body's feed when it is read on demand)
RequestEvent = tuple[
    Literal[0], PendingReply, str, str, list[tuple[str, bytes]], bytes, str, RequestFeed | None
]
#: (kind, socket id, data)
MessageEvent = tuple[Literal[1], int, str | bytes]
#: (kind, socket id, code, reason, was_clean, the handle of an object's socket or None)
CloseEvent = tuple[Literal[2], int, int, str, bool, SocketHandle | None]
#: (kind, socket id, message)
ErrorEvent = tuple[Literal[3], int, str]
#: (kind, socket id)
DrainedEvent = tuple[Literal[4], int]
AllClosedEvent = tuple[Literal[5]]
#: (kind, token, handle or None, protocol, error or None)
ConnectedEvent = tuple[Literal[6], int, SocketHandle | None, str, str | None]
#: (kind, namespace, object id, id name or None, retries so far)
AlarmEvent = tuple[Literal[7], str, str, str | None, int]
#: (kind, token, committed)
ReleasedEvent = tuple[Literal[8], int, bool]
#: (kind, owner key, message)
CommitFailedEvent = tuple[Literal[9], int, str]
#: (kind, stream id, open: room for more chunks, else the client is gone)
BodyEvent = tuple[Literal[10], int, bool]
#: (kind, feed id, a piece or None at the end, why the body cannot be read or None)
RequestBodyEvent = tuple[Literal[11], int, bytes | None, str | None]
#: (kind, token, (status, headers, body, url, redirected) or None, (error kind, message) or None)
FetchedEvent = tuple[
    Literal[12],
    int,
    tuple[int, list[tuple[str, bytes]], bytes, str, bool] | None,
    tuple[str, str] | None,
]
Event = (
    RequestEvent
    | MessageEvent
    | CloseEvent
    | ErrorEvent
    | DrainedEvent
    | AllClosedEvent
    | ConnectedEvent
    | AlarmEvent
    | ReleasedEvent
    | CommitFailedEvent
    | BodyEvent
    | RequestBodyEvent
    | FetchedEvent
)

# -- facts of the core, read by Python rather than repeated ----------------------------------

STORAGE_MAX_KEY_BYTES: Final[int]
STORAGE_MAX_VALUE_BYTES: Final[int]
STORAGE_MAX_KEYS_PER_CALL: Final[int]
MAX_TAGS: Final[int]
MAX_TAG_CHARS: Final[int]
MAX_ATTACHMENT_BYTES: Final[int]
MAX_CLOSE_REASON_BYTES: Final[int]
#: What ``SocketHandle.send`` returns.
SEND_QUEUED: Final = 0
SEND_DROPPED: Final = 1
SEND_OVERFLOW: Final = 2
SendOutcome = Literal[0, 1, 2]
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_NO_STATUS: Final = 1005
CLOSE_ABNORMAL: Final = 1006
CLOSE_INVALID_PAYLOAD: Final = 1007
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
#: The core's defaults of what it enforces, by ``Limits`` field.
LIMIT_DEFAULTS: Final[dict[str, int | float | None]]

def check_close(code: int, reason: str) -> None: ...
def allocator_stats() -> tuple[int, int, int, int, int]: ...
def allocator_size_classes() -> list[tuple[int, int]]: ...

@final
class SocketHandle:
    @property
    def id(self) -> int: ...
    def traffic(self) -> tuple[int, int, int, int, float] | None: ...
    def send(self, data: str | bytes) -> SendOutcome: ...
    def close(self, code: int, reason: str) -> bool: ...
    @property
    def buffered_amount(self) -> int: ...
    @property
    def high_water(self) -> int: ...
    def set_paused(self, paused: bool) -> None: ...
    def request_drain(self) -> bool: ...
    @property
    def object_key(self) -> int | None: ...
    @property
    def object(self) -> ObjectState | None: ...
    def set_owner(self, owner: int) -> None: ...
    @property
    def tags(self) -> list[str]: ...
    @property
    def url(self) -> str: ...
    @property
    def protocol(self) -> str: ...
    @property
    def extensions(self) -> str: ...
    def set_origin(self, url: str, protocol: str) -> None: ...
    @property
    def attachment(self) -> bytes | None: ...
    def set_attachment(self, attachment: bytes | None) -> None: ...
    @property
    def auto_response_timestamp(self) -> float | None: ...

@final
class SocketLimits:
    def __new__(
        cls,
        *,
        max_message_size: int,
        max_buffered_bytes: int,
        idle_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        handshake_timeout: float,
        max_connections: int,
        max_body_size: int,
    ) -> Self: ...

@final
class ObjectState:
    @property
    def key(self) -> int: ...
    @property
    def name(self) -> tuple[str, str] | None: ...
    event_timeout_ms: int | None
    id_name: str | None
    resident: bool
    def auto_responses(self) -> list[tuple[str | bytes, str | bytes]]: ...
    def check_accept(self, more: int, tags: list[str]) -> None: ...
    def adopt(self, handle: SocketHandle, tags: list[str]) -> None: ...
    def sockets(self, tag: str | None = None) -> list[SocketHandle]: ...
    def count(self, tag: str | None = None) -> int: ...
    def broadcast(
        self, message: str | bytes, tag: str | None = None, exclude: int | None = None
    ) -> int: ...
    def set_auto_responses(self, pairs: list[tuple[str | bytes, str | bytes]]) -> None: ...

@final
class Store:
    def get(self, keys: list[str]) -> list[bytes | None]: ...
    def put(self, pairs: list[tuple[str, bytes]]) -> None: ...
    def delete(self, keys: list[str]) -> int: ...
    def delete_all(self) -> int: ...
    def list_range(
        self,
        prefix: str | None = None,
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> list[tuple[str, bytes]]: ...
    def exec(
        self, query: str, bindings: list[Any]
    ) -> tuple[list[str], list[list[Any]], int, int]: ...
    @property
    def database_size(self) -> int: ...
    def begin_block(self) -> None: ...
    def end_block(self, rollback: bool) -> None: ...
    def get_alarm(self) -> tuple[float, str] | None: ...
    def set_alarm(
        self, at: float | None, account: str = "default", id_name: str | None = None
    ) -> None: ...
    def close(self) -> None: ...
    @property
    def path(self) -> str: ...

@final
class PendingReply:
    @property
    def is_websocket(self) -> bool: ...
    def respond(self, status: int, headers: list[tuple[str, bytes]], body: bytes) -> None: ...
    def accept_websocket(
        self,
        headers: list[tuple[str, bytes]],
        slot: Slot | None = None,
        limits: SocketLimits | None = None,
    ) -> SocketHandle: ...
    def open(self) -> None: ...
    def respond_stream(self, status: int, headers: list[tuple[str, bytes]]) -> ResponseStream: ...

#: ``ResponseStream.write`` answers: queued with room for more; queued, wait for a BODY event;
#: dropped (the client is gone).
STREAM_ROOM: Final[int]
STREAM_FULL: Final[int]
STREAM_GONE: Final[int]

@final
class ResponseStream:
    @property
    def id(self) -> int: ...
    def write(self, chunk: bytes) -> int: ...
    def finish(self, ok: bool) -> None: ...

@final
class RequestFeed:
    @property
    def id(self) -> int: ...
    def read(self) -> None: ...

UNIT_REQUESTS: Final[int]
UNIT_CONNECTIONS: Final[int]
UNIT_MESSAGES_IN: Final[int]
UNIT_MESSAGES_OUT: Final[int]
UNIT_AUTO_RESPONSES: Final[int]
UNIT_CPU_NS: Final[int]
UNIT_DURATION_US: Final[int]
UNIT_BYTES_IN: Final[int]
UNIT_BYTES_OUT: Final[int]
UNIT_STORAGE_ROWS_READ: Final[int]
UNIT_STORAGE_ROWS_WRITTEN: Final[int]
UNIT_PROTOCOL_PINGS: Final[int]
UNIT_SUBREQUESTS: Final[int]
#: The names of the units, in the order of usage vectors (UNIT_<NAME> is the index).
UNIT_NAMES: Final[tuple[str, ...]]
UNITS: Final[int]

@final
class Meter:
    def __new__(cls) -> Self: ...
    def slot(
        self,
        account: str,
        namespace: str | None,
        object_id: str | None,
        cpu_limit_ms: float,
        wall_limit_ms: float = 0.0,
    ) -> Slot: ...
    def drain(self) -> list[tuple[str, str | None, str | None, list[int]]]: ...
    def totals(self) -> list[int]: ...

@final
class Slot:
    def add(self, unit: int, n: int) -> None: ...
    @property
    def account(self) -> str: ...
    @property
    def namespace(self) -> str | None: ...
    @property
    def object_id(self) -> str | None: ...
    @property
    def cpu_limit_ns(self) -> int | None: ...

@final
class Batch:
    def __iter__(self) -> Batch: ...
    def __next__(self) -> Event: ...
    def __len__(self) -> int: ...

@final
class Metered(Generic[_T]):
    """A coroutine whose steps are charged to a slot (``Server.metered``)."""

    def send(self, value: Any) -> Any: ...
    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any: ...
    def close(self) -> Any: ...
    def __await__(self) -> Generator[Any, None, _T]: ...
    def __iter__(self) -> Metered[_T]: ...
    def __next__(self) -> Any: ...

@final
class Reactor:
    """The core's reactor, as the selector of the asyncio loop (single-thread mode)."""

    def __new__(cls) -> Self: ...
    def watch(self, fd: int, events: int) -> None: ...
    def select(self, timeout: float | None = None) -> list[tuple[int, int]]: ...
    def close(self) -> None: ...

@final
class Server:
    def __new__(
        cls,
        host: str,
        port: int,
        *,
        limits: SocketLimits,
        io_threads: int,
        metering: bool = True,
        certfile: str | None = None,
        keyfile: str | None = None,
        smallest_cpu_limit: float = 30.0,
        data_dir: str | None = None,
        durability: str = "full",
        allowed_origins: list[str] | None = None,
        log_blocked_after: float = 1.0,
        on_blocked: Callable[[int, float], None] | None = None,
        compression: bool = False,
        reactor: Reactor | None = None,
        cluster: tuple[str, str, str, float, float] | None = None,
        reuse_port: bool = False,
        link_port: int | None = None,
        metrics: tuple[str, int, bool, int, float, list[str]] | None = None,
        meter: Meter | None = None,
        access_log: bool = False,
        stream_request_bodies: bool = False,
    ) -> Self: ...
    @property
    def address(self) -> tuple[str, int]: ...
    @property
    def metrics_address(self) -> tuple[str, int] | None: ...
    @property
    def single_threaded(self) -> bool: ...
    @property
    def thread_ident(self) -> int: ...
    def fileno(self) -> int: ...
    def socket(self, id: int) -> SocketHandle | None: ...
    def drain(self) -> Batch: ...
    def flush(self) -> None: ...
    def current_slot(self) -> Slot | None: ...
    def relabel(self, slot: Slot) -> None: ...
    def metered(self, coro: Coroutine[Any, Any, _T], slot: Slot) -> Metered[_T]: ...
    def connect(
        self,
        url: str,
        protocols: list[str],
        headers: list[tuple[str, str]],
        slot: Slot | None,
        token: int,
        ca_file: str | None = None,
    ) -> None: ...
    def fetch(
        self,
        url: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        token: int,
        timeout: float,
        connect_timeout: float,
        max_response_size: int,
        max_redirects: int | None,
        ca_file: str | None = None,
    ) -> None: ...
    def cancel_fetch(self, token: int) -> None: ...
    @property
    def open_sockets(self) -> int: ...
    def shutdown(self, code: int, reason: str) -> None: ...
    def stop(self) -> None: ...
    def commit(self) -> None: ...
    def open_store(self, namespace: str, object_id: str, owner: int) -> Store: ...
    def cluster_route(
        self, namespace: str, object_id: str
    ) -> tuple[int | None, str | None, str | None] | None: ...
    def cluster_known_route(
        self, namespace: str, object_id: str
    ) -> tuple[int | None, str | None, str | None] | None: ...
    def cluster_forget(self, namespace: str, object_id: str) -> None: ...
    def cluster_release(self, namespace: str, object_id: str) -> None: ...
    def cluster_lost(self) -> list[tuple[str, str]]: ...
    def cluster_peers(self) -> list[tuple[str, str]]: ...
    def cluster_stats(
        self,
    ) -> tuple[str, str, int, int, int, int, int, int, int] | None: ...
    def object_state(self, namespace: str, object_id: str, max_sockets: int) -> ObjectState: ...
    @property
    def live_objects(self) -> int: ...
    def hold_token(self, owner: int, token: int) -> int | None: ...
    def arm_alarm(
        self, namespace: str, object_id: str, at: float, retry: int, id_name: str | None = None
    ) -> None: ...
    @property
    def storage_bytes(self) -> int: ...
    def storage_stats(self) -> tuple[int, int, int, int, int, int, int]: ...

def install_log_queue(level: int) -> int: ...
def take_log_records() -> tuple[list[tuple[int, str, str, str | None, int | None]], int]: ...
