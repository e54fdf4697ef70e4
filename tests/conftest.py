"""Fixtures: one real server process per test module and app, stopped with SIGTERM (exit 0)."""

from __future__ import annotations

import resource
import signal
from collections.abc import Callable, Iterator

import pytest

from tests.postgres import Postgres, PostgresNotFound
from tests.support import ServerProcess

# Many connections at once (test_concurrency) need file descriptors on the client side too.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
_want = 8192 if _hard == resource.RLIM_INFINITY else min(8192, _hard)
if _soft != resource.RLIM_INFINITY and _soft < _want:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_want, _hard))


def _stop_cleanly(server: ServerProcess) -> None:
    rc = server.stop(signal.SIGTERM)
    assert rc == 0, (
        f"server {server.app} exited with {rc} after SIGTERM; log tail:\n{server.log_tail()}"
    )


def _module_server(name: str, app: str, *extra: str) -> Callable[[], Iterator[ServerProcess]]:
    @pytest.fixture(scope="module", name=name)
    def fixture() -> Iterator[ServerProcess]:
        server = ServerProcess(app, extra)
        try:
            yield server
        finally:
            _stop_cleanly(server)

    return fixture


echo_server = _module_server("echo_server", "tests.apps.echo:app")
tight_server = _module_server("tight_server", "tests.apps.tight:app")
few_server = _module_server("few_server", "tests.apps.few:app")
flood_server = _module_server("flood_server", "tests.apps.flood:app")


@pytest.fixture
def make_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start a server owned by one test (for tests that stop it themselves)."""
    started: list[ServerProcess] = []

    def start(
        app: str,
        *extra: str,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> ServerProcess:
        server = ServerProcess(app, extra, env=env, preexec=preexec)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


ported_server = _module_server("ported_server", "tests.apps.ported:app")


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL cluster for the session (tests/postgres.py), stopped at its end.
    Missing binaries fail the tests that need it: the cluster tests are never skipped."""
    try:
        server = Postgres()
    except PostgresNotFound as error:
        raise pytest.fail.Exception(str(error), pytrace=False) from None
    with server:
        yield server


@pytest.fixture
def pg_dsn(postgres: Postgres) -> Iterator[str]:
    """The DSN of a new, empty database on the session's cluster, dropped after the test."""
    dsn = postgres.create_database()
    yield dsn
    postgres.drop_database(dsn)
