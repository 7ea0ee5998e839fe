"""The takeover scanner: every scan interval this node ends the incarnations whose lease
expired and adopts a share of their pods, then restores them exactly as a restart does
(a turn that was open comes back `paused`). The adopted pods' events, pending work,
received ids and owed reports are in the shared tables and come with them.

Once the leases moved (the scan's transaction committed), the pods are this node's and no
other node will adopt them: if bringing them up fails (their records cannot be read, the
control connection broke), every later scan tries them again until they are up; if the
connection broke as the transaction committed, the next scan finds what it moved
(capd.fleet.control.Control.adopt).
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from capd.fleet.control import Control, NotLive
from capd.store import PodRecord
from protocol.errors import first_line

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
        self._owed: list[str] = []
        """Pods whose leases this node took but which are not brought up yet (a scan failed
        after the leases moved): each scan tries them again first."""

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
            except Exception as exc:
                owed = f"; {len(self._owed)} adopted pods wait for it" if self._owed else ""
                log.error(
                    "fleet takeover scan failed: %s: %s%s; the next scan in %g s tries again",
                    type(exc).__name__,
                    first_line(exc),
                    owed,
                    scan_s(self._ttl_s),
                )
                log.debug("the scan's failure", exc_info=exc)
            await asyncio.sleep(scan_s(self._ttl_s))

    async def scan(self) -> list[str]:
        """One scan: the pods adopted (those a failed scan left are brought up first)."""
        if self._owed:
            log.warning("bringing up %d adopted pods again", len(self._owed))
            await self._bring_up()
        ended, pods = await self._control.adopt(self._node, self._incarnation, self._pods_dir)
        for name in ended:
            log.warning("node %s's lease expired: its pods are up for adoption", name)
        if not pods:
            return []
        log.warning("adopting %d pods: %s", len(pods), " ".join(pods))
        self._owed = pods  # this node's now, whatever fails from here
        await self._bring_up()
        return pods

    async def _bring_up(self) -> None:
        """Bring the owed pods up; `adopt` skips those a failed attempt brought up."""
        await self._adopt(await self._control.records(self._owed))
        self._owed = []
