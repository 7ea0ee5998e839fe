"""capd's process: start-up, restore, the pod registry, signals and shutdown.

`Daemon.serve()` is `startup()`, `main_loop()` and `shutdown()` in that order. Pods live in
`self.pods` while running; the store remembers every pod, running or stopped.
"""

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import resource
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, TypeVar

from capd.children import ChildPods, check_child
from capd.config import Config
from capd.controller import PodController, StopMode
from capd.engines import check_engine
from capd.fanout import Hub
from capd.outbox import Outbox
from capd.proc import leftovers
from capd.proc.groups import stop_all_groups
from capd.registry import PodRegistry
from capd.server import DaemonEndpoint, PodEndpoint
from capd.store import PodRecord, Store
from capd.systemd import Notifier, activated_socket
from capd.tools.base import ToolFailed
from protocol import VERSION
from protocol.errors import ProtocolError
from protocol.events import (
    PodDeleted,
    PodEventBase,
    PodSpawned,
    PodStatusEvent,
    PodStatusName,
    PodStopped,
)
from protocol.framing import encode
from protocol.manifest import Manifest
from protocol.paths import pod_socket
from protocol.results import InfoResult, ListResult, PodListEntry, SpawnResult

log = logging.getLogger("capd")

T = TypeVar("T")

REPLAY_BATCH = 1000
SHUTDOWN_GRACE_S = 10.0
POD_STOP_TIMEOUT_S = 8.0
"""A pod's actor has this long to stop (its turn paused or cancelled, its engine closed;
each of those is bounded well within it); then it is cancelled, so a stop never hangs."""
ABANDON_TIMEOUT_S = 3.0
"""How long a cancelled actor, then its engine's closing, may take. With the endpoints'
close and SHUTDOWN_GRACE_S, shutdown stays inside the unit's TimeoutStopSec=30."""
RESTORE_REPORT_S = 1.0
"""How often a restore under way tells systemd its progress."""
RESTORE_EXTEND_USEC = 30_000_000
"""How long each progress report extends systemd's start-up timeout."""


@dataclass(eq=False)
class _RunningPod:
    controller: PodController
    endpoint: PodEndpoint
    actor: "asyncio.Task[None]"


class DaemonLocked(Exception):
    """Another capd holds the lock on this state or runtime directory."""


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pods: dict[str, _RunningPod] = {}
        self.hub = Hub("", lambda: 0)
        self._store: Store | None = None
        self._outbox: Outbox | None = None
        self._registry: PodRegistry | None = None
        self._endpoint = DaemonEndpoint(self, config)
        self._locks: list[IO[str]] = []
        self._should_exit = asyncio.Event()
        self._started = time.monotonic()
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping: set[str] = set()
        self._notifier = Notifier({})
        self._broken: dict[str, str] = {}
        """Pods that failed to come back up, and why."""
        self._closing = False

    @property
    def store(self) -> Store:
        assert self._store is not None
        return self._store

    @property
    def registry(self) -> PodRegistry:
        assert self._registry is not None
        return self._registry

    @property
    def outbox(self) -> Outbox:
        assert self._outbox is not None
        return self._outbox

    # -- lifecycle ----------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        self._notifier = Notifier()
        activated = activated_socket()
        _make_private_dir(cfg.runtime_dir, cfg.allow_gid)
        _make_private_dir(cfg.runtime_dir / "pods", cfg.allow_gid)
        _make_private_dir(cfg.state_dir, None)
        self._locks = [_lock(cfg.state_dir / "capd.lock"), _lock(cfg.runtime_dir / "capd.lock")]
        if left := leftovers.claim(cfg.state_dir):
            log.warning(
                "stopping %d process groups the last capd left running (%s)",
                len(left),
                " ".join(map(str, left)),
            )
        _raise_fd_limit()
        self._store = Store(cfg.state_dir / "capd.db")
        self._outbox = Outbox(self._store)
        self._registry = PodRegistry(self._store)
        await self._restore_pods()
        await self._endpoint.listen(activated)
        self.outbox.start()
        log.info(
            "capd %s listening on %s%s (%d pods restored)",
            VERSION,
            self._endpoint.path,
            " (socket-activated)" if activated else "",
            len(self.pods),
        )
        # What start-up built (modules, pydantic schemas, restored pods) lives as long as the
        # daemon: keep the collector from walking it again on every full collection.
        gc.freeze()
        self._notifier.ready(self._summary())

    async def _restore_pods(self) -> None:
        """Bring up the pods that were not stopped. A long restore tells systemd how far it
        is and extends the start-up timeout, so a big state directory never trips it."""
        records = [record for record in self.registry.all() if not record.stopped]
        reported = -RESTORE_REPORT_S
        for done, record in enumerate(records):
            if self._should_exit.is_set():
                return  # SIGTERM during restore: stop here, shutdown() takes down what is up
            if time.monotonic() - reported >= RESTORE_REPORT_S:
                reported = time.monotonic()
                self._notifier.send(
                    EXTEND_TIMEOUT_USEC=str(RESTORE_EXTEND_USEC),
                    STATUS=f"restoring pods: {done} of {len(records)} up",
                )
            with contextlib.suppress(ProtocolError):
                await self._bring_up_record(record)

    async def main_loop(self) -> None:
        if self._notifier.watchdog_s is None:
            await self._should_exit.wait()
            return
        # Pinged from the event loop itself: a loop that stops turning stops the pings.
        interval = self._notifier.watchdog_s / 2
        while not self._should_exit.is_set():
            self._notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._should_exit.wait()

    def request_shutdown(self) -> None:
        self._should_exit.set()

    async def shutdown(self) -> None:
        """Refuse new work, let spawns and stops under way finish, pause the pods' turns,
        give their tools' process groups KILL_GRACE_S to exit after SIGTERM (then SIGKILL),
        then stop delivering reports; what is undelivered waits in the store."""
        log.info("shutting down: pausing in-flight turns")
        self._notifier.stopping("stopping: pausing running turns")
        self._closing = True
        await self._endpoint.close()
        if self._background:
            await asyncio.wait(self._background, timeout=SHUTDOWN_GRACE_S)
        await asyncio.gather(*(self._take_down(name, "pause") for name in list(self.pods)))
        await stop_all_groups()
        if self._locks:
            leftovers.release(self.config.state_dir)
        if self._outbox is not None:
            await self._outbox.close()
        if self._store is not None:
            self._store.close()
        for lock in self._locks:
            lock.close()
        log.info("capd stopped")

    # -- pods ---------------------------------------------------------------------------

    async def spawn(
        self,
        manifest: Manifest,
        parent: str | None,
        *,
        turn_id: str | None = None,
        make_cwd: bool = False,
    ) -> SpawnResult:
        """Create and start a pod. With a local `parent` the child rules apply (see
        children.py) and the parent records `child_spawned` with `turn_id`, the turn whose
        spawn_pod call made it. `make_cwd` creates a missing cwd once all checks pass."""
        self._refuse_when_closing()
        self._check_room()
        name = manifest.name
        if name in self.pods or self.registry.get(name) is not None:
            raise ProtocolError("already_exists", f"a pod named {name} already exists")
        if parent is not None and (not Path(parent).is_absolute() or "\0" in parent):
            raise ProtocolError(
                "invalid_request", f"parent {parent!r} must be an absolute socket path"
            )
        cwd = self._resolve_cwd(manifest, must_exist=not make_cwd)
        manifest = manifest.model_copy(update={"cwd": str(cwd)})
        _check_api_key(manifest)
        check_engine(manifest)
        parent_name = self._pods_dir_name(parent)
        if parent_name is not None:
            self._check_child_of(parent_name, manifest)
            parent = str(self._socket(parent_name))  # the spelling children_of looks up
        if make_cwd:
            try:
                cwd.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ProtocolError(
                    "invalid_request", f"cannot create cwd {cwd}: {exc.strerror or exc}"
                ) from None
        self._make_pod_state_dir(name)
        self.registry.add(name, manifest.model_dump_json(), parent)
        running = await self._bring_up(manifest, parent)
        socket = str(running.endpoint.path)
        if (local_parent := self._pod_at(parent)) is not None:
            # A parent stopping meanwhile refuses; its stop cascade takes the child down.
            with contextlib.suppress(ProtocolError):
                await local_parent.controller.adopt(name, socket, turn_id)
        self._publish(PodSpawned(pod=name, socket=socket, parent=parent))
        return SpawnResult(name=name, socket=socket)

    def _check_child_of(self, parent: str, manifest: Manifest) -> None:
        if parent in self._stopping:
            raise ProtocolError("shutting_down", f"parent pod {parent} is stopping")
        record = self.registry.get(parent)
        if record is None:
            raise ProtocolError(
                "not_found",
                f"parent {self._socket(parent)} is in capd's pods directory but no pod "
                f"named {parent} exists; spawn the parent first",
            )
        check_child(
            parent,
            Manifest.model_validate_json(record.manifest),
            manifest,
            [child for child in self.children_of(parent) if child in self.pods],
            self._depth(parent) + 1,
        )

    async def stop_pod(self, name: str) -> list[str]:
        """Stop the pod, then its descendants; returns the names of those that were running.
        Descendants are listed once the pod is down, so a child it was spawning is among them.
        A pod that could not be restored is marked stopped, so restarts stop retrying it."""
        self._require_known(name)
        if self._broken.pop(name, None) is not None:
            self.registry.set_stopped(name, True)
            self._publish(PodStopped(pod=name))
        stopped = [name] if await self._stop_one(name) else []
        for record, _ in self.descendants(name):
            if await self._stop_one(record.name):
                stopped.append(record.name)
        return stopped

    async def _stop_one(self, name: str) -> bool:
        running = self.pods.get(name)
        if running is None:
            return False
        self._stopping.add(name)
        try:
            await self._take_down(name, "cancel")
            report = running.controller.shut_down_report()
            self.registry.set_stopped(name, True, report)
            if report is not None:
                self.outbox.poke(report.target)
        finally:
            self._stopping.discard(name)
        self._publish(PodStopped(pod=name))
        return True

    def in_background(self, work: Awaitable[T]) -> "asyncio.Task[T]":
        """Run `work` as a task the daemon owns: shutdown waits for it, and whoever awaits
        it can be cancelled (by `asyncio.shield`) without cutting it short."""

        async def run() -> T:
            return await work

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: "asyncio.Task[Any]") -> None:
        """Forget the task; its awaiter may be gone, so log a failure nobody expected."""
        self._background.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, ProtocolError | ToolFailed):
            log.error("background work failed", exc_info=exc)

    def stop_pod_soon(self, name: str) -> None:
        """Stop a pod after the current request's reply went out (the pod's own `stop`)."""
        self.in_background(self.stop_pod(name))

    async def start_pod(self, name: str) -> SpawnResult:
        self._refuse_when_closing()
        record = self._require_known(name)
        if name in self._stopping:
            raise ProtocolError(
                "shutting_down", f"pod {name} is stopping; start it once it has stopped"
            )
        if name not in self.pods:
            self._check_room()
        if name not in self.pods:
            await self._bring_up_record(record)
            self.registry.set_stopped(name, False)
            self._publish(
                PodSpawned(pod=name, socket=str(self._socket(name)), parent=record.parent)
            )
        return SpawnResult(name=name, socket=str(self._socket(name)))

    async def delete_pod(self, name: str) -> None:
        """Stop the pod and its descendants, then remove its state: its children become
        top-level pods and the reports still owed to it are dropped."""
        self._require_known(name)
        self._stopping.add(name)
        try:
            await self.stop_pod(name)
            self.registry.delete(name, str(self._socket(name)))
            shutil.rmtree(self._pod_state_dir(name) / "spill", ignore_errors=True)
            self._broken.pop(name, None)
        finally:
            self._stopping.discard(name)
        self._publish(PodDeleted(pod=name))

    def children_of(self, name: str) -> list[str]:
        running = self.pods.get(name)
        # A running pod's path is built already; `status` asks this on every call.
        socket = running.controller.socket_path if running else self._socket(name)
        return self.registry.children(str(socket))

    def descendants(self, name: str) -> list[tuple[PodRecord, int]]:
        """The pod's children, their children and so on, depth first, each with its depth."""
        found: list[tuple[PodRecord, int]] = []
        seen = {name}

        def walk(pod: str, depth: int) -> None:
            for child in self.children_of(pod):
                record = self.registry.get(child)
                if record is not None and child not in seen:
                    seen.add(child)
                    found.append((record, depth))
                    walk(child, depth + 1)

        walk(name, 1)
        return found

    def _depth(self, name: str) -> int:
        """How many local ancestors the pod has (0 for a top-level pod)."""
        depth, seen = 0, {name}
        record = self.registry.get(name)
        while record is not None and (parent := self.name_at(record.parent)) not in seen:
            if parent is None:
                break
            depth += 1
            seen.add(parent)
            record = self.registry.get(parent)
        return depth

    def list_pods(self) -> ListResult:
        entries = []
        for record in self.registry.all():
            running = self.pods.get(record.name)
            status = running.controller.status if running else "stopped"
            entries.append(
                PodListEntry(
                    name=record.name,
                    status=status,
                    parent=record.parent,
                    socket=str(self._socket(record.name)),
                    error=self._broken.get(record.name),
                )
            )
        return ListResult(pods=entries)

    def info(self) -> InfoResult:
        return InfoResult(
            version=VERSION,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            pods=len(self.pods),
            runtime_dir=str(self.config.runtime_dir),
            state_dir=str(self.config.state_dir),
        )

    async def _bring_up_record(self, record: PodRecord) -> _RunningPod:
        """Restore a stored pod. One that cannot be restored (its stored state does not
        parse, or its socket cannot be bound) stays down, marked in `list` with the reason,
        rather than keeping capd or the other pods from starting."""
        try:
            running = await self._bring_up(
                Manifest.model_validate_json(record.manifest), record.parent
            )
        except Exception as exc:
            reason = f"cannot be restored: {type(exc).__name__}: {_first_line(exc)}"
            log.error("pod %s %s", record.name, reason, exc_info=exc)
            self._broken[record.name] = reason
            raise ProtocolError("internal", f"pod {record.name} {reason}") from None
        self._broken.pop(record.name, None)
        return running

    async def _bring_up(self, manifest: Manifest, parent: str | None) -> _RunningPod:
        name = manifest.name
        controller = PodController(
            manifest,
            parent=parent,
            socket_path=self._socket(name),
            store=self.store,
            outbox=self.outbox,
            on_status=self._pod_status_changed,
        )
        controller.toolbox.context = replace(
            controller.toolbox.context,
            pods=ChildPods(self, controller),
            spill_dir=self._pod_state_dir(name) / "spill",
        )
        controller.restore(self._stored_events(name))
        endpoint = PodEndpoint(controller, self, self.config)
        await endpoint.listen()
        self.outbox.retry_now(str(endpoint.path))
        actor = asyncio.create_task(controller.run(), name=f"pod {name}")
        running = _RunningPod(controller, endpoint, actor)
        self.pods[name] = running
        return running

    async def _take_down(self, name: str, mode: StopMode) -> None:
        running = self.pods.pop(name, None)
        if running is None:
            return
        await running.endpoint.close_listener()
        try:
            async with asyncio.timeout(POD_STOP_TIMEOUT_S):
                await running.controller.stop(mode)
                await running.actor
        except TimeoutError:
            log.error("pod %s did not stop within %.0f s; cancelled", name, POD_STOP_TIMEOUT_S)
            running.actor.cancel()
            await asyncio.wait([running.actor], timeout=ABANDON_TIMEOUT_S)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(ABANDON_TIMEOUT_S):
                    await running.controller.abandon()
        await running.endpoint.close()

    def _stored_events(self, name: str) -> Iterator[bytes]:
        after = 0
        while rows := self.store.events_after(name, after, REPLAY_BATCH):
            for _, data in rows:
                yield data
            after = rows[-1][0]

    def _require_known(self, name: str) -> PodRecord:
        record = self.registry.get(name)
        if record is not None:
            return record
        raise ProtocolError("not_found", f"no pod named {name}; `capctl ps` lists them")

    def _pod_state_dir(self, name: str) -> Path:
        return self.config.state_dir / "pods" / name

    def _make_pod_state_dir(self, name: str) -> Path:
        """The pod's state dir (its spilled tool output goes there), 0700 at each level."""
        path = self._pod_state_dir(name)
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        return path

    def _socket(self, name: str) -> Path:
        return pod_socket(self.config.runtime_dir, name)

    def name_at(self, socket: str | None) -> str | None:
        """The name of this daemon's pod (running or stopped) whose socket is `socket`."""
        name = self._pods_dir_name(socket)
        return name if name is not None and self.registry.get(name) is not None else None

    def _pods_dir_name(self, socket: str | None) -> str | None:
        """The pod name a socket path in this daemon's pods directory stands for, however
        it is spelled (`..`, a symlink to the runtime dir or to the socket); None for a
        path elsewhere. Whether such a pod exists is the caller's question."""
        if socket is None:
            return None
        path = Path(socket)
        if path != self._socket(path.stem):
            path = Path(os.path.realpath(path))
            pods_dir = Path(os.path.realpath(self.config.runtime_dir / "pods"))
            if path.parent != pods_dir or path.suffix != ".sock":
                return None
        return path.stem

    def _pod_at(self, socket: str | None) -> _RunningPod | None:
        name = self.name_at(socket)
        return self.pods.get(name) if name else None

    def _check_room(self) -> None:
        limit = self.config.max_pods
        if len(self.pods) >= limit:
            raise ProtocolError(
                "limit_reached",
                f"capd has {len(self.pods)} pods up, the most --max-pods={limit} allows; "
                "stop or delete one first",
            )

    def _refuse_when_closing(self) -> None:
        if self._closing:
            raise ProtocolError("shutting_down", "capd is shutting down; try again once it is back")

    def _resolve_cwd(self, manifest: Manifest, must_exist: bool) -> Path:
        if manifest.cwd is None:
            cwd = self._make_pod_state_dir(manifest.name) / "work"
            cwd.mkdir(mode=0o700, exist_ok=True)
            return cwd
        cwd = Path(manifest.cwd)
        if not cwd.is_absolute():
            raise ProtocolError("invalid_request", f"cwd {cwd} must be an absolute path")
        if must_exist and not cwd.is_dir():
            raise ProtocolError(
                "invalid_request", f"cwd {cwd} is not a directory; create it before spawning"
            )
        return cwd.resolve()

    def _pod_status_changed(self, name: str, status: PodStatusName) -> None:
        self._publish(PodStatusEvent(pod=name, status=status))
        if self._notifier.enabled and not self._closing:
            self._notifier.status(self._summary())

    def _summary(self) -> str:
        """The one-line STATUS= systemd shows for capd."""
        running = sum(1 for pod in self.pods.values() if pod.controller.status == "running")
        return f"{len(self.pods)} pods up, {running} running"

    def _publish(self, event: PodEventBase) -> None:
        if self.hub.subscriptions:
            self.hub.publish(encode(event))


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0]


def _check_api_key(manifest: Manifest) -> None:
    env = manifest.model.api_key_env if manifest.model else None
    if env and not os.environ.get(env):
        raise ProtocolError(
            "invalid_request",
            f"model.api_key_env names {env}, which is not set in capd's environment",
        )


def _make_private_dir(path: Path, group: int | None) -> None:
    """Mode 0700, or 0710 owned by `group`, whose members may then reach the sockets."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, 0o700 if group is None else 0o710)


def _lock(path: Path) -> IO[str]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # one an older capd made 0644
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise DaemonLocked(
            f"{path.parent} is in use by capd (pid {owner}); stop it first "
            "or give this one other --runtime-dir/--state-dir"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _raise_fd_limit() -> None:
    """Every pod listens on a socket: allow as many descriptors as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> None:
    config = Config.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s capd[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _install_loop()
    try:
        asyncio.run(Daemon(config).serve())
    except DaemonLocked as exc:
        print(f"capd: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        print(f"capd: {exc}", file=sys.stderr)
        sys.exit(1)
