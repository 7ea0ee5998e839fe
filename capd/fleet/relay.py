"""Relaying requests for pods another node hosts, over node links (capd.fleet.links).

Each client connection of the daemon socket gets its own link to each host node it uses,
opened on first use and closed with it: the link's replies come back in the order it was
sent, a slow client slows only its own link, and a subscription lives on that link as it
would on the host's own socket. A relayed request holds its slot among the connection's
replies (`Connection.answer`), so relayed and local requests pipeline on one connection
and are answered in request order. Daemon methods (list, spawn, stop, …) for other nodes
share one link per node.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from capd.connection import Answer, Connection
from capd.fleet.links import Link, LinkError, open_link
from capd.outbox import ParentGone
from protocol.client import LINE_LIMIT, Client
from protocol.errors import ProtocolError
from protocol.framing import encode
from protocol.results import FleetNode, ListResult

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0
"""How long a daemon method forwarded to another node may take (a spawn restores a pod)."""
REPORT_TIMEOUT_S = 10.0
"""How long a report relayed to a parent on another node waits for its ack."""
LIST_TIMEOUT_S = 2.0
"""How long `list` waits for another node's pods; a node that is slower is left out."""
RESUBSCRIBE_POLL_S = 0.5
"""How often a subscription whose host was lost looks for the pod's new host."""

OnReply = Callable[[dict[str, Any] | None, bytes], None]
"""Called with a reply frame and its line, or (None, b"") when the link was lost first."""


class NodeInfo(Protocol):
    name: str
    address: str | None


class FleetView(Protocol):
    """What the relay needs of capd.fleet.membership.Fleet."""

    node: str
    ttl_s: float

    async def host_of(self, pod: str) -> Any: ...

    async def orphaned(self, pod: str) -> bool: ...

    async def live_nodes(self) -> list[Any]: ...

    async def place(self, node: str | None) -> Any: ...


class Upstream:
    """One link to a host node: requests out with the link's own ids, their replies and
    every other frame (a subscription's events) back to callbacks."""

    def __init__(
        self,
        relay: "Relay",
        node: NodeInfo,
        on_event: Callable[["Upstream", bytes, dict[str, Any]], None],
        on_lost: Callable[["Upstream"], None],
        conn: Connection | None,
    ) -> None:
        self.node = node.name
        self._on_event = on_event
        self._on_lost = on_lost
        self._conn = conn
        self._link: Link | None = None
        self._queued: list[dict[str, Any]] = []
        self._pending: dict[int, OnReply] = {}
        self._next_id = 1
        self.lost = False
        self.reached = False
        """Its link opened: a request lost since may have taken effect on the node."""
        self._task = asyncio.create_task(self._run(relay, node))

    def request(self, frame: dict[str, Any], on_reply: OnReply) -> None:
        if self.lost:
            on_reply(None, b"")
            return
        rid = self._next_id
        self._next_id += 1
        self._pending[rid] = on_reply
        frame["id"] = rid
        if self._link is None:
            self._queued.append(frame)
        else:
            self._link.send(frame)

    def close(self) -> None:
        self._task.cancel()
        if self._link is not None:
            self._link.close()

    async def _run(self, relay: "Relay", node: NodeInfo) -> None:
        try:
            if node.address is None:
                raise LinkError(f"node {node.name} has no --node-listen address")
            self._link = link = await relay.dial(node)
            self.reached = True
            for frame in self._queued:
                link.send(frame)
            self._queued.clear()
            async for line, frame in link.frames():
                self._dispatch(line, frame)
                if self._conn is not None and self._conn.over_bound:
                    await self._conn.backpressure()  # the host's fan-out marks it lagged
        except (LinkError, OSError, ValueError) as exc:
            log.warning("link to node %s: %s", self.node, exc)
        finally:
            self.lost = True
            pending, self._pending = self._pending, {}
            for on_reply in pending.values():
                on_reply(None, b"")
            self._on_lost(self)

    def _dispatch(self, line: bytes, frame: dict[str, Any]) -> None:
        if frame.get("event") in ("ack", "error"):
            on_reply = self._pending.pop(frame.get("id"), None)  # type: ignore[arg-type]
            if on_reply is not None:
                on_reply(frame, line)
                return
        self._on_event(self, line, frame)


class _Subscription:
    """A relayed `subscribe`: the pod, where it lives, and the last durable seq sent on."""

    __slots__ = ("live", "node", "options", "pod", "seq")

    def __init__(self, pod: str, node: str, seq: int | None, options: dict[str, Any]) -> None:
        self.pod = pod
        self.node = node
        self.seq = seq
        self.options = options
        """The request's other fields (`deltas`), for a subscription on the next host."""
        self.live = False
        """Its ack came: events of the link are its (earlier ones were the last one's)."""


class ConnRelay:
    """The relayed requests of one client connection."""

    def __init__(self, relay: "Relay", conn: Connection) -> None:
        self._relay = relay
        self._conn = conn
        self._ups: dict[str, Upstream] = {}
        self._jobs: list[tuple[str, dict[str, Any], Answer]] = []
        self._pump: asyncio.Task[None] | None = None
        self._sub: _Subscription | None = None
        self._resubscribing: asyncio.Task[None] | None = None

    def forward(self, pod: str, frame: dict[str, Any], answer: Answer) -> None:
        """Send `frame` (with `pod`) to the pod's host; its reply settles `answer`."""
        host = self._relay.cached(pod)
        if host is not None and not self._jobs:
            self._send(pod, host, frame, answer)
            return
        self._jobs.append((pod, frame, answer))
        if self._pump is None:
            self._pump = asyncio.create_task(self._drain())

    async def subscribe(self, pod: str, frame: dict[str, Any], rid: Any) -> bytes | None:
        """Relay a subscription: the host's ack, then its replay and live events."""
        self.end_subscription()
        host = await self._relay.resolve(pod)
        after = frame.get("after_seq")
        options = {k: v for k, v in frame.items() if k not in ("id", "method", "pod", "after_seq")}
        sub = _Subscription(pod, host.name, after if isinstance(after, int) else None, options)
        self._sub = sub
        done: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()

        def on_reply(reply: dict[str, Any] | None, line: bytes) -> None:
            if reply is None:
                self._sub = None
                done.set_exception(_lost(host.name))
            elif reply.get("event") == "ack":
                self._conn.send(_with_id(reply, rid))  # ahead of the events that follow
                sub.live = True
                if sub.seq is None:  # live only: from what was committed then, no gap
                    sub.seq = (reply.get("result") or {}).get("last_seq")
                done.set_result(None)
            else:
                self._sub = None
                done.set_result(_with_id(reply, rid))

        self._up(host).request(frame, on_reply)
        return await done

    def end_subscription(self) -> None:
        """End the relayed subscription, if any (the connection subscribes elsewhere)."""
        sub, self._sub = self._sub, None
        if self._resubscribing is not None:
            self._resubscribing.cancel()
            self._resubscribing = None
        if sub is not None and (up := self._ups.get(sub.node)) is not None:
            up.request({"method": "unsubscribe", "pod": sub.pod}, _ignore)

    def close(self) -> None:
        self.end_subscription()
        if self._pump is not None:
            self._pump.cancel()
        for up in self._ups.values():
            up.close()

    async def _drain(self) -> None:
        try:
            while self._jobs:
                pod, frame, answer = self._jobs[0]
                try:
                    host = await self._relay.resolve(pod)
                except ProtocolError as exc:
                    answer.set_exception(exc)
                else:
                    self._send(pod, host, frame, answer)
                self._jobs.pop(0)
        finally:
            self._pump = None

    def _send(self, pod: str, host: NodeInfo, frame: dict[str, Any], answer: Answer) -> None:
        rid = frame.get("id")

        def on_reply(reply: dict[str, Any] | None, line: bytes) -> None:
            if reply is None:
                answer.set_exception(_lost(host.name))
                return
            if reply.get("code") == "not_found":
                self._relay.forget_pod(pod)  # moved or deleted: look it up again next time
            answer.settle(_with_id(reply, rid))

        self._up(host).request(frame, on_reply)

    def _up(self, host: NodeInfo) -> Upstream:
        up = self._ups.get(host.name)
        if up is None or up.lost:
            up = Upstream(self._relay, host, self._event, self._lost, self._conn)
            self._ups[host.name] = up
        return up

    def _event(self, up: Upstream, line: bytes, frame: dict[str, Any]) -> None:
        sub = self._sub
        if sub is None or not sub.live or sub.node != up.node:
            return  # the rest of an ended subscription
        if (seq := frame.get("seq")) is not None:
            sub.seq = seq
        self._conn.send(line)
        if frame.get("event") == "pod_stopped":
            self._sub = None

    def _lost(self, up: Upstream) -> None:
        if self._ups.get(up.node) is up:
            del self._ups[up.node]
        self._relay.forget_node(up.node)
        sub = self._sub
        if sub is not None and sub.node == up.node and sub.live:
            self._resubscribing = asyncio.create_task(self._resubscribe(sub))

    async def _resubscribe(self, sub: _Subscription) -> None:
        """The host was lost mid-subscription: find the pod's host (the same node back,
        or the node that adopted it) and go on from the last durable event sent."""
        deadline = time.monotonic() + 2 * self._relay.fleet.ttl_s + 10
        while time.monotonic() < deadline and self._sub is sub:
            try:
                host = await self._relay.fleet.host_of(sub.pod)
            except Exception as exc:  # the control connection: try again next poll
                log.warning("looking up pod %s's node: %s", sub.pod, exc)
                host = None
            if host is not None and host.address is not None:
                sub.node, sub.live = host.name, False
                frame: dict[str, Any] = {"method": "subscribe", "pod": sub.pod, **sub.options}
                if sub.seq is not None:
                    frame["after_seq"] = sub.seq
                ok: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
                self._up(host).request(frame, _live_at_ack(sub, ok))
                if await ok:
                    return
            await asyncio.sleep(RESUBSCRIBE_POLL_S)
        if self._sub is sub:
            self._sub = None
            resume = sub.seq or 0
            self._conn.send(
                encode({"event": "lagged", "pod": sub.pod, "missed": 0, "resume_from": resume})
            )


class Relay:
    """The node's relay: per-connection relays, the routing cache, shared daemon links."""

    def __init__(
        self, fleet: FleetView, key: bytes | None, local_socket: Callable[[str], Path]
    ) -> None:
        """`local_socket(pod)`: where a pod this node hosts listens."""
        self.fleet = fleet
        self._key = key
        self._local_socket = local_socket
        self._conns: dict[Connection, ConnRelay] = {}
        self._hosts: dict[str, NodeInfo] = {}
        """pod → the node hosting it, as last looked up."""
        self._shared: dict[str, Upstream] = {}

    async def dial(self, node: NodeInfo) -> Link:
        assert node.address is not None
        # What a node sends back is unbounded, as on its daemon socket (a history page).
        return await open_link(node.address, self.fleet.node, self._key, LINE_LIMIT, node.name)

    def of(self, conn: Connection) -> ConnRelay:
        relay = self._conns.get(conn)
        if relay is None:
            relay = self._conns[conn] = ConnRelay(self, conn)
        return relay

    def forget(self, conn: Connection) -> None:
        if (relay := self._conns.pop(conn, None)) is not None:
            relay.close()

    def end_subscription(self, conn: Connection) -> None:
        if (relay := self._conns.get(conn)) is not None:
            relay.end_subscription()

    def cached(self, pod: str) -> NodeInfo | None:
        return self._hosts.get(pod)

    async def resolve(self, pod: str) -> NodeInfo:
        """The other node hosting `pod`; `not_found` when no live node does."""
        host = self._hosts.get(pod)
        if host is not None:
            return host
        host = await self.fleet.host_of(pod)
        if host is None or host.name == self.fleet.node:
            raise ProtocolError("not_found", f"no pod {pod} on a live node of the fleet")
        if host.address is None:
            raise ProtocolError(
                "not_running", f"pod {pod} is on node {host.name}: " + _no_links(host.name)
            )
        self._hosts[pod] = host
        return host

    def forget_pod(self, pod: str) -> None:
        self._hosts.pop(pod, None)

    def forget_node(self, node: str) -> None:
        """Links to `node` broke: look its pods up again (they may have moved)."""
        for pod in [pod for pod, host in self._hosts.items() if host.name == node]:
            del self._hosts[pod]

    async def call(
        self, node: NodeInfo, frame: dict[str, Any], timeout: float = CALL_TIMEOUT_S
    ) -> dict[str, Any]:
        """A daemon method on `node`: its ack's result, or its error raised."""
        up = self._shared.get(node.name)
        if up is None or up.lost:
            up = Upstream(self, node, _drop_event, self._shared_lost, None)
            self._shared[node.name] = up
        done: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()

        def on_reply(reply: dict[str, Any] | None, line: bytes) -> None:
            if not done.done():
                done.set_result(reply)

        up.request(dict(frame), on_reply)
        try:
            reply = await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise ProtocolError(
                "timeout", f"node {node.name} did not answer in {timeout:g} s"
            ) from None
        if reply is None:
            raise _lost(node.name) if up.reached else Unreachable(node.name)
        if reply.get("event") == "error":
            raise ProtocolError(reply.get("code", "internal"), str(reply.get("message")))
        return reply.get("result") or {}

    async def place(self, node: str | None, parent: str | None) -> NodeInfo | None:
        """The other node a `spawn` goes to, None for this one: `node`, else this node for
        a child (its parent is a socket path on this machine), else the fleet's choice
        (capd.fleet.membership.Fleet.place) when it has a link to reach it by, else this node."""
        if node is None and parent is not None:
            return None
        target = await self.fleet.place(node)
        if target is None or target.name == self.fleet.node:
            return None
        if node is None and target.address is None:
            return None
        return target

    async def on_node(
        self, host: NodeInfo, frame: dict[str, Any], **changes: Any
    ) -> dict[str, Any]:
        """Daemon method `frame` (with `changes`) run by live node `host`, as a lookup just
        found it."""
        if host.address is None:
            raise ProtocolError("not_found", _no_links(host.name))
        return await self.call(host, {**frame, **changes})

    async def spawn_on(self, target: NodeInfo, frame: dict[str, Any], placed: bool) -> Any:
        """A `spawn` forwarded to node `target`: its result; None when placement chose
        `target` (`placed`) but no link to it opens (it died within its lease TTL), so
        the request never left and the pod goes to this node instead."""
        try:
            return await self.on_node(target, frame, node=target.name)
        except Unreachable as exc:
            if not placed:
                raise
            log.warning("spawn placed on node %s stays here: %s", target.name, exc.message)
            return None

    async def list_fleet(self, local: ListResult) -> dict[str, Any]:
        """`list` over the fleet: this node's pods, then every other live node's (asked in
        parallel; a node that does not answer in LIST_TIMEOUT_S is left out)."""
        others = [
            node
            for node in await self.fleet.live_nodes()
            if node.name != self.fleet.node and node.address is not None
        ]
        answers = await asyncio.gather(
            *(self.call(node, {"method": "list"}, LIST_TIMEOUT_S) for node in others),
            return_exceptions=True,
        )
        entries = local.model_dump()["pods"]
        seen = {entry["name"] for entry in entries}
        for node, answer in zip(others, answers, strict=True):
            if isinstance(answer, BaseException):
                log.warning("list: node %s did not answer: %s", node.name, answer)
                continue
            for entry in answer.get("pods", []):
                if entry["name"] not in seen:
                    seen.add(entry["name"])
                    entry["socket"] = None
                    entries.append(entry)
        return {"pods": entries}

    async def deliver_report(self, pod: str, child: str, request: dict[str, Any]) -> None:
        """Pod `child`'s report (`pod_event`) to fleet pod `pod` on the node hosting it now
        (capd.outbox): over that node's link, or to the pod's own socket when this node
        hosts it (a parent adopted here listens at a new path, and a node may take no
        links). An error, or no live host yet, is the outbox's to retry; ParentGone when
        `child` is top-level now (its parent was deleted, on whichever node)."""
        host = await self.fleet.host_of(pod)
        if host is None:
            if await self.fleet.orphaned(child):
                raise ParentGone(f"parent pod {pod} was deleted; pod {child} is top-level now")
            raise OSError(f"pod {pod} is on no live node of the fleet (being adopted?)")
        if host.name != self.fleet.node:
            await self.call(host, {**request, "pod": pod}, REPORT_TIMEOUT_S)
            return
        async with await Client.connect(self._local_socket(pod), REPORT_TIMEOUT_S) as parent:
            await parent.request(request, REPORT_TIMEOUT_S)

    async def fleet_nodes(self) -> list[FleetNode]:
        return [
            FleetNode(node=node.name, pods=node.pods, last_seen=node.last_seen)
            for node in await self.fleet.live_nodes()
        ]

    async def close(self) -> None:
        for relay in tuple(self._conns.values()):
            relay.close()
        self._conns.clear()
        for up in self._shared.values():
            up.close()

    def _shared_lost(self, up: Upstream) -> None:
        if self._shared.get(up.node) is up:
            del self._shared[up.node]
        self.forget_node(up.node)


def _live_at_ack(sub: _Subscription, ok: "asyncio.Future[bool]") -> OnReply:
    """Mark `sub` live as its ack is read, before the link's next frame (its events)."""

    def on_reply(reply: dict[str, Any] | None, line: bytes) -> None:
        sub.live = reply is not None and reply.get("event") == "ack"
        ok.set_result(sub.live)

    return on_reply


def _no_links(node: str) -> str:
    """Why node `node` cannot be asked anything by another node."""
    return f"node {node} takes no links from other nodes (it has no --node-listen)"


class Unreachable(ProtocolError):
    """No link to the node opened: the request was not sent."""

    def __init__(self, node: str) -> None:
        super().__init__(
            "internal", f"node {node} cannot be reached (no link opens): the request was not sent"
        )


def _lost(node: str) -> ProtocolError:
    return ProtocolError(
        "internal",
        f"node {node} was lost before answering; the request may or may not have taken "
        "effect (check `history`)",
    )


def _with_id(reply: dict[str, Any], rid: Any) -> bytes:
    reply["id"] = rid
    return encode(reply)


def _ignore(reply: dict[str, Any] | None, line: bytes) -> None:
    pass


def _drop_event(up: Upstream, line: bytes, frame: dict[str, Any]) -> None:
    pass
