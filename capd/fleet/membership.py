"""This node's membership of a fleet (several capd nodes on one PostgreSQL database,
docs/scaling.md).

`Fleet` is that membership: it joins at start-up (a new incarnation, taking back
its own pods at once), keeps its lease (capd.fleet.lease), adopts the pods of nodes whose
lease expired (capd.fleet.takeover), places spawns (capd.fleet.placement) and leaves at
shutdown by ending its incarnation, so the other nodes adopt its pods at their next scan
instead of after a TTL (marked `draining` from the start of its shutdown, so no spawn is
placed on it meanwhile). A capd on SQLite has no fleet.

Leaving hands the pods over rather than letting the lease run out: a node that shuts down
is usually going away (a drain, a scale-down), and its pods are back elsewhere within a
scan plus their restore instead of a TTL. A node that restarts under the same name takes
back whatever was not adopted yet; a fleet of one takes back everything.
"""

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg

from capd.fleet.control import Control, NameInUse, NodeInfo
from capd.fleet.lease import (
    FleetRefused,
    LeasedStore,
    NodeLease,
    previous_incarnation,
    save_incarnation,
    stop_node,
)
from capd.fleet.placement import place
from capd.fleet.takeover import Scanner
from capd.store import PodRecord

log = logging.getLogger(__name__)


class FleetStore(LeasedStore):
    def join_fleet(self, node: str, incarnation: int, ttl_s: float) -> None: ...


class Fleet:
    def __init__(self, control: Control, lease: NodeLease) -> None:
        self._control = control
        self._lease = lease
        self._scanner: Scanner | None = None

    @property
    def node(self) -> str:
        return self._lease.node

    @property
    def incarnation(self) -> int:
        return self._lease.incarnation

    @property
    def ttl_s(self) -> float:
        return self._lease.ttl_s

    @classmethod
    async def join(
        cls, url: str, store: "FleetStore", node: str, state_dir: Path, ttl_s: float
    ) -> "Fleet":
        """Join as node `node`: a new incarnation, fencing `store`'s writes from now on."""
        control = await Control.connect(url, node)
        try:
            joined = await control.join(node, previous_incarnation(state_dir), ttl_s)
        except NameInUse as exc:
            await control.close()
            raise FleetRefused(str(exc)) from None
        except BaseException:
            await control.close()
            raise
        save_incarnation(state_dir, joined.incarnation)
        store.join_fleet(node, joined.incarnation, ttl_s)
        lease = NodeLease(store, node, joined.incarnation, ttl_s)
        lease.start()
        log.info(
            "node %s joined the fleet (incarnation %d, lease %g s), holding %d pods",
            node,
            joined.incarnation,
            ttl_s,
            len(joined.reclaimed),
        )
        return cls(control, lease)

    def adopt_with(
        self, adopt: Callable[[list[PodRecord]], Awaitable[None]], pods_dir: str
    ) -> None:
        """Start adopting the pods of nodes that left or whose lease expired; `adopt`
        brings their records up, parents first. `pods_dir`: where this node's pod
        sockets are (an adopted child's parent socket is moved there with its parent)."""
        self._scanner = Scanner(
            self._control, self.node, self.incarnation, self.ttl_s, adopt, self._lost, pods_dir
        )
        self._scanner.start()

    def _lost(self, exc: BaseException) -> None:
        stop_node(f"{exc}: another node may have taken its pods; stopping")

    # -- for the daemon socket and the relay --------------------------------------------

    async def host_of(self, pod: str) -> NodeInfo | None:
        """The live node whose lease holds `pod` (this one included); None when there is
        no such pod or its holder is not live (it is being adopted: ask again)."""
        return await self._control.host_of(pod, self.ttl_s)

    async def orphaned(self, pod: str) -> bool:
        """Whether `pod` is stored as top-level (a delete of its parent made it so)."""
        return await self._control.orphaned(pod)

    async def live_nodes(self) -> list[NodeInfo]:
        """The live nodes, this one included, by name."""
        return await self._control.live_nodes(self.ttl_s)

    async def set_address(self, address: str) -> None:
        """Where other nodes reach this one's node link (`nodes.address`)."""
        await self._control.set_address(self.node, self.incarnation, address)

    async def place(self, node: str | None) -> NodeInfo | None:
        """Where a daemon `spawn` goes: `node` when it is live (else `not_found`), else
        the live node with the fewest pods (None: there is none, this node takes it)."""
        return await place(self._control, node, self.ttl_s)

    async def report_targets(self, pods: list[str]) -> list[str]:
        """Where reports owed by `pods` go (after adopting them, this node delivers)."""
        return await self._control.report_targets(pods)

    # -- leaving ------------------------------------------------------------------------

    async def begin_leaving(self) -> None:
        """Adopt no more pods, and be placed no more spawns (`nodes.draining`): this node
        is shutting down. A database that does not answer is the lease's to find."""
        if self._scanner is not None:
            await self._scanner.stop()
        try:
            await self._control.drain(self.node, self.incarnation)
        except psycopg.Error as exc:
            log.warning("node %s could not mark itself draining: %s", self.node, exc)

    async def stop_renewing(self) -> None:
        """Once the store's last batch committed: no heartbeat, no watchdog."""
        await self._lease.stop()

    async def leave(self) -> None:
        """End this incarnation (the store is closed): the other nodes adopt its pods at
        their next scan."""
        try:
            if await self._control.leave(self.node, self.incarnation):
                log.info("node %s left the fleet; its pods go to the other nodes", self.node)
        finally:
            await self._control.close()
