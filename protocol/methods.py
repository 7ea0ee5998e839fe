"""Requests of docs/protocol.md, Pod methods and Daemon socket.

Requests are flat objects discriminated on `method`; unknown fields are rejected.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protocol.errors import ProtocolError
from protocol.manifest import Manifest
from protocol.names import IfBusy
from protocol.paths import NODE_NAME_PATTERN, POD_NAME_PATTERN
from protocol.team import TeamPod

RequestId = str | int
Seq = Annotated[int, Field(ge=0, le=2**63 - 1)]
"""A `seq` a request names: SQLite stores it as a signed 64-bit integer."""
TRACEPARENT_PATTERN = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
"""A W3C trace context `traceparent`, version 00."""
MAX_DESCRIBED_ERRORS = 5
MAX_INSTRUCTIONS = 10_000
"""Characters a `compact` request's instructions may hold."""
PodName = Annotated[str, Field(pattern=POD_NAME_PATTERN)]
NodeName = Annotated[str, Field(pattern=NODE_NAME_PATTERN)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: RequestId | None = None


# -- pod socket ---------------------------------------------------------------------------


class Run(Request):
    method: Literal["run"] = "run"
    text: str
    if_busy: IfBusy = "reject"
    traceparent: str | None = Field(default=None, pattern=TRACEPARENT_PATTERN)
    """The span that asked for this run (an addition): the turn's `invoke_agent` span links
    to it, and `turn_start` keeps it."""


class Pause(Request):
    method: Literal["pause"] = "pause"


class Resume(Request):
    method: Literal["resume"] = "resume"


class Cancel(Request):
    method: Literal["cancel"] = "cancel"
    all: bool = False


class Notify(Request):
    method: Literal["notify"] = "notify"
    text: str
    source: str | None = None


class PodEvent(Request):
    """A report from another pod (a child, §9); `event` holds at least `kind`."""

    method: Literal["pod_event"] = "pod_event"
    event: dict[str, Any]


class Permission(Request):
    """Answer a `permission_request` (an addition): an option's `option_id`, or null to
    cancel the request."""

    method: Literal["permission"] = "permission"
    request_id: str
    option_id: str | None = None


class Compact(Request):
    """§10: compact the model's context now (idle or paused) or at the next step boundary
    (running); `instructions` add to the summary prompt."""

    method: Literal["compact"] = "compact"
    instructions: str | None = Field(default=None, max_length=MAX_INSTRUCTIONS)


class Rewind(Request):
    """§11: make the model's context what it was just before `turn_id` started, and with
    `files` the cwd's files too (from that turn's checkpoint). Idle or paused pods only."""

    method: Literal["rewind"] = "rewind"
    turn_id: str = Field(min_length=1, max_length=200)
    files: bool = False


class SetBudget(Request):
    """§11: set the pod's budget. A field left out keeps its value; null removes that
    limit."""

    method: Literal["set_budget"] = "set_budget"
    tokens: int | None = Field(default=None, ge=0)
    usd: float | None = Field(default=None, ge=0)


class Status(Request):
    method: Literal["status"] = "status"


class Subscribe(Request):
    method: Literal["subscribe"] = "subscribe"
    after_seq: Seq | None = None
    deltas: bool = True
    """False: no `text_delta`, `thinking_delta` or `tool_call_delta` (an addition)."""


class Unsubscribe(Request):
    method: Literal["unsubscribe"] = "unsubscribe"


class History(Request):
    method: Literal["history"] = "history"
    after_seq: Seq = 0
    limit: int = Field(default=1000, ge=1, le=10000)
    last_turns: int | None = Field(default=None, ge=1, le=10000)
    """Start at the `turn_start` of the last this-many turns instead of `after_seq` (an
    addition)."""


class StopPod(Request):
    method: Literal["stop"] = "stop"


class Reconfigure(Request):
    """§14: give an idle or paused pod a new manifest; it keeps its history."""

    method: Literal["reconfigure"] = "reconfigure"
    manifest: Manifest


PodRequest = Annotated[
    Run
    | Pause
    | Resume
    | Cancel
    | Notify
    | PodEvent
    | Permission
    | Compact
    | Rewind
    | SetBudget
    | Status
    | Subscribe
    | Unsubscribe
    | History
    | StopPod
    | Reconfigure,
    Field(discriminator="method"),
]


# -- daemon socket ------------------------------------------------------------------------


class Spawn(Request):
    method: Literal["spawn"] = "spawn"
    manifest: Manifest
    parent: str | None = None
    team: PodName | None = None
    """§16: the team the pod belongs to (an addition; `apply` sets it)."""
    node: NodeName | None = None
    """§15: the fleet node to host the pod; by default the least-loaded node."""


class ListPods(Request):
    method: Literal["list"] = "list"


class Stop(Request):
    method: Literal["stop"] = "stop"
    name: PodName
    keep_turn: bool = False
    """§16: a running or paused turn comes back `paused` at `start` instead of ending
    `cancelled`."""


class Start(Request):
    method: Literal["start"] = "start"
    name: PodName


class Delete(Request):
    method: Literal["delete"] = "delete"
    name: PodName
    delete_branch: bool = False
    """§16: also delete the branch of the pod's `workspace.git` work tree (an addition)."""


class Info(Request):
    method: Literal["info"] = "info"


class Shutdown(Request):
    method: Literal["shutdown"] = "shutdown"


class DaemonSubscribe(Request):
    method: Literal["subscribe"] = "subscribe"
    activity: bool = False
    """Also send `pod_activity` events (an addition)."""


class Restart(Request):
    """Stop a pod and its descendants, then start it and those of them that were up (an
    addition)."""

    method: Literal["restart"] = "restart"
    name: PodName


class Overview(Request):
    """Every pod's `pod_activity` object at once (an addition)."""

    method: Literal["overview"] = "overview"


class Metrics(Request):
    """§14: the daemon's metrics in the Prometheus text format."""

    method: Literal["metrics"] = "metrics"


class Diff(Request):
    """§16: the pod's work tree (committed and not) against the merge base with its
    `workspace.git.base` (an addition: `capctl diff` asks the daemon)."""

    method: Literal["diff"] = "diff"
    name: PodName
    stat: bool = False
    """A `--stat` summary instead of the patch."""


class Apply(Request):
    """§16: make the team's pods match `pods` (an addition: `capctl apply` asks the
    daemon, which checks every pod before it changes anything)."""

    method: Literal["apply"] = "apply"
    team: PodName
    pods: list[TeamPod] = Field(min_length=1)
    prune: bool = False
    """Delete the team's pods that `pods` does not list."""
    dry_run: bool = False
    """Only say what would be done."""


class Down(Request):
    """§16: bring the team down (an addition: `capctl down` asks the daemon, which keeps
    the team's pods from starting turns of their own while it drains them)."""

    method: Literal["down"] = "down"
    team: PodName
    drain_timeout_s: float = Field(default=30.0, ge=0, le=86400)


DaemonRequest = Annotated[
    Spawn
    | ListPods
    | Stop
    | Start
    | Restart
    | Delete
    | Info
    | Shutdown
    | DaemonSubscribe
    | Overview
    | Metrics
    | Diff
    | Apply
    | Down,
    Field(discriminator="method"),
]


class RequestParser:
    """Turns a decoded frame into a typed request, or a ProtocolError carrying the id."""

    def __init__(self, union: Any) -> None:
        self._adapter: TypeAdapter[Any] = TypeAdapter(union)
        choices = union.__origin__.__args__ if hasattr(union, "__origin__") else ()
        self.models: dict[str, type[Request]] = {
            m: model for model in choices for m in model.model_fields["method"].annotation.__args__
        }
        self.methods = frozenset(self.models)

    def parse(self, frame: dict[str, Any]) -> Request:
        method = frame.get("method")
        if not isinstance(method, str):
            raise ProtocolError("invalid_request", "request needs a string field 'method'")
        if method not in self.methods:
            known = ", ".join(sorted(self.methods))
            raise ProtocolError("unknown_method", f"unknown method {method!r}; known: {known}")
        try:
            return self._adapter.validate_python(frame)
        except ValidationError as exc:
            raise ProtocolError(
                "invalid_request", describe_validation_error(exc, skip=1, root="request")
            ) from None


def describe_validation_error(exc: ValidationError, skip: int = 0, root: str = "value") -> str:
    """One line naming each bad field, e.g. `text: Field required; if_busy: Input should be ...`.
    `skip` drops leading location parts (a union's tag); `root` names the whole object."""
    errors = exc.errors(include_url=False)
    parts = []
    for err in errors[:MAX_DESCRIBED_ERRORS]:
        loc = ".".join(_printable(str(p)) for p in err["loc"][skip:])
        parts.append(f"{loc or root}: {err['msg']}")
    if len(errors) > MAX_DESCRIBED_ERRORS:
        parts.append(f"and {len(errors) - MAX_DESCRIBED_ERRORS} more")
    return "; ".join(parts)


def _printable(name: str) -> str:
    """A field name as it can appear in a one-line message (control characters escaped)."""
    return name if name.isprintable() else repr(name)


def request_id(frame: dict[str, Any]) -> RequestId | None:
    """The frame's id when it is readable (a string or an integer), to echo in errors."""
    rid = frame.get("id")
    if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
        return rid
    return None


POD_REQUESTS = RequestParser(PodRequest)
DAEMON_REQUESTS = RequestParser(DaemonRequest)
