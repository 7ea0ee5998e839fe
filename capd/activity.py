"""What each pod is doing now, for a view of many pods: the daemon's `overview` and the
coalesced `pod_activity` events of `subscribe {activity}` (docs/protocol.md, §14).

`Activity` follows one pod's events as the controller emits them (text deltas never reach
it) and keeps what no other state holds: since when the pod is in its status, what the
running turn waits for (`phase`), the running tool, how the last turn ended. The rest of a
`pod_activity` object (queued runs, context, usage, spend) is read from the controller
when the object is built. `ActivityFeed` marks pods dirty only while a daemon subscriber
asked for activity, and flushes them at most every FLUSH_INTERVAL_S.
"""

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

import orjson

from capd.engines.base import Turn
from capd.fanout import Hub
from protocol.events import (
    AssistantMessage,
    CompactionSkipped,
    CompactionStarted,
    ContextCompacted,
    PermissionRequest,
    PermissionResolved,
    PodDeleted,
    PodEventBase,
    PodSpawned,
    PodStopped,
    Retry,
    StatusChanged,
    ToolCallStart,
    ToolResult,
    TurnEnd,
    TurnResult,
)
from protocol.framing import encode

FLUSH_INTERVAL_S = 0.25
"""At most one `pod_activity` per pod this often."""

WATCHED_EPHEMERAL: frozenset[type[PodEventBase]] = frozenset(
    {ToolCallStart, Retry, CompactionStarted, CompactionSkipped}
)
"""The ephemeral events `Activity.see` reads; the controller tests this one set, so a
text delta costs one `if`."""
SEEN: frozenset[type[PodEventBase]] = WATCHED_EPHEMERAL | {
    StatusChanged,
    TurnEnd,
    AssistantMessage,
    ToolResult,
    PermissionRequest,
    PermissionResolved,
    ContextCompacted,
}
"""Every event `Activity.see` matches on."""

Built = dict[str, Any]
"""A `protocol.events.PodActivity` as a plain dict (built for every flush)."""


def _nothing(_name: str) -> None:
    pass


class Activity:
    """One pod's activity, derived from its events alone so that it holds for every engine.

    The running tool is a call announced and not answered yet. The builtin engine announces
    a call (`tool_call_start`) while the model still streams its arguments and runs it after
    the step's `assistant_message`, so there a call runs from that message on; external
    engines report a call when their agent starts it (an ACP agent's `tool_result` may even
    come before its step's `assistant_message`), so there `tool_call_start` starts it."""

    __slots__ = (
        "_asked",
        "_calls",
        "_external",
        "_retry_until",
        "_running",
        "_shown",
        "last_result",
        "name",
        "on_change",
        "phase",
        "phase_since",
        "since",
    )

    def __init__(self, name: str, external: bool) -> None:
        self.name = name
        self._external = external
        self.since = time.time()
        """When the pod entered its status; a pod comes up in it."""
        self.phase: str | None = None
        self.phase_since: float | None = None
        self.last_result: TurnResult | None = None
        self.on_change: Callable[[str], None] = _nothing
        """Told the pod's name after each event seen (the feed marks it dirty)."""
        self._running = False
        self._calls: dict[str, str] = {}
        """Call id → tool name of the calls running or waiting to run, in order."""
        self._shown: str | None = None
        """The call whose tool `phase_since` dates from."""
        self._asked: dict[str, None] = {}
        """The permission requests waiting, as dict keys: an empty dict is a quarter of an
        empty set's memory, and an idle pod keeps one."""
        self._retry_until = 0.0

    def see(self, event: PodEventBase) -> None:
        if type(event) not in SEEN:  # a report received, a user message: one `if`
            self.on_change(self.name)
            return
        ts = getattr(event, "ts", 0.0) or time.time()
        match event:
            case StatusChanged(status=status):
                self.since = ts
                self._running = status == "running"
                self._calls.clear()
                self._asked.clear()
                self._set("model" if self._running else None, ts)
            case TurnEnd(result=result):
                self.last_result = result
            case AssistantMessage(tool_calls=calls) if self._running:
                if not self._external:
                    self._calls = {call.id: call.name for call in calls}
                self._settle(ts)
            case ToolCallStart(call_id=call_id, name=name) if self._external and self._running:
                self._calls[call_id] = name
                self._settle(ts)
            case ToolResult(call_id=call_id) if self._running:
                if self._calls.pop(call_id, None) is not None:
                    self._settle(ts)
            case PermissionRequest(request_id=request_id) if self._running:
                self._asked[request_id] = None
                self._set("permission", ts)
            case PermissionResolved(request_id=request_id):
                self._asked.pop(request_id, None)
                self._settle(ts)
            case Retry(wait_ms=wait_ms) if self._running:
                self._retry_until = ts + wait_ms / 1000
                self._set("retry", ts)
                # The model is called again then, with no event to say so.
                asyncio.get_running_loop().call_later(wait_ms / 1000, self.on_change, self.name)
            case CompactionStarted() if self._running:
                self._set("compacting", ts)
            case ContextCompacted() | CompactionSkipped() if self.phase == "compacting":
                self._settle(ts)
        self.on_change(self.name)

    def _settle(self, ts: float) -> None:
        """The phase when nothing else holds the turn: a question, a tool, or the model."""
        if not self._running:
            return
        if self._asked:
            self._set("permission", ts)
        elif self._calls:
            first = next(iter(self._calls))
            self._set("tool", ts, force=first != self._shown)
            self._shown = first
        else:
            self._set("model", ts)

    def _set(self, phase: str | None, ts: float, force: bool = False) -> None:
        if phase != self.phase or force:
            self.phase, self.phase_since = phase, ts if phase else None

    @property
    def tool(self) -> str | None:
        """The running tool: the first call announced and not answered."""
        if self.phase != "tool":
            return None
        return next(iter(self._calls.values()), None)

    def now(self, when: float) -> tuple[str | None, float | None]:
        """The phase and its start at `when`: a retry's wait over, the model is called again."""
        if self.phase == "retry" and when >= self._retry_until:
            return "model", self._retry_until
        return self.phase, self.phase_since


class Controller(Protocol):
    """What a running pod's activity is read from (`capd.controller.PodController`)."""

    activity: Activity
    turn: Turn | None

    def status_result(self, children: list[str]) -> dict[str, Any]: ...


def running_activity(controller: Controller) -> Built:
    """The pod_activity of a pod that is up: its tracker, and what `status` says."""
    status = controller.status_result([])
    activity = controller.activity
    phase, phase_since = activity.now(time.time())
    running = status["status"] == "running"
    return {
        "event": "pod_activity",
        "pod": status["name"],
        "status": status["status"],
        "since": activity.since,
        "socket": status["socket"],
        "parent": status["parent"],
        "model": status["model"],
        "turn_id": status["turn_id"],
        "step": controller.turn.steps if controller.turn is not None else 0,
        "phase": phase if running else None,
        "phase_since": phase_since if running else None,
        "tool": activity.tool if running and phase == "tool" else None,
        "queued": status["queued"],
        "permissions": len(status["permissions"]),
        "context_tokens": status["context"]["tokens"],
        "context_window": status["context"]["window"],
        "usage": status["usage"],
        "spent": status["spent"],
        "last_result": activity.last_result,
        "error": None,
        "engine": status["engine"],
    }


def stopped_activity(
    name: str,
    *,
    socket: str,
    parent: str | None,
    model: str,
    since: float,
    usage: dict[str, Any],
    spent: dict[str, Any],
    queued: int,
    last_result: TurnResult | None,
    error: str | None,
) -> Built:
    return {
        "event": "pod_activity",
        "pod": name,
        "status": "stopped",
        "since": since,
        "socket": socket,
        "parent": parent,
        "model": model,
        "turn_id": None,
        "step": 0,
        "phase": None,
        "phase_since": None,
        "tool": None,
        "queued": queued,
        "permissions": 0,
        "context_tokens": 0,
        "context_window": None,
        "usage": usage,
        "spent": spent,
        "last_result": last_result,
        "error": error,
        "engine": None,
    }


class ActivityFeed:
    """The daemon subscribers that asked for activity: the lifecycle events every daemon
    subscriber gets, plus each changed pod's `pod_activity`, coalesced."""

    def __init__(self, build: Callable[[str], Built | None]) -> None:
        """`build(name)` is the pod's pod_activity now; None once it is deleted."""
        self.hub = Hub("", lambda: 0)
        self._build = build
        self._trackers: dict[str, Activity] = {}
        """Every pod's tracker since this capd brought it up; a stopped pod's is kept for
        its last_result."""
        self.stopped_at: dict[str, float] = {}
        self._dirty: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._last_flush = 0.0

    def track(self, activity: Activity) -> None:
        """Follow a pod that came up."""
        self._trackers[activity.name] = activity
        self.stopped_at.pop(activity.name, None)
        activity.on_change = self.changed

    def last_result(self, name: str) -> TurnResult | None:
        tracker = self._trackers.get(name)
        return tracker.last_result if tracker is not None else None

    def lifecycle(self, event: PodEventBase) -> None:
        """A daemon event (pod spawned, status, stopped, deleted): passed on, and noted."""
        match event:
            case PodStopped(pod=name):
                self.stopped_at[name] = time.time()
            case PodDeleted(pod=name):
                self.stopped_at.pop(name, None)
                self._trackers.pop(name, None)
                self._dirty.discard(name)
        if not self.hub.subscriptions:
            return
        self.hub.publish(encode(event))
        if isinstance(event, PodSpawned | PodStopped):
            self.changed(event.pod)

    def changed(self, name: str) -> None:
        if not self.hub.subscriptions:
            return
        self._dirty.add(name)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last_flush + FLUSH_INTERVAL_S - loop.time())
            self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        self._last_flush = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, set()
        if not self.hub.subscriptions:
            return
        for name in dirty:
            built = self._build(name)
            if built is not None:
                self.hub.publish(encode_built(built))


def encode_built(built: Built) -> bytes:
    return orjson.dumps(built, option=orjson.OPT_APPEND_NEWLINE)
