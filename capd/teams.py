"""Teams (§16): the daemon's `apply` and `down`, and the two things a team pod's actor
does for them: take the change `apply` deferred while a turn ran, and start no turn of
its own while `down` drains it.

`apply` checks every pod of the file against the daemon's state before it changes
anything, with the supervisor's own `check_spawn` / `check_change` (a child against the
file's parent, which may not exist yet), plans parents first with the supervisor's own
resolution and `changed_fields`, so a second apply of the same file plans only
`unchanged`, then runs the steps. One lock per team keeps two
applies, or an apply and a down, of one team from interleaving.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from capd.budgets import unpriced
from capd.children import Parent, check_within
from capd.controller import PodController
from capd.proc.sandbox import resolve_paths
from capd.reconfigure import changed_fields
from protocol.errors import ProtocolError
from protocol.events import PodStatusName
from protocol.manifest import Manifest
from protocol.methods import Apply, Pause
from protocol.results import ApplyResult, DownOutcome, DownResult, PlanStep
from protocol.team import PLAN_SYMBOLS, TeamPod, check_tree, in_tree_order

if TYPE_CHECKING:
    from capd.supervisor import Supervisor

log = logging.getLogger("capd")

Outcome = Literal["finished", "paused", "stopped"]


@dataclass
class _Planning:
    """What planning one file knows so far."""

    team: str
    listed: set[str]
    parents: dict[str, str | None]
    new: dict[str, Manifest]
    """Each pod planned so far as it will be: stored, or spawned, paths resolved."""
    deferred: set[str] = field(default_factory=set)
    """The pods whose change waits for their running turn."""
    branches: dict[tuple[Path, str], str] = field(default_factory=dict)
    """The work-tree branches the file's new pods take: (common git dir, branch) → pod."""


@dataclass
class _Step:
    plan: PlanStep
    manifest: Manifest | None = None
    """`spawn`: what is sent; `reconfigure`/`deferred`: the new manifest, resolved;
    `start`: that of the step after it, if any."""
    parent: str | None = None
    """`spawn`: the parent's name."""


class Teams:
    def __init__(self, supervisor: "Supervisor") -> None:
        self._sup = supervisor
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Callable[[str, PodStatusName], None]] = []

    # -- what a pod's actor gets --------------------------------------------------------

    def attach(self, pod: PodController) -> None:
        """A pod coming up: the change `apply` deferred (kept across restarts of capd),
        and the draining mark when its parent has it (a child spawned during `down`)."""
        registry = self._sup.registry
        record = registry.get(pod.name)
        if record is not None and record.pending_manifest is not None:
            try:
                pod.pending_manifest = Manifest.model_validate_json(record.pending_manifest)
            except ValueError as exc:
                why = " ".join(str(exc).split())
                log.error(
                    "pod %s: the change apply deferred cannot be read; dropped: %s", pod.name, why
                )
                registry.set_pending_manifest(pod.name, None)
        pod.take_pending = self._take_pending
        parent = self._sup.running(registry.parent_of(pod.name) or "")
        pod.draining = parent is not None and parent.draining
        if pod.draining and record is not None:  # stored stopped, as `down` stores its pods
            registry.set_stopped(pod.name, True)

    async def _take_pending(self, pod: PodController, manifest: Manifest) -> list[str]:
        """Reconfigure the pod, whose turn ended, with the manifest `apply` deferred; a
        change that no longer passes its checks is logged and dropped."""
        changed: list[str] = []
        try:
            changed = await self._sup.reconfigure(pod, manifest)
        except ProtocolError as exc:
            if exc.code == "shutting_down":
                return []  # kept: the pod takes it when it comes back
            log.error("pod %s: the change apply deferred is dropped: %s", pod.name, exc.message)
        except Exception:
            log.exception("pod %s: the change apply deferred failed; dropped", pod.name)
        else:
            log.info("pod %s took the change apply deferred: %s", pod.name, ", ".join(changed))
        self._drop_pending(pod.name)
        return changed

    def status_changed(self, name: str, status: PodStatusName) -> None:
        for listener in list(self._listeners):
            listener(name, status)

    # -- apply --------------------------------------------------------------------------

    async def apply(self, request: Apply) -> ApplyResult:
        """Run in the background: a client that goes away does not cut it short."""
        return await asyncio.shield(self._sup.in_background(self._apply(request)))

    async def _apply(self, request: Apply) -> ApplyResult:
        if request.dry_run:  # changes nothing: no need to wait for an apply or a down
            return ApplyResult(plan=[step.plan for step in await self._plan(request)], done=False)
        async with self._lock(request.team):
            steps = await self._plan(request)
            done: list[PlanStep] = []
            for step in steps:
                try:
                    done.append(await self._run(step, request.team))
                except ProtocolError as exc:
                    shown = ", ".join(f"{PLAN_SYMBOLS[s.action]} {s.action} {s.pod}" for s in done)
                    raise ProtocolError(
                        exc.code,
                        f"applied {len(done)} of {len(steps)} steps"
                        f"{f' ({shown})' if shown else ''}; pod {step.plan.pod}: {exc.message}",
                    ) from None
            return ApplyResult(plan=done, done=True)

    async def _plan(self, request: Apply) -> list[_Step]:
        """Check every pod and plan its steps, parents first, then the deletions."""
        try:
            check_tree(request.pods)
        except ValueError as exc:
            raise ProtocolError("invalid_request", str(exc)) from None
        listed = {pod.name for pod in request.pods}
        parents = {pod.name: pod.parent for pod in request.pods}
        ctx = _Planning(request.team, listed, parents, {})
        steps: list[_Step] = []
        for pod in in_tree_order(request.pods):
            try:
                steps += await self._plan_pod(ctx, pod)
            except ProtocolError as exc:
                raise ProtocolError(exc.code, f"pod {pod.name}: {exc.message}") from None
        await self._check_writers_after(ctx)
        steps = self._narrowing_last(ctx, steps)
        registry = self._sup.registry
        if request.prune:
            doomed = [r.name for r in registry.all() if r.team == request.team]
            doomed = [name for name in doomed if name not in listed]
            doomed.sort(key=registry.depth, reverse=True)
            steps += [_Step(PlanStep(pod=name, action="delete")) for name in doomed]
        coming = sum(step.plan.action in ("spawn", "start") for step in steps)
        limit = self._sup.config.max_pods
        if coming and len(self._sup.pods) + coming > limit:
            raise ProtocolError(
                "limit_reached",
                f"applying would bring {coming} pods up beside the {len(self._sup.pods)} up, "
                f"more than --max-pods={limit} allows; stop or delete some first",
            )
        return steps

    async def _plan_pod(self, ctx: _Planning, pod: TeamPod) -> list[_Step]:
        sup, name, team, new = self._sup, pod.name, ctx.team, ctx.new
        requested = pod.manifest()
        parent = new[pod.parent] if pod.parent is not None else None
        if pod.parent in ctx.deferred:  # this pod's steps run before the parent's change
            parent = sup.manifest_of(pod.parent)
        record = sup.registry.get(name)
        if record is None:
            send, manifest = self._as_spawned(requested, parent)
            await self._check_spawn(ctx, manifest, pod.parent, parent)
            new[name] = manifest
            return [_Step(PlanStep(pod=name, action="spawn"), send, pod.parent)]
        if record.team != team:
            theirs = f"team {record.team}" if record.team else "no team"
            raise ProtocolError(
                "already_exists",
                f"name: pod {name} exists and is not of team {team} (it has {theirs}); "
                f"rename the pod in the file, or delete pod {name}",
            )
        if (was := sup.registry.parent_of(name)) != pod.parent:
            raise ProtocolError(
                "invalid_request",
                f"parent: {pod.parent or 'null'} is not its parent {was or 'null'}; a pod "
                "keeps its parent (delete it, or apply --prune without it, to make it anew)",
            )
        old = sup.manifest_of(name)
        if old is None:
            raise ProtocolError(
                "internal", f"its stored manifest cannot be read; delete pod {name}"
            )
        manifest = sup.resolved(old, requested)
        changed = changed_fields(old, manifest)
        if changed:
            sup.check_change(old, manifest)
        if parent is not None and pod.parent is not None:  # as the file has it
            check_within(pod.parent, parent, manifest)
        sup.check_children(manifest, skip=ctx.listed)  # those listed: `_narrowing_last`
        new[name] = manifest
        up = sup.running(name)
        start = _Step(PlanStep(pod=name, action="start"), manifest if changed else None)
        steps = [] if up is not None else [start]
        if not changed:
            return steps or [_Step(PlanStep(pod=name, action="unchanged"))]
        if up is not None and up.status == "running":
            note = f"pod {name} is running; its change applies when its turn ends"
            step = PlanStep(pod=name, action="deferred", changed=changed, note=note)
            ctx.deferred.add(name)
        else:
            step = PlanStep(pod=name, action="reconfigure", changed=changed)
        return [*steps, _Step(step, manifest)]

    async def _check_writers_after(self, ctx: _Planning) -> None:
        """Each new work tree against what the file's pods planned after it can write
        (those before it were checked as it was planned; the spawns of the later ones
        would refuse it)."""
        for name in ctx.branches.values():
            manifest = ctx.new[name]
            others = [other for other in ctx.new.values() if other.name != name]
            try:
                await self._sup.worktrees.check(manifest, others)
            except ProtocolError as exc:
                raise ProtocolError(exc.code, f"pod {name}: {exc.message}") from None

    def _narrowing_last(self, ctx: _Planning, steps: list[_Step]) -> list[_Step]:
        """Move a pod's reconfigure after its descendants' steps when its new manifest is
        narrower than what a child of it uses now (that child narrows in its own step),
        as capd refuses a parent narrower than its child. A child whose change is
        deferred cannot narrow first: that is refused."""
        sup = self._sup
        for step in reversed(list(steps)):
            name = step.plan.pod
            if step.plan.action != "reconfigure":
                continue
            narrower = []
            for child, exc in sup.narrower_children(ctx.new[name]):
                if child not in ctx.listed:
                    continue  # refused while planning (`check_children`)
                if child in ctx.deferred:
                    raise ProtocolError(
                        "forbidden",
                        f"pod {name}: it would be narrower than its child pod {child}, "
                        f"whose change waits for its running turn: {exc.message}; "
                        f"apply again once pod {child}'s turn has ended",
                    )
                narrower.append(child)
            if narrower:
                below = {record.name for record, _ in sup.registry.descendants(name)}
                steps.remove(step)
                last = max(i for i, other in enumerate(steps) if other.plan.pod in below)
                steps.insert(last + 1, step)
        return steps

    def _as_spawned(
        self, requested: Manifest, parent: Manifest | None
    ) -> tuple[Manifest, Manifest]:
        """What `spawn` is sent (a child with neither a cwd nor `workspace.git` gets its
        parent's cwd) and the manifest as it will be stored: cwd and sandbox paths
        resolved. Nothing is created."""
        send = requested
        if requested.cwd is None and requested.workspace.git is None and parent is not None:
            send = requested.model_copy(update={"cwd": parent.cwd})
            cwd = Path(str(parent.cwd))  # resolved; the child's spawn makes it if need be
        else:
            cwd = self._sup.spawn_cwd(send)
        stored = send.model_copy(update={"cwd": str(cwd), "sandbox": resolve_paths(send.sandbox)})
        return send, stored

    async def _check_spawn(
        self, ctx: _Planning, manifest: Manifest, parent: str | None, rules: Manifest | None
    ) -> None:
        """What `spawn` checks, with the child rules against the parent's manifest `rules`
        (the file's, unless its change is deferred) and the file's tree, and its work
        tree's."""
        sup = self._sup
        family = None
        if parent is not None:
            assert rules is not None
            siblings = [name for name in ctx.new if ctx.parents.get(name) == parent]
            up = [child for child in sup.registry.children_of(parent) if child in sup.pods]
            depth, above = 1, ctx.parents[parent]
            while above is not None:
                depth, above = depth + 1, ctx.parents[above]
            family = Parent(parent, rules, list(dict.fromkeys([*up, *siblings])), depth)
        sup.check_spawn(manifest, family)
        self._check_budgets_above(ctx, manifest, parent)
        planned = [other for other in ctx.new.values() if other.name != manifest.name]
        if (taken := await sup.worktrees.check(manifest, planned)) is None:
            return
        if (other := ctx.branches.setdefault(taken, manifest.name)) != manifest.name:
            assert manifest.workspace.git is not None
            raise ProtocolError(
                "already_exists",
                f"workspace.git.branch {taken[1]} of {manifest.workspace.git.repo} is pod "
                f"{other}'s in the file too; name another branch for one of them",
            )

    def _check_budgets_above(self, ctx: _Planning, manifest: Manifest, parent: str | None) -> None:
        """`ledger.check_spawn` for ancestors that exist only in the file so far."""
        reason = unpriced(manifest)
        while reason is not None and parent is not None:
            budget = ctx.new[parent].budget
            if budget is not None and budget.usd is not None:
                raise ProtocolError(
                    "invalid_request",
                    f"pod {parent}'s budget.usd would cover pod {manifest.name}, but its {reason}",
                )
            parent = ctx.parents[parent]

    async def _run(self, step: _Step, team: str) -> PlanStep:
        sup, plan = self._sup, step.plan
        name = plan.pod
        match plan.action:
            case "spawn":
                assert step.manifest is not None
                parent = str(sup.registry.socket(step.parent)) if step.parent else None
                await sup.spawn(step.manifest, parent, team=team)
            case "start":
                # The file says what the pod is to be now: a change is taken as it comes
                # up, before a turn can start (the reconfigure step after this says so).
                # A start that fails leaves the stored change as it was.
                record = sup.registry.get(name)
                before = record.pending_manifest if record is not None else None
                if step.manifest is None:
                    self._drop_pending(name)
                else:
                    sup.registry.set_pending_manifest(name, step.manifest.model_dump_json())
                try:
                    await sup.start_pod(name)
                except BaseException:
                    if sup.running(name) is None and sup.registry.get(name) is not None:
                        sup.registry.set_pending_manifest(name, before)
                    raise
                if (up := sup.running(name)) is not None and up.status == "paused":
                    return plan.model_copy(update={"note": f"paused: `capctl resume {name}`"})
            case "unchanged":
                self._drop_pending(name)
            case "reconfigure" | "deferred":
                return await self._take(plan, step.manifest)
            case "delete":
                await sup.delete_pod(name)
        return plan

    async def _take(self, plan: PlanStep, manifest: Manifest | None) -> PlanStep:
        """Give a pod that is up its new manifest: now when it is idle or paused, when its
        turn ends if one runs (kept in the store meanwhile)."""
        assert manifest is not None
        name = plan.pod
        pod = self._sup.running(name)
        if pod is None:
            raise ProtocolError("shutting_down", f"pod {name} stopped meanwhile")
        self._sup.registry.set_pending_manifest(name, manifest.model_dump_json())
        try:
            result = await pod.take_manifest(manifest)
        except BaseException:
            self._drop_pending(name)
            raise
        if result["deferred"] and changed_fields(pod.manifest, manifest):
            note = f"pod {name} is running; its change applies when its turn ends"
            if pod.status != "running":
                note = f"pod {name} is compacting; its change applies when the compaction ends"
            return plan.model_copy(update={"action": "deferred", "note": note})
        self._drop_pending(name)  # taken now, or as the pod started (see "start")
        return plan.model_copy(update={"action": "reconfigure", "note": None})

    def _drop_pending(self, name: str) -> None:
        record = self._sup.registry.get(name)
        if record is not None and record.pending_manifest is not None:
            self._sup.registry.set_pending_manifest(name, None)
        if (pod := self._sup.running(name)) is not None:
            pod.pending_manifest = None

    # -- down ---------------------------------------------------------------------------

    async def down(self, team: str, drain_timeout_s: float) -> DownResult:
        """Run in the background: a client that goes away does not cut it short."""
        return await asyncio.shield(self._sup.in_background(self._down(team, drain_timeout_s)))

    async def _down(self, team: str, drain_timeout_s: float) -> DownResult:
        sup = self._sup
        registry = sup.registry
        async with self._lock(team):
            members = [record.name for record in registry.all() if record.team == team]
            if not members:
                raise ProtocolError(
                    "not_found", f"no pod is of team {team}; `capctl ps` shows pods' teams"
                )
            marked = self._with_descendants(members)
            for pod in [pod for name in marked if (pod := sup.running(name)) is not None]:
                pod.draining = True
                # Stored: a capd that stops or dies meanwhile leaves the pod stopped at its
                # next start (its turn kept), so it does not start what the drain held back.
                registry.set_stopped(pod.name, True)
            try:
                was_running = {name for name in marked if self._status(name) == "running"}
                await self._turns_end(was_running, drain_timeout_s)
                for name in marked:
                    if (pod := sup.running(name)) is not None and pod.status == "running":
                        with contextlib.suppress(ProtocolError):  # ended meanwhile
                            await pod.call(Pause())
                outcomes = [
                    DownOutcome(pod=name, outcome=self._outcome(name, was_running))
                    for name in members
                ]
                for name in sorted(marked, key=registry.depth, reverse=True):
                    if registry.get(name) is not None:
                        await sup.stop_pod(name, keep_turn=True)
            except BaseException:
                # A down that failed: the pods still up go on as they were.
                for name in self._with_descendants(members):
                    if (pod := sup.running(name)) is not None and pod.draining:
                        registry.set_stopped(name, False)
                raise
            finally:
                for name in self._with_descendants(members):  # spawned meanwhile too
                    if (pod := sup.running(name)) is not None:
                        pod.draining = False
        return DownResult(pods=outcomes)

    def _with_descendants(self, names: list[str]) -> list[str]:
        registry = self._sup.registry
        below = [record.name for name in names for record, _ in registry.descendants(name)]
        return list(dict.fromkeys([*names, *below]))

    def _status(self, name: str) -> PodStatusName | None:
        pod = self._sup.running(name)
        return pod.status if pod is not None else None

    def _outcome(self, name: str, was_running: set[str]) -> Outcome:
        if self._status(name) == "paused":
            return "paused"
        return "finished" if name in was_running else "stopped"

    async def _turns_end(self, names: set[str], timeout: float) -> None:
        """Wait until none of the pods runs a turn, at most `timeout` seconds."""
        waiting = {name for name in names if self._status(name) == "running"}
        if not waiting:
            return
        ended = asyncio.get_running_loop().create_future()

        def seen(name: str, status: PodStatusName) -> None:
            if status != "running":
                waiting.discard(name)
            if not waiting and not ended.done():
                ended.set_result(None)

        self._listeners.append(seen)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await ended
        finally:
            self._listeners.remove(seen)

    def _lock(self, team: str) -> asyncio.Lock:
        return self._locks.setdefault(team, asyncio.Lock())
