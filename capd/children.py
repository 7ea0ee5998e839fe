"""Child pods: the rules every child obeys, and the pod tools' view of the daemon.

A child is an ordinary pod whose `parent` is another pod's socket. When that parent is a
pod of this daemon, `check_child` holds the child to it (docs/protocol.md, Parent
reports): its cwd lies inside the parent's, its tools are a subset of the parent's, its
MCP servers are some of the parent's, each defined as the parent defines it once a
relative command is taken from each pod's own cwd (else a child could run anything under
a server's name), the parent has fewer than
`limits.max_children` running children, the new child is no deeper than
`limits.max_depth`, and its sandbox and resource limits are no wider than the parent's
(docs/protocol.md, Children). That holds however the child is made: by `spawn_pod` or by
a client's `spawn` with a `parent`. `ChildPods` serves the pod tools of one pod; they reach
only its descendants, and every refusal is a ToolFailed the model can read. It sees the
supervisor through `ChildHost`, the few calls it makes.
"""

import asyncio
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol, TypeVar

import orjson
from pydantic import ValidationError

from capd import tracing
from capd.engines.base import Turn
from capd.pod_worktrees import PodWorktrees
from capd.proc.sandbox import real_path
from capd.registry import PodRegistry
from capd.store import Store
from capd.tools.base import ToolFailed
from capd.tools.files import resolve_inside
from protocol.errors import ProtocolError
from protocol.events import AssistantMessage, PodStatusName
from protocol.manifest import (
    DEFAULT_SANDBOX_ENV,
    Limits,
    Manifest,
    McpServerConfig,
    McpStdioServer,
    ModelConfig,
    Sandbox,
    SandboxMode,
)
from protocol.methods import Run, describe_validation_error
from protocol.results import SpawnResult
from protocol.tools import SpawnPodArgs

T = TypeVar("T")

INHERITED_MODEL_FIELDS = ("provider", "base_url", "api_key_env")
"""A child cannot choose where its model calls go, nor which credential they carry."""


@dataclass(frozen=True)
class Parent:
    """A new pod's parent as the child rules see it (`apply` plans one from its file)."""

    name: str
    rules: Manifest
    """Its manifest, cwd resolved."""
    running_children: list[str]
    """Its children that are up, which count against its limits.max_children."""
    depth: int
    """How many levels below the top the new child would be."""


def check_child(parent: Parent, child: Manifest) -> None:
    """Refuse (ProtocolError) a `child` of `parent`; both cwds are resolved."""
    name, rules, running = parent.name, parent.rules, parent.running_children
    check_within(name, rules, child)
    limits = rules.limits
    if len(running) >= limits.max_children:
        raise ProtocolError(
            "limit_reached",
            f"pod {name} already has {len(running)} running children "
            f"({_names(running)}), the most its limits.max_children="
            f"{limits.max_children} allows; stop one first",
        )
    if parent.depth > limits.max_depth:
        raise ProtocolError(
            "limit_reached",
            f"a child of pod {name} would be {parent.depth} levels deep, more than its "
            f"limits.max_depth={limits.max_depth}",
        )


def check_within(parent: str, rules: Manifest, child: Manifest) -> None:
    """Refuse (forbidden) a `child` wider than pod `parent`, whose manifest is `rules`: its
    cwd, tools, MCP servers, sandbox and resource limits (a spawn, a `reconfigure` of
    either pod, and a child's start or restore check this)."""
    assert child.cwd is not None
    assert rules.cwd is not None
    if child.workspace.git is not None:
        _check_same_repository(parent, rules, child.workspace.git.repo)
    elif not Path(child.cwd).is_relative_to(rules.cwd):
        raise ProtocolError(
            "forbidden",
            f"cwd {child.cwd} is outside {rules.cwd}, the cwd of parent pod {parent}; "
            "a child works inside its parent's directory",
        )
    extra = [tool for tool in child.tools if tool not in rules.tools]
    if extra:
        raise ProtocolError(
            "forbidden",
            f"tools {_names(extra)} are not among parent pod {parent}'s tools "
            f"({_names(rules.tools)}); a child's tools are a subset of its parent's",
        )
    foreign = [
        name
        for name, server in child.mcp_servers.items()
        if name not in rules.mcp_servers
        or _anchored(server, child.cwd) != _anchored(rules.mcp_servers[name], rules.cwd)
    ]
    if foreign:
        raise ProtocolError(
            "forbidden",
            f"mcp_servers {_names(foreign)} are not among parent pod {parent}'s MCP servers "
            f"({_names(rules.mcp_servers)}) as it defines them; a child's MCP servers are "
            "some of its parent's, defined the same (a relative command is taken from each "
            "pod's own cwd)",
        )
    _check_sandbox(parent, rules, child)
    _check_resource_limits(parent, rules.limits, child.limits)


def _check_same_repository(parent: str, rules: Manifest, repo: str) -> None:
    """A child with a work tree of its own (outside its parent's cwd) works on its
    parent's repository: the parent's `workspace.git.repo`, or one inside its cwd that
    the parent's sandbox does not hide (the child's work tree would show it)."""
    assert rules.cwd is not None
    theirs = real_path(repo)
    mine = rules.workspace.git
    if mine is not None and real_path(mine.repo) == theirs:
        return
    if theirs.is_relative_to(rules.cwd):
        hides = rules.sandbox.hidden if rules.sandbox.mode != "off" else []
        if hider := next((h for h in hides if theirs.is_relative_to(h)), None):
            raise _wider(
                f"workspace.git.repo {repo} lies inside {hider}, which parent pod {parent} "
                "hides (sandbox.hidden): a child would see it"
            )
        return
    raise ProtocolError(
        "forbidden",
        f"workspace.git.repo {repo} is neither parent pod {parent}'s repository nor inside "
        f"its cwd {rules.cwd}; a child with a work tree works on its parent's repository",
    )


MODE_WIDTH: dict[SandboxMode, int] = {"read-only": 0, "workspace-write": 1, "off": 2}
"""How much each sandbox mode lets a pod's processes do: a child's is at most its parent's."""


def _check_sandbox(parent: str, rules: Manifest, child: Manifest) -> None:
    """Refuse a child whose sandbox is wider than its parent's: its cwd and writable
    paths stay out of what the parent hides (a child's sandbox shows its cwd and writable
    paths even under a hidden one), its hidden paths cover the parent's. Paths are
    resolved (the supervisor stores them so), so comparing them as they are is enough."""
    mine, theirs = rules.sandbox, child.sandbox
    if mine.mode == "off":
        return  # an unconfined parent can do all that any child can
    if MODE_WIDTH[theirs.mode] > MODE_WIDTH[mine.mode]:
        raise _wider(f"sandbox.mode {theirs.mode} is wider than parent pod {parent}'s {mine.mode}")
    if theirs.network and not mine.network:
        raise _wider(f"sandbox.network is true, but parent pod {parent} has no network")
    assert child.cwd is not None
    for field, paths in (("cwd", [child.cwd]), ("sandbox.writable", theirs.writable)):
        for path in paths:
            if hider := next((h for h in mine.hidden if Path(path).is_relative_to(h)), None):
                raise _wider(
                    f"{field} {path} lies inside {hider}, which parent pod {parent} hides "
                    "(sandbox.hidden): a child would see it"
                )
    if theirs.mode == "workspace-write":  # with read-only, `writable` writes nothing
        assert rules.cwd is not None
        roots = [Path(rules.cwd), *map(Path, mine.writable)]
        outside = [p for p in theirs.writable if not any(Path(p).is_relative_to(r) for r in roots)]
        if outside:
            raise _wider(
                f"sandbox.writable {_names(outside)} lies outside parent pod {parent}'s cwd "
                f"and writable paths ({_names(map(str, roots))})"
            )
    extra = [name for name in _env(theirs) if name not in _env(mine)]
    if extra:
        raise _wider(
            f"sandbox.env {_names(extra)} is not among parent pod {parent}'s variables "
            f"({_names(_env(mine))})"
        )
    shown = [p for p in mine.hidden if not any(Path(p).is_relative_to(h) for h in theirs.hidden)]
    if shown:
        raise _wider(f"sandbox.hidden leaves out parent pod {parent}'s hidden {_names(shown)}")


def _check_resource_limits(parent: str, mine: Limits, theirs: Limits) -> None:
    for field in ("memory_mb", "pids"):
        bound, asked = getattr(mine, field), getattr(theirs, field)
        if bound is not None and (asked is None or asked > bound):
            raise _wider(
                f"limits.{field} {'unset' if asked is None else asked} is more than "
                f"parent pod {parent}'s {bound}"
            )


def _env(sandbox: Sandbox) -> tuple[str, ...]:
    return DEFAULT_SANDBOX_ENV if sandbox.env is None else tuple(sandbox.env)


def _wider(what: str) -> ProtocolError:
    return ProtocolError(
        "forbidden", f"{what}; a child's sandbox and limits are no wider than its parent's"
    )


class RunningPod(Protocol):
    """A running pod's actor, as the pod tools use it (the controller provides it)."""

    parent: str | None
    status: PodStatusName
    turn: Turn | None

    async def call(self, request: Run) -> dict[str, Any]: ...

    async def deliver(
        self, text: str, source: str, traceparent: str | None = None
    ) -> dict[str, Any]: ...


class ChildHost(Protocol):
    """What the pod tools ask of the supervisor."""

    def in_background(self, work: Awaitable[T]) -> "asyncio.Task[T]": ...

    async def spawn(
        self, manifest: Manifest, parent: str | None, *, turn_id: str | None, make_cwd: bool
    ) -> SpawnResult: ...

    async def stop_pod(self, name: str) -> list[str]: ...

    @property
    def worktrees(self) -> PodWorktrees: ...

    def running(self, name: str) -> RunningPod | None:
        """None when the pod is stopped or unknown."""
        ...


class ChildPods:
    """The pod tools' view of the daemon, for the pod `manifest` describes."""

    def __init__(
        self,
        host: ChildHost,
        registry: PodRegistry,
        store: Store,
        manifest: Manifest,
        socket_path: Path,
    ) -> None:
        self._host = host
        self._registry = registry
        self._store = store
        self._manifest = manifest
        self._name = manifest.name
        self._socket = str(socket_path)

    async def spawn(self, args: SpawnPodArgs) -> str:
        manifest = self._child_manifest(args)
        if self._registry.get(args.name) is not None:
            raise ToolFailed(self._name_taken(args.name))
        # Run by the supervisor and shielded: pausing or stopping this pod while the child
        # comes up must not leave it half made. The child's turn links to this call's span.
        traceparent = tracing.current_traceparent()
        start = self._host.in_background(self._start_child(manifest, args.task, traceparent))
        turn_id = await asyncio.shield(start)
        servers = f", MCP servers: {_names(manifest.mcp_servers)}" if manifest.mcp_servers else ""
        where = manifest.cwd or f"a work tree of its own on branch capd/{args.name}"
        return (
            f"spawned pod {args.name} (cwd {where}, tools: {_names(manifest.tools)}"
            f"{servers}); "
            f"it is working on your task as turn {turn_id}. Its report reaches you as a "
            "notification when that turn ends."
        )

    async def _start_child(self, manifest: Manifest, task: str, traceparent: str | None) -> str:
        """Spawn the child and send it its task; the child's turn_id."""
        me = self._host.running(self._name)
        try:
            if manifest.workspace.git is not None:  # from this pod's current commit
                manifest = await self._host.worktrees.from_parent(self._name, manifest)
            await self._host.spawn(
                manifest,
                self._socket,
                turn_id=me.turn.turn_id if me and me.turn else None,
                make_cwd=True,
            )
            child = self._host.running(manifest.name)
            if child is None:
                raise ProtocolError("shutting_down", f"pod {manifest.name} stopped at once")
            # Queued only while the child's team goes down (capctl down); else it starts.
            started = await child.call(Run(text=task, traceparent=traceparent, if_busy="queue"))
        except ProtocolError as exc:
            raise ToolFailed(f"cannot spawn pod {manifest.name}: {exc.message}") from None
        return str(started["turn_id"])

    async def send(self, name: str, text: str) -> str:
        child = self._reachable(name)
        try:
            result = await child.deliver(text, f"pod {self._name}", tracing.current_traceparent())
        except ProtocolError as exc:
            raise ToolFailed(f"cannot send to pod {name}: {exc.message}") from None
        reply_to = (
            "you get"
            if child.parent == self._socket
            else (f"its parent {self._registry.name_at(child.parent)} gets")
        )
        if "buffered" in result:
            return f"pod {name} is paused; it reads your message when it is resumed"
        if result.get("queued"):
            why = "'s team is going down" if child.draining else " is busy"
            return (
                f"pod {name}{why}; your message is queued as its next turn "
                f"{result['turn_id']}, and {reply_to} a report when that turn ends"
            )
        return f"pod {name} started turn {result['turn_id']}; {reply_to} a report when it ends"

    def read_output(self, name: str, limit: int) -> str:
        self._check_descendant(name)
        store = self._store
        reader = self._name
        rows = store.events_of_kind_after(
            name, store.read_cursor(reader, name), "assistant_message"
        )
        status = self._status(name)
        text = _assistant_text(data for _, data in rows)
        if rows:
            store.set_read_cursor(reader, name, rows[-1][0])
        if not text:
            return f"pod {name} is {status}; it has written nothing new since your last read"
        if len(text) > limit:
            text = (
                f"[earlier output cut: the last {limit} of {len(text)} characters follow]\n"
                + text[-limit:]
            )
        return f"pod {name} is {status}; its output since your last read:\n{text}"

    async def stop(self, name: str) -> str:
        self._check_descendant(name)
        if self._host.running(name) is None:
            return f"pod {name} is already stopped"
        # Shielded like spawn: a stop cut short would leave the child half stopped.
        stopped = await asyncio.shield(self._host.in_background(self._host.stop_pod(name)))
        others = [pod for pod in stopped if pod != name]
        also = f" and its descendants {_names(others)}" if others else ""
        return f"stopped pod {name}{also}; a running turn was cancelled"

    def tree(self) -> str:
        family = self._registry.descendants(self._name)
        if not family:
            return "you have no child pods"
        lines = []
        for record, depth in family:
            running = self._host.running(record.name)
            detail = self._status(record.name)
            if running and running.turn:
                detail += f", turn {running.turn.turn_id}"
            lines.append(f"{'  ' * (depth - 1)}- {record.name} ({detail})")
        return "\n".join(lines)

    # -- checks -------------------------------------------------------------------------

    def _family(self) -> set[str]:
        """The names of this pod's descendants."""
        return {record.name for record, _ in self._registry.descendants(self._name)}

    def _check_descendant(self, name: str) -> None:
        if name not in self._family():
            raise ToolFailed(
                f"{name} is not one of your child pods; list_pods shows the ones you can reach"
            )

    def _reachable(self, name: str) -> RunningPod:
        self._check_descendant(name)
        running = self._host.running(name)
        if running is None:
            raise ToolFailed(f"pod {name} is stopped; it cannot take messages")
        return running

    def _status(self, name: str) -> str:
        running = self._host.running(name)
        return running.status if running else "stopped"

    def _name_taken(self, name: str) -> str:
        if name in self._family():
            return (
                f"pod {name} already exists and is yours; use send_to_pod or read_pod_output "
                "with it, or spawn under another name"
            )
        return f"a pod named {name} already exists; choose another name"

    def _child_manifest(self, args: SpawnPodArgs) -> Manifest:
        """The child's manifest: the caller's, changed as asked; its cwd is not made yet."""
        parent = self._manifest
        candidate: dict[str, Any] = {
            "name": args.name,
            "model": _child_model(parent.model, args.model or {}) if parent.model else None,
            "engine": parent.engine.model_dump(),
            "system_prompt": parent.system_prompt
            if args.system_prompt is None
            else args.system_prompt,
            "cwd": None if args.worktree else str(_child_cwd(parent, args.cwd)),
            "workspace": _child_workspace(parent, args),
            "tools": list(parent.tools) if args.tools is None else args.tools,
            "limits": parent.limits.model_dump(),
            "mcp_servers": _child_mcp_servers(parent, args.mcp_servers),
            # Validated with the rest (a bad field is named); check_child says if it is narrow.
            "sandbox": {**parent.sandbox.model_dump(), **(args.sandbox or {})},
            "permissions": parent.permissions.model_dump(),
        }
        try:
            return Manifest.model_validate(candidate)
        except ValidationError as exc:
            raise ToolFailed(
                f"cannot spawn pod {args.name}: {describe_validation_error(exc)}"
            ) from None


def _child_model(parent: ModelConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    inherited = parent.model_dump()
    for key in INHERITED_MODEL_FIELDS:
        if key in overrides and overrides[key] != inherited[key]:
            raise ToolFailed(
                f"a child uses your model's {', '.join(INHERITED_MODEL_FIELDS)}; "
                f"leave {key} out of model"
            )
    return {**inherited, **overrides}


def _child_mcp_servers(parent: Manifest, names: list[str] | None) -> dict[str, Any]:
    """The parent's MCP servers that `names` picks (all of them when None), as defined
    but for a relative command, made absolute so the child runs the parent's program."""
    servers = parent.mcp_servers
    unknown = [name for name in names or [] if name not in servers]
    if unknown:
        raise ToolFailed(
            f"mcp_servers {_names(unknown)} are not among your MCP servers "
            f"({_names(servers)}); a child gets some of yours"
        )
    chosen = servers if names is None else {name: servers[name] for name in names}
    assert parent.cwd is not None
    return {name: _anchored(server, parent.cwd).model_dump() for name, server in chosen.items()}


def _anchored(server: McpServerConfig, cwd: str) -> McpServerConfig:
    """`server` as a pod working in `cwd` runs it: a stdio command with a `/` that is not
    absolute made absolute against `cwd`. Only a leading `..` is folded, into `cwd` (which
    is resolved); one further on may follow a symlink, so it stays as written."""
    if not isinstance(server, McpStdioServer) or "/" not in server.command:
        return server
    base, parts = Path(cwd), PurePosixPath(server.command).parts
    while parts and parts[0] == "..":
        base, parts = base.parent, parts[1:]
    return server.model_copy(update={"command": str(base.joinpath(*parts))})


def _child_workspace(parent: Manifest, args: SpawnPodArgs) -> dict[str, Any]:
    """A `worktree` child's work tree of the caller's repository (its base, the caller's
    commit, is set when it is spawned); none otherwise."""
    if not args.worktree:
        return {}
    if args.cwd is not None:
        raise ToolFailed("cwd and worktree exclude each other: a worktree child works in its own")
    if parent.workspace.git is None:
        raise ToolFailed(
            "worktree needs your cwd to be a git work tree (workspace.git); leave it out"
        )
    return {"git": {"repo": parent.workspace.git.repo}}


def _child_cwd(parent: Manifest, cwd: str | None) -> Path:
    assert parent.cwd is not None
    root = Path(parent.cwd)
    if cwd is None:
        return root.resolve()
    target = resolve_inside(cwd, root)
    if target.exists() and not target.is_dir():
        raise ToolFailed(f"cwd {cwd} exists and is not a directory")
    return target


def _assistant_text(stored: Iterable[bytes]) -> str:
    """The assistant text of stored assistant_message events; a step a pause interrupted
    or max_tokens cut off runs straight on into its continuation, other steps are
    separated by a blank line."""
    parts: list[str] = []
    glue = ""
    for data in stored:
        message = AssistantMessage.model_validate(orjson.loads(data))
        if message.text:
            parts.append(glue + message.text if parts else message.text)
        glue = "" if message.runs_on else "\n\n"
    return "".join(parts)


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"
