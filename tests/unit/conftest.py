"""Fixtures of the in-process tier: a store on a temporary file and a running pod actor."""

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from capd.store import SqliteStore, Store
from tests.unit.pods import PARENT, Rig

STORES = ("sqlite", "postgresql")
"""The backends: a module whose tests run on both overrides `store_kind` with
`@pytest.fixture(params=STORES)`."""


@pytest.fixture
def store_kind() -> str:
    """The backend of `store`: SQLite, unless the module overrides this."""
    return "sqlite"


@pytest.fixture
def reopen(request: pytest.FixtureRequest, store_kind: str, tmp_path: Path) -> Callable[[], Store]:
    """Opens this test's store (again): the same file, or the same PostgreSQL database."""
    if store_kind == "postgresql":
        from capd.store.postgres import PostgresStore

        url: str = request.getfixturevalue("pg_url")
        return lambda: PostgresStore(url)
    return lambda: SqliteStore(tmp_path / "capd.db")


@pytest.fixture
def store(reopen: Callable[[], Store]) -> Iterator[Store]:
    store = reopen()
    yield store
    store.close()


@pytest.fixture
async def rig(tmp_path: Path, store: Store) -> AsyncIterator[Rig]:
    """A pod with no parent, its actor running; stopped (`cancel`) after the test."""
    rig = Rig.build(tmp_path, store).start()
    yield rig
    await rig.close()


@pytest.fixture
async def child(tmp_path: Path, store: Store) -> AsyncIterator[Rig]:
    """A pod `c` whose parent is `PARENT`, its actor running."""
    rig = Rig.build(tmp_path, store, name="c", parent=PARENT).start()
    yield rig
    await rig.close()
