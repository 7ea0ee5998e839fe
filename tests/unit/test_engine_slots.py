"""capd.engines.slots: which engine stops for a new one under --max-engine-processes."""

import asyncio

import pytest

from capd.engines import slots
from capd.engines.slots import EngineSlot, EngineSlots


class Fleet:
    """Slots whose pods answer a stop request as `refuse` says."""

    def __init__(self, limit: int, refuse: frozenset[str] = frozenset()) -> None:
        self.slots = EngineSlots(limit, self._reap)
        self.refuse = refuse
        self.asked: list[str] = []
        self.by_pod: dict[str, EngineSlot] = {}
        self.hold: asyncio.Event | None = None
        """When set, a pod asked answers only once the event is set."""

    async def start(self, pod: str) -> None:
        self.by_pod[pod] = slot = self.slots.slot(pod)
        await slot.acquire()

    async def _reap(self, pod: str) -> bool:
        self.asked.append(pod)
        await asyncio.sleep(0)  # as an actor answers: later
        if self.hold is not None:
            await self.hold.wait()
        if pod in self.refuse:
            return False
        self.by_pod[pod].release()
        return True

    def live(self) -> list[str]:
        return sorted(slot.pod for slot in self.slots.live)


async def test_a_busy_pod_is_passed_over_for_the_next_longest_idle() -> None:
    fleet = Fleet(2, refuse=frozenset({"a"}))
    for pod in ("a", "b", "c"):
        await fleet.start(pod)
    assert fleet.asked == ["a", "b"]
    assert fleet.live() == ["a", "c"]


async def test_two_starts_at_once_stop_two_different_engines() -> None:
    fleet = Fleet(2)
    await fleet.start("a")
    await fleet.start("b")
    await asyncio.gather(fleet.start("c"), fleet.start("d"))
    assert sorted(fleet.asked) == ["a", "b"]
    assert fleet.live() == ["c", "d"]


async def test_no_limit_asks_nobody_and_counts() -> None:
    fleet = Fleet(0)
    for pod in ("a", "b", "c"):
        await fleet.start(pod)
    assert fleet.asked == []
    assert len(fleet.slots.live) == 3
    assert not fleet.by_pod["a"].crowded()


async def test_all_busy_goes_over_the_limit_and_the_extra_one_is_crowded() -> None:
    fleet = Fleet(1, refuse=frozenset({"a"}))
    await fleet.start("a")
    await fleet.start("b")
    assert fleet.live() == ["a", "b"]
    assert fleet.by_pod["a"].crowded()
    fleet.by_pod["a"].release()
    assert not fleet.by_pod["b"].crowded()


async def test_a_start_cancelled_while_it_asks_takes_no_slot_and_frees_its_victim() -> None:
    """A pause while the pod it asked has not answered: no slot is taken, and the pod
    asked is asked again by the next start."""
    fleet = Fleet(1)
    await fleet.start("a")
    fleet.hold = asyncio.Event()
    starting = asyncio.create_task(fleet.start("b"))
    while not fleet.asked:
        await asyncio.sleep(0)
    starting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starting
    assert fleet.live() == ["a"]
    fleet.hold.set()
    await fleet.start("c")
    assert fleet.asked == ["a", "a"]
    assert fleet.live() == ["c"]


async def test_the_asks_of_one_start_wait_at_most_the_timeout_in_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pods slow to answer cost a start REAP_TIMEOUT_S in all, not that much each: it
    then starts over the limit."""
    monkeypatch.setattr(slots, "REAP_TIMEOUT_S", 0.05)
    fleet = Fleet(2)
    await fleet.start("a")
    await fleet.start("b")
    fleet.hold = asyncio.Event()
    await fleet.start("c")
    assert fleet.asked == ["a"]
    assert fleet.live() == ["a", "b", "c"]
