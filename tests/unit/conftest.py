"""Fixtures of the in-process tier: a store on a temporary file and a running pod actor."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from capd.store import SqliteStore, Store
from tests.unit.pods import PARENT, Rig


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = SqliteStore(tmp_path / "capd.db")
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
