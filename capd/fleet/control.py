"""The fleet's control connection: every query about nodes and leases, on a psycopg
`AsyncConnection` of its own on the event loop (autocommit), never on the store's batch
connection — a scan or a relay's lookup must not wait behind, or join, a batch.

A node is live while `incarnation <> 0 AND expires > clock_timestamp()`: expiry is only
ever compared in the database's clock (fleet22 §8.2).
"""

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import conninfo

from capd.store import PodRecord

LIVE = "n.incarnation <> 0 AND n.expires > clock_timestamp()"
NODE_COLUMNS = (
    "n.name, n.address, n.incarnation, "
    "(SELECT count(*) FROM leases l WHERE l.node = n.name), "
    "extract(epoch FROM n.expires) - %s"
)


MOVE_PARENTS = r"""
WITH moved AS (
    SELECT p.name, p.parent AS old, %s || substring(p.parent from '/[^/]+\.sock$') AS new
    FROM pods p
    WHERE p.name = ANY(%s)
      AND substring(p.parent from '/pods/([^/]+)\.sock$')
          IN (SELECT pod FROM leases WHERE node = %s)
), reports AS (
    UPDATE outbox o SET target = m.new FROM moved m
    WHERE o.pod = m.name AND o.target = m.old AND m.old <> m.new
)
UPDATE pods p SET parent = m.new FROM moved m WHERE p.name = m.name AND m.old <> m.new
"""
"""Adopted pods whose parent is now this node's: their parent socket (and the reports they
owe it) moved to this node's pods dir (parameters: pods dir, adopted pods, this node)."""


@dataclass(frozen=True)
class NodeInfo:
    name: str
    address: str | None
    """`host:port` of its node link (`nodes.address`), None until set."""
    incarnation: int
    """The live process's incarnation (a link can check its peer's)."""
    pods: int
    """Pods whose lease names it, stopped ones included."""
    last_seen: float
    """Unix seconds of its last renewal (its expiry - ttl, the database's clock)."""


@dataclass(frozen=True)
class Joined:
    incarnation: int
    reclaimed: list[str]
    """The pods the node held under its name (each lease's epoch went up by one)."""


class NameInUse(Exception):
    """Another live capd runs under this node name."""


class Control:
    def __init__(self, conn: psycopg.AsyncConnection[Any], params: dict[str, Any]) -> None:
        self._conn = conn
        self._params = params
        self._lock = asyncio.Lock()
        """One query or transaction at a time: a transaction spans several awaits."""
        self._unsettled: list[str] = []
        """Transaction ids of takeover scans that failed once under way: their COMMIT may
        have gone through (the connection broke as it was sent), so the leases they moved
        may be this node's. The next `adopt` reports those."""

    @classmethod
    async def connect(cls, url: str, node: str) -> "Control":
        params = conninfo.conninfo_to_dict(url)
        params.setdefault("connect_timeout", 10)
        params["application_name"] = f"capd/{node}/control"
        return cls(await psycopg.AsyncConnection.connect(autocommit=True, **params), params)

    async def close(self) -> None:
        with contextlib.suppress(psycopg.Error):
            await self._conn.close()

    async def _ready(self) -> psycopg.AsyncConnection[Any]:
        """The connection, opened again if it broke (a database restart): the store's own
        connection fails its next commit then anyway, so this one only has to recover
        for the queries made meanwhile. Call with the lock held."""
        if self._conn.closed:
            self._conn = await psycopg.AsyncConnection.connect(autocommit=True, **self._params)
        return self._conn

    async def _all(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._lock:
            cursor = await (await self._ready()).execute(sql, params)  # type: ignore[arg-type]
            return await cursor.fetchall()

    # -- this node ----------------------------------------------------------------------

    async def join(self, me: str, previous: int | None, ttl_s: float) -> Joined:
        """Start a new incarnation of node `me` and take back every pod its lease names
        (epoch +1: an old incarnation still running somewhere fails its next fence).
        Refused (NameInUse) when a live incarnation other than `previous` (this state
        dir's last) holds the name: another capd uses it. The node's stored address stays
        until `set_address` (once it listens for links)."""
        async with self._lock:
            return await self._join(me, previous, ttl_s)

    async def _join(self, me: str, previous: int | None, ttl_s: float) -> Joined:
        async with (await self._ready()).transaction():
            cur = await self._conn.execute(
                "SELECT incarnation, expires > clock_timestamp(), "
                "extract(epoch FROM clock_timestamp() - expires) + %s "
                "FROM nodes WHERE name = %s FOR UPDATE",
                (ttl_s, me),
            )
            row = await cur.fetchone()
            if row is not None and row[0] != 0 and row[1] and row[0] != previous:
                raise NameInUse(
                    f"node {me} is live (incarnation {row[0]}, renewed {row[2]:.1f} s ago) "
                    "and is not this state dir's: another capd uses this name; pick "
                    "another --node"
                )
            cur = await self._conn.execute(
                "INSERT INTO nodes (name, incarnation, expires) VALUES "
                "(%s, nextval('node_incarnation'), "
                "clock_timestamp() + make_interval(secs => %s)) "
                "ON CONFLICT (name) DO UPDATE SET incarnation = excluded.incarnation, "
                "expires = excluded.expires, started = clock_timestamp(), draining = false "
                "RETURNING incarnation",
                (me, ttl_s),
            )
            inc = await cur.fetchone()
            assert inc is not None
            cur = await self._conn.execute(
                "UPDATE leases SET epoch = epoch + 1 WHERE node = %s RETURNING pod", (me,)
            )
            reclaimed = [pod for (pod,) in await cur.fetchall()]
            # Pods a capd wrote before the fleet's tables existed have no lease: the first
            # node to join takes them.
            cur = await self._conn.execute(
                "INSERT INTO leases (pod, node, epoch, family) SELECT name, %s, 1, name "
                "FROM pods WHERE NOT EXISTS (SELECT 1 FROM leases WHERE pod = name) "
                "ON CONFLICT DO NOTHING RETURNING pod",
                (me,),
            )
            reclaimed += [pod for (pod,) in await cur.fetchall()]
        return Joined(int(inc[0]), reclaimed)

    async def set_address(self, me: str, incarnation: int, address: str) -> None:
        await self._all(
            "UPDATE nodes SET address = %s WHERE name = %s AND incarnation = %s RETURNING 1",
            (address, me, incarnation),
        )

    async def drain(self, me: str, incarnation: int) -> None:
        """Placement passes this node over from now on (it is shutting down)."""
        await self._all(
            "UPDATE nodes SET draining = true WHERE name = %s AND incarnation = %s RETURNING 1",
            (me, incarnation),
        )

    async def leave(self, me: str, incarnation: int) -> bool:
        """End this incarnation now: other nodes adopt its pods at their next scan."""
        rows = await self._all(
            "UPDATE nodes SET incarnation = 0, expires = clock_timestamp() "
            "WHERE name = %s AND incarnation = %s RETURNING 1",
            (me, incarnation),
        )
        return bool(rows)

    # -- takeover -----------------------------------------------------------------------

    async def adopt(self, me: str, incarnation: int, pods_dir: str) -> tuple[list[str], list[str]]:
        """One scan, one transaction: end the incarnations that expired, then move a share
        of the ended nodes' pods (whole families) to `me`, whose pod sockets are in
        `pods_dir`. Returns (nodes ended, pods adopted). Raises NotLive when
        `me` itself is no longer live. The pods an earlier call moved to `me` though it
        failed (its COMMIT went through unanswered) are among those adopted."""
        async with self._lock:
            moved = await self._moved_by(me, self._unsettled) if self._unsettled else []
            ended, adopted = await self._adopt(me, incarnation, pods_dir)
            self._unsettled = []  # the earlier ones' pods are in `moved`, this one answered
            return ended, moved + adopted

    async def _moved_by(self, me: str, xids: list[str]) -> list[str]:
        """The leases of `me` that transactions `xids` wrote last: none if they rolled back.
        (Nothing else writes the lease of a pod this node does not know yet.)"""
        cur = await (await self._ready()).execute(
            "SELECT pod FROM leases WHERE node = %s AND xmin::text = ANY(%s)",
            (me, xids),
        )
        return [pod for (pod,) in await cur.fetchall()]

    async def _adopt(self, me: str, incarnation: int, pods_dir: str) -> tuple[list[str], list[str]]:
        async with (await self._ready()).transaction():
            # Locks our own row (FOR SHARE) for the transaction: a node whose lease ran
            # out must not adopt, and cannot lose the row before this commits.
            cur = await self._conn.execute(
                "SELECT pg_current_xact_id()::xid::text FROM nodes n WHERE name = %s AND "
                "incarnation = %s AND " + LIVE + " FOR SHARE",
                (me, incarnation),
            )
            if (row := await cur.fetchone()) is None:
                raise NotLive(f"node {me} (incarnation {incarnation}) lost its lease")
            self._unsettled.append(row[0])  # until this returns: it may commit unanswered
            # A row locked by its holder's open fenced batch, or by a re-join, is skipped
            # until the next scan: the holder may be renewing it right now.
            cur = await self._conn.execute(
                "UPDATE nodes SET incarnation = 0 WHERE name IN (SELECT name FROM nodes "
                "WHERE incarnation <> 0 AND expires < clock_timestamp() "
                "FOR UPDATE SKIP LOCKED) RETURNING name"
            )
            ended = [name for (name,) in await cur.fetchall()]
            cur = await self._conn.execute(
                "SELECT count(DISTINCT l.family), (SELECT count(*) FROM nodes n WHERE "
                + LIVE
                + ") FROM leases l JOIN nodes n ON n.name = l.node WHERE n.incarnation = 0"
            )
            counts = await cur.fetchone()
            assert counts is not None
            families, live = counts
            if not families:
                return ended, []
            share = max(1, -(-families // max(1, live)))
            cur = await self._conn.execute(
                "SELECT l.family FROM leases l JOIN nodes n ON n.name = l.node "
                "WHERE n.incarnation = 0 GROUP BY l.family ORDER BY min(l.pod) LIMIT %s",
                (share,),
            )
            chosen = [family for (family,) in await cur.fetchall()]
            # Lock the ended node's row too (FOR SHARE OF n): otherwise a re-join of that
            # node, which re-claims its pods, can interleave and leave two holders
            # (fleet22 §3.3, joinrace.py).
            cur = await self._conn.execute(
                "UPDATE leases SET node = %s, epoch = epoch + 1 WHERE pod IN ("
                "SELECT l.pod FROM leases l JOIN nodes n ON n.name = l.node "
                "WHERE n.incarnation = 0 AND l.family = ANY(%s) "
                "FOR UPDATE OF l SKIP LOCKED FOR SHARE OF n SKIP LOCKED) RETURNING pod",
                (me, chosen),
            )
            adopted = [pod for (pod,) in await cur.fetchall()]
            # A child names its parent by socket path: a parent that is now this node's
            # listens in this node's pods dir, where the child (its tree, its reports) must
            # look for it — the old node's path may differ.
            await self._conn.execute(MOVE_PARENTS, (pods_dir, adopted, me))
            # An ended node that holds nothing any more leaves the fleet's listing.
            await self._conn.execute(
                "DELETE FROM nodes WHERE name IN (SELECT name FROM nodes n WHERE "
                "incarnation = 0 AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.node = "
                "n.name) FOR UPDATE SKIP LOCKED)"
            )
        return ended, adopted

    async def records(self, pods: Sequence[str]) -> list[PodRecord]:
        """The stored records of `pods`, parents before children (creation order)."""
        rows = await self._all(
            "SELECT name, manifest, parent, stopped, team, worktree, pending_manifest "
            "FROM pods WHERE name = ANY(%s) ORDER BY created, name",
            (list(pods),),
        )
        return [PodRecord(*row) for row in rows]

    async def report_targets(self, pods: Sequence[str]) -> list[str]:
        """Where reports owed by `pods` go (their new host delivers them)."""
        rows = await self._all(
            "SELECT DISTINCT target FROM outbox WHERE pod = ANY(%s)", (list(pods),)
        )
        return [target for (target,) in rows]

    # -- the fleet ----------------------------------------------------------------------

    async def host_of(self, pod: str, ttl_s: float) -> NodeInfo | None:
        rows = await self._all(
            f"SELECT {NODE_COLUMNS} FROM leases h JOIN nodes n ON n.name = h.node "
            f"WHERE h.pod = %s AND {LIVE}",
            (ttl_s, pod),
        )
        return _info(rows[0]) if rows else None

    async def orphaned(self, pod: str) -> bool:
        rows = await self._all("SELECT 1 FROM pods WHERE name = %s AND parent IS NULL", (pod,))
        return bool(rows)

    async def live_nodes(self, ttl_s: float) -> list[NodeInfo]:
        rows = await self._all(
            f"SELECT {NODE_COLUMNS} FROM nodes n WHERE {LIVE} ORDER BY n.name", (ttl_s,)
        )
        return [_info(row) for row in rows]

    async def least_loaded(self, ttl_s: float) -> NodeInfo | None:
        """The live, non-draining node with the fewest pods (ties by name)."""
        rows = await self._all(
            f"SELECT {NODE_COLUMNS} FROM nodes n WHERE {LIVE} AND NOT n.draining "
            "ORDER BY 4, n.name LIMIT 1",
            (ttl_s,),
        )
        return _info(rows[0]) if rows else None


class NotLive(Exception):
    """This node's own lease is gone (found by a scan)."""


def _info(row: tuple[Any, ...]) -> NodeInfo:
    name, address, incarnation, pods, last_seen = row
    return NodeInfo(name, address, int(incarnation), int(pods), float(last_seen))
