"""``Nodes``: this node's part of a cluster (SPEC §7) on the Python side. The core holds the
leases and the storage (``cluster.rs``); this routes an object's events to the node that owns
it, over one WebSocket link per pair of nodes, and serves what other nodes forward here.

A link is an ordinary WebSocket between two nodes (``/_sockworker/cluster`` on the node's
port, proved with an HMAC of the dialing node's id under the cluster's secret). Each binary
message is one pickled ``(op, request id, body)``; requests of either side are multiplexed on it
and answered in any order.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import logging
import pickle
from typing import TYPE_CHECKING, Any

from .. import _native
from ..errors import ClusterError, StorageError
from ..http import Headers, Request, Response
from ..state import DurableObjectId
from ..websocket import CloseCode, MessageEvent, WebSocket, WebSocketPair
from .contract import Owner
from .remote import Accepted, Info, ObjectRef, Relay, RemoteHandle

if TYPE_CHECKING:
    from ..cluster import Cluster
    from .connecting import Outgoing
    from .contract import ObjectKind
    from .host import ObjectHost, Objects
    from .services import Services

logger = logging.getLogger("sockworker")

CLUSTER_PATH = "/_sockworker/cluster"
_HEADER_NODE = "x-sockworker-node"
_HEADER_PROOF = "x-sockworker-proof"
#: Seconds a forwarded event may take before the sender gives up on it.
FORWARD_TIMEOUT = 30.0
#: Seconds a node that takes an object waits for another node to say which sockets of it it
#: holds (a live node answers at once; one paused or dying must not hold the object's events).
GATHER_TIMEOUT = 2.0


class NotOwner(Exception):
    """Answered by a node that no longer owns the object: the sender routes again."""


class LinkLost(ClusterError):
    """The link closed after a request went out: the owner may have run it, or not. It is not
    sent again (an event runs at most once); the caller sees this error."""


class Link:
    """One WebSocket to another node; requests both ways, by id."""

    def __init__(self, nodes: Nodes, peer: str, ws: WebSocket) -> None:
        self.nodes = nodes
        self.peer = peer
        self.ws = ws
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        # Socket events sent on this link and not yet acknowledged, in order: sent again
        # (routed anew) if the link closes first.
        self.unacked: dict[int, tuple[Relay, Info, str, tuple[Any, ...]]] = {}
        # Events of this loop iteration, sent in one message at its end.
        self.evbox: list[tuple[int, str, ObjectRef, tuple[Any, ...], tuple[Any, ...]]] = []
        ws.add_event_listener("message", self._on_message)
        ws.add_event_listener("close", self._on_close)

    def request(self, op: str, body: Any) -> asyncio.Future[Any]:
        rid = next(self.ids)
        future: asyncio.Future[Any] = self.nodes.services.loop.create_future()
        self.pending[rid] = future
        try:
            self.ws.send(pickle.dumps((op, rid, body), protocol=pickle.HIGHEST_PROTOCOL))
        except Exception as error:
            del self.pending[rid]
            raise ClusterError(f"the link to node {self.peer!r} is closed: {error}") from None
        return future

    def _on_message(self, event: MessageEvent) -> None:
        data = event.data
        if not isinstance(data, bytes):
            self.ws.close(1003, "binary messages only")
            return
        op, rid, body = pickle.loads(data)
        if op == "evs":
            # Sockets' events, from the node that holds the sockets: in order, at once. The
            # acknowledgement goes through the output gate: it leaves once what the events'
            # handlers wrote is durable (with what they sent, in one message when it can).
            for _rid, name, obj, info, args in body:
                self.nodes.on_socket_event(self.peer, name, obj, info, args)
            last = body[-1][0] if body else 0
            if self.nodes.links.get(self.peer) is self:
                self.nodes.out(self.peer, ("ack", last))
            elif self.open:
                self.send(("out", 0, [("ack", last)]))
            return
        if op == "out":
            # What an owner did with sockets held here, and its acknowledgements.
            self.nodes.apply(body, self)
            return
        if op in ("ok", "err", "moved"):
            future = self.pending.pop(rid, None)
            if future is None or future.done():
                return
            if op == "ok":
                future.set_result(body)
            elif op == "moved":
                future.set_exception(NotOwner(body))
            else:
                future.set_exception(ClusterError(f"node {self.peer!r}: {body}"))
            return
        self.nodes.services.spawn(self._serve(op, rid, body), "a forwarded event")

    async def _serve(self, op: str, rid: int, body: Any) -> None:
        try:
            result = await self.nodes.serve(op, body, self.peer)
            answer: tuple[str, int, Any] = ("ok", rid, result)
        except NotOwner as moved:
            answer = ("moved", rid, str(moved))
        except Exception as error:  # the sender's caller sees it as a ClusterError
            if not isinstance(error, ClusterError):
                logger.exception("a %s forwarded by node %s failed", op, self.peer)
            answer = ("err", rid, f"{type(error).__name__}: {error}")
        if self.ws.ready_state == WebSocket.OPEN:
            self.ws.send(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))

    def send(self, message: tuple[str, int, Any]) -> None:
        self.ws.send(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def send_event(self, event: tuple[Relay, Info, str, tuple[Any, ...]]) -> None:
        relay, info, name, args = event
        rid = next(self.ids)
        self.unacked[rid] = event
        if not self.evbox:
            self.nodes.services.loop.call_soon(self._flush_events)
        # (A plain tuple: a NamedTuple pickles by name, four times slower and larger.)
        self.evbox.append((rid, name, relay.obj, tuple(info), args))

    def _flush_events(self) -> None:
        evbox, self.evbox = self.evbox, []
        # (A link closed meanwhile sent its unacknowledged events again already.)
        if evbox and self.open:
            self.send(("evs", 0, evbox))

    def acknowledged(self, last: int) -> None:
        """The owner handled every event up to ``last``."""
        unacked = self.unacked
        while unacked:
            rid = next(iter(unacked))
            if rid > last:
                break
            del unacked[rid]

    @property
    def open(self) -> bool:
        return self.ws.ready_state == WebSocket.OPEN

    def _on_close(self, _event: Any) -> None:
        if self.nodes.links.get(self.peer) is self:
            del self.nodes.links[self.peer]
            self.nodes.peer_lost(self.peer)
        unacked, self.unacked = list(self.unacked.values()), {}
        if unacked:
            self.nodes.resend(self.peer, unacked)
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    LinkLost(
                        f"the link to node {self.peer!r} closed before it answered; the event "
                        "may or may not have run there"
                    )
                )


def _owner(routed: tuple[int | None, str | None, str | None] | None) -> Owner | int:
    """An answer of the core's cluster routing: this node's epoch, or the owner node."""
    assert routed is not None, "the server was started in cluster mode"
    epoch, node, address = routed
    return epoch if epoch is not None else Owner(node or "?", address)


class Nodes:
    """Routing of object events in cluster mode, and the links to the other nodes."""

    def __init__(
        self, services: Services, objects: Objects, settings: Cluster, outgoing: Outgoing
    ) -> None:
        self.services = services
        self.objects = objects
        self.settings = settings
        # Where the links to other nodes are dialed from (outgoing sockets of the runtime).
        self.outgoing = outgoing
        stats = services.server.cluster_stats()
        assert stats is not None, "the server was started in cluster mode"
        self.node_id = stats[0]
        self.links: dict[str, Link] = {}
        self.dialing: dict[str, asyncio.Future[Link]] = {}
        self.watcher: asyncio.Task[None] | None = None
        # As an owner: the sockets of its objects held by other nodes, by object, by (node,
        # socket id) and (until the holder names them) by token.
        self.remote: dict[tuple[str, str], dict[int, RemoteHandle]] = {}
        self.held: dict[tuple[str, int], RemoteHandle] = {}
        self.unbound: dict[int, RemoteHandle] = {}
        self.outbox: dict[str, list[tuple[Any, ...]]] = {}
        self.flushing = False
        # As a holder: socket events waiting for a link to their owner, by owner node.
        self.waiting: dict[str, list[tuple[Relay, Info, str, tuple[Any, ...]]]] = {}
        # Objects whose sockets on other nodes were asked for, with the epoch taken.
        self.gathered: dict[tuple[str, str], int] = {}
        # Objects whose owner PostgreSQL is being asked for (route_async), by object.
        self.asking: dict[tuple[str, str], asyncio.Future[Owner | int]] = {}

    # -- routing --------------------------------------------------------------------------------

    def owner(self, binding: str, object_id: str) -> Owner | int:
        """Who serves the object: another node, or this node's epoch of its lease (taken now
        if it was free). One call to the core: a map lookup while the lease is known valid,
        else a PostgreSQL statement that holds up the calling thread (see ``route_async``)."""
        return _owner(self.services.server.cluster_route(binding, object_id))

    def route(self, binding: str, object_id: str) -> Owner | None:
        """The node that owns the object, or None when it is this one."""
        owner = self.owner(binding, object_id)
        return None if isinstance(owner, int) else owner

    async def route_async(self, binding: str, object_id: str) -> Owner | None:
        """``route`` without holding up the event loop: when PostgreSQL must be asked (an object
        this node has not seen lately, or taking it), the statement runs on a worker thread while
        the loop serves other events, and concurrent events of one object wait for the same
        answer (two takes would each raise the epoch)."""
        known = self.services.server.cluster_known_route(binding, object_id)
        if known is not None:
            owner = _owner(known)
        else:
            key = (binding, object_id)
            asking = self.asking.get(key)
            if asking is None:
                loop = asyncio.get_running_loop()
                asking = loop.run_in_executor(None, self.owner, binding, object_id)
                self.asking[key] = asking
                asking.add_done_callback(lambda _: self.asking.pop(key, None))
            owner = await asyncio.shield(asking)
        return None if isinstance(owner, int) else owner

    def epoch(self, binding: str, object_id: str) -> int:
        """This node's epoch of the object's lease; ``ClusterError`` when another node owns it."""
        owner = self.owner(binding, object_id)
        if isinstance(owner, Owner):
            raise ClusterError(f"object {object_id} of {binding} is owned by node {owner.node!r}")
        return owner

    async def forward(
        self, kind: ObjectKind, object_id: DurableObjectId, op: str, body: Any
    ) -> Any:
        """Runs ``op`` on the node that owns the object and returns its result. When the owner
        cannot be reached (it died, and its lease has not expired yet), tries again until its
        lease can have expired (``lease + 2 * renew`` seconds): then this node takes the object,
        or sees who did. ``NotOwner`` when the object is (now) this node's own."""
        binding, hex_id = kind.binding, str(object_id)
        loop = self.services.loop
        settings = self.settings
        deadline = loop.time() + settings.lease + 2 * settings.renew
        pause = min(settings.renew / 2, 0.25)
        while True:
            owner = await self.route_async(binding, hex_id)
            if owner is None:
                raise NotOwner("the object is owned by this node now")
            try:
                link = await self.link_to(owner)
                future = link.request(op, (binding, hex_id, object_id.name, body))
                return await asyncio.wait_for(future, FORWARD_TIMEOUT)
            except NotOwner:
                # It moved: ask PostgreSQL where to (no pause, the answer is there now).
                self.services.server.cluster_forget(binding, hex_id)
                if loop.time() < deadline:
                    continue
                raise ClusterError(f"object {hex_id} of {binding} keeps moving") from None
            except LinkLost:
                self.services.server.cluster_forget(binding, hex_id)
                raise
            except TimeoutError:
                self.services.server.cluster_forget(binding, hex_id)
                raise LinkLost(
                    f"node {owner.node!r} did not answer within {FORWARD_TIMEOUT:g} s; the event "
                    "may or may not have run there"
                ) from None
            except (ClusterError, OSError) as error:
                self.services.server.cluster_forget(binding, hex_id)
                if loop.time() >= deadline:
                    raise ClusterError(
                        f"object {hex_id} of {binding}: its owner, node {owner.node!r}, cannot be "
                        f"reached ({error})"
                    ) from None
            # The owner is down and its lease still live: wait a little for it to expire.
            await asyncio.sleep(pause)

    # -- links ----------------------------------------------------------------------------------

    def proof(self, node: str) -> str:
        return hmac.new(self.settings.link_secret, node.encode(), hashlib.sha256).hexdigest()

    async def link_to(self, owner: Owner) -> Link:
        link = self.links.get(owner.node)
        if link is not None and link.ws.ready_state == WebSocket.OPEN:
            return link
        dialing = self.dialing.get(owner.node)
        if dialing is None:
            if owner.address is None:
                raise ClusterError(f"node {owner.node!r} has not registered an address")
            dialing = self.services.loop.create_future()
            self.dialing[owner.node] = dialing
            self.services.spawn(self._dial(owner, dialing), "dialing a node")
        return await asyncio.shield(dialing)

    async def _dial(self, owner: Owner, done: asyncio.Future[Link]) -> None:
        try:
            headers = [(_HEADER_NODE, self.node_id), (_HEADER_PROOF, self.proof(self.node_id))]
            ws = await self.outgoing.connect(
                f"ws://{owner.address}{CLUSTER_PATH}", [], headers, accepted=True
            )
            link = Link(self, owner.node, ws)
            self.links[owner.node] = link
            done.set_result(link)
        except Exception as error:
            done.set_exception(ClusterError(f"node {owner.node!r} at {owner.address}: {error}"))
            done.exception()  # (retrieved: the waiters may all have gone)
        finally:
            self.dialing.pop(owner.node, None)

    def accept(self, request: Request) -> Response:
        """A node dials this one: the link is accepted if its proof holds."""
        node = request.headers.get(_HEADER_NODE, "")
        proof = request.headers.get(_HEADER_PROOF, "")
        if request.headers.get("upgrade", "").lower() != "websocket":
            return Response("a cluster link is a WebSocket\n", status=426)
        if not node or not hmac.compare_digest(proof, self.proof(node)):
            return Response("not a node of this cluster\n", status=403)
        client, server = WebSocketPair()
        server.accept()
        old = self.links.get(node)
        self.links[node] = Link(self, node, server)
        if old is not None and old.ws.ready_state == WebSocket.OPEN:
            logger.debug("cluster: node %s dialed again; both links stay until one closes", node)
        return Response(status=101, websocket=client)

    # -- what other nodes forward here -----------------------------------------------------------

    async def serve(self, op: str, body: Any, peer: str) -> Any:
        binding, hex_id, id_name, payload = body
        kind = self.objects.kinds.get(binding)
        if kind is None:
            raise ClusterError(f"this node's app has no namespace {binding!r}")
        if op == "sockets":
            # Another node took the object: the sockets of it held here, and the events of
            # theirs still unacknowledged by the node that owned it before (paused, perhaps)
            # go to the new owner.
            state = self.services.server.object_state(
                binding, hex_id, kind.cls.max_hibernatable_websockets
            )
            self._redirect_unacked((binding, hex_id), peer)
            infos = [tuple(Info.of(handle)) for handle in state.sockets(None)]
            return infos, state.auto_responses()
        epoch = self.owner(binding, hex_id)
        if isinstance(epoch, Owner):
            raise NotOwner(f"node {self.node_id!r} does not own the object")
        host = self.objects.host(kind, DurableObjectId(hex_id, id_name), epoch)
        if op == "fetch":
            method, url, headers, data = payload
            response = await host.call("fetch", Request(method, url, Headers(headers), data))
            if not isinstance(response, Response):
                raise ClusterError(f"{host.cls.__name__}.fetch must return a Response")
            if response.websocket is not None:
                return self._accept_for_peer(host, peer, url, response)
            if response.stream is not None:
                close = getattr(response.stream, "aclose", None)
                if close is not None:
                    await close()
                raise ClusterError(
                    f"{host.cls.__name__}.fetch answered a streamed body, which is not forwarded "
                    "between nodes (yet): stream from a Worker, or return bytes"
                )
            host.returned(response)
            return ("http", response.status, list(response.headers.items()), response.body)
        if op == "rpc":
            name, args, kwargs = payload
            return await host.call(name, *args, **kwargs)
        raise ClusterError(f"unknown forwarded operation {op!r}")

    def _accept_for_peer(
        self, host: ObjectHost, peer: str, url: str, response: Response
    ) -> tuple[Any, ...]:
        """The object accepted a socket for a request that reached node ``peer``: the socket
        will be held there, and is a ``RemoteHandle`` here."""
        client = response.websocket
        server_end = client._peer if client is not None else None
        if response.status != 101 or server_end is None:
            raise ClusterError(
                "a Response with a websocket must have status 101 and a pair's client end"
            )
        if server_end._object is not host:
            raise ClusterError(
                "only a socket accepted with ctx.accept_websocket() can be held by another node "
                "than its object's (the standard API's server.accept() cannot yet)"
            )
        tags = server_end._take_tags()
        protocol = response.headers.get("sec-websocket-protocol", "")
        ws_url = "ws" + url.removeprefix("http")
        handle = RemoteHandle(self, peer, (host.kind.binding, str(host.id)), tags, ws_url, protocol)
        host.pending_accepts -= 1
        server_end._bind(handle, self.services, ws_url, protocol)  # type: ignore[arg-type]
        host.sockets[handle.id] = server_end
        self.services.sockets[handle.id] = server_end
        self.unbound[handle.id] = handle
        self.remote.setdefault(handle.obj, {})[handle.id] = handle
        return (
            "ws",
            self.node_id,
            handle.id,
            list(response.headers.items()),
            tags,
            host.native.auto_responses(),
        )

    def response(self, kind: ObjectKind, object_id: DurableObjectId, result: Any) -> Response:
        """The Response here for what the owner answered a forwarded fetch."""
        if result[0] == "http":
            _, status, headers, body = result
            return Response(body, status, Headers(headers))
        _, owner, token, headers, tags, auto_responses = result
        client, server_end = WebSocketPair()
        accepted = Accepted(
            self,
            kind,
            (kind.binding, str(object_id), object_id.name),
            owner,
            token,
            tags,
            auto_responses,
        )
        server_end._accept_for(accepted, tags, kind.socket_limits)
        return Response(status=101, headers=Headers(headers), websocket=client)

    # -- sockets held here for objects owned elsewhere --------------------------------------------

    def adopt(self, accepted: Accepted, ws: WebSocket, handle: _native.SocketHandle) -> None:
        """The 101 went out: the socket joins its object's core state here, and the owner
        learns its id. Its Python object is not kept (the next event makes one)."""
        binding, hex_id, _ = accepted.obj
        state = self.services.server.object_state(
            binding, hex_id, accepted.kind.cls.max_hibernatable_websockets
        )
        handle.set_origin(ws.url or "", ws.protocol)
        state.adopt(handle, ws._take_tags() or accepted.tags)
        if accepted.auto_responses:
            state.set_auto_responses(accepted.auto_responses)
        self.services.sockets.pop(handle.id, None)
        owner = Owner(accepted.owner_node, None)
        self._event(owner, accepted, Info.of(handle), "ws_bound", (accepted.token,))

    def relay(self, handle: _native.SocketHandle) -> WebSocket | None:
        """The Python object for an event of a socket held here whose object is owned by
        another node (its events are relayed); None when the object is this node's."""
        state = handle.object
        name = state.name if state is not None else None
        if state is None or name is None:
            return None
        kind = self.objects.kinds.get(name[0])
        if kind is None:
            return None
        try:
            owner = self.route(name[0], name[1])
        except StorageError as error:
            logger.warning(
                "an event of socket %d waits for the cluster database: %s", handle.id, error
            )
            return None
        if owner is None:
            return None
        relay = Relay(self, kind, (name[0], name[1], state.id_name), owner)
        return WebSocket._revive(handle, self.services, relay)

    def socket_event(self, relay: Relay, ws: WebSocket, name: str, args: tuple[Any, ...]) -> None:
        handle = ws._handle
        if handle is None:
            return
        owner = relay.owner
        if owner is None:
            binding, hex_id, _ = relay.obj
            try:
                owner = self.route(binding, hex_id)
            except StorageError as error:
                logger.warning("an event of socket %d is dropped: %s", handle.id, error)
                return
        self._event(owner, relay, Info.of(handle), name, args)

    def _event(
        self, owner: Owner | None, relay: Relay, info: Info, name: str, args: tuple[Any, ...]
    ) -> None:
        """Sends a socket's event to its object's owner, after any still waiting for it."""
        if owner is None:
            self.on_socket_event(self.node_id, name, relay.obj, info, args)
            return
        link = self.links.get(owner.node)
        queue = self.waiting.get(owner.node)
        if link is not None and link.open and not queue:
            link.send_event((relay, info, name, args))
            return
        if queue is None:
            queue = self.waiting[owner.node] = []
            self.services.spawn(self._deliver(owner.node), "relaying socket events")
        queue.append((relay, info, name, args))

    async def _deliver(self, node: str) -> None:
        """Sends the events waiting for ``node`` once a link to it is open; when it cannot be
        reached, routes them again (its objects move once its leases expire)."""
        loop = self.services.loop
        deadline = loop.time() + self.settings.lease + 2 * self.settings.renew
        while True:
            queue = self.waiting.get(node)
            if not queue:
                self.waiting.pop(node, None)
                return
            relay = queue[0][0]
            binding, hex_id, _ = relay.obj
            try:
                owner = self.route(binding, hex_id)
                if owner is not None and owner.node == node:
                    address = owner.address or next(
                        (a for n, a in self.services.server.cluster_peers() if n == node), None
                    )
                    link = await self.link_to(Owner(node, address))
                    while queue and link.open:
                        link.send_event(queue.pop(0))
                    continue
            except (ClusterError, StorageError, OSError) as error:
                if loop.time() >= deadline:
                    logger.warning(
                        "%d socket events for node %s are dropped: %s", len(queue), node, error
                    )
                    self.waiting.pop(node, None)
                    return
                self.services.server.cluster_forget(binding, hex_id)
                await asyncio.sleep(min(self.settings.renew / 2, 0.25))
                continue
            # The object moved (or is this node's now): its events follow it.
            self.waiting.pop(node, None)
            for relay, info, name, args in queue:
                moved = self.route(relay.obj[0], relay.obj[1])
                self._event(moved, relay, info, name, args)
            return

    def resend(self, node: str, events: list[tuple[Relay, Info, str, tuple[Any, ...]]]) -> None:
        """Events sent to ``node`` that it did not acknowledge before its link closed: they go
        again, before any sent since, to wherever their objects are (a new owner, once the
        dead one's lease expires). One the owner ran but could not acknowledge runs twice."""
        queue = self.waiting.get(node)
        if queue is None:
            self.waiting[node] = list(events)
            self.services.spawn(self._deliver(node), "relaying socket events")
        else:
            queue[:0] = events

    def _redirect_unacked(self, obj: tuple[str, str], owner: str) -> None:
        moved: list[tuple[Relay, Info, str, tuple[Any, ...]]] = []
        for node, link in list(self.links.items()):
            if node == owner:
                continue
            for rid, event in list(link.unacked.items()):
                if event[0].obj[:2] == obj:
                    del link.unacked[rid]
                    moved.append(event)
        for relay, info, name, args in moved:
            if owner == self.node_id:
                self.on_socket_event(self.node_id, name, relay.obj, info, args)
            else:
                self._event(Owner(owner, None), relay, info, name, args)

    def took(self, binding: str, hex_id: str) -> None:
        """This node took the object: the events its own sockets of it had sent to the owner
        before (paused, perhaps) and that were not acknowledged are its own now, first."""
        self._redirect_unacked((binding, hex_id), self.node_id)

    def apply(self, ops: list[tuple[Any, ...]], link: Link) -> None:
        """What the owner of an object did with its sockets held here, in order."""
        server = self.services.server
        for op in ops:
            what = op[0]
            if what == "ack":
                link.acknowledged(op[1])
                continue
            if what == "broadcast":
                _, binding, hex_id, data, tag, exclude = op
                kind = self.objects.kinds.get(binding)
                if kind is not None:
                    state = server.object_state(
                        binding, hex_id, kind.cls.max_hibernatable_websockets
                    )
                    state.broadcast(data, tag, exclude)
                continue
            if what == "auto":
                _, binding, hex_id, pairs = op
                kind = self.objects.kinds.get(binding)
                if kind is not None:
                    state = server.object_state(
                        binding, hex_id, kind.cls.max_hibernatable_websockets
                    )
                    state.set_auto_responses(pairs)
                continue
            handle = server.socket(op[1])
            if handle is None:
                continue
            if what == "send":
                handle.send(op[2])
            elif what == "close":
                handle.close(op[2], op[3])
            elif what == "attach":
                handle.set_attachment(op[2])

    # -- an owner's sockets on other nodes --------------------------------------------------------

    def on_socket_event(
        self, peer: str, name: str, obj: ObjectRef, info: Info, args: tuple[Any, ...]
    ) -> None:
        """An event of a socket held by node ``peer`` (this node itself after a failover) for
        an object that should be this node's."""
        binding, hex_id, id_name = obj
        kind = self.objects.kinds.get(binding)
        if kind is None:
            return
        info = Info(*info)
        try:
            owner = self.owner(binding, hex_id)
        except StorageError as error:
            logger.warning("an event of a socket on node %s is dropped: %s", peer, error)
            return
        if isinstance(owner, Owner):
            # Not this node's (any more): on to the owner.
            self._event(owner, Relay(self, kind, obj), info, name, args)
            return
        host = self.objects.host(kind, DurableObjectId(hex_id, id_name), owner)
        if peer == self.node_id:
            # Held here and owned here now: an ordinary socket of the object.
            handle = self.services.server.socket(info.socket_id)
            if handle is None:
                return
            if name == "ws_close":
                ws = WebSocket._revive(handle, self.services, host)
                ws._on_close(*args)
                return
            ws = host.revive(handle)
            if name == "ws_message":
                ws._on_message(args[0])
            elif name == "ws_error":
                ws._on_error(args[0])
            return
        if name == "ws_bound":
            remote = self.unbound.pop(args[0], None)
            if remote is None:
                return
            self.held[(peer, info.socket_id)] = remote
            remote.bound(info.socket_id)
            return
        remote = self.held.get((peer, info.socket_id))
        if remote is None:
            remote = self._register(peer, (binding, hex_id), info)
        else:
            remote.refresh(info)
        if name == "ws_close":
            self._forget(remote)
            ws = host.sockets.pop(remote.id, None) or WebSocket._revive(remote, self.services, host)  # type: ignore[arg-type]
            self.services.sockets.pop(remote.id, None)
            ws._on_close(*args)
            return
        ws = host.revive(remote)  # type: ignore[arg-type]
        if name == "ws_message":
            ws._on_message(args[0])
        elif name == "ws_error":
            ws._on_error(args[0])

    def _register(self, peer: str, obj: tuple[str, str], info: Info) -> RemoteHandle:
        remote = RemoteHandle(
            self,
            peer,
            obj,
            info.tags,
            info.url,
            info.protocol,
            info.extensions,
            info.socket_id,
            info.attachment,
        )
        self.held[(peer, info.socket_id)] = remote
        self.remote.setdefault(obj, {})[remote.id] = remote
        return remote

    def _forget(self, remote: RemoteHandle) -> None:
        remote.closed = True
        if remote.socket_id is not None:
            self.held.pop((remote.node, remote.socket_id), None)
        self.unbound.pop(remote.id, None)
        sockets = self.remote.get(remote.obj)
        if sockets is not None:
            sockets.pop(remote.id, None)
            if not sockets:
                del self.remote[remote.obj]

    def peer_lost(self, peer: str) -> None:
        """The link to ``peer`` closed: the sockets it held for objects here are gone (closed
        with 1006 for their objects); if it is alive, their next events bring them back."""
        for remote in [r for r in self.held.values() if r.node == peer]:
            self._forget(remote)
            kind = self.objects.kinds.get(remote.obj[0])
            host = self.objects.resident(remote.obj[0], DurableObjectId(remote.obj[1]))
            if kind is None or host is None:
                continue
            ws = host.sockets.pop(remote.id, None)
            self.services.sockets.pop(remote.id, None)
            if ws is not None:
                ws._on_close(1006, f"node {peer} unreachable", False)

    def has_remote(self, binding: str, hex_id: str) -> bool:
        return bool(self.remote.get((binding, hex_id)))

    def remote_sockets(self, binding: str, hex_id: str, tag: str | None) -> list[RemoteHandle]:
        sockets = self.remote.get((binding, hex_id))
        if not sockets:
            return []
        return [r for r in sockets.values() if not r.closed and (tag is None or tag in r.tags)]

    def broadcast(
        self, binding: str, hex_id: str, data: str | bytes, tag: str | None, exclude: int | None
    ) -> int:
        """One message per node holding sockets of the object; returns the sockets reached."""
        by_node: dict[str, tuple[int, int | None]] = {}
        for remote in self.remote_sockets(binding, hex_id, tag):
            if remote.socket_id is None:
                remote.send(data)  # (not named yet: queued on its own)
                continue
            count, excluded = by_node.get(remote.node, (0, None))
            if remote.id == exclude:
                by_node[remote.node] = (count, remote.socket_id)
            else:
                by_node[remote.node] = (count + 1, excluded)
        payload = data if isinstance(data, str) else bytes(data)
        for node, (_, excluded) in by_node.items():
            self.out(node, ("broadcast", binding, hex_id, payload, tag, excluded))
        return sum(count for count, _ in by_node.values())

    def auto_responses_changed(
        self, binding: str, hex_id: str, pairs: list[tuple[str | bytes, str | bytes]]
    ) -> None:
        for node in {r.node for r in self.remote_sockets(binding, hex_id, None)}:
            self.out(node, ("auto", binding, hex_id, pairs))

    def out(self, node: str, op: tuple[Any, ...]) -> None:
        """Queues ``op`` for ``node``; what one loop iteration queued goes in one message."""
        self.outbox.setdefault(node, []).append(op)
        if not self.flushing:
            self.flushing = True
            self.services.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        outbox, self.outbox = self.outbox, {}
        for node, ops in outbox.items():
            link = self.links.get(node)
            if link is not None and link.open:
                link.send(("out", 0, ops))
            else:
                self.services.spawn(self._send_later(node, ops), "sending to a node")

    async def _send_later(self, node: str, ops: list[tuple[Any, ...]]) -> None:
        address = next((a for n, a in self.services.server.cluster_peers() if n == node), None)
        try:
            link = await self.link_to(Owner(node, address))
        except ClusterError as error:
            logger.warning(
                "%d operations on sockets held by node %s are lost: %s", len(ops), node, error
            )
            return
        link.send(("out", 0, ops))

    async def gather(self, kind: ObjectKind, object_id: DurableObjectId) -> None:
        """This node took the object: the sockets other nodes hold for it join it here."""
        binding, hex_id = kind.binding, str(object_id)
        peers = self.services.server.cluster_peers()

        async def ask(node: str, address: str) -> None:
            async def sockets() -> Any:
                link = await self.link_to(Owner(node, address))
                return await link.request("sockets", (binding, hex_id, object_id.name, None))

            # (One bound for dialing and answering: a node that is paused accepts the TCP
            # connection and answers nothing; the dial goes on in the background.)
            try:
                infos, _ = await asyncio.wait_for(sockets(), GATHER_TIMEOUT)
            except (ClusterError, TimeoutError) as error:
                logger.warning(
                    "node %s did not say which sockets of %s it holds: %s", node, hex_id, error
                )
                return
            for info in infos:
                info = Info(*info)
                if (node, info.socket_id) not in self.held:
                    self._register(node, (binding, hex_id), info)

        await asyncio.gather(*(ask(node, address) for node, address in peers))

    def needs_gather(self, binding: str, hex_id: str, epoch: int) -> bool:
        if (
            self.gathered.get((binding, hex_id)) == epoch
            or not self.services.server.cluster_peers()
        ):
            return False
        self.gathered[(binding, hex_id)] = epoch
        return True

    # -- leases lost ----------------------------------------------------------------------------

    def start(self) -> None:
        self.watcher = self.services.loop.create_task(self._watch())

    async def _watch(self) -> None:
        """Every renewal interval: an object whose lease was lost (the node was cut off from
        PostgreSQL for longer than a lease, or was paused) stops being served here: its
        instance goes, and its sockets are closed with 1012 so that their clients reconnect."""
        while True:
            await asyncio.sleep(self.settings.renew)
            for binding, hex_id in self.services.server.cluster_lost():
                self.objects.lost(binding, hex_id)

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.cancel()
        for link in list(self.links.values()):
            if link.ws.ready_state == WebSocket.OPEN:
                link.ws.close(CloseCode.GOING_AWAY, "node shutting down")
