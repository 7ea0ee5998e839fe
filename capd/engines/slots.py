"""The engine processes of all pods, and `capd --max-engine-processes N` over them.

Every external engine holds an `EngineSlot` while its process runs: `acquire` before the
process starts, `release` once it is gone, `touch` when a prompt ends (last activity).
With a limit, a start that finds N processes running asks the longest-idle other pod to
stop its engine first, through that pod's actor (`reap`); a pod that refuses (it is busy)
is passed over for the next, and all the asks together wait at most REAP_TIMEOUT_S. When
no other engine could stop, the new one starts anyway: the limit is exceeded, logged once
per such episode, until enough engines idle (`crowded` tells an idle pod to stop its
engine at once).

The asker is a turn (or compaction) task, never an actor, so asking another pod's actor
cannot close a cycle of actors waiting on each other.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from capd import metrics

log = logging.getLogger(__name__)

REAP_TIMEOUT_S = 5.0
"""How long a start waits, in all, for other pods to stop their engines; then it starts
its own anyway (over the limit)."""


class EngineSlot:
    """One engine's claim on a process; see EngineSlots."""

    __slots__ = ("_slots", "pod")

    def __init__(self, slots: "EngineSlots", pod: str) -> None:
        self._slots = slots
        self.pod = pod

    async def acquire(self) -> None:
        await self._slots.acquire(self)

    def release(self) -> None:
        self._slots.release(self)

    def exited(self) -> None:
        """The process died by itself: it takes no place any more, and the pod's
        `pod_activity` says so."""
        self._slots.release(self)
        self._slots.exited(self.pod)

    def touch(self) -> None:
        self._slots.touch(self)

    def crowded(self) -> bool:
        """Whether this engine's running process is one too many."""
        return self._slots.over_limit() and self in self._slots.live


class EngineSlots:
    def __init__(
        self,
        limit: int,
        reap: Callable[[str], Awaitable[bool]],
        exited: Callable[[str], None] = lambda pod: None,
    ) -> None:
        """`limit` 0 counts the processes but bounds nothing; `reap(pod)` asks the pod's
        actor to stop its engine for the limit, True when it did; `exited(pod)` is told
        when a pod's engine process died by itself."""
        self.limit = limit
        self._reap = reap
        self.exited = exited
        self.live: dict[EngineSlot, float] = {}
        """The slots whose process runs → when their engine was last active (monotonic)."""
        self._asked: set[EngineSlot] = set()
        """Slots whose pod is being asked to stop: another start asks another pod."""
        self._exceeded = False

    def slot(self, pod: str) -> EngineSlot:
        return EngineSlot(self, pod)

    def over_limit(self) -> bool:
        return 0 < self.limit < len(self.live)

    async def acquire(self, slot: EngineSlot) -> None:
        tried: set[EngineSlot] = set()
        deadline = asyncio.get_running_loop().time() + REAP_TIMEOUT_S
        while 0 < self.limit <= len(self.live) and slot not in self.live:
            victim = self._longest_idle(slot, tried)
            if victim is None or asyncio.get_running_loop().time() >= deadline:
                metrics.engine_limit_exceeded()
                if not self._exceeded:
                    self._exceeded = True
                    log.warning(
                        "engine limit %d exceeded: no other engine could stop (busy, slow "
                        "to answer or unable to resume its session), so pod %s starts one "
                        "more (--max-engine-processes)",
                        self.limit,
                        slot.pod,
                    )
                break
            tried.add(victim)
            self._asked.add(victim)
            try:
                async with asyncio.timeout_at(deadline):
                    await self._reap(victim.pod)
            except TimeoutError:
                log.info("pod %s did not stop its engine in time for pod %s", victim.pod, slot.pod)
            finally:
                self._asked.discard(victim)
        self.live[slot] = time.monotonic()

    def release(self, slot: EngineSlot) -> None:
        self.live.pop(slot, None)
        if len(self.live) <= self.limit:
            self._exceeded = False

    def touch(self, slot: EngineSlot) -> None:
        if slot in self.live:
            self.live[slot] = time.monotonic()

    def _longest_idle(self, slot: EngineSlot, tried: set[EngineSlot]) -> EngineSlot | None:
        others = [
            (active, other)
            for other, active in self.live.items()
            if other.pod != slot.pod and other not in tried and other not in self._asked
        ]
        return min(others, key=lambda pair: pair[0])[1] if others else None
