"""What an idle pod keeps, and the collector: 10,000 idle pods share one daemon (README:
"Memory per pod, the collector, the report's note")."""

import asyncio
import gc

from capd.controller import Mailbox
from capd.daemon import FULL_COLLECTION_EVERY, _tune_collector
from tests.unit.pods import Rig


async def test_an_idle_pods_controller_keeps_no_attribute_dict(rig: Rig) -> None:
    assert not hasattr(rig.pod, "__dict__")
    assert rig.pod.status_result([])["queued"] == 0


async def test_a_mailbox_makes_its_deque_with_its_first_message() -> None:
    never_sent, sent = Mailbox(), Mailbox()
    assert never_sent._items is sent._items  # one shared empty stand-in
    for msg in ("a", "b", "c"):
        sent.put_nowait(msg)  # type: ignore[arg-type]
    assert [await sent.get() for _ in range(3)] == ["a", "b", "c"]
    assert never_sent.empty()
    assert sent.empty()
    waiting = asyncio.create_task(never_sent.get())
    await asyncio.sleep(0)  # one loop step: the task runs until it waits
    assert never_sent._waiter is not None
    never_sent.put_nowait("d")  # type: ignore[arg-type]
    async with asyncio.timeout(5):
        assert await waiting == "d"


def test_capd_spaces_full_collections_further_apart() -> None:
    before = gc.get_threshold()
    try:
        _tune_collector()
        assert gc.get_threshold() == (*before[:2], FULL_COLLECTION_EVERY)
    finally:
        gc.set_threshold(*before)
