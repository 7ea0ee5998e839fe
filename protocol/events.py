"""Events of docs/protocol.md, Pod events and Daemon socket, plus the hello, ack and error frames.

Event models ignore unknown fields, so a client built on them keeps working when the
server adds fields. Durable events carry `seq` and `ts`; ephemeral ones never do.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from protocol.errors import ErrorCode
from protocol.methods import RequestId

PodStatusName = Literal["idle", "running", "paused"]
Invoke = Literal["run", "notify", "pod_event"]
TurnResult = Literal["finished", "cancelled", "errored", "limit_reached"]
CompactionTrigger = Literal["auto", "overflow", "request"]

PROTOCOL_VERSION = 1


class Frame(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


# -- connection frames --------------------------------------------------------------------


class PodHello(Frame):
    name: str
    status: PodStatusName
    last_seq: int


class Hello(Frame):
    event: Literal["hello"] = "hello"
    protocol: int = PROTOCOL_VERSION
    server: str
    pod: PodHello | None = None


class Ack(Frame):
    event: Literal["ack"] = "ack"
    id: RequestId | None = None
    result: dict[str, Any] = Field(default_factory=dict)


class Error(Frame):
    event: Literal["error"] = "error"
    id: RequestId | None = None
    code: ErrorCode
    message: str


# -- pod events ---------------------------------------------------------------------------


class PodEventBase(Frame):
    pod: str = ""
    """Filled in by the pod that emits the event."""


class DurableEvent(PodEventBase):
    seq: int = 0
    ts: float = 0.0


class ToolCall(Frame):
    id: str
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class Usage(Frame):
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None
    """What the call cost in dollars (an addition): from `model.price` or a known list
    price, or as the external engine reported it; null when unknown."""


class Spent(Frame):
    """Tokens (input and output) and dollars spent (§11); `usd` is null while nothing
    spent had a known price."""

    tokens: int = 0
    usd: float | None = None


class BudgetLimits(Frame):
    """A pod's budget as events and results show it (§11): null is no limit."""

    tokens: int | None = None
    usd: float | None = None


class ThinkingBlock(Frame):
    """A step's reasoning as the model API returned it (an addition). Anthropic signs its
    thinking and wants it back verbatim while tools run; `redacted` holds the encrypted
    content of a block the API did not show, which has no text."""

    text: str = ""
    signature: str = ""
    redacted: str = ""


class StatusChanged(DurableEvent):
    event: Literal["status"] = "status"
    status: PodStatusName
    turn_id: str | None = None


class TurnStart(DurableEvent):
    event: Literal["turn_start"] = "turn_start"
    turn_id: str
    invoke: Invoke
    traceparent: str | None = None
    """The `run` request's `traceparent` (an addition)."""


class UserMessage(DurableEvent):
    event: Literal["user_message"] = "user_message"
    turn_id: str
    text: str


class Notification(DurableEvent):
    """A buffered notify or pod_event entering the model's context. `pod_event_seq` (an
    addition) is the seq of the `pod_event_received` it delivers, so a restored pod knows
    which received reports its model has not seen yet."""

    event: Literal["notification"] = "notification"
    turn_id: str
    source: str
    text: str
    pod_event_seq: int | None = None


class AssistantMessage(DurableEvent):
    """One model step. `interrupted` (an addition to the contract) marks the partial text a
    pause kept from a response that was still streaming; it has no tool calls. `thinking`
    (an addition) keeps the step's complete thinking blocks, which go back to the model.
    `truncated` (§10) marks a reply the model's output limit (max_tokens) cut off; the
    next step continues it."""

    event: Literal["assistant_message"] = "assistant_message"
    turn_id: str
    text: str
    tool_calls: list[ToolCall] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    interrupted: bool = False
    thinking: list[ThinkingBlock] = Field(default_factory=list)
    truncated: bool = False

    @property
    def runs_on(self) -> bool:
        """Its text goes straight on in the next step's: a pause interrupted it, or
        max_tokens cut it off before any tool call."""
        return self.interrupted or (self.truncated and not self.tool_calls)


class ToolResult(DurableEvent):
    event: Literal["tool_result"] = "tool_result"
    turn_id: str
    call_id: str
    name: str
    output: str
    is_error: bool = False


class TurnEnd(DurableEvent):
    event: Literal["turn_end"] = "turn_end"
    turn_id: str
    result: TurnResult
    output: str = ""
    error: str | None = None


class ChildSpawned(DurableEvent):
    """`turn_id` (an addition) is the turn whose `spawn_pod` call made the child; null
    when a client spawned it with this pod as `parent` on the daemon socket."""

    event: Literal["child_spawned"] = "child_spawned"
    name: str
    socket: str
    turn_id: str | None = None


class PodEventReceived(DurableEvent):
    """A `pod_event` this pod accepted. `event` is the frame's type tag on the wire, so the
    received object travels in `payload`."""

    event: Literal["pod_event_received"] = "pod_event_received"
    payload: dict[str, Any] = Field(default_factory=dict)


class EngineSession(DurableEvent):
    """An external engine's own session id (an addition), recorded when the engine first
    reports it or reports a new one, so that a restarted capd resumes that session.
    `replaced` names the session this one replaces because the engine could not resume it
    (what that session had seen is lost to the engine), and `reason` says why, in the
    engine's words when it gave any."""

    event: Literal["engine_session"] = "engine_session"
    turn_id: str | None = None
    session_id: str
    replaced: str | None = None
    reason: str | None = None


class PermissionRequest(DurableEvent):
    """An engine asks leave to run a tool (an addition; ACP engines with `permission: ask`).
    Answer with the pod method `permission {request_id, option_id}`; until then the turn
    waits. `tool_call` and `options` (`[{optionId, name, kind}]`) are as the agent sent
    them."""

    event: Literal["permission_request"] = "permission_request"
    turn_id: str
    request_id: str
    tool_call: dict[str, Any] = Field(default_factory=dict)
    options: list[dict[str, Any]] = Field(default_factory=list)


class PermissionGrant(Frame):
    """What an `allow_always` answer to a builtin-engine pod's question lets run from then
    on: the rule of `permissions.rules` at index `rule` (its calls that would be asked
    about), or, when `rule` is null (`permissions.default` asked), calls of `tool` that no
    rule matches."""

    rule: int | None = None
    tool: str


class PermissionResolved(DurableEvent):
    """A `permission_request` answered: `option_id` is the option chosen, null when the
    request was cancelled (by the client, or because the turn stopped). `grant` (an
    addition): what an `allow_always` of a builtin-engine pod granted, read back at restore."""

    event: Literal["permission_resolved"] = "permission_resolved"
    turn_id: str
    request_id: str
    option_id: str | None = None
    grant: PermissionGrant | None = None


class ContextCompacted(DurableEvent):
    """§10: from here on the model's context is the system prompt, `summary`, then every
    event after `through_seq`. Additions: `window`, the context window the compaction
    measured against (on an overflow, the one the provider named), kept for the pod;
    `restore_from`, the first seq a restart reads (the kept messages, the open turn and
    reports the model has not read yet all come after it); `usage`, the pod's token
    totals up to this event, which a restart takes instead of reading older events."""

    event: Literal["context_compacted"] = "context_compacted"
    turn_id: str | None = None
    trigger: CompactionTrigger
    summary: str
    through_seq: int
    tokens_before: int
    tokens_after: int
    window: int | None = None
    restore_from: int = 0
    usage: Usage = Field(default_factory=Usage)


class Rewound(DurableEvent):
    """§11: from here on the model's context is what it was just before `to_turn_id`
    started. Additions: `to_seq`, the seq of that turn's `turn_start`; `new_session`, an
    external engine's session was left behind and the next turn starts a new one primed
    with the kept history."""

    event: Literal["rewound"] = "rewound"
    to_turn_id: str
    files_restored: bool = False
    to_seq: int = 0
    new_session: bool = False


class CheckpointTaken(DurableEvent):
    """The cwd's files at the start of `turn_id` are saved (an addition): `rewind` with
    `files` can restore them. `changed` counts the paths that differ from the previous
    checkpoint; `left_out`, files past `workspace.checkpoint_file_max_mb` (at most 20
    named), which a rewind leaves as they are."""

    event: Literal["checkpoint"] = "checkpoint"
    turn_id: str
    changed: int = 0
    duration_ms: int = 0
    left_out: list[str] = Field(default_factory=list)


class CheckpointSkipped(DurableEvent):
    """No checkpoint for `turn_id` (an addition): `reason` says which bound it passed or
    what failed. The turn runs as usual; a rewind to it cannot restore files."""

    event: Literal["checkpoint_skipped"] = "checkpoint_skipped"
    turn_id: str
    reason: str


class BudgetExhausted(DurableEvent):
    """§11: the budget of pod `scope` (this pod or an ancestor) is spent by its subtree;
    the turn pauses before its next model call. `set_budget` then `resume` goes on."""

    event: Literal["budget_exhausted"] = "budget_exhausted"
    turn_id: str
    scope: str
    used: Spent
    budget: BudgetLimits


class Reconfigured(DurableEvent):
    """§14: the pod took a new manifest; `changed` names its top-level fields that differ."""

    event: Literal["reconfigured"] = "reconfigured"
    changed: list[str]


class TextDelta(PodEventBase):
    event: Literal["text_delta"] = "text_delta"
    turn_id: str
    text: str


class ThinkingDelta(PodEventBase):
    event: Literal["thinking_delta"] = "thinking_delta"
    turn_id: str
    text: str


class ToolCallStart(PodEventBase):
    event: Literal["tool_call_start"] = "tool_call_start"
    turn_id: str
    call_id: str
    name: str


class ToolCallDelta(PodEventBase):
    event: Literal["tool_call_delta"] = "tool_call_delta"
    turn_id: str
    call_id: str
    json_: str = Field(alias="json")


class Retry(PodEventBase):
    event: Literal["retry"] = "retry"
    turn_id: str
    attempt: int
    max_attempts: int
    wait_ms: int
    error: str


class CompactionStarted(PodEventBase):
    """The model is summarising the older part of the context (an addition); a
    `context_compacted` follows when it is done, unless a pause or cancel stops it."""

    event: Literal["compaction_started"] = "compaction_started"
    turn_id: str | None = None
    trigger: CompactionTrigger


class CompactionSkipped(PodEventBase):
    """A requested compaction that was not made (an addition): nothing to compact, its
    summary call failed, or the turn it waited in was cancelled; `reason` says which."""

    event: Literal["compaction_skipped"] = "compaction_skipped"
    turn_id: str | None = None
    trigger: CompactionTrigger
    reason: str


class Lagged(PodEventBase):
    event: Literal["lagged"] = "lagged"
    missed: int
    resume_from: int


# -- daemon events ------------------------------------------------------------------------


class PodSpawned(PodEventBase):
    event: Literal["pod_spawned"] = "pod_spawned"
    socket: str
    parent: str | None = None


class PodStatusEvent(PodEventBase):
    event: Literal["pod_status"] = "pod_status"
    status: PodStatusName


class PodStopped(PodEventBase):
    event: Literal["pod_stopped"] = "pod_stopped"


class PodDeleted(PodEventBase):
    event: Literal["pod_deleted"] = "pod_deleted"


Phase = Literal["model", "tool", "permission", "retry", "compacting"]


class EngineState(BaseModel):
    """§16: an external engine's process (`status.engine`; null for the builtin engine)."""

    model_config = ConfigDict(extra="ignore")
    state: Literal["running", "stopped"]
    pid: int | None = None
    since: float = 0.0
    """When the process started or stopped (unix time; an addition)."""
    reaped: int = 0
    """How many times capd stopped it for idleness or the process limit since the pod
    last started (an addition)."""


class PodActivity(PodEventBase):
    """What a pod is doing now, for a view of many pods (an addition): a daemon event for
    subscribers that ask for `activity`, and the entries of `overview`."""

    event: Literal["pod_activity"] = "pod_activity"
    status: Literal["idle", "running", "paused", "stopped"]
    since: float = 0.0
    """When the pod entered `status` (unix time; 0 when unknown)."""
    socket: str = ""
    parent: str | None = None
    """The parent's socket, as `list` gives it."""
    model: str = ""
    """As `status.model` names it."""
    turn_id: str | None = None
    step: int = 0
    """The current turn's model steps so far (its `assistant_message`s)."""
    phase: Phase | None = None
    """What the running turn waits for; null when no turn runs."""
    phase_since: float | None = None
    tool: str | None = None
    """The tool running now, while `phase` is `tool`."""
    queued: int = 0
    permissions: int = 0
    """Open permission questions."""
    context_tokens: int = 0
    context_window: int | None = None
    usage: Usage = Field(default_factory=Usage)
    """The pod's own usage, as in `status`."""
    spent: Spent = Field(default_factory=Spent)
    """The pod and its descendants, as in `status`."""
    last_result: TurnResult | None = None
    """How the pod's last turn ended."""
    error: str | None = None
    """Why a pod that should be up is not, as in `list`."""
    engine: EngineState | None = None
    """§16: as in `status` (an addition)."""


AnyEvent = Annotated[
    Hello
    | Ack
    | Error
    | StatusChanged
    | TurnStart
    | UserMessage
    | Notification
    | AssistantMessage
    | ToolResult
    | TurnEnd
    | ChildSpawned
    | PodEventReceived
    | EngineSession
    | PermissionRequest
    | PermissionResolved
    | ContextCompacted
    | Rewound
    | CheckpointTaken
    | CheckpointSkipped
    | BudgetExhausted
    | Reconfigured
    | TextDelta
    | ThinkingDelta
    | ToolCallStart
    | ToolCallDelta
    | Retry
    | CompactionStarted
    | CompactionSkipped
    | Lagged
    | PodSpawned
    | PodStatusEvent
    | PodStopped
    | PodDeleted
    | PodActivity,
    Field(discriminator="event"),
]

_EVENT_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyEvent)
KNOWN_EVENTS = frozenset(
    m.model_fields["event"].default
    for m in AnyEvent.__origin__.__args__  # type: ignore[attr-defined]
)


def parse_event(frame: dict[str, Any]) -> Frame | None:
    """A typed frame, or None for an event type this client does not know (it ignores it)."""
    if frame.get("event") not in KNOWN_EVENTS:
        return None
    return _EVENT_ADAPTER.validate_python(frame)
