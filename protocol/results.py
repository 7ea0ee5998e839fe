"""The `result` objects of acks, one model per method that returns more than `{}`."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.events import BudgetLimits, EngineState, PodActivity, PodStatusName, Spent, Usage
from protocol.manifest import SandboxMode


class Result(BaseModel):
    model_config = ConfigDict(extra="ignore")


class RunResult(Result):
    turn_id: str
    queued: bool = False


class NotifyResult(Result):
    buffered: int
    turn_id: str | None = None


class OpenPermission(Result):
    """A `permission_request` still waiting for its answer (an addition), as the event
    gave it."""

    request_id: str
    turn_id: str
    tool_call: dict[str, Any] = Field(default_factory=dict)
    options: list[dict[str, Any]] = Field(default_factory=list)


class ContextSize(Result):
    """`status.context` (§10): `tokens`, the size of the context the next model call
    sends (the provider's count for the last call plus an estimate for what came since,
    or an estimate before any call); `window`, the model's context window, null while
    unknown."""

    tokens: int = 0
    window: int | None = None


class McpServerState(Result):
    """`status.mcp` (§12): one of the pod's MCP servers as capd sees it now."""

    name: str
    state: Literal["starting", "ready", "failed"]
    tools: int = 0
    """How many tools it offers."""
    error: str | None = None
    """Why it is not ready (failed), or why it was last restarted."""
    transport: Literal["stdio", "http"] = "stdio"
    """An addition."""
    pid: int | None = None
    """A stdio server's process while it runs (an addition)."""
    restarts: int = 0
    """How many times capd started it again after a failure (an addition)."""
    managed_by: Literal["capd", "engine"] = "capd"
    """`engine`: an external engine runs the server; capd only handed it over, and `state`
    says whether the engine took it (an addition)."""


class SandboxState(Result):
    """`status.sandbox` (§13): the confinement in force for the pod's processes."""

    mode: SandboxMode
    network: bool
    backend: Literal["bwrap", "none"]
    """`none` only with mode `off`: a pod whose sandbox cannot be set up is refused."""
    limits: Literal["cgroup2", "cgroup1", "rlimit", "none"] = "none"
    """How limits.memory_mb and limits.pids are enforced (an addition): cgroup v2, cgroup v1
    (hosts whose memory and pids controllers are still on v1), per-process rlimits, or
    not at all (neither is set)."""
    writable: list[str] = Field(default_factory=list)
    """The writable paths besides /tmp, resolved, the cwd first (an addition)."""


class WorkspaceState(Result):
    """`status.workspace` (§16): the pod's work tree of a git repository."""

    repo: str
    branch: str
    base: str
    """`workspace.git.base` as given, or the commit it resolved to when it was unset."""
    path: str = ""
    """The work tree (the pod's cwd; an addition)."""
    base_commit: str = ""
    """The commit the branch started from (an addition)."""
    sync_error: str | None = None
    """Why capd could not bring the repository's branch up to date after the last turn
    (an addition; null when it is)."""


class PodStatus(Result):
    name: str
    status: PodStatusName
    turn_id: str | None = None
    queued: int = 0
    last_seq: int = 0
    parent: str | None = None
    children: list[str] = Field(default_factory=list)
    model: str
    cwd: str
    tools: list[str] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    context: ContextSize = Field(default_factory=ContextSize)
    socket: str = ""
    permissions: list[OpenPermission] = Field(default_factory=list)
    """The engine's questions waiting for a `permission` answer (an addition); while there
    are any, a running turn waits for them."""
    budget: BudgetLimits = Field(default_factory=BudgetLimits)
    """§11: the pod's own budget, for its whole subtree."""
    spent: Spent = Field(default_factory=Spent)
    """§11: what the pod and all its descendants have spent."""
    mcp: list[McpServerState] = Field(default_factory=list)
    """§12: the pod's MCP servers, in the manifest's order."""
    sandbox: SandboxState | None = None
    """§13: set for every pod a daemon hosts."""
    team: str | None = None
    """§16: the team that `apply` made the pod for."""
    workspace: WorkspaceState | None = None
    """§16: set when the pod has a `workspace.git` work tree."""
    engine: EngineState | None = None
    """§16: the external engine's process; null for the builtin engine."""
    node: str = ""
    """§15: the node hosting the pod."""


class SetBudgetResult(Result):
    budget: BudgetLimits


class SubscribeResult(Result):
    last_seq: int


class HistoryResult(Result):
    events: list[dict[str, Any]]
    last_seq: int


class SpawnResult(Result):
    name: str
    socket: str
    cwd: str | None = None
    """The pod's working directory, resolved (an addition)."""


class ReconfigureResult(Result):
    changed: list[str]


class OverviewResult(Result):
    pods: list[PodActivity]


class MetricsResult(Result):
    text: str


class DiffResult(Result):
    repo: str
    branch: str
    base: str
    merge_base: str
    """The commit the diff is taken against."""
    text: str
    """What `git diff` prints: the patch, or the `--stat` summary."""


PlanAction = Literal["spawn", "start", "reconfigure", "deferred", "delete", "unchanged"]


class PlanStep(Result):
    pod: str
    action: PlanAction
    changed: list[str] = Field(default_factory=list)
    """The manifest fields a `reconfigure` or `deferred` step changes."""
    note: str | None = None


class ApplyResult(Result):
    plan: list[PlanStep]
    """In the order the steps run (or would run, with `dry_run`)."""
    done: bool
    """False for a `dry_run`."""


class DownOutcome(Result):
    pod: str
    outcome: Literal["finished", "paused", "stopped"]
    """`finished`: its turn ended within the drain timeout; `paused`: it was paused and
    keeps its turn; `stopped`: it had no turn."""


class DownResult(Result):
    pods: list[DownOutcome]


class PodListEntry(Result):
    name: str
    status: Literal["idle", "running", "paused", "stopped"]
    parent: str | None = None
    socket: str | None
    """The pod's socket; §15: null for a pod hosted on another node."""
    error: str | None = None
    """Why a pod that should be up is not (an addition): it could not be restored."""
    spent: Spent = Field(default_factory=Spent)
    """What the pod and its descendants have spent (an addition)."""
    team: str | None = None
    """§16: the pod's team."""
    engine: EngineState | None = None
    """§16: as in `status` (an addition); null for the builtin engine and a stopped pod."""
    node: str | None = None
    """§15: the node hosting the pod (null for a stopped pod no node holds)."""


class ListResult(Result):
    pods: list[PodListEntry]


class SandboxBackend(Result):
    """`info.sandbox` (an addition): the bwrap binary that confines pods, or why none can."""

    path: str | None = None
    """The binary in use; null when none works here."""
    version: str | None = None
    """What `bwrap --version` says."""
    error: str | None = None
    """When none works: the line a spawn with a sandbox is refused with."""
    failures: list[str] = Field(default_factory=list)
    """Each candidate tried before (`<path>: <first line of its stderr>`)."""


class FleetNode(Result):
    """§15: one node of the fleet, as `info.fleet` lists it."""

    node: str
    pods: int
    """The pods it hosts now."""
    last_seen: float
    """When it last renewed its leases (Unix seconds)."""


class InfoResult(Result):
    version: str
    pid: int
    uptime_s: float
    pods: int
    runtime_dir: str
    state_dir: str
    sandbox: SandboxBackend | None = None
    metrics_listen: str | None = None
    """`host:port` where `--metrics-listen` serves /metrics, as bound (an addition)."""
    node: str = ""
    """§15: this node's name (`capd --node`)."""
    fleet: list[FleetNode] = Field(default_factory=list)
    """§15: every node of the fleet, this one included; one entry without a fleet."""
