"""The takeover scanner: every scan interval this node ends the incarnations whose lease
expired and adopts a share of their pods, then restores them exactly as a restart does
(a turn that was open comes back `paused`). The adopted pods' events, pending work,
received ids and owed reports are in the shared tables and come with them.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from capd.fleet.control import Control, NotLive
from capd.store import PodRecord

log = logging.getLogger(__name__)


def scan_s(ttl_s: float) -> float:
    return min(1.0, ttl_s / 5)


class Scanner:
    def __init__(
        self,
        control: Control,
        node: str,
        incarnation: int,
        ttl_s: float,
        adopt: Callable[[list[PodRecord]], Awaitable[None]],
        lost: Callable[[BaseException], None],
        pods_dir: str,
    ) -> None:
        """`adopt` brings the records up (parents first); `lost` stops capd."""
        self._control = control
        self._node = node
        self._incarnation = incarnation
        self._ttl_s = ttl_s
        self._adopt = adopt
        self._lost = lost
        self._pods_dir = pods_dir
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fleet takeover")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.scan()
            except NotLive as exc:
                self._lost(exc)
                return
            except Exception:
                log.exception("fleet takeover scan failed (next scan retries)")
            await asyncio.sleep(scan_s(self._ttl_s))

    async def scan(self) -> list[str]:
        """One scan: the pods adopted."""
        ended, adopted = await self._control.adopt(self._node, self._incarnation, self._pods_dir)
        for name in ended:
            log.warning("node %s's lease expired: its pods are up for adoption", name)
        if not adopted:
            return []
        pods = [pod for pod, _ in adopted]
        log.warning("adopting %d pods: %s", len(pods), " ".join(pods))
        await self._adopt(await self._control.records(pods))
        return pods
