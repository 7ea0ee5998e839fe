"""The daemon socket and the pod sockets: listening, and turning requests into calls.

`Endpoint` is one listening Unix socket with its connections; `PodEndpoint` and
`DaemonEndpoint` decide what each method does on their socket (§4 and §7).
"""

import asyncio
import contextlib
import errno
import inspect
import logging
import os
import socket
import stat
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from pydantic import BaseModel

from capd.access import current_policy, peer_of
from capd.activity import ActivityFeed
from capd.config import Config
from capd.connection import Connection, Reply, serve_connection
from capd.controller import PodController
from capd.fanout import Hub
from protocol import SERVER_NAME
from protocol.errors import ProtocolError
from protocol.events import Error, Hello, PodHello, PodStopped
from protocol.framing import encode
from protocol.manifest import Manifest
from protocol.methods import (
    DAEMON_REQUESTS,
    POD_REQUESTS,
    Apply,
    DaemonSubscribe,
    Delete,
    Diff,
    Down,
    History,
    Info,
    ListPods,
    Metrics,
    Overview,
    Request,
    RequestId,
    Restart,
    Shutdown,
    Spawn,
    Start,
    Status,
    Stop,
    StopPod,
    Subscribe,
    Unsubscribe,
    request_id,
)
from protocol.paths import POD_NAME_RE
from protocol.results import (
    ApplyResult,
    DiffResult,
    DownResult,
    InfoResult,
    ListResult,
    MetricsResult,
    SpawnResult,
    SubscribeResult,
)

if TYPE_CHECKING:
    from capd.fleet.relay import Relay

log = logging.getLogger(__name__)

FLUSH_GRACE_S = 0.5
"""How long closing an endpoint lets its connections write what is queued for them."""
CLOSE_TIMEOUT_S = 5.0
"""How long it then waits for requests still being handled."""


def ack(request: Request, result: dict[str, Any] | None = None) -> bytes:
    """An `ack` frame (protocol.events.Ack), encoded without a model: every request's reply
    takes this path, and building the model cost more than the rest of a `status`."""
    return orjson.dumps(
        {"event": "ack", "id": request.id, "result": result or {}},
        option=orjson.OPT_APPEND_NEWLINE,
    )


class PodEndpointHost(Protocol):
    """What a pod's socket asks of whoever runs the pod (the supervisor)."""

    node: str
    """The node hosting the pod (`capd --node`)."""

    def children_of(self, name: str) -> list[str]: ...

    def stop_pod_soon(self, name: str) -> None: ...


class TeamMethods(Protocol):
    """The daemon socket's methods on teams (capd.teams)."""

    async def apply(self, request: Apply) -> ApplyResult: ...

    async def down(self, team: str, drain_timeout_s: float) -> DownResult: ...


class PodMethods(Protocol):
    """The daemon socket's methods on pods; the supervisor provides them."""

    teams: TeamMethods
    hub: Hub
    """Where the daemon socket's subscribers hear of pods spawned, stopped, deleted."""
    activity: ActivityFeed
    """The same for subscribers that asked for activity, with each pod's pod_activity."""
    node: str
    """This node's name (`capd --node`)."""

    def endpoint(self, name: str) -> "PodEndpoint":
        """The endpoint of a pod this node hosts; `not_found` or `not_running` otherwise."""
        ...

    def watch_stops(self, callback: Callable[[str], None]) -> None: ...

    async def spawn(
        self, manifest: Manifest, parent: str | None, *, team: str | None = None
    ) -> SpawnResult: ...

    def list_pods(self) -> ListResult: ...

    def overview(self) -> dict[str, Any]: ...

    async def stop_pod(self, name: str, keep_turn: bool = False) -> list[str]: ...

    async def start_pod(self, name: str) -> SpawnResult: ...

    async def restart_pod(self, name: str) -> SpawnResult: ...

    async def delete_pod(self, name: str, delete_branch: bool = False) -> None: ...

    async def diff(self, name: str, stat: bool) -> DiffResult: ...


class ProcessMethods(Protocol):
    """The daemon socket's methods on capd itself; the daemon provides them."""

    def info(self) -> InfoResult: ...

    def metrics(self) -> str: ...

    def request_shutdown(self) -> None: ...

    @property
    def stopping(self) -> bool:
        """capd is shutting down (its pods stop because it does)."""
        ...


class Endpoint(ABC):
    """A listening socket, its open connections, and the handler for their requests."""

    def __init__(self, path: Path, config: Config) -> None:
        self.path = path
        self._config = config
        self._server: asyncio.Server | None = None
        self._activated = False
        self._access = current_policy(config.allow_gid)
        # Dicts used as sets: an empty dict is a quarter of an empty set's memory, and most
        # of 10,000 idle pods' endpoints never see a connection.
        self._connections: dict[Connection, None] = {}
        self._tasks: dict[asyncio.Task[None], None] = {}

    async def listen(self, activated: socket.socket | None = None) -> None:
        """Bind and listen at `path`, or serve `activated`, a socket systemd bound there
        (its unit sets the mode; the file stays when capd stops)."""
        limit = self._config.max_frame_bytes + 1
        group = self._config.allow_gid
        if activated is not None:
            self._activated = True
            if group is not None:
                _share_with_group(Path(activated.getsockname()), group)
            try:
                # uvloop, and asyncio from 3.13, would unlink systemd's socket file on close.
                self._server = await asyncio.start_unix_server(
                    self._serve, sock=activated, limit=limit, cleanup_socket=False
                )
            except TypeError:
                self._server = await asyncio.start_unix_server(
                    self._serve, sock=activated, limit=limit
                )
            return
        try:
            sock = _bind_private(self.path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            _remove_stale_socket(self.path)  # rare: only after a crash
            sock = _bind_private(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=limit)
        if group is not None:
            _share_with_group(self.path, group)
        # Else it is 0600 already: bound under umask 0o177.

    async def close_listener(self) -> None:
        """Stop accepting connections and remove the socket file, if this endpoint bound it
        (not systemd, and not another capd whose lock made this one give up)."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        if not self._activated:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def close(self) -> None:
        """Stop listening, then flush and close every connection. One whose client does
        not read what is queued for it is dropped after FLUSH_GRACE_S: waiting longer
        would not flush it, only hold up shutdown."""
        await self.close_listener()
        for conn in tuple(self._connections):
            conn.abort_after_flush()
        if self._tasks:
            await asyncio.wait(tuple(self._tasks), timeout=FLUSH_GRACE_S)
        for conn in tuple(self._connections):
            conn.abort()
        if self._tasks:
            await asyncio.wait(tuple(self._tasks), timeout=CLOSE_TIMEOUT_S)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refusal = self._access.refusal(peer_of(writer.get_extra_info("socket")))
        if refusal is not None:
            log.warning("refused a connection to %s: %s", self.path, refusal)
            writer.write(encode(Error(code="forbidden", message=refusal)))
            writer.close()
            return
        await self.serve_stream(reader, writer, encode(self.hello()))

    async def serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: bytes
    ) -> None:
        """Serve a connection whose client may use this endpoint (its socket's access
        check, or a node link's authentication), greeting it with `hello`."""
        task = asyncio.current_task()
        assert task is not None
        self._tasks[task] = None  # type: ignore[index]
        try:
            await serve_connection(
                reader,
                writer,
                hello,
                self._handle,
                max_queued_bytes=self._config.max_queued_bytes,
                max_frame_bytes=self._config.max_frame_bytes,
                on_open=self._connections.setdefault,
                on_close=self._forget,
            )
        finally:
            self._tasks.pop(task, None)  # type: ignore[call-overload]

    def _forget(self, conn: Connection) -> None:
        self._connections.pop(conn, None)
        conn.unsubscribe()

    def _subscribe(
        self,
        hub: Hub,
        conn: Connection,
        request: Request,
        after_seq: int | None,
        deltas: bool = True,
    ) -> None:
        """Ack, then register: the ack is queued before any replayed or live event."""
        conn.unsubscribe()
        limit = self._config.max_subscribers
        if (subscribed := self._subscribers(hub)) >= limit:
            raise ProtocolError(
                "limit_reached",
                f"{subscribed} connections already subscribe here, the most "
                f"capd --max-subscribers={limit} allows; close one first",
            )
        conn.send(ack(request, SubscribeResult(last_seq=hub.last_seq()).model_dump()))
        conn.subscribe(hub, after_seq, deltas)

    def _subscribers(self, hub: Hub) -> int:
        """The connections subscribed at this socket, which `--max-subscribers` bounds."""
        return len(hub.subscriptions)

    @abstractmethod
    def hello(self) -> Hello: ...

    @abstractmethod
    def _handle(self, frame: dict[str, Any], conn: Connection) -> Reply:
        """The reply (see `capd.connection.Reply`): an `async def` handler is sequential,
        its requests handled one at a time as they come."""


PLAIN_STATUS_KEYS = frozenset({"id", "method"})


def _plain_status(frame: dict[str, Any]) -> bool:
    """A `status` request that parsing would accept as it is (an id that is a string, an
    integer or absent; no other field): what clients poll, answered without the parser."""
    rid = frame.get("id")
    return frame.keys() <= PLAIN_STATUS_KEYS and (rid is None or type(rid) in (str, int))


def _share_with_group(path: Path, group: int) -> None:
    os.chown(path, -1, group)
    os.chmod(path, 0o660)


def _bind_private(path: Path) -> socket.socket:
    """A Unix socket bound at `path`, created 0600. The umask is process-wide, so it is
    changed only around the bind, with no await in between."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _remove_stale_socket(path: Path) -> None:
    """Clear the way for a new socket at `path`. Only a socket is removed — one left by a
    capd that died (this one holds the directory's lock, so no live capd owns it); any
    other file there is an error to resolve by hand, not something to delete."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; move it away and start again")
    path.unlink()


class PodEndpoint(Endpoint):
    def __init__(self, pod: PodController, host: PodEndpointHost, config: Config) -> None:
        super().__init__(pod.socket_path, config)
        self.pod = pod
        self._host = host

    def hello(self) -> Hello:
        pod = self.pod
        return Hello(
            server=SERVER_NAME,
            pod=PodHello(name=pod.name, status=pod.status, last_seq=pod.journal.committed_seq),
        )

    def _handle(self, frame: dict[str, Any], conn: Connection) -> Reply:
        """Methods for the actor go to its mailbox at once, in the order they came, and
        are answered when it gets to them; the connection reads on meanwhile. The others
        are answered here: `status` and `history` at once when no earlier request of the
        connection waits for its reply (else after them, as they would see their effects),
        the subscription methods after every earlier reply is written."""
        if frame.get("method") == "status" and not conn.unanswered and _plain_status(frame):
            return self._status(frame.get("id"))
        request = POD_REQUESTS.parse(frame)
        match request:
            case Status() | History() if not conn.unanswered:
                return self._local(request, conn)
            case Status() | History() | Subscribe() | Unsubscribe() | StopPod():
                return self._sequential(request, conn)
        answer = conn.answer(request.id)
        try:
            self.pod.submit(request, answer)
        except ProtocolError as exc:
            answer.set_exception(exc)
        return answer

    def _status(self, rid: RequestId | None) -> bytes:
        pod = self.pod
        result = pod.status_json(self._host.children_of(pod.name), self._host.node)
        return b'{"event":"ack","id":%b,"result":%b}\n' % (orjson.dumps(rid), result)

    async def _sequential(self, request: Request, conn: Connection) -> bytes | None:
        return self._local(request, conn)

    def _local(self, request: Request, conn: Connection) -> bytes | None:
        pod = self.pod
        match request:
            case Status():
                return self._status(request.id)
            case Subscribe(after_seq=after_seq, deltas=deltas):
                self._subscribe(pod.hub, conn, request, after_seq, deltas)
                return None
            case Unsubscribe():
                conn.unsubscribe()
                return ack(request)
            case History(after_seq=after_seq, limit=limit, last_turns=last_turns):
                return pod.journal.history(request.id, after_seq, limit, last_turns)
            case StopPod():
                conn.send(ack(request))
                self._host.stop_pod_soon(pod.name)
                return None
        raise AssertionError(f"not a local method: {request!r}")


class DaemonEndpoint(Endpoint):
    def __init__(
        self,
        pods: PodMethods,
        process: ProcessMethods,
        config: Config,
        relay: "Relay | None" = None,
        for_links: bool = False,
    ) -> None:
        """With `relay` (a fleet), what concerns pods other nodes host goes to them; the
        endpoint that serves node links (`for_links`) has none: it answers for this node
        alone."""
        super().__init__(config.runtime_dir / "capd.sock", config)
        self._pods = pods
        self._process = process
        self._relay = relay
        self._for_links = for_links
        self._following: dict[Connection, str] = {}
        """Connections subscribed to a pod's events (`subscribe` with `pod`), and the pod."""
        pods.watch_stops(self._pod_stopped)

    def hello(self) -> Hello:
        return Hello(server=SERVER_NAME, pod=None)

    def _subscribers(self, hub: Hub) -> int:
        """Both kinds of daemon subscriber, with activity or without, count."""
        return len(self._pods.hub.subscriptions) + len(self._pods.activity.hub.subscriptions)

    def _handle(self, frame: dict[str, Any], conn: Connection) -> Reply:
        if "pod" in frame:
            return self._pod_method(frame, conn)
        return self._daemon_method(frame, conn)

    async def _daemon_method(self, frame: dict[str, Any], conn: Connection) -> bytes | None:
        request = DAEMON_REQUESTS.parse(frame)
        pods, process = self._pods, self._process
        match request:
            case Spawn(manifest=manifest, parent=parent, team=team, node=node):
                if self._relay is not None:
                    target = await self._relay.place(node, parent)
                    placed = node is None
                    if target is not None and (
                        (result := await self._relay.spawn_on(target, frame, placed)) is not None
                    ):
                        return ack(request, result)
                else:
                    self._check_node(node)
                return ack(request, (await pods.spawn(manifest, parent, team=team)).model_dump())
            case ListPods():
                if self._relay is not None:
                    return ack(request, await self._relay.list_fleet(pods.list_pods()))
                return ack(request, pods.list_pods().model_dump())
            case Stop(name=name, keep_turn=keep_turn):
                return await self._on_host(request, frame, pods.stop_pod(name, keep_turn))
            case Start(name=name):
                return await self._on_host(request, frame, pods.start_pod(name))
            case Restart(name=name):
                return await self._on_host(request, frame, pods.restart_pod(name))
            case Delete(name=name, delete_branch=delete_branch):
                return await self._on_host(request, frame, pods.delete_pod(name, delete_branch))
            case Diff(name=name, stat=stat):
                return await self._on_host(request, frame, pods.diff(name, stat))
            case Info():
                info = process.info()
                if self._relay is not None:
                    info.fleet = await self._relay.fleet_nodes()
                return ack(request, info.model_dump())
            case Metrics():
                return ack(request, MetricsResult(text=process.metrics()).model_dump())
            case Shutdown():
                process.request_shutdown()  # first: whoever reads the ack finds capd stopping
                conn.send(ack(request))
                return None
            case DaemonSubscribe(activity=activity):
                self._stop_following(conn)
                self._subscribe(pods.activity.hub if activity else pods.hub, conn, request, None)
                return None
            case Overview():
                return ack(request, pods.overview())
            case Apply():
                return ack(request, (await pods.teams.apply(request)).model_dump())
            case Down(team=team, drain_timeout_s=drain_timeout_s):
                return ack(request, (await pods.teams.down(team, drain_timeout_s)).model_dump())
        raise AssertionError(f"unhandled daemon method {request!r}")

    async def _on_host(
        self, request: Request, frame: dict[str, Any], local: Coroutine[Any, Any, Any]
    ) -> bytes:
        """Run `local` (a method on pod `name`); a pod this node does not know, in a
        fleet, is asked of the node hosting it."""
        try:
            result = await local
        except ProtocolError as exc:
            if exc.code != "not_found" or self._relay is None:
                raise
            host = await self._relay.fleet.host_of(frame["name"])
            if host is None or host.name == self._pods.node:
                raise
            return ack(request, await self._relay.on_node(host, frame))
        return ack(request, result.model_dump() if isinstance(result, BaseModel) else None)

    def _pod_method(self, frame: dict[str, Any], conn: Connection) -> Reply:
        """A pod method naming its pod in `pod`: the pod's own endpoint handles it, on this
        connection, as it would on the pod's socket, and its reply is this one. (A fleet
        relays here the methods of pods that other nodes host.)"""
        name = frame["pod"]
        if not isinstance(name, str) or not POD_NAME_RE.match(name):
            raise ProtocolError("invalid_request", f"pod: {name!r} is not a pod name")
        method = frame.get("method")
        if method in DAEMON_REQUESTS.methods and method not in POD_REQUESTS.methods:
            raise ProtocolError(
                "invalid_request",
                f"{method} is a daemon method and takes no pod field (pod methods: "
                f"{', '.join(sorted(POD_REQUESTS.methods))})",
            )
        try:
            endpoint = self._pods.endpoint(name)
        except ProtocolError as exc:
            if exc.code != "not_found" or self._relay is None:
                raise
            return self._relayed(name, frame, conn)
        request = {k: v for k, v in frame.items() if k != "pod"}
        if method in ("subscribe", "unsubscribe"):
            POD_REQUESTS.parse(request)  # a bad one changes nothing; a good one ends the
            self._stop_following(conn)  # connection's subscription, whichever it is
        reply = endpoint._handle(request, conn)
        return self._follow(reply, conn, name) if method == "subscribe" else reply

    def _relayed(self, name: str, frame: dict[str, Any], conn: Connection) -> Reply:
        """A pod method for pod `name`, which another node hosts: forwarded to it as it
        came (the link's endpoint checks it); the reply takes this request's turn."""
        assert self._relay is not None
        relay = self._relay.of(conn)
        method = frame.get("method")
        if method in ("subscribe", "unsubscribe"):
            request = POD_REQUESTS.parse({k: v for k, v in frame.items() if k != "pod"})
            self._following.pop(conn, None)
            conn.unsubscribe()
            if isinstance(request, Unsubscribe):
                relay.end_subscription()
                return ack(request)
            return relay.subscribe(name, frame, request.id)
        answer = conn.answer(request_id(frame))
        relay.forward(name, frame, answer)
        return answer

    def _stop_following(self, conn: Connection) -> None:
        """The connection follows no pod from now on, here or through a relay."""
        self._following.pop(conn, None)
        if self._relay is not None:
            self._relay.end_subscription(conn)

    async def _follow(self, subscribing: Reply, conn: Connection, name: str) -> bytes | None:
        """Once the connection's `subscribe` to pod `name` has succeeded, note it, so the
        pod's stop ends it (`_pod_stopped`)."""
        assert inspect.isawaitable(subscribing)  # PodEndpoint: subscribe is sequential
        reply = await subscribing
        self._following[conn] = name
        return reply

    def _pod_stopped(self, name: str) -> None:
        """End the subscriptions to pod `name` held here with `pod_stopped`, after its last
        event; on its own socket, the connection would close. A node that shuts down hands
        its pods over: its links just close, and the relays at their other end follow each
        pod to its next node."""
        if self._for_links and self._process.stopping:
            return
        for conn, followed in tuple(self._following.items()):
            if followed == name:
                del self._following[conn]
                conn.unsubscribe()
                conn.send(encode(PodStopped(pod=name)))

    def _forget(self, conn: Connection) -> None:
        self._following.pop(conn, None)
        if self._relay is not None:
            self._relay.forget(conn)
        super()._forget(conn)

    def _check_node(self, node: str | None) -> None:
        """A spawn goes to this node, the only one without a shared store."""
        if node is not None and node != self._pods.node:
            raise ProtocolError(
                "not_found", f"no node {node} in the fleet (nodes: {self._pods.node})"
            )
