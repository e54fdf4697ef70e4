"""Cluster mode (SPEC §7): several nodes serve one app and share one PostgreSQL database.

``App(cluster=sw.Cluster("postgresql://..."))`` or ``sockworker serve app:app --cluster DSN``.
Each object is owned by one node at a time (a lease in PostgreSQL, with an epoch that fences its
commits); its KV pairs and alarms are stored in PostgreSQL; a node that does not own an object
forwards the object's events to the owner. See docs/topics/cluster.md.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["Cluster"]

_NODE_ID = re.compile(r"[A-Za-z0-9_.:@-]{1,200}")


@dataclass(frozen=True)
class Cluster:
    """How this node joins a cluster.

    Args:
        dsn: the PostgreSQL database every node shares (``postgresql://user@host:port/db``).
        node_id: this node's name, unique in the cluster and the same across its restarts (a
            node that restarts under its name takes its objects back at once). Default: the
            address it advertises.
        advertise: ``host:port`` where other nodes reach this one (default: the address it
            listens on, which must then be reachable from the other nodes).
        lease: seconds a lease lasts without renewal: when a node dies, its objects move to
            another node after this long (at most).
        renew: seconds between renewals (one statement per round for all of a node's leases).
        secret: what nodes prove to each other on their links (default: derived from ``dsn``,
            which every node knows). Anyone with it can run events on every node.
    """

    dsn: str
    node_id: str | None = None
    advertise: str | None = None
    lease: float = 10.0
    renew: float = 3.0
    secret: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dsn, str) or not self.dsn.startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("the cluster DSN is a postgresql:// URL")
        if self.node_id is not None and not _NODE_ID.fullmatch(self.node_id):
            raise ValueError(
                f"a node id is 1 to 200 letters, digits and any of '_.:@-', not {self.node_id!r}"
            )
        if not (self.lease > 0 and 0 < self.renew < self.lease):
            raise ValueError(
                f"the lease ({self.lease} s) must be longer than its renewal interval "
                f"({self.renew} s), both positive"
            )

    @property
    def link_secret(self) -> bytes:
        """The key of the links' authentication."""
        if self.secret is not None:
            return self.secret.encode()
        return hashlib.sha256(b"sockworker-cluster\0" + self.dsn.encode()).digest()
