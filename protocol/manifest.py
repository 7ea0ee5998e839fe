"""The pod manifest (docs/protocol.md, Manifest): a YAML file, or the same object as JSON
in `spawn`."""

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from protocol.names import ToolName, mcp_server_of
from protocol.paths import POD_NAME_PATTERN

ProviderName = Literal["openai", "anthropic", "scripted"]
TOOL_CHOICES = ("auto", "required", "none")
"""`model.tool_choice` values that are not a tool's name."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ScriptedToolCall(_Strict):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


class ScriptedStep(_Strict):
    """One canned model response of the `scripted` provider.

    `text` streams in pieces of `chunk_chars` characters, `delay_ms` apart; then the tool
    calls are returned. `error` makes the call fail instead (`retryable` decides whether the
    agent loop retries it), which lets tests and demos show failures without a network.
    """

    text: str = ""
    thinking: str = ""
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list)
    chunk_chars: int = Field(default=16, ge=1)
    delay_ms: float = Field(default=0.0, ge=0)
    error: str | None = None
    retryable: bool = False


class Price(_Strict):
    """List prices in dollars per million tokens (§11); input counts cached prompt tokens
    at the input price."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)


class Budget(_Strict):
    """What a pod and all its descendants may spend (§11); an unset field is no limit."""

    tokens: int | None = Field(default=None, ge=0)
    usd: float | None = Field(default=None, ge=0)


def _host_path(path: str) -> str:
    if not (path.startswith("/") or path == "~" or path.startswith("~/")):
        raise ValueError(f"{path!r} must be an absolute path (or start with ~/)")
    return path


HostPath = Annotated[str, Field(min_length=1), AfterValidator(_host_path)]
"""An absolute path, or one under the home directory of capd's user (`~/...`)."""


_BAD_IN_BRANCH = re.compile(r"\.\.|@\{|//|/\.|\.lock/|[\x00-\x20\x7f~^:?*\[\\]")


def _branch_name(name: str) -> str:
    """Refuse what `git check-ref-format --branch` refuses, without running git."""
    if (
        _BAD_IN_BRANCH.search(name)
        or name.startswith(("-", "/", "."))
        or name.endswith(("/", ".", ".lock"))
        or name == "@"
    ):
        raise ValueError(f"{name!r} is not a valid git branch name")
    return name


BranchName = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_branch_name)]


class GitWorkspace(_Strict):
    """§16: the pod's cwd is a work tree of `repo` on a branch of its own."""

    repo: HostPath
    """The repository (its top level, or any directory inside it; resolved at spawn)."""
    base: str | None = Field(default=None, min_length=1, max_length=256)
    """What the new branch starts from (a branch, tag or commit); the repo's HEAD when unset."""
    branch: BranchName | None = None
    """The pod's branch; `capd/<pod>` when unset. An existing branch is reused as it is."""


class Workspace(_Strict):
    """The pod's cwd as capd keeps it (§11)."""

    git: GitWorkspace | None = None
    """§16: give the pod a work tree of a git repository as its cwd."""

    checkpoints: bool = True
    """Snapshot the cwd's files at each turn start, so `rewind` can restore them."""
    checkpoint_timeout_s: float = Field(default=30.0, gt=0)
    """A checkpoint that takes longer is skipped (`checkpoint_skipped`), never the turn
    (an addition)."""
    checkpoint_max_mb: int = Field(default=1024, ge=1)
    """A checkpoint that would store more new data than this is skipped (an addition)."""
    checkpoint_max_files: int = Field(default=200_000, ge=1)
    """A cwd with more files than this is not checkpointed (an addition)."""
    checkpoint_file_max_mb: int = Field(default=100, ge=1)
    """Files larger than this are left out of checkpoints, and a rewind leaves them as
    they are (an addition)."""


PROVIDER_KEY_ENV: dict[str, str] = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
"""The variable a provider reads its key from when `api_key_env` is unset (the providers'
DEFAULT_KEY_ENV)."""


class ModelConfig(_Strict):
    provider: ProviderName
    name: str = ""
    base_url: str | None = None
    api_key_env: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    context_window: int | None = Field(default=None, ge=1)
    """Tokens the model accepts (§10); unset: a well-known model's, else learned from the
    provider's first overflow error."""
    temperature: float | None = Field(default=None, ge=0, le=2)
    request_timeout_s: float | None = Field(default=None, gt=0)
    max_retries: int = Field(default=4, ge=0, le=20)
    thinking_budget_tokens: int | None = Field(default=None, ge=1024)
    """anthropic: turns on extended thinking with this budget (an addition)."""
    tool_choice: str | None = Field(default=None, min_length=1)
    """`auto`, `required`, `none` or the name of a tool, sent with the first model call of
    each turn only (an addition): small local models may need a tool forced to start a
    tool loop, and forcing every call would never let the loop end."""
    script: list[ScriptedStep] = Field(default_factory=list)
    price: Price | None = None
    """Makes dollar figures possible (§11); unset: a known model's list price, if any."""

    @model_validator(mode="after")
    def _thinking_fits(self) -> "ModelConfig":
        budget = self.thinking_budget_tokens
        if budget is not None and self.provider != "anthropic":
            raise ValueError("thinking_budget_tokens is for provider anthropic only")
        if budget is not None and self.max_tokens is not None and budget >= self.max_tokens:
            raise ValueError(
                "thinking_budget_tokens must be less than max_tokens, which counts the thinking"
            )
        if budget is not None and self.tool_choice not in (None, "auto", "none"):
            raise ValueError("with thinking_budget_tokens, tool_choice may only be auto or none")
        return self


class Limits(_Strict):
    max_steps: int = Field(default=50, ge=1)
    turn_timeout_s: float = Field(default=1800, gt=0)
    max_children: int = Field(default=8, ge=0)
    max_depth: int = Field(default=3, ge=0)
    """How many levels of descendants a pod may have below it (an addition)."""
    max_continuations: int = Field(default=3, ge=0)
    """How many replies cut off by max_tokens in a row the builtin engine continues (§10)."""
    compact_at: float = Field(default=0.8, gt=0, le=1)
    """Compact before a call would fill more than this share of the context window (§10)."""
    mcp_startup_timeout_s: float = Field(default=60.0, gt=0)
    """How long an MCP server has to start and list its tools, else it is restarted with
    backoff (an addition)."""
    mcp_call_timeout_s: float = Field(default=120.0, gt=0)
    """How long an MCP tool call may take, then it is cancelled and the model reads an
    error (an addition)."""
    memory_mb: int | None = Field(default=None, ge=16)
    """§13: memory of all the pod's processes together (each tool call, MCP server and
    engine process on its own when capd falls back to rlimits); unset: unbounded."""
    pids: int | None = Field(default=None, ge=8)
    """§13: processes and threads of all the pod's processes together; unset: unbounded."""
    engine_idle_s: float | None = Field(default=600.0, gt=0)
    """§16: an external engine's process idle this long is stopped, and started again with
    its session at the next turn; null: never (an addition)."""


SandboxMode = Literal["workspace-write", "read-only", "off"]
DEFAULT_SANDBOX_ENV = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TERM",
    "TZ",
    "USER",
    "LOGNAME",
)
"""The variables of capd's environment a pod's processes see when `sandbox.env` is unset."""


EnvName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]


class Sandbox(_Strict):
    """§13: how a pod's processes are confined."""

    mode: SandboxMode = "workspace-write"
    """`workspace-write`: read-only but the cwd, `writable` and a private /tmp; `read-only`:
    the cwd too is read-only; `off`: no confinement."""
    network: bool = True
    """false: no network, only Unix sockets whose path the sandbox shows."""
    writable: list[HostPath] = Field(default_factory=list)
    """More writable paths, besides the cwd."""
    env: list[EnvName] | None = None
    """Variables of capd's environment passed on; unset: DEFAULT_SANDBOX_ENV. Never the
    model's key: `model.api_key_env`, else the provider's (PROVIDER_KEY_ENV)."""
    hidden: list[HostPath] = Field(default_factory=list)
    """More paths the pod's processes cannot see, e.g. `~/.ssh` (an addition; capd's state
    and runtime directories are always hidden)."""


PermissionAction = Literal["allow", "ask", "deny"]


class PermissionRule(_Strict):
    tool: str = Field(min_length=1)
    """A tool's name or a glob (`mcp__*`, `mcp__git__*`)."""
    match: str | None = Field(default=None, min_length=1)
    """A glob against the bash command, or against the call's arguments as compact JSON
    with sorted keys for other tools; unset: every call of the tool."""
    action: PermissionAction


class Permissions(_Strict):
    """§13: which builtin and MCP tool calls run, are asked about, or are refused. The first
    rule that matches decides; when none does, `default`."""

    default: PermissionAction = "allow"
    rules: list[PermissionRule] = Field(default_factory=list)


MCP_SERVER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$"


def _one_part(name: str) -> str:
    if "__" in name or name.endswith("_"):
        raise ValueError(f"MCP server name {name!r} may not contain '__' or end with '_'")
    return name


McpServerName = Annotated[str, Field(pattern=MCP_SERVER_NAME_PATTERN), AfterValidator(_one_part)]
"""A server's name, the middle of its tools' names `mcp__<server>__<tool>`: without `__`
and a trailing `_`, so the three parts stay apart, and short, so tool names fit
providers' 64 characters."""


class McpStdioServer(_Strict):
    """An MCP server capd runs as one of the pod's processes, speaking over its stdio (§12)."""

    type: Literal["stdio"] = "stdio"
    """Optional, as in Claude Code's `.mcp.json` (an addition)."""
    command: str = Field(min_length=1)
    """An executable: a name with a `/` is taken relative to the pod's cwd, a bare name is
    looked up on PATH."""
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    """Set over capd's environment; `${VAR}` in a value reads capd's environment."""


class McpHttpServer(_Strict):
    """An MCP server reached over Streamable HTTP (§12)."""

    type: Literal["http"] = "http"
    """Optional, as in Claude Code's `.mcp.json` (an addition)."""
    url: str = Field(pattern=r"^https?://[^\s]+$")
    headers: dict[str, str] = Field(default_factory=dict)
    """Sent with every request; `${VAR}` in a value reads capd's environment."""


def _mcp_server_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "http" if "url" in value or value.get("type") == "http" else "stdio"
    return "http" if isinstance(value, McpHttpServer) else "stdio"


McpServerConfig = Annotated[
    Annotated[McpStdioServer, Tag("stdio")] | Annotated[McpHttpServer, Tag("http")],
    Discriminator(_mcp_server_kind),
]


class BuiltinEngine(_Strict):
    """capd's own agent loop: `model` calls, the manifest's `tools`."""

    kind: Literal["builtin"] = "builtin"


class _EngineProcess(_Strict):
    env: dict[str, str] = Field(default_factory=dict)
    """Set in the engine's environment, over capd's own."""
    settle_timeout_s: float = Field(10.0, gt=0)
    """How long an interrupted engine has to wind its turn down before it is restarted."""


class AcpEngine(_EngineProcess):
    """An Agent Client Protocol agent, JSON-RPC 2.0 over its stdin and stdout."""

    kind: Literal["acp"]
    command: list[str] = Field(min_length=1)
    permission: Literal["allow", "deny", "ask"] = "deny"
    """How `session/request_permission` is answered; `ask` asks the pod's clients."""


class ClaudeCodeEngine(_EngineProcess):
    """Claude Code in headless stream-json mode, one long-lived process per pod."""

    kind: Literal["claude-code"]
    command: list[str] = Field(default_factory=lambda: ["claude"], min_length=1)
    args: list[str] = Field(default_factory=list)
    """Extra command-line arguments, e.g. `["--allowedTools", "Bash Read"]`."""
    model: str | None = None
    """Passed as `--model`."""
    permission_mode: str | None = None
    """Passed as `--permission-mode` (default, acceptEdits, plan, bypassPermissions, ...)."""


EngineConfig = Annotated[BuiltinEngine | AcpEngine | ClaudeCodeEngine, Field(discriminator="kind")]


class Manifest(_Strict):
    name: str = Field(pattern=POD_NAME_PATTERN)
    model: ModelConfig | None = None
    """Required by the builtin engine; external engines bring their own model."""
    engine: EngineConfig = Field(default_factory=BuiltinEngine)
    """What runs the pod's turns (an addition)."""
    system_prompt: str = ""
    cwd: str | None = None
    tools: list[ToolName] = Field(default_factory=list)
    limits: Limits = Field(default_factory=Limits)
    workspace: Workspace = Field(default_factory=Workspace)
    budget: Budget | None = None
    mcp_servers: dict[McpServerName, McpServerConfig] = Field(default_factory=dict)
    """§12: the MCP servers whose tools the pod is offered, by name."""
    sandbox: Sandbox = Field(default_factory=Sandbox)
    """§13: the confinement of every process the pod starts."""
    permissions: Permissions = Field(default_factory=Permissions)
    """§13: approvals of builtin and MCP tool calls (builtin engine only)."""

    @model_validator(mode="after")
    def _fits_engine(self) -> "Manifest":
        kind = self.engine.kind
        if kind == "builtin" and self.model is None:
            raise ValueError("model is required (engine builtin runs capd's own agent loop)")
        if kind != "builtin" and self.model is not None:
            raise ValueError(f"engine {kind} brings its own model; leave model out")
        if kind != "builtin" and self.tools:
            raise ValueError(f"engine {kind} brings its own tools; leave tools out")
        if kind != "builtin" and self.permissions != Permissions():
            raise ValueError(
                f"engine {kind} asks about its own tools (its permission settings); "
                "leave permissions out"
            )
        if kind != "builtin" and not self.sandbox.network and self.sandbox.mode != "off":
            raise ValueError(
                f"engine {kind} needs the network to reach its model; "
                "set sandbox.network: true (and confine it with its own settings)"
            )
        if self.model is not None and self.sandbox.env is not None:
            named = self.model.api_key_env
            key = named or PROVIDER_KEY_ENV.get(self.model.provider)
            if key in self.sandbox.env:
                whose = "the model's api_key_env" if named else f"{self.model.provider}'s key"
                raise ValueError(
                    f"sandbox.env lists {key}, {whose}; "
                    "capd never passes its API keys to a pod's processes"
                )
        return self

    @model_validator(mode="after")
    def _tool_choice_is_offered(self) -> "Manifest":
        choice = self.model.tool_choice if self.model else None
        if choice is None or choice in TOOL_CHOICES or choice in self.tools:
            return self
        if mcp_server_of(choice) not in self.mcp_servers:
            raise ValueError(
                f"model.tool_choice {choice!r} is neither auto, required, none, one of tools "
                "nor mcp__<server>__<tool> of one of mcp_servers"
            )
        return self


def stored_field(stored: str, key: str) -> Any:
    """One top-level field of a stored manifest's JSON, read without validating the rest
    (what reads every pod's pays for one field only); None when it is absent or the JSON
    is not an object."""
    try:
        return orjson.loads(stored).get(key)
    except (ValueError, AttributeError):
        return None
