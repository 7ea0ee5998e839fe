"""Pods' lifecycle: spawn, start, stop and delete, bringing a pod up and taking it down,
and the checks a spawn passes.

A running pod is its controller (the actor), its endpoint (the pod socket) and the task
running the actor. The daemon makes one `Supervisor` at start-up, asks it to restore the
stored pods, and to take them all down at shutdown; the daemon socket's pod methods and
the pod tools (through `ChildPods`) call it in between.
"""

import asyncio
import contextlib
import contextvars
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from capd import metrics
from capd.activity import ActivityFeed, Built, running_activity, stopped_activity
from capd.budgets import Ledger
from capd.checkpoints import CheckpointStore, require_git
from capd.children import ChildPods, Parent, check_child, check_within
from capd.config import Config
from capd.controller import PodController, StopMode
from capd.engines import check_engine, make_engine, model_label
from capd.engines.claude_code import state_paths as claude_code_state
from capd.engines.slots import EngineSlots
from capd.fanout import Hub
from capd.outbox import Outbox
from capd.pod_worktrees import PodWorktrees
from capd.proc.limits import Limiter, PodLimits
from capd.proc.sandbox import (
    Backend,
    Confinement,
    SandboxRefused,
    confinement,
    containing,
    fixed_real_path,
    resolve_paths,
)
from capd.providers import missing_key
from capd.reconfigure import Parts, changed_fields
from capd.registry import PodRegistry
from capd.server import PodEndpoint, TeamMethods
from capd.store import PodRecord, Store
from capd.store.batch import after_writes
from capd.tools import CHANGE_FILES
from capd.tools.base import ToolContext, ToolFailed
from capd.tools.mcp.server import pod_servers
from capd.tools.toolbox import Toolbox
from protocol.errors import ErrorCode, ProtocolError, first_line
from protocol.events import (
    PodDeleted,
    PodEventBase,
    PodSpawned,
    PodStatusEvent,
    PodStatusName,
    PodStopped,
    Spent,
)
from protocol.framing import encode
from protocol.manifest import ClaudeCodeEngine, Manifest
from protocol.results import DiffResult, FleetNode, ListResult, PodListEntry, SpawnResult

log = logging.getLogger("capd")

T = TypeVar("T")

REPLAY_BATCH = 1000
BREATHE_S = 0.05
ADOPT_CHUNK = 50
"""How long a run of restores keeps the event loop before it lets it turn: an idle pod's
restore never waits, and thousands of them in a row (a start-up, an adoption) must not
starve the fleet lease's heartbeat and the commits (the node would stop itself)."""
SHUTDOWN_GRACE_S = 10.0
"""How long shutdown waits for spawns and stops under way."""
POD_STOP_TIMEOUT_S = 8.0
"""A pod's actor has this long to stop (its turn paused or cancelled, its engine closed;
each of those is bounded well within it); then it is cancelled, so a stop never hangs."""
ABANDON_TIMEOUT_S = 3.0
"""How long a cancelled actor, then its engine's closing, may take. With the endpoints'
close and SHUTDOWN_GRACE_S, shutdown stays inside the unit's TimeoutStopSec=30."""


class TeamHooks(TeamMethods, Protocol):
    """The teams' part in pods coming up and changing status (capd.teams.Teams)."""

    def attach(self, pod: PodController) -> None: ...

    def status_changed(self, name: str, status: PodStatusName) -> None: ...


class CannotRestore(Exception):
    """A stored pod could not be brought up; it stays down, its reason in `list`. `code`
    is the error a `start` of it gives."""

    def __init__(self, message: str, code: ErrorCode = "internal") -> None:
        super().__init__(message)
        self.code: ErrorCode = code


@dataclass(eq=False)
class _RunningPod:
    controller: PodController
    endpoint: PodEndpoint
    actor: "asyncio.Task[None]"
    limits: PodLimits


class Supervisor:
    def __init__(
        self,
        config: Config,
        store: Store,
        outbox: Outbox,
        registry: PodRegistry,
        on_status: Callable[[], None],
        sandbox: Backend,
        teams: "Callable[[Supervisor], TeamHooks]",
    ) -> None:
        """`on_status` is called when a pod's status changes, unless capd is closing;
        `sandbox` is the bwrap that confines pods' processes (or why none can); `teams`
        makes the daemon's `apply` and `down` (capd.teams.Teams) on this supervisor."""
        self.config = config
        self.node = config.node
        """This node's name (`capd --node`): `status`, `list` and `info` name it."""
        self.sandbox = sandbox
        self.store = store
        self.outbox = outbox
        self.registry = registry
        self.ledger = Ledger(registry, store)
        """What every pod (stopped ones too) spent and may spend."""
        self.pods: dict[str, _RunningPod] = {}
        self.hub = Hub("", lambda: 0)
        """The daemon socket's subscribers: pods spawned, stopped, deleted, their status."""
        self.activity = ActivityFeed(self._activity_of)
        """The daemon subscribers that asked for activity too."""
        self._stop_watchers: list[Callable[[str], None]] = []
        self._stopped_usage: dict[str, dict[str, Any]] = {}
        self._on_status = on_status
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping: set[str] = set()
        self._broken: dict[str, str] = {}
        """Pods that failed to come back up, and why."""
        self._closing = False
        self._breathed = time.monotonic()
        self._restoring: set[str] = set()
        """Pods a restore is bringing up (a `start` meanwhile would bring them up twice)."""
        self._own_dirs = (config.state_dir, config.runtime_dir)
        self._pods_dir = config.state_dir / "pods"
        self._real_pods_dir = fixed_real_path(config.state_dir) / "pods"
        """The pods' state dirs, resolved (capd makes them, and what lies in them)."""
        self._git_found = False
        """Whether `require_git` passed once: capd's PATH does not change."""
        self.limiter = Limiter.detect(config.state_dir, config.limits)
        """How pods' limits.memory_mb and limits.pids are enforced (detected once)."""
        self.worktrees = PodWorktrees(
            registry,
            config.state_dir,
            self._own_dirs,
            self.in_background,
            fleet=config.store is not None,
        )
        """The pods' `workspace.git` work trees (none in a fleet: they cannot move)."""
        self.teams = teams(self)
        """The daemon's `apply` and `down`."""
        self.engine_slots = EngineSlots(
            config.max_engine_processes, self._reap_engine, self._engine_exited
        )
        """The external engines' processes, bounded by --max-engine-processes."""

    # -- start-up and shutdown ----------------------------------------------------------

    def to_restore(self) -> list[PodRecord]:
        """The stored pods that were not stopped."""
        return [record for record in self.registry.all() if not record.stopped]

    async def restore(self, record: PodRecord) -> None:
        """Bring a stored pod back up; one that cannot be is marked broken and left down."""
        self._restoring.add(record.name)
        try:
            with contextlib.suppress(CannotRestore):
                await self._bring_up_record(record)
        finally:
            self._restoring.discard(record.name)
        await self._breathe()

    async def _breathe(self) -> None:
        """Let the event loop turn if a run of restores has held it for BREATHE_S."""
        if time.monotonic() - self._breathed >= BREATHE_S:
            await asyncio.sleep(0)
            self._breathed = time.monotonic()

    async def adopt(self, records: list[PodRecord]) -> None:
        """Pods another fleet node held until this one adopted them (parents first):
        known from now on, and brought up as a restart would (a turn that was running
        comes back paused); stopped ones stay stopped, here. A retry after a failed scan
        brings up those of them not up yet, learned by the failed attempt or not; one
        that cannot be brought up is marked, like a restore's, and the others still come
        up."""
        for record in records:
            if self.registry.get(record.name) is None:
                self.registry.learn(record)
        records = [record for record in records if record.name not in self.pods]
        pending = {record.name for record in records if not record.stopped}
        self._restoring |= pending  # known from now on, up only once its turn comes
        try:
            for first in range(0, len(records), ADOPT_CHUNK):  # two reads a pod: let it turn
                self.ledger.adopting(records[first : first + ADOPT_CHUNK], self.store)
                await self._breathe()
            self.ledger.adopted(records, self.store)
            for record in records:
                # A client may have stopped or deleted it while the ones before came up.
                now = self.registry.get(record.name)
                if now is None or now.stopped or self._closing:
                    continue
                if record.name in self.pods or record.name in self._broken:
                    continue
                await self.restore(now)
        finally:
            self._restoring -= pending

    def refuse_new_work(self) -> None:
        self._closing = True

    async def take_down_all(self) -> None:
        """Let spawns and stops under way finish, then pause every pod's turn and stop it."""
        if self._background:
            await asyncio.wait(self._background, timeout=SHUTDOWN_GRACE_S)
        await asyncio.gather(*(self._take_down(name, "pause") for name in list(self.pods)))
        self.limiter.close()

    def summary(self) -> str:
        """The one-line STATUS= systemd shows for capd."""
        running = sum(1 for pod in self.pods.values() if pod.controller.status == "running")
        return f"{len(self.pods)} pods up, {running} running"

    # -- pods ---------------------------------------------------------------------------

    async def spawn(
        self,
        manifest: Manifest,
        parent: str | None,
        *,
        turn_id: str | None = None,
        make_cwd: bool = False,
        team: str | None = None,
    ) -> SpawnResult:
        """Create and start a pod. With a local `parent` the child rules apply (see
        children.py) and the parent records `child_spawned` with `turn_id`, the turn whose
        spawn_pod call made it. `make_cwd` creates a missing cwd once all checks pass.
        `team`: the team `apply` makes it for (it never changes)."""
        self._refuse_when_closing()
        self._check_room()
        name = manifest.name
        if name in self.pods or self.registry.get(name) is not None:
            raise ProtocolError("already_exists", f"a pod named {name} already exists")
        if parent is not None and (not Path(parent).is_absolute() or "\0" in parent):
            raise ProtocolError(
                "invalid_request", f"parent {parent!r} must be an absolute socket path"
            )
        fresh = not self._pod_state_dir(name).exists()
        cwd = self.worktrees.cwd(manifest) or self._resolve_cwd(manifest, not make_cwd)
        sandbox = resolve_paths(manifest.sandbox)
        manifest = manifest.model_copy(update={"cwd": str(cwd), "sandbox": sandbox})
        parent_name = self.registry.pods_dir_name(parent)
        rules = None
        if parent_name is not None:
            rules = self._parent(parent_name)
            parent = str(self.registry.socket(parent_name))  # the spelling children_of looks up
        unshared = self.check_spawn(manifest, rules)
        if make_cwd:
            try:
                cwd.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ProtocolError(
                    "invalid_request", f"cannot create cwd {cwd}: {exc.strerror or exc}"
                ) from None
        tree = await self.worktrees.make(manifest)  # the record is added before any await
        worktree = tree.to_json() if tree else None
        try:  # from here a failure undoes the work tree too
            stored = manifest.model_dump_json()
            self.registry.add(name, stored, parent, team=team, worktree=worktree)
            self.ledger.added(name, manifest.budget)
            sandbox = self._with_worktree(name, unshared)  # its record exists now
            # A new pod has no events: a name is free only once delete_pod removed them.
            running = await self._bring_up(manifest, parent, sandbox, stored=())
        except BaseException as exc:
            self._forget_unborn(name, fresh)
            await self.worktrees.undo(tree)
            if isinstance(exc, ProtocolError) or not isinstance(exc, Exception):
                raise
            log.error("pod %s could not start", name, exc_info=exc)
            raise ProtocolError(
                "internal",
                f"pod {name} could not start, so it was not kept: {type(exc).__name__}: "
                f"{first_line(exc)}",
            ) from None
        socket = str(running.endpoint.path)
        if (local_parent := self._pod_at(parent)) is not None:
            # A parent stopping meanwhile refuses; its stop cascade takes the child down.
            with contextlib.suppress(ProtocolError):
                await local_parent.controller.adopt(name, socket, turn_id)
        self._publish(PodSpawned(pod=name, socket=socket, parent=parent))
        return SpawnResult(name=name, socket=socket, cwd=manifest.cwd)

    def _forget_unborn(self, name: str, fresh: bool) -> None:
        """Undo a spawn that failed once its checks passed: no record, no ledger entry
        (none yet when its state dir or record could not be made), and no state dir when
        this spawn made it (`fresh`), so the name is free again."""
        if self.registry.get(name) is not None:
            self.registry.delete(name)
            self.ledger.deleted(name, None)
        if fresh:
            shutil.rmtree(self._pod_state_dir(name), ignore_errors=True)

    def _parent(self, parent: str) -> Parent:
        """A spawn's local parent, as the child rules see it."""
        if parent in self._stopping:
            raise ProtocolError("shutting_down", f"parent pod {parent} is stopping")
        record = self.registry.get(parent)
        if record is None:
            raise ProtocolError(
                "not_found",
                f"parent {self.registry.socket(parent)} is in capd's pods directory but no "
                f"pod named {parent} exists; spawn the parent first",
            )
        return Parent(
            parent,
            Manifest.model_validate_json(record.manifest),
            [child for child in self.registry.children_of(parent) if child in self.pods],
            self.registry.depth(parent) + 1,
        )

    # -- what a spawn and a reconfigure refuse (`apply` plans with the same) ------------

    def check_spawn(self, manifest: Manifest, parent: Parent | None) -> Confinement | None:
        """Refuse what a spawn refuses of `manifest` (cwd and sandbox resolved, as stored)
        besides its name and capd's room: the child rules against `parent` (None: a
        top-level pod, or a parent of another daemon), a repository it could write, its
        engine and sandbox, its model's key, git for its checkpoints, and a dollar budget
        it would break. Its work tree's own refusals are `worktrees.make`'s (also
        `worktrees.check`, which makes nothing). Returns its confinement but for what work
        trees add (`_with_worktree`), so a spawn computes it once."""
        self.worktrees.check_writer(manifest)
        if parent is not None:
            check_child(parent, manifest)
        unshared = self._unshared_confinement(manifest)
        check_engine(manifest, self._with_worktree(manifest.name, unshared))
        _check_api_key(manifest)
        if _checkpointed(manifest) and not self._git_found:
            require_git()
            self._git_found = True
        self.ledger.check_spawn(manifest, parent.name if parent is not None else None)
        return unshared

    def check_change(self, old: Manifest, manifest: Manifest) -> Confinement | None:
        """Refuse what a reconfigure from `old` refuses of the pod's new `manifest` itself
        (resolved: `resolved`); against its parent and children, see `check_children`.
        Returns the pod's new confinement."""
        _check_api_key(manifest)
        self.worktrees.check_writer(manifest)
        sandbox = self._confinement(manifest)
        check_engine(manifest, sandbox)
        if _checkpointed(manifest) and not _checkpointed(old):
            require_git()
        self.ledger.check_reconfigure(manifest, self.registry.parent_of(manifest.name))
        return sandbox

    def check_children(self, manifest: Manifest, skip: Collection[str] = ()) -> None:
        """Refuse (forbidden) a pod's new manifest that is narrower than one of its
        children but those in `skip` (see `narrower_children`)."""
        name = manifest.name
        for child, exc in self.narrower_children(manifest):
            if child not in skip:
                raise ProtocolError(
                    "forbidden",
                    f"pod {name} would be narrower than its child pod {child}: "
                    f"{exc.message}; narrow pod {child} first (`capctl update {child}`, "
                    f"started if it is stopped), delete it, or keep what it uses",
                )

    def narrower_children(self, manifest: Manifest) -> list[tuple[str, ProtocolError]]:
        """The pod's children that its new manifest is narrower than, each with why:
        every child, stopped, broken or still being spawned too (its stored manifest), as
        `start` checks it again."""
        name, found = manifest.name, []
        for child in self.registry.children_of(name):
            theirs = self.manifest_of(child)
            if theirs is None:
                continue
            try:
                check_within(name, manifest, theirs)
            except ProtocolError as exc:
                found.append((child, exc))
        return found

    def spawn_cwd(self, manifest: Manifest) -> Path:
        """The cwd a spawn of `manifest` stores, resolved: its work tree, its cwd (which
        must be a directory; when it is another pod's own work dir, that is made, as its
        owner's first turn would), or its own work directory."""
        return self.worktrees.cwd(manifest) or self._resolve_cwd(manifest, True)

    async def stop_pod(self, name: str, keep_turn: bool = False) -> list[str]:
        """Stop the pod, then its descendants; returns the names of those that were running.
        Descendants are listed once the pod is down, so a child it was spawning is among them.
        A pod that could not be restored is marked stopped, so restarts stop retrying it.
        With `keep_turn` their turns are paused, not cancelled, as capd's shutdown does."""
        self._require_known(name)
        if self._broken.pop(name, None) is not None:
            self.registry.set_stopped(name, True)
            self._publish(PodStopped(pod=name))
        mode: StopMode = "pause" if keep_turn else "cancel"
        stopped = [name] if await self._stop_one(name, mode) else []
        for record, _ in self.registry.descendants(name):
            if await self._stop_one(record.name, mode):
                stopped.append(record.name)
        return stopped

    async def _stop_one(self, name: str, mode: StopMode = "cancel") -> bool:
        running = self.pods.get(name)
        if running is None:
            return False
        self._stopping.add(name)
        try:
            await self._take_down(name, mode)
            report = running.controller.journal.shut_down_report()
            metrics.pod_stopped(name, running.controller.journal.usage)
            self.registry.set_stopped(name, True, report)
            if report is not None:
                self.outbox.poke(report.target)
        finally:
            self._stopping.discard(name)
        self._publish(PodStopped(pod=name))
        return True

    def in_background(self, work: Awaitable[T]) -> "asyncio.Task[T]":
        """Run `work` as a task the supervisor owns: shutdown waits for it, and whoever
        awaits it can be cancelled (by `asyncio.shield`) without cutting it short. It runs
        in a fresh context: a child a tool call spawns is not part of that call's span."""

        async def run() -> T:
            return await work

        task = asyncio.create_task(run(), context=contextvars.Context())
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
        socket = str(self.registry.socket(name))
        if name in self._stopping:
            raise ProtocolError(
                "shutting_down", f"pod {name} is stopping; start it once it has stopped"
            )
        if name in self._restoring:
            raise ProtocolError("not_running", f"pod {name} is being restored; try again")
        if name not in self.pods:
            self._check_room()
        if name not in self.pods:
            with contextlib.suppress(ValueError):  # one that does not parse says so below
                self._confinement(Manifest.model_validate_json(record.manifest))
            try:
                await self._bring_up_record(record)
            except CannotRestore as exc:
                raise ProtocolError(exc.code, str(exc)) from None
            self.registry.set_stopped(name, False)
            self._publish(PodSpawned(pod=name, socket=socket, parent=record.parent))
        return SpawnResult(name=name, socket=socket, cwd=self.pods[name].controller.manifest.cwd)

    async def restart_pod(self, name: str) -> SpawnResult:
        """Stop the pod and its descendants, then start it and, parents first, each
        descendant that was up. A descendant that cannot start is named in the error; the
        others are started still. When the pod cannot start, none is, and the error names
        them."""
        self._refuse_when_closing()
        self._require_known(name)
        was_up = await self.stop_pod(name)
        try:
            result = await self.start_pod(name)
        except ProtocolError as exc:
            if down := [child for child in was_up if child != name]:
                raise ProtocolError(
                    exc.code,
                    f"{exc.message}; so its descendants {', '.join(down)} stay stopped "
                    f"(`capctl start` each once pod {name} is up)",
                ) from None
            raise
        failed: list[tuple[str, ProtocolError]] = []
        for child in was_up:
            if child == name:
                continue
            try:
                await self.start_pod(child)
            except ProtocolError as exc:
                failed.append((child, exc))
        if failed:
            child, exc = failed[0]
            others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise ProtocolError(
                exc.code,
                f"pod {name} restarted, but its descendant {child} did not start{others}: "
                f"{exc.message}; `capctl start {child}` once that is fixed",
            )
        return result

    async def delete_pod(self, name: str, delete_branch: bool = False) -> None:
        """Stop the pod and its descendants, then remove its state: its children become
        top-level pods and the reports still owed to it are dropped. Its work tree goes
        (its branch synced first, deleted with `delete_branch`)."""
        self._require_known(name)
        await self.worktrees.check_delete(name, delete_branch)
        tree = self.worktrees.of(name)
        self._stopping.add(name)
        try:
            await self.stop_pod(name)
            await self.worktrees.sync(name)
            carried = self.ledger.carried_past(name)
            self.registry.delete(name, carried)
            self.ledger.deleted(name, carried)
            shutil.rmtree(self._pod_state_dir(name) / "spill", ignore_errors=True)
            shutil.rmtree(self._checkpoints_dir(name), ignore_errors=True)
            self._broken.pop(name, None)
            metrics.pod_deleted(name, [record.manifest for record in self.registry.all()])
        finally:
            self._stopping.discard(name)
        self._publish(PodDeleted(pod=name))
        await self.worktrees.remove(tree, name, delete_branch)

    async def diff(self, name: str, stat: bool) -> DiffResult:
        return await self.worktrees.diff(name, stat)

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
                    socket=str(self.registry.socket(record.name)),
                    error=self._broken.get(record.name),
                    spent=Spent.model_validate(self.ledger.spent(record.name)),
                    team=record.team,
                    engine=running.controller.engine_status() if running else None,
                    node=self.node if running else None,
                )
            )
        return ListResult(pods=entries)

    def fleet(self) -> list[FleetNode]:
        """`info.fleet`: without a shared store, this node alone."""
        return [FleetNode(node=self.node, pods=len(self.pods), last_seen=time.time())]

    def endpoint(self, name: str) -> PodEndpoint:
        """The endpoint of pod `name`, which this node hosts: its methods on the daemon
        socket go there. Unknown → `not_found`; stopped (or not up yet) → `not_running`."""
        if (running := self.pods.get(name)) is not None:
            return running.endpoint
        self._require_known(name)
        if name in self._restoring:
            raise ProtocolError("not_running", f"pod {name} is being restored; try again")
        why = f" ({self._broken[name]})" if name in self._broken else ""
        raise ProtocolError(
            "not_running", f"pod {name} is stopped{why}; `capctl start {name}` brings it back"
        )

    def watch_stops(self, callback: Callable[[str], None]) -> None:
        """Call `callback(name)` once pod `name` is stopped, and that committed; the
        daemon socket ends the pod's subscriptions it holds then."""
        self._stop_watchers.append(callback)

    async def _reap_engine(self, name: str) -> bool:
        """Ask pod `name` to stop its idle engine for --max-engine-processes."""
        running = self.pods.get(name)
        return running is not None and await running.controller.reap_engine("limit")

    def _engine_exited(self, name: str) -> None:
        """Pod `name`'s engine process died while nothing of capd's stopped it."""
        if (running := self.pods.get(name)) is not None:
            running.controller.activity.on_change(name)

    def children_of(self, name: str) -> list[str]:
        return self.registry.children_of(name)

    def running(self, name: str) -> PodController | None:
        """The actor of a running pod; None when the pod is stopped or unknown."""
        pod = self.pods.get(name)
        return pod.controller if pod else None

    def is_broken(self, name: str) -> bool:
        """Whether the pod could not be brought back up (`list` says why)."""
        return name in self._broken

    # -- bring-up and take-down ---------------------------------------------------------

    async def _bring_up_record(self, record: PodRecord) -> _RunningPod:
        """Restore a stored pod. One that cannot be restored (its stored state does not
        parse, it is wider than its parent now, or its socket cannot be bound) stays down,
        marked in `list` with the reason, rather than keeping capd or the other pods from
        starting."""
        try:
            manifest = Manifest.model_validate_json(record.manifest)
        except ValueError as exc:
            raise self._cannot_restore(record.name, exc) from None
        try:
            self._check_within_parent(manifest)
        except ProtocolError as exc:
            parent = self.registry.parent_of(record.name)
            reason = (
                f"cannot start, as it is wider than its parent pod {parent} now: "
                f"{exc.message}; `capctl update {parent}` to give it back what pod "
                f"{record.name} uses, or delete pod {record.name}"
            )
            log.error("pod %s %s", record.name, reason)
            self._broken[record.name] = reason
            raise CannotRestore(f"pod {record.name} {reason}", exc.code) from None
        try:
            running = await self._bring_up(manifest, record.parent, self._confinement(manifest))
        except Exception as exc:
            raise self._cannot_restore(record.name, exc) from None
        self._broken.pop(record.name, None)
        return running

    def _cannot_restore(self, name: str, exc: Exception) -> CannotRestore:
        reason = f"cannot be restored: {type(exc).__name__}: {first_line(exc)}"
        log.error("pod %s %s", name, reason, exc_info=exc)
        self._broken[name] = reason
        return CannotRestore(f"pod {name} {reason}")

    async def _bring_up(
        self,
        manifest: Manifest,
        parent: str | None,
        sandbox: Confinement | None,
        stored: Iterable[bytes] | None = None,
    ) -> _RunningPod:
        """Start the pod, restored from `stored` (its events in the store when None)."""
        limits = self.limiter.pod(manifest.name, manifest.limits.memory_mb, manifest.limits.pids)
        try:
            return await self._start_pod(manifest, parent, sandbox, limits, stored)
        except BaseException:
            await limits.close()
            raise

    async def _start_pod(
        self,
        manifest: Manifest,
        parent: str | None,
        sandbox: Confinement | None,
        limits: PodLimits,
        stored: Iterable[bytes] | None,
    ) -> _RunningPod:
        name = manifest.name
        socket_path = self.registry.socket(name)
        assert manifest.cwd is not None
        toolbox = self._toolbox(manifest, sandbox, limits)
        record = self.registry.get(name)
        tree = record is not None and record.worktree is not None
        controller = PodController(
            manifest,
            engine=make_engine(manifest, sandbox, limits, self.engine_slots.slot(name)),
            toolbox=toolbox,
            parent=parent,
            socket_path=socket_path,
            store=self.store,
            outbox=self.outbox,
            ledger=self.ledger,
            on_status=self._pod_status_changed,
            checkpoints=self._checkpoint_store(name, _cwd_of(manifest, sandbox), manifest),
            running_in_tree=lambda: self._running_in_tree(name),
            reconfigure=self.reconfigure,
            make_dirs=self.make_pod_dirs,
            # A work tree is made at spawn, or never: a pod without one asks nothing.
            workspace=(lambda: self.worktrees.status(name)) if tree else _no_workspace,
            team=record.team if record else None,
        )
        self.teams.attach(controller)
        controller.restore(self._stored_events(name) if stored is None else stored)
        self.activity.track(controller.activity)
        self._stopped_usage.pop(name, None)
        endpoint = PodEndpoint(controller, self, self.config)
        await endpoint.listen()
        self.outbox.retry_now(str(endpoint.path))
        actor = asyncio.create_task(
            controller.run(), name=f"pod {name}", context=contextvars.Context()
        )
        running = _RunningPod(controller, endpoint, actor, limits)
        self.pods[name] = running
        self._start_servers(toolbox)  # not awaited: the pod is up even if one cannot start
        return running

    def _toolbox(
        self,
        manifest: Manifest,
        sandbox: Confinement | None,
        limits: PodLimits,
        servers: bool = True,
    ) -> Toolbox:
        """The pod's tools, with its MCP servers (not started yet) unless not `servers`."""
        name = manifest.name
        cwd, state = _cwd_of(manifest, sandbox), self._pod_state_dir(name)
        tool_context = ToolContext(
            cwd=cwd,
            pod=name,
            pods=ChildPods(self, self.registry, self.store, manifest, self.registry.socket(name)),
            spill_dir=state / "spill",
            sandbox=sandbox,
            limits=limits,
        )
        toolbox = Toolbox.builtin(manifest.tools, tool_context)
        if (
            servers and manifest.engine.kind == "builtin"
        ):  # external engines run their servers themselves
            toolbox.add_mcp_servers(
                pod_servers(
                    manifest.mcp_servers,
                    pod=name,
                    cwd=cwd,
                    state_dir=state,
                    limits=manifest.limits,
                    sandbox=sandbox,
                    pod_limits=limits,
                )
            )
        return toolbox

    # -- reconfigure (§14) --------------------------------------------------------------

    async def reconfigure(self, pod: PodController, requested: Manifest) -> list[str]:
        """Give the pod (idle or paused: its actor calls this) a new manifest, checked as
        a spawn's; returns the fields that changed. Its engine, toolbox and checkpoint
        store are built anew, its MCP servers kept when nothing they depend on changed;
        the pod commits the manifest with `reconfigured` and swaps them in, then the old
        ones close (an external engine's process stops: its next turn resumes the
        session)."""
        self._refuse_when_closing()
        running = self.pods.get(pod.name)
        if running is None or running.controller is not pod:
            raise ProtocolError("shutting_down", f"pod {pod.name} is stopping")
        old = pod.manifest
        manifest = self.resolved(old, requested)
        changed = changed_fields(old, manifest)
        if not changed:
            return []
        self._check_family(manifest)
        sandbox = self.check_change(old, manifest)
        await pod.engine.settle()  # what a paused prompt still reports is the old engine's
        renew = _resource_limits(manifest) != _resource_limits(old)
        if renew:
            await self._renew_limits(running, manifest)
        keep_servers = not {"mcp_servers", "sandbox", "limits"} & set(changed)
        parts: Parts | None = None
        try:
            parts = self._parts(manifest, sandbox, running.limits, new_servers=not keep_servers)
            self._check_family(manifest)  # again: a child may have been spawned meanwhile
            pod.commit_manifest(manifest, changed)
        except BaseException:
            if parts is not None:
                await _close(parts)
            if renew:  # the old parts are closed already: the old limits, and parts anew
                await running.limits.close()
                self._rebuild_as(running, old)
            raise
        let_go = pod.use_parts(manifest, parts)
        pod.engine.take_over(let_go.engine)
        if keep_servers:
            pod.toolbox.take_mcp_servers(let_go.toolbox)
        self.registry.manifest_committed(pod.name, manifest.model_dump_json())
        self.ledger.budget_changed(pod.name, manifest.budget)
        if not renew:  # else closed already
            await _close(let_go)
        self._start_servers(pod.toolbox)
        return changed

    async def _renew_limits(self, running: _RunningPod, manifest: Manifest) -> None:
        """New limits.memory_mb or limits.pids: the pod's processes (its engine's, its MCP
        servers') stop with the old limits' group, which goes, before the new one is made
        under the same name. When it cannot be made, the old one is made again and the
        pod's parts built anew: the pod goes on as it was (internal)."""
        pod, old = running.controller, running.controller.manifest
        await _close(Parts(pod.engine, pod.toolbox, None))
        await running.limits.close()
        try:
            running.limits = self.limiter.pod(pod.name, *_resource_limits(manifest))
        except OSError as exc:
            self._rebuild_as(running, old)
            raise ProtocolError(
                "internal",
                f"cannot reconfigure pod {pod.name}: its new limits could not be set up "
                f"({exc}); it keeps its manifest",
            ) from None

    def _rebuild_as(self, running: _RunningPod, manifest: Manifest) -> None:
        """A pod whose parts and limits group were closed goes on as `manifest` says, with
        them made anew."""
        running.limits = self.limiter.pod(manifest.name, *_resource_limits(manifest))
        pod = running.controller
        pod.use_parts(manifest, self._parts(manifest, self._confinement(manifest), running.limits))
        self._start_servers(pod.toolbox)

    def _parts(
        self,
        manifest: Manifest,
        sandbox: Confinement | None,
        limits: PodLimits,
        new_servers: bool = True,
    ) -> Parts:
        """A running pod's replaceable parts for `manifest`; without `new_servers` its
        toolbox has no MCP servers yet (it takes the old toolbox's)."""
        assert manifest.cwd is not None
        return Parts(
            make_engine(manifest, sandbox, limits, self.engine_slots.slot(manifest.name)),
            self._toolbox(manifest, sandbox, limits, new_servers),
            self._checkpoint_store(manifest.name, _cwd_of(manifest, sandbox), manifest),
        )

    def resolved(self, old: Manifest, requested: Manifest) -> Manifest:
        """`requested` with its paths resolved as a spawn stores them; no cwd, or no
        workspace, keeps the pod's (neither can change)."""
        cwd = old.cwd if requested.cwd is None else str(self._resolve_cwd(requested, False))
        sandbox = resolve_paths(requested.sandbox)
        workspace = requested.workspace
        if "workspace" not in requested.model_fields_set:
            workspace = old.workspace
        return requested.model_copy(update={"cwd": cwd, "sandbox": sandbox, "workspace": workspace})

    def _check_family(self, manifest: Manifest) -> None:
        """Refuse (forbidden) a pod's new manifest that is wider than its parent, or
        narrower than one of its children."""
        self._check_within_parent(manifest)
        self.check_children(manifest)

    def _check_within_parent(self, manifest: Manifest) -> None:
        """Refuse (forbidden) a pod wider than its local parent is now (a parent's
        `reconfigure` may have narrowed it while the pod was down)."""
        parent = self.registry.parent_of(manifest.name)
        if parent is None or (rules := self.manifest_of(parent)) is None:
            return
        check_within(parent, rules, manifest)

    def manifest_of(self, name: str) -> Manifest | None:
        """The pod's manifest: its running one, else its stored one (None: no pod, or a
        stored manifest that does not parse, which cannot start)."""
        if (up := self.pods.get(name)) is not None:
            return up.controller.manifest
        record = self.registry.get(name)
        if record is None:
            return None
        with contextlib.suppress(ValueError):
            return Manifest.model_validate_json(record.manifest)
        return None

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
        await running.limits.close()

    def _checkpoint_store(self, name: str, cwd: Path, manifest: Manifest) -> CheckpointStore | None:
        """The store of the cwd's checkpoints, which never records capd's own directories."""
        if not _checkpointed(manifest):
            return None
        exclude = self.worktrees.exclude(name)
        return CheckpointStore(
            self._checkpoints_dir(name), cwd, manifest.workspace, self._own_dirs, exclude
        )

    def _checkpoints_dir(self, name: str) -> Path:
        return self._pod_state_dir(name) / "checkpoints"

    def _running_in_tree(self, name: str) -> list[str]:
        """The other pods with a turn running whose cwd is the pod's, inside it or around
        it: a rewind of its files would change theirs under them."""
        running = self.pods.get(name)
        if running is None or running.controller.manifest.cwd is None:
            return []
        cwd = Path(running.controller.manifest.cwd)
        found = []
        for other, pod in self.pods.items():
            theirs = pod.controller.manifest.cwd
            if other == name or pod.controller.status != "running" or theirs is None:
                continue
            if Path(theirs).is_relative_to(cwd) or cwd.is_relative_to(theirs):
                found.append(other)
        return found

    def _stored_events(self, name: str) -> Iterator[bytes]:
        """The events a restore reads: from where the pod's latest compaction says a
        restart starts (the whole history if it never compacted), in pages."""
        after = self.store.restore_start(name) - 1
        while rows := self.store.events_after(name, after, REPLAY_BATCH):
            for _, data in rows:
                yield data
            after = rows[-1][0]

    # -- checks and paths ---------------------------------------------------------------

    def _require_known(self, name: str) -> PodRecord:
        record = self.registry.get(name)
        if record is not None:
            return record
        raise ProtocolError("not_found", f"no pod named {name}; `capctl ps` lists them")

    def _confinement(self, manifest: Manifest) -> Confinement | None:
        """How the pod's processes are confined (None: sandbox mode `off`); refused
        (invalid_request) when no bwrap works here, or when its cwd or a writable path
        contains capd's own directories, which every sandbox hides, or its paths do not fit
        together (`capd.proc.sandbox.SandboxRefused`). A claude-code pod may write its
        engine's own state too (`claude_code_state`)."""
        return self._with_worktree(manifest.name, self._unshared_confinement(manifest))

    def _with_worktree(self, name: str, confine: Confinement | None) -> Confinement | None:
        """`confine` with the pod's work tree, or the one its cwd lies in (which may come
        and go while a spawn awaits)."""
        if confine is None:
            return None
        try:
            return self.worktrees.confine(name, confine)
        except SandboxRefused as exc:
            raise ProtocolError("invalid_request", str(exc)) from None

    def _unshared_confinement(self, manifest: Manifest) -> Confinement | None:
        """`_confinement` but for what work trees add."""
        config = manifest.sandbox
        if config.mode == "off":
            return None
        if self.sandbox.path is None:
            raise ProtocolError("invalid_request", self.sandbox.refusal)
        assert manifest.cwd is not None
        cwd = Path(manifest.cwd)
        own = self._own_dirs
        if found := containing([cwd, *map(Path, config.writable)], own):
            outer, inner = found
            what = "cwd" if outer == cwd else "sandbox.writable path"
            raise ProtocolError(
                "invalid_request",
                f"sandbox: the {what} {outer} contains capd's own {inner}, which every "
                "sandbox hides; choose a path that does not, or set sandbox.mode: off",
            )
        spill = self._real_pods_dir / manifest.name / "spill"  # shown once it exists
        try:
            confine = confinement(
                config,
                bwrap=self.sandbox.path,
                cwd=cwd,
                capd_dirs=own,
                shown=[spill, *self.config.sandbox_show],  # resolved at start-up
            )
            if isinstance(manifest.engine, ClaudeCodeEngine):
                confine = confine.widened(claude_code_state(manifest.engine.env))
        except SandboxRefused as exc:
            raise ProtocolError("invalid_request", str(exc)) from None
        return confine

    def _pod_state_dir(self, name: str) -> Path:
        return self._pods_dir / name

    def make_pod_dirs(self, name: str, cwd: Path) -> None:
        """The pod's state dir and, when `cwd` is in a pod's own work dir (its own, or a
        team lead's its plain child works in), that one: made when first needed (each
        turn and each start of its MCP servers makes sure), not at spawn, where their two
        mkdirs cost as much as the rest of a spawn on a disk. Idle pods need neither, and
        a pod another fleet node adopted gets them on this one. `cwd` is resolved, as the
        pod's manifest stores it."""
        if self._make_owners_dirs(cwd) != name:
            self._make_pod_state_dir(name)

    def _make_owners_dirs(self, cwd: Path) -> str | None:
        """When `cwd` (resolved) is in a known pod's own work dir, that pod's state and work
        dirs; the pod's name, or None."""
        try:
            owner, below = cwd.relative_to(self._real_pods_dir).parts[:2]
        except ValueError:  # not in the pods dir, or the pods dir itself
            return None
        if below != "work" or self.registry.get(owner) is None:
            return None
        self._make_pod_state_dir(owner)
        (self._real_pods_dir / owner / "work").mkdir(mode=0o700, exist_ok=True)
        return owner

    def _start_servers(self, toolbox: Toolbox) -> None:
        """Start the pod's MCP servers (returns at once), its directories made first: they
        run in its cwd. When they cannot be made, the servers fail to start as they would
        in any cwd that is gone, and the pod goes on without their tools."""
        if toolbox.has_mcp_servers:
            context = toolbox.context
            try:
                self.make_pod_dirs(context.pod, context.cwd)
            except OSError as exc:
                log.error("pod %s: cannot make its directories: %s", context.pod, exc)
        toolbox.start_mcp_servers()

    def _make_pod_state_dir(self, name: str) -> None:
        """The pod's state dir (its spilled tool output goes there), 0700 at each level;
        one mkdir once the pods dir exists."""
        path = self._pod_state_dir(name)
        try:
            path.mkdir(mode=0o700, exist_ok=True)
        except FileNotFoundError:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.mkdir(mode=0o700, exist_ok=True)

    def _pod_at(self, socket: str | None) -> _RunningPod | None:
        name = self.registry.name_at(socket)
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
        """The manifest's cwd resolved; without one, the pod's own work directory (made
        when first needed: `make_pod_dirs`)."""
        # Stored resolved, as the file tools and the sandbox walk it. The pod's own work
        # directory is resolved by its capd-made pods dir's resolved path (a symlink put at
        # `work` is refused when a confined process is started there, as any path moved).
        if manifest.cwd is None:
            return self._real_pods_dir / manifest.name / "work"
        cwd = Path(manifest.cwd)
        if not cwd.is_absolute():
            raise ProtocolError("invalid_request", f"cwd {cwd} must be an absolute path")
        resolved = cwd.resolve()
        try:
            self._make_owners_dirs(resolved)  # another pod's own work dir, not made yet
        except OSError as exc:
            raise ProtocolError(
                "invalid_request", f"cannot make the work dir cwd {cwd} is in: {exc}"
            ) from None
        if must_exist and not resolved.is_dir():
            raise ProtocolError(
                "invalid_request", f"cwd {cwd} is not a directory; create it before spawning"
            )
        return resolved

    def _pod_status_changed(self, name: str, status: PodStatusName) -> None:
        self.teams.status_changed(name, status)
        self._publish(PodStatusEvent(pod=name, status=status))
        if status == "idle":  # a turn ended: its commits go to the repository's branch
            self.worktrees.sync_soon(name)
        if not self._closing:
            self._on_status()

    def _publish(self, event: PodEventBase) -> None:
        if self.hub.subscriptions:
            self.hub.publish(encode(event))
        self.activity.lifecycle(event)
        if isinstance(event, PodStopped):
            # Once the stop commits, as the hub's subscribers hear it: a crash before then
            # brings the pod back, and no client may have been told it stopped.
            after_writes(lambda: self._tell_stop_watchers(event.pod))

    def _tell_stop_watchers(self, name: str) -> None:
        for watcher in self._stop_watchers:
            watcher(name)

    # -- activity -----------------------------------------------------------------------

    def overview(self) -> dict[str, Any]:
        """The `overview` ack's result: every pod's pod_activity, in creation order."""
        return {"pods": [self._activity_of(record.name) for record in self.registry.all()]}

    def _activity_of(self, name: str) -> Built | None:
        running = self.pods.get(name)
        if running is not None:
            return running_activity(running.controller)
        record = self.registry.get(name)
        if record is None:
            return None
        if name not in self._stopped_usage:  # a stopped pod spends nothing more
            inp, out, usd = self.store.usage_totals(name)
            self._stopped_usage[name] = {
                "input_tokens": inp,
                "output_tokens": out,
                "cost_usd": usd,
            }
        try:
            model = model_label(Manifest.model_validate_json(record.manifest))
        except ValueError:
            model = ""  # it cannot be restored either; `error` says so
        return stopped_activity(
            name,
            socket=str(self.registry.socket(name)),
            parent=record.parent,
            model=model,
            since=self.activity.stopped_at.get(name, 0.0),
            usage=self._stopped_usage[name],
            spent=self.ledger.spent(name),
            queued=sum(row.kind == "run" for row in self.store.pending(name)),
            last_result=self.activity.last_result(name),
            error=self._broken.get(name),
        )


def _no_workspace() -> None:
    """`status.workspace` of a pod without a work tree."""
    return None


def _cwd_of(manifest: Manifest, sandbox: Confinement | None) -> Path:
    """The pod's cwd, the confinement's own Path when it has one: each pod's parts share
    it rather than each parse the string again."""
    if sandbox is not None:
        return sandbox.cwd
    assert manifest.cwd is not None
    return Path(manifest.cwd)


def _checkpointed(manifest: Manifest) -> bool:
    """Whether the pod's turns are checkpointed: checkpoints are on and a turn can change
    the cwd's files (an external engine, or a builtin pod with a tool that does)."""
    writes = manifest.engine.kind != "builtin" or not CHANGE_FILES.isdisjoint(manifest.tools)
    return manifest.workspace.checkpoints and writes


def _check_api_key(manifest: Manifest) -> None:
    """Refuse a model whose key is not in capd's environment (at spawn, never at restore:
    a stored pod comes back, and its calls fail until the key is there)."""
    if manifest.model is not None and (missing := missing_key(manifest.model)):
        raise ProtocolError("invalid_request", missing)


def _resource_limits(manifest: Manifest) -> tuple[int | None, int | None]:
    return manifest.limits.memory_mb, manifest.limits.pids


async def _close(parts: Parts) -> None:
    """Close the parts a reconfigured pod let go of (or never took); a failure is logged,
    as the pod has its new manifest by then."""
    for part in (parts.engine, parts.toolbox):
        try:
            await part.aclose()
        except Exception:
            log.exception(
                "pod %s: closing its old %s failed", parts.toolbox.context.pod, type(part).__name__
            )
