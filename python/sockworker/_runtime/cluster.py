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
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import ClusterError
from ..http import Headers, Request, Response
from ..state import DurableObjectId
from ..websocket import CloseCode, MessageEvent, WebSocket

if TYPE_CHECKING:
    from ..cluster import Cluster
    from .contract import ObjectKind
    from .host import Objects
    from .services import Services

logger = logging.getLogger("sockworker")

CLUSTER_PATH = "/_sockworker/cluster"
_HEADER_NODE = "x-sockworker-node"
_HEADER_PROOF = "x-sockworker-proof"
#: Seconds a forwarded event may take before the sender gives up on it.
FORWARD_TIMEOUT = 30.0


class Owner(NamedTuple):
    """The node that holds an object's lease, and where it listens."""

    node: str
    address: str | None


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
            result = await self.nodes.serve(op, body)
            answer: tuple[str, int, Any] = ("ok", rid, result)
        except NotOwner as moved:
            answer = ("moved", rid, str(moved))
        except Exception as error:  # the sender's caller sees it as a ClusterError
            if not isinstance(error, ClusterError):
                logger.exception("a %s forwarded by node %s failed", op, self.peer)
            answer = ("err", rid, f"{type(error).__name__}: {error}")
        if self.ws.ready_state == WebSocket.OPEN:
            self.ws.send(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))

    def _on_close(self, _event: Any) -> None:
        self.nodes.links.pop(self.peer, None) if self.nodes.links.get(self.peer) is self else None
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(
                    LinkLost(
                        f"the link to node {self.peer!r} closed before it answered; the event "
                        "may or may not have run there"
                    )
                )


class Nodes:
    """Routing of object events in cluster mode, and the links to the other nodes."""

    def __init__(self, services: Services, objects: Objects, settings: Cluster) -> None:
        self.services = services
        self.objects = objects
        self.settings = settings
        stats = services.server.cluster_stats()
        assert stats is not None, "the server was started in cluster mode"
        self.node_id = stats[0]
        self.links: dict[str, Link] = {}
        self.dialing: dict[str, asyncio.Future[Link]] = {}
        self.watcher: asyncio.Task[None] | None = None

    # -- routing --------------------------------------------------------------------------------

    def route(self, binding: str, object_id: str) -> Owner | None:
        """The node that owns the object, or None when it is this one (its lease is held now,
        taken if it was free)."""
        routed = self.services.server.cluster_route(binding, object_id)
        assert routed is not None, "the server was started in cluster mode"
        epoch, node, address = routed
        if epoch is not None:
            return None
        return Owner(node or "?", address)

    def epoch(self, binding: str, object_id: str) -> int:
        """This node's epoch of the object's lease (taken now if free); ``ClusterError`` when
        another node owns it."""
        routed = self.services.server.cluster_route(binding, object_id)
        assert routed is not None, "the server was started in cluster mode"
        epoch, node, _ = routed
        if epoch is None:
            raise ClusterError(f"object {object_id} of {binding} is owned by node {node!r}")
        return epoch

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
            owner = self.route(binding, hex_id)
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
        from .. import outgoing

        try:
            ws = await outgoing.connect(
                f"ws://{owner.address}{CLUSTER_PATH}",
                headers={_HEADER_NODE: self.node_id, _HEADER_PROOF: self.proof(self.node_id)},
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
        from ..websocket import WebSocketPair

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

    async def serve(self, op: str, body: Any) -> Any:
        binding, hex_id, id_name, payload = body
        kind = self.objects.kinds.get(binding)
        if kind is None:
            raise ClusterError(f"this node's app has no namespace {binding!r}")
        if self.route(binding, hex_id) is not None:
            raise NotOwner(f"node {self.node_id!r} does not own the object")
        host = self.objects.host(kind, DurableObjectId(hex_id, id_name))
        if op == "fetch":
            method, url, headers, data = payload
            response = await host.call("fetch", Request(method, url, Headers(headers), data))
            if not isinstance(response, Response):
                raise ClusterError(f"{host.cls.__name__}.fetch must return a Response")
            if response.websocket is not None:
                host.returned(response)
                raise ClusterError(
                    "a WebSocket accepted by an object on another node cannot be forwarded yet: "
                    "connect to the node that owns the object"
                )
            host.returned(response)
            return (response.status, list(response.headers.items()), response.body)
        if op == "rpc":
            name, args, kwargs = payload
            return await host.call(name, *args, **kwargs)
        raise ClusterError(f"unknown forwarded operation {op!r}")

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
