"""What only the PostgreSQL store has: a failed write breaks its batch (PostgreSQL aborts
the whole transaction), start-up errors that say what to do, schema versions."""

import asyncio

import psycopg
import pytest

from capd.store import StoreUnavailable, open_store, redact
from capd.store.batch import StoreFailed
from capd.store.postgres import MIGRATIONS, PostgresStore
from tests.pg import PgServer


async def test_a_write_that_fails_in_a_batch_fails_the_batch_and_keeps_none_of_it(
    pg_url: str,
) -> None:
    failures: list[BaseException] = []
    failed = asyncio.Event()
    store = PostgresStore(pg_url, lambda exc: (failures.append(exc), failed.set()))
    try:
        store.append("p", [(1, 1.0, "status", b"{}")])
        await store.flush()
        called: list[str] = []
        store.add_pod("q", "{}", None, 1.0)
        store.append("p", [(1, 1.0, "status", b"{}")])  # seq 1 again
        store.after_commit(lambda: called.append("after"))
        await asyncio.wait_for(failed.wait(), 10)
        assert called == []
        [failure] = failures
        assert isinstance(failure, psycopg.errors.UniqueViolation)
        with pytest.raises(StoreFailed):
            store.add_pod("r", "{}", None, 1.0)
    finally:
        store.close()
    reopened = PostgresStore(pg_url)
    try:
        assert reopened.pods() == []
        assert reopened.events_after("p", 0, 10) == [(1, b"{}")]
    finally:
        reopened.close()


async def test_a_read_after_a_failed_write_breaks_the_batch_at_once(pg_url: str) -> None:
    failures: list[BaseException] = []
    store = PostgresStore(pg_url, failures.append)
    try:
        store.append("p", [(1, 1.0, "status", b"{}"), (1, 1.0, "status", b"{}")])
        with pytest.raises(Exception, match="aborted the batch"):
            store.pods()
        assert len(failures) == 1
    finally:
        store.close()


def test_an_unreachable_server_is_one_line_naming_the_url_without_its_password(
    pg_server: PgServer,
) -> None:
    url = f"postgresql://capd:s3cret@/nowhere?host={pg_server.root}/nosuchdir&connect_timeout=2"
    with pytest.raises(StoreUnavailable) as caught:
        open_store(url, pg_server.root)
    message = str(caught.value)
    assert "\n" not in message
    assert "s3cret" not in message
    assert f"postgresql://capd:***@/nowhere?host={pg_server.root}/nosuchdir" in message
    assert "is PostgreSQL running" in message


def test_a_missing_database_says_so(pg_server: PgServer) -> None:
    with pytest.raises(StoreUnavailable, match='database "nosuchdb" does not exist'):
        open_store(pg_server.url("nosuchdb"), pg_server.root)


def test_a_schema_newer_than_this_capd_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = %s", (len(MIGRATIONS) + 1,))
    with pytest.raises(StoreUnavailable, match="newer than this capd knows"):
        PostgresStore(pg_url)


def test_an_empty_database_gets_the_schema_once(pg_server: PgServer) -> None:
    name = pg_server.create_database(template="template0")
    try:
        for _ in range(2):
            PostgresStore(pg_server.url(name)).close()
        with psycopg.connect(pg_server.url(name)) as db:
            assert db.execute("SELECT version FROM schema_version").fetchall() == [
                (len(MIGRATIONS),)
            ]
    finally:
        pg_server.drop_database(name)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5/db", "postgresql://u:***@h:5/db"),
        (
            "postgresql://u@h/db?password=pw&sslmode=require",
            "postgresql://u@h/db?password=***&sslmode=require",
        ),
        ("postgresql:///db?host=/run/pg", "postgresql:///db?host=/run/pg"),
    ],
)
def test_a_url_is_shown_without_its_password(url: str, shown: str) -> None:
    assert redact(url) == shown


async def test_a_closed_store_refuses_writes_and_reads_at_once(pg_url: str) -> None:
    """Rather than queueing them to a thread that is gone (a wait for ever)."""
    store = PostgresStore(pg_url)
    store.close()
    with pytest.raises(StoreFailed):
        store.append("p", [(1, 1.0, "status", b"{}")])
    with pytest.raises(StoreFailed):
        store.pods()


def test_a_read_that_finds_the_server_gone_stops_capd(pg_url: str) -> None:
    """A read-only workload would otherwise never notice (only a commit fails capd)."""
    failures: list[BaseException] = []
    store = PostgresStore(pg_url, failures.append)
    try:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'capd' AND pid <> pg_backend_pid()"
            )
        with pytest.raises(psycopg.OperationalError):
            store.pods()
        assert [type(exc) for exc in failures] == [psycopg.OperationalError]
    finally:
        store.close()
