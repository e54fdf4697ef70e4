"""The PostgreSQL harness of the cluster tests (tests/postgres.py): a throwaway cluster that
keeps its data across restarts and crashes, and a proxy that cuts one client off."""

from __future__ import annotations

import psycopg
import pytest

from tests.postgres import Postgres, TcpProxy


def test_a_fresh_database_takes_a_table_and_rows(postgres: Postgres, pg_dsn: str) -> None:
    assert pg_dsn.startswith(f"postgresql://postgres@127.0.0.1:{postgres.port}/test_")
    postgres.sql(pg_dsn, "CREATE TABLE notes (id int PRIMARY KEY, body text)")
    postgres.sql(pg_dsn, "INSERT INTO notes VALUES (%s, %s), (%s, %s)", 1, "one", 2, "two")
    assert postgres.sql(pg_dsn, "SELECT id, body FROM notes ORDER BY id") == [
        (1, "one"),
        (2, "two"),
    ]


def test_each_test_gets_its_own_database(postgres: Postgres, pg_dsn: str) -> None:
    other = postgres.create_database()
    try:
        assert other != pg_dsn
        postgres.sql(pg_dsn, "CREATE TABLE mine (x int)")
        assert postgres.sql(other, "SELECT to_regclass('mine')") == [(None,)]
    finally:
        postgres.drop_database(other)


def test_rows_survive_a_stop_and_start_and_a_crash() -> None:
    # A cluster of its own: stopping the session's one would break the tests that share it.
    with Postgres() as server:
        dsn = server.create_database()
        port = server.port
        server.sql(dsn, "CREATE TABLE kept (x int)")
        server.sql(dsn, "INSERT INTO kept VALUES (1)")

        server.stop()
        assert not server.running
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(dsn, connect_timeout=5).close()
        server.start()
        assert server.port == port
        server.sql(dsn, "INSERT INTO kept VALUES (2)")

        # synchronous_commit is on: a committed row is in the WAL even with fsync off.
        server.kill()
        assert not server.running
        server.start()
        assert server.sql(dsn, "SELECT x FROM kept ORDER BY x") == [(1,), (2,)]

        server.restart()
        assert server.sql(dsn, "SELECT count(*) FROM kept") == [(2,)]
    assert not server.directory.exists()


def test_a_cut_proxy_drops_and_refuses_connections_until_restored(
    postgres: Postgres, pg_dsn: str
) -> None:
    dbname = pg_dsn.rsplit("/", 1)[1]
    with TcpProxy("127.0.0.1", postgres.port) as proxy:
        through = proxy.dsn_for(dbname)
        postgres.sql(through, "CREATE TABLE t (x int)")
        postgres.sql(through, "INSERT INTO t VALUES (%s)", 7)
        assert postgres.sql(pg_dsn, "SELECT x FROM t") == [(7,)]

        with psycopg.connect(through, autocommit=True) as held:
            proxy.cut()
            # cut() returns after the proxy has shut the connection down: no waiting needed.
            with pytest.raises(psycopg.OperationalError):
                held.execute("SELECT 1")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(through, connect_timeout=5).close()
        # Only the proxied path is cut.
        assert postgres.sql(pg_dsn, "SELECT x FROM t") == [(7,)]

        proxy.restore()
        assert postgres.sql(through, "SELECT x FROM t") == [(7,)]
