"""What the runtime needs of the app it serves: ``AppLike`` (``sockworker.App`` is one) and
``ObjectKind`` (each of its Durable Object namespaces). The runtime imports neither ``app`` nor
``durable``: they sit above it and hand it these."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ..billing import BillingHook, Meter
from ..cluster import Cluster
from ..env import Env
from ..limits import Limits


class ObjectKind(Protocol):
    """One Durable Object namespace: its binding, its class and the limits of its objects."""

    @property
    def binding(self) -> str: ...

    @property
    def cls(self) -> type[Any]:
        """Called as ``cls(state, env)`` to make an instance."""
        ...

    @property
    def limits(self) -> Limits: ...

    @property
    def socket_limits(self) -> Limits | None:
        """The limits of sockets its objects accept (None: the app's)."""
        ...


class AppLike(Protocol):
    """The configuration of the app being served."""

    @property
    def fetch(self) -> Callable[..., Any] | None: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def env(self) -> Env: ...
    @property
    def namespaces(self) -> Mapping[str, ObjectKind]: ...
    @property
    def account(self) -> Callable[..., str] | None: ...
    @property
    def billing(self) -> BillingHook | None: ...
    @property
    def meter(self) -> Meter: ...
    @property
    def metering(self) -> bool: ...
    @property
    def metrics_path(self) -> str | None: ...
    @property
    def data_dir(self) -> str | os.PathLike[str] | None: ...
    @property
    def durability(self) -> str: ...
    @property
    def allowed_origins(self) -> list[str] | None: ...
    @property
    def compression(self) -> bool: ...
    @property
    def cluster(self) -> Cluster | None: ...
