"""The pod actor's engine idle timer (`PodController._arm_reap`), with a `FakeEngine` that
holds a process: `limits.engine_idle_s` of idleness stops it, and at once while it is one
over --max-engine-processes."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capd.store import Store
from protocol.errors import ProtocolError
from protocol.methods import Pause, Run
from tests.fakes.engine import WAIT_S, FakeEngine
from tests.unit.pods import Rig


class HoldingEngine(FakeEngine):
    """Holds a process until `release`; `over` says whether it is one too many."""

    def __init__(self) -> None:
        super().__init__()
        self.holds = True
        self.over = False
        self.released = asyncio.Event()

    def holds_process(self) -> bool:
        return self.holds

    def crowded(self) -> bool:
        return self.holds and self.over

    async def release(self) -> bool:
        self.holds = False
        self.released.set()
        return True


@pytest.fixture
async def held(tmp_path: Path, store: Store) -> AsyncIterator[Rig]:
    rig = Rig.build(tmp_path, store, HoldingEngine()).start()
    yield rig
    await rig.close()


async def test_an_idle_pod_whose_process_becomes_one_too_many_stops_it_at_once(
    held: Rig,
) -> None:
    """The idle timer (600 s) is armed; then the process is over the limit (a start
    gave up waiting for this pod's answer): the next message re-arms it to fire at once."""
    engine = held.engine
    assert isinstance(engine, HoldingEngine)
    await held.call(Run(text="go"))
    (await engine.next_drive()).finish()
    await held.until("idle")
    engine.over = True
    with pytest.raises(ProtocolError):
        await held.call(Pause())  # any message the actor serves while idle
    async with asyncio.timeout(WAIT_S):
        await engine.released.wait()
