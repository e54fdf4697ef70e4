"""Durable Objects with hibernatable WebSockets, instrumented for the end-to-end tests.

Every instance counts itself into module globals that the Worker serves over plain HTTP routes
which never touch an object, so a test can tell whether Python ran without waking anything.

Namespaces (the first path segment picks one, the second is the object's name)
  /room/NAME     ROOMS   Room: app limits, hibernate_after=0.5 s
  /steady/NAME   STEADY  SteadyRoom: per-namespace limits, hibernate_after=60 s (stays resident)
  /small/NAME    SMALL   SmallRoom: at most 5 hibernatable WebSockets per object
  /async/NAME    ASYNC   AsyncRoom: `async def` handlers, hibernate_after=60 s
  /camel/NAME    CAMEL   CamelRoom: Cloudflare's camelCase handler and state method names

Worker routes that never touch an object
  GET /stats             constructor and handler counters per object name, whether the last
                         instance of each name is alive (after gc.collect()), close and error
                         records, the default socket cap
  GET /census            gc.collect(), then how many sw.WebSocket and sw.DurableObject instances
                         exist, and tracemalloc's current size (when tracing);
                         ?snapshot=mark takes a snapshot, ?snapshot=diff lists the top growth since
  GET /ids               results of the namespace id API (JSON)
Worker routes that call an object
  GET /rpc/NS/NAME/METHOD?args=JSON     `await stub.METHOD(*args)`; JSON result, or 500 + error
  GET /rpc-by-value/NAME                RPC arguments and results are copies
  GET /unique                           an object reached by new_unique_id(): its hex id + whoami
  GET /by-hex/HEX                       id_from_string(HEX), then whoami
  ANY /NS/NAME[...]                     `await stub.fetch(request)`

Object fetch: an upgrade accepts a hibernatable socket with `?tags=JSON-list` and optional
`?att=JSON` attachment; `?mode=standard` accepts a standard-API socket instead; `?raise=1` raises;
a plain GET answers whoami as JSON. A limit error from accept_websocket answers 400 + JSON.

Text commands on a hibernatable socket (anything else is echoed back, binary too):
  !whoami            {"uuid", "pyid", "name", "id", "cls", "constructed"}
  !info              {"url", "protocol"} of ws (an offered subprotocol "chat" is selected)
  !slow S            (AsyncRoom only) sleeps S seconds in the async handler, then "slept"
  !tags              get_tags(ws)                 !att       deserialize_attachment()
  !setatt N          attachment b"x" * N -> "ok" or "error TYPE"
  !setatt-json J     attachment json.loads(J)     !setatt-lambda   an unpicklable attachment
  !count [TAG]       websocket_count(TAG)         !sockets [TAG]   tags and attachments of
                                                                   get_websockets(TAG)
  !broadcast TAG|- EXCLUDE(0|1) TEXT    ctx.broadcast(TEXT, tag, exclude=ws if 1); no reply
  !bbroadcast TAG|- EXCLUDE(0|1) TEXT   same, as bytes
  !seq SENDER N      records N in arrival order for SENDER; no reply
  !done SENDER       answers "done SENDER" (every earlier message of that socket was handled)
  !order SENDER      the numbers recorded for SENDER by this instance (JSON list)
  !auto on|multi|off set_websocket_auto_response(...) -> get_websocket_auto_response() as JSON
  !autots            get_websocket_auto_response_timestamp(ws): JSON null, or
                     {"type", "utc": aware and UTC, "ts": POSIX seconds}
  !evt MS|none       set_hibernatable_websocket_event_timeout -> the getter's value
  !evt?              get_hibernatable_websocket_event_timeout()
  !wait S            ctx.wait_until(asyncio.sleep(S)) -> "waiting"
  !close CODE REASON ws.close(CODE, REASON)
  !raise             raises inside websocket_message
  !census            counts sw.WebSocket objects while holding get_websockets()
Tags with a meaning: "raise-on-close" and "raise-on-error" make those handlers raise.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import json
import tracemalloc
import uuid
import weakref
from collections import defaultdict
from typing import Any

import sockworker as sw

HIBERNATE_AFTER = 0.5

CONSTRUCTED: dict[str, int] = defaultdict(int)
HANDLED: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
LIVE: dict[str, weakref.ref[Any]] = {}
CLOSES: list[dict[str, Any]] = []
ERRORS: list[dict[str, Any]] = []


def _json(value: Any, status: int = 200) -> sw.Response:
    return sw.Response(
        json.dumps(value), status=status, headers={"content-type": "application/json"}
    )


def _count_websockets() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, sw.WebSocket))


def _stamp(value: datetime.datetime | None) -> str:
    """JSON: the timestamp as POSIX seconds, and whether it is an aware datetime in UTC."""
    if value is None:
        return json.dumps(None)
    aware_utc = (
        isinstance(value, datetime.datetime)
        and value.tzinfo is not None
        and value.utcoffset() == datetime.timedelta(0)
    )
    return json.dumps({"type": type(value).__name__, "utc": aware_utc, "ts": value.timestamp()})


def _describe(auto: Any) -> Any:
    """get_websocket_auto_response() as JSON: request/response of each pair (or its repr)."""
    if auto is None:
        return None
    if isinstance(auto, list | tuple):
        return [_describe(pair) for pair in auto]
    if hasattr(auto, "request") and hasattr(auto, "response"):
        return [repr(auto.request), repr(auto.response)]
    return repr(auto)


def _error(exc: BaseException) -> dict[str, Any]:
    return {
        "error": type(exc).__name__,
        "message": str(exc),
        "value_error": isinstance(exc, ValueError),
        "sockworker_error": isinstance(exc, sw.SockworkerError),
    }


class _Instrumented(sw.DurableObject):
    """Everything but the WebSocket handlers, which Room and CamelRoom name differently."""

    def __init__(self, ctx: sw.DurableObjectState, env: sw.Env) -> None:
        super().__init__(ctx, env)
        self.room_name = ctx.id.name or str(ctx.id)
        CONSTRUCTED[self.room_name] += 1
        LIVE[self.room_name] = weakref.ref(self)
        self.uuid = uuid.uuid4().hex
        self.order: dict[str, list[int]] = defaultdict(list)
        self.kept: Any = None

    # -- helpers -------------------------------------------------------------------------------

    def _count(self, kind: str) -> None:
        HANDLED[self.room_name][kind] += 1

    def whoami(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "pyid": id(self),
            "name": self.ctx.id.name,
            "id": str(self.ctx.id),
            "cls": type(self).__name__,
            "constructed": CONSTRUCTED[self.room_name],
        }

    # -- state-method indirection (CamelRoom uses the camelCase aliases) -----------------------

    def _accept(self, ws: sw.WebSocket, tags: list[str]) -> None:
        self.ctx.accept_websocket(ws, tags=tags)

    def _get_websockets(self, tag: str | None = None) -> list[sw.WebSocket]:
        return self.ctx.get_websockets(tag)

    def _get_tags(self, ws: sw.WebSocket) -> list[str]:
        return list(self.ctx.get_tags(ws))

    def _set_att(self, ws: sw.WebSocket, value: Any) -> None:
        ws.serialize_attachment(value)

    def _get_att(self, ws: sw.WebSocket) -> Any:
        return ws.deserialize_attachment()

    # -- fetch ---------------------------------------------------------------------------------

    def fetch(self, request: sw.Request) -> sw.Response:
        self._count("fetch")
        query = request.query
        if query.get("raise") == "1":
            raise RuntimeError(f"fetch-failure-{self.room_name}")
        if request.headers.get("upgrade", "").lower() != "websocket":
            return _json(self.whoami())
        client, server = sw.WebSocketPair()
        if query.get("mode") == "standard":
            server.accept()
            server.add_event_listener("message", lambda event: server.send(event.data))
            return sw.Response(status=101, websocket=client)
        tags = json.loads(query.get("tags", "[]"))
        try:
            self._accept(server, tags)
        except Exception as exc:
            return _json(_error(exc), status=400)
        if "att" in query:
            self._set_att(server, json.loads(query["att"]))
        offered = request.headers.get("sec-websocket-protocol", "")
        chosen = {"sec-websocket-protocol": "chat"} if "chat" in offered.split(", ") else {}
        return sw.Response(status=101, websocket=client, headers=chosen)

    # -- WebSocket handlers --------------------------------------------------------------------

    def _on_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        self._count("message")
        reply = self._command(ws, message)
        if reply is not None:
            ws.send(reply)

    def _command(self, ws: sw.WebSocket, message: str | bytes) -> str | bytes | None:
        if not isinstance(message, str) or not message.startswith("!"):
            return message
        verb, _, rest = message.partition(" ")
        if verb == "!seq":
            sender, _, n = rest.partition(" ")
            self.order[sender].append(int(n))
            return None
        if verb == "!done":
            return f"done {rest}"
        if verb == "!order":
            return json.dumps(self.order.get(rest, []))
        if verb == "!whoami":
            return json.dumps(self.whoami())
        if verb == "!info":
            return json.dumps({"url": ws.url, "protocol": ws.protocol})
        if verb == "!tags":
            return json.dumps(self._get_tags(ws))
        if verb == "!att":
            return json.dumps(repr(self._get_att(ws)))
        if verb in ("!setatt", "!setatt-json", "!setatt-lambda"):
            if verb == "!setatt":
                value: Any = b"x" * int(rest)
            elif verb == "!setatt-json":
                value = json.loads(rest)
            else:
                value = lambda: None  # noqa: E731 - deliberately unpicklable
            try:
                self._set_att(ws, value)
            except Exception as exc:
                return json.dumps({"ok": False, **_error(exc)})
            return json.dumps({"ok": True})
        if verb == "!count":
            return str(self.ctx.websocket_count(rest or None))
        if verb == "!sockets":
            sockets = self._get_websockets(rest or None)
            return json.dumps(
                [
                    {
                        "tags": self._get_tags(s),
                        "att": repr(self._get_att(s)),
                        "open": s.ready_state == sw.WebSocket.OPEN,
                    }
                    for s in sockets
                ]
            )
        if verb in ("!broadcast", "!bbroadcast"):
            tag, exclude, text = rest.split(" ", 2)
            payload: str | bytes = text if verb == "!broadcast" else text.encode()
            self.ctx.broadcast(
                payload, tag=None if tag == "-" else tag, exclude=ws if exclude == "1" else None
            )
            return None
        if verb == "!auto":
            if rest == "on":
                self.ctx.set_websocket_auto_response(sw.AutoResponse("ping", "pong"))
            elif rest == "multi":
                self.ctx.set_websocket_auto_response(
                    [sw.AutoResponse("ping", "pong"), sw.AutoResponse(b"\x01ping", b"\x02pong")]
                )
            else:
                self.ctx.set_websocket_auto_response(None)
            return json.dumps(_describe(self.ctx.get_websocket_auto_response()))
        if verb == "!autots":
            return _stamp(self.ctx.get_websocket_auto_response_timestamp(ws))
        if verb == "!evt":
            self.ctx.set_hibernatable_websocket_event_timeout(None if rest == "none" else int(rest))
            return repr(self.ctx.get_hibernatable_websocket_event_timeout())
        if verb == "!evt?":
            return repr(self.ctx.get_hibernatable_websocket_event_timeout())
        if verb == "!wait":
            self.ctx.wait_until(asyncio.sleep(float(rest)))
            return "waiting"
        if verb == "!close":
            code, _, reason = rest.partition(" ")
            ws.close(int(code), reason)
            return None
        if verb == "!raise":
            raise RuntimeError(f"message-failure-{self.room_name}")
        if verb == "!census":
            held = self._get_websockets()
            return json.dumps({"held": len(held), "websockets": _count_websockets()})
        return message

    def _on_close(self, ws: sw.WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self._count("close")
        tags = self._get_tags(ws)
        remaining = self._get_websockets()
        CLOSES.append(
            {
                "name": self.room_name,
                "code": code,
                "reason": reason,
                "was_clean": was_clean,
                "tags": tags,
                "att": repr(self._get_att(ws)),
                "remaining": len(remaining),
                "remaining_all_open": all(s.ready_state == sw.WebSocket.OPEN for s in remaining),
                "count": self.ctx.websocket_count(),
            }
        )
        if "raise-on-close" in tags:
            raise RuntimeError(f"close-failure-{self.room_name}")

    def _on_error(self, ws: sw.WebSocket, error: BaseException) -> None:
        self._count("error")
        tags = self._get_tags(ws)
        ERRORS.append(
            {
                "name": self.room_name,
                "error": type(error).__name__,
                "tags": tags,
                "is_exception": isinstance(error, BaseException),
            }
        )
        if "raise-on-error" in tags:
            raise RuntimeError(f"error-failure-{self.room_name}")

    # -- RPC -----------------------------------------------------------------------------------

    def order_seen(self) -> dict[str, list[int]]:
        self._count("rpc")
        return dict(self.order)

    def keep(self, value: Any) -> Any:
        self._count("rpc")
        value.append(4)
        self.kept = value
        return value

    def kept_value(self) -> Any:
        self._count("rpc")
        return self.kept

    def add(self, a: int, b: int) -> int:
        self._count("rpc")
        return a + b

    async def add_later(self, a: int, b: int) -> int:
        self._count("rpc")
        await asyncio.sleep(0.01)
        return a + b

    def sockets_info(self, tag: str | None = None) -> list[dict[str, Any]]:
        self._count("rpc")
        return [
            {"tags": self._get_tags(s), "att": repr(self._get_att(s))}
            for s in self._get_websockets(tag)
        ]

    def counts(self, tag: str | None = None) -> int:
        self._count("rpc")
        return self.ctx.websocket_count(tag)

    def boom(self) -> None:
        self._count("rpc")
        raise RuntimeError(f"rpc-failure-{self.room_name}")

    def _private(self) -> str:
        return "must not be reachable through a stub"


class Room(_Instrumented):
    def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:
        self._on_message(ws, message)

    def websocket_close(self, ws: sw.WebSocket, code: int, reason: str, was_clean: bool) -> None:
        self._on_close(ws, code, reason, was_clean)

    def websocket_error(self, ws: sw.WebSocket, error: BaseException) -> None:
        self._on_error(ws, error)


class SteadyRoom(Room):
    limits = sw.Limits(hibernate_after=60)


class SmallRoom(Room):
    max_hibernatable_websockets = 5


class AsyncRoom(Room):
    limits = sw.Limits(hibernate_after=60)

    async def fetch(self, request: sw.Request) -> sw.Response:  # type: ignore[override]
        await asyncio.sleep(0)
        return super().fetch(request)

    async def websocket_message(self, ws: sw.WebSocket, message: str | bytes) -> None:  # type: ignore[override]
        self._count("message")
        # Arrival order is recorded before the first await; the reply comes after it.
        if isinstance(message, str) and message.startswith("!slow "):
            await asyncio.sleep(float(message.removeprefix("!slow ")))
            reply: str | bytes | None = "slept"
        else:
            reply = self._command(ws, message)
        await asyncio.sleep(0)
        if reply is not None:
            ws.send(reply)


class CamelRoom(_Instrumented):
    """Written as it would be ported from Cloudflare: camelCase handlers and state methods."""

    def _accept(self, ws: sw.WebSocket, tags: list[str]) -> None:
        self.ctx.acceptWebSocket(ws, tags)

    def _get_websockets(self, tag: str | None = None) -> list[sw.WebSocket]:
        return self.ctx.getWebSockets(tag)

    def _get_tags(self, ws: sw.WebSocket) -> list[str]:
        return list(self.ctx.getTags(ws))

    def _set_att(self, ws: sw.WebSocket, value: Any) -> None:
        ws.serializeAttachment(value)

    def _get_att(self, ws: sw.WebSocket) -> Any:
        return ws.deserializeAttachment()

    def _command(self, ws: sw.WebSocket, message: str | bytes) -> str | bytes | None:
        if message == "!camel-auto":
            self.ctx.setWebSocketAutoResponse(sw.AutoResponse("ping", "pong"))
            return json.dumps(_describe(self.ctx.getWebSocketAutoResponse()))
        if message == "!camel-autots":
            return _stamp(self.ctx.getWebSocketAutoResponseTimestamp(ws))
        if message == "!camel-evt":
            self.ctx.setHibernatableWebSocketEventTimeout(1234)
            return repr(self.ctx.getHibernatableWebSocketEventTimeout())
        if message == "!camel-wait":
            self.ctx.waitUntil(asyncio.sleep(0.01))
            return "waiting"
        return super()._command(ws, message)

    # Cloudflare's handler names only: the runtime must find these.
    def webSocketMessage(self, ws: sw.WebSocket, message: str | bytes) -> None:
        self._on_message(ws, message)

    def webSocketClose(self, ws: sw.WebSocket, code: int, reason: str, wasClean: bool) -> None:
        self._on_close(ws, code, reason, wasClean)

    def webSocketError(self, ws: sw.WebSocket, error: BaseException) -> None:
        self._on_error(ws, error)


NAMESPACES = {
    "room": "ROOMS",
    "steady": "STEADY",
    "small": "SMALL",
    "async": "ASYNC",
    "camel": "CAMEL",
}


def _stub(env: Any, ns: str, name: str) -> Any:
    namespace = getattr(env, NAMESPACES[ns])
    return namespace.get(namespace.id_from_name(name))


def _stats() -> dict[str, Any]:
    gc.collect()
    return {
        "constructed": dict(CONSTRUCTED),
        "handled": {name: dict(kinds) for name, kinds in HANDLED.items()},
        "alive": {name: ref() is not None for name, ref in LIVE.items()},
        "closes": CLOSES,
        "errors": ERRORS,
        "default_max_sockets": sw.DurableObject.max_hibernatable_websockets,
        "now": sw.now(),
    }


SNAPSHOT: list[tracemalloc.Snapshot] = []


def _census(mode: str | None) -> dict[str, Any]:
    websockets = _count_websockets()
    objects = sum(1 for obj in gc.get_objects() if isinstance(obj, sw.DurableObject))
    tracing = tracemalloc.is_tracing()
    traced = tracemalloc.get_traced_memory()[0] if tracing else None
    result: dict[str, Any] = {"websockets": websockets, "objects": objects, "traced": traced}
    if tracing and mode == "mark":  # remember where memory is now
        SNAPSHOT[:] = [tracemalloc.take_snapshot()]
    elif tracing and mode == "diff" and SNAPSHOT:  # where it grew since the mark
        stats = tracemalloc.take_snapshot().compare_to(SNAPSHOT[0], "lineno")
        result["growth"] = [str(stat) for stat in stats[:15]]
    return result


def _ids(env: Any) -> dict[str, Any]:
    ns = env.ROOMS
    a1, a2, b = ns.id_from_name("a"), ns.id_from_name("a"), ns.id_from_name("b")
    u1, u2 = ns.new_unique_id(), ns.new_unique_id()
    bad: dict[str, Any] = {}
    for label, text in [
        ("short", "0" * 63),
        ("long", "0" * 65),
        ("not_hex", "z" * 64),
        ("empty", ""),
    ]:
        try:
            ns.id_from_string(text)
            bad[label] = None
        except Exception as exc:
            bad[label] = _error(exc)
    return {
        "a": str(a1),
        "a_again": str(a2),
        "a_equal": a1 == a2,
        "a_hash_equal": hash(a1) == hash(a2),
        "a_as_key": {a1: 1}.get(a2),
        "a_name": a1.name,
        "b": str(b),
        "a_ne_b": a1 != b,
        "b_name": b.name,
        "u1": str(u1),
        "u2": str(u2),
        "u_ne": u1 != u2,
        "u_name": u1.name,
        "round_trip": ns.id_from_string(str(u1)) == u1,
        "round_trip_named": ns.id_from_string(str(a1)) == a1,
        "bad": bad,
    }


async def fetch(request: sw.Request, env: Any, ctx: Any) -> sw.Response:
    parts = request.path.strip("/").split("/")
    head = parts[0]
    if head == "stats":
        return _json(_stats())
    if head == "census":
        return _json(_census(request.query.get("snapshot")))
    if head == "ids":
        return _json(_ids(env))
    if head == "rpc" and len(parts) == 4:
        _, ns, name, method = parts
        args = json.loads(request.query.get("args", "[]"))
        try:
            result = await getattr(_stub(env, ns, name), method)(*args)
        except Exception as exc:
            return _json(_error(exc), status=500)
        return _json({"result": result})
    if head == "rpc-by-value" and len(parts) == 2:
        stub = _stub(env, "steady", parts[1])
        args = [1, 2, 3]
        result = await stub.keep(args)
        args.append("caller")
        again = await stub.kept_value()
        return _json({"args": args, "result": result, "again": again, "same": result is args})
    if head == "unique":
        unique = env.STEADY.new_unique_id()
        who = await env.STEADY.get(unique).whoami()
        return _json({"id": str(unique), "name": unique.name, "who": who})
    if head == "by-hex" and len(parts) == 2:
        try:
            the_id = env.STEADY.id_from_string(parts[1])
        except ValueError as exc:
            return _json(_error(exc), status=400)
        return _json({"who": await env.STEADY.get(the_id).whoami()})
    if head in NAMESPACES and len(parts) >= 2:
        stub = _stub(env, head, parts[1])
        response: sw.Response = await stub.fetch(request)
        return response
    return sw.Response("not found", status=404)


app = sw.App(
    fetch=fetch,
    durable_objects={
        "ROOMS": Room,
        "STEADY": SteadyRoom,
        "SMALL": SmallRoom,
        "ASYNC": AsyncRoom,
        "CAMEL": CamelRoom,
    },
    limits=sw.Limits(hibernate_after=HIBERNATE_AFTER),
)
