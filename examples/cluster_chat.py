"""The chat of ``examples/chat.py`` on a cluster of nodes (SPEC §7): ``make cluster-demo`` starts
PostgreSQL and three nodes, and two browser tabs on two nodes chat in one room.

The room is the same Durable Object; only its history moves from the SQL API (not offered in
cluster mode yet) to the KV API, which cluster mode keeps in PostgreSQL. Each socket stays on the
node the browser connected to; the room lives on one node (the owner of its lease) and the other
nodes relay their sockets' messages to it. See docs/topics/cluster.md.

    sockworker serve examples.cluster_chat:app --cluster postgresql://... --node-id a --port 8787
"""

import time

import sockworker as sw

from examples.chat import HISTORY, ChatRoom, fetch


class ClusterChatRoom(ChatRoom):
    def prepare(self) -> None:
        """(Nothing to create: the history is one KV entry.)"""

    def history(self) -> list[dict[str, object]]:
        stored: list[dict[str, object]] = self.ctx.storage.get("history") or []
        return stored

    def remember(self, user: str, text: str) -> None:
        history = self.history()
        history.append({"user": user, "text": text, "at": time.time(), "node": sw.node_id()})
        self.ctx.storage.put("history", history[-HISTORY:])


app = sw.App(fetch=fetch, durable_objects={"ROOMS": ClusterChatRoom})
