"""Claude Code as a pod's engine: `claude -p` in stream-json mode, one process per pod.

In: `{"type":"user","message":{"role":"user","content":...}}` per prompt, and
`control_request {subtype: interrupt}` to stop a turn. Out: `system` (`init` carries the
session id), `stream_event` (the API's raw stream events, for the deltas), `assistant`
(complete content blocks of one API message), `user` (tool_result blocks), `result` (the
end of the prompt's turn) and `control_response`. Messages of subagents (those with a
`parent_tool_use_id`) are the subagent's own steps and are not recorded.

A step is what one API message asked for: its text, thinking and tool_use blocks become
one `assistant_message` when the message stops streaming (or, should no stream event say
so, when the next message starts, a tool result arrives or the turn ends). Its usage is
what the message's stream events report (message_start, then message_delta's totals); the
`assistant` messages only repeat message_start's. An interrupt is acknowledged with a
`control_response` and ends the CLI's turn with a `result`; the next prompt waits for
both. A `--resume` the CLI refuses (an error `result` before any `init`) replaces the
session (`ExternalEngine._session_lost`).

Compaction. Claude Code compacts its own session: automatically, before an API call that
would pass its threshold, or when sent `/compact [instructions]` as a prompt (a local
command it runs in print mode too). It says so with `system` `status: "compacting"` (a
`compaction_started`), then a `compact_boundary` (`compact_metadata.trigger` "auto" or
"manual", `pre_tokens`, `post_tokens`), then the summary as a `user` message flagged
`isSynthetic`. capd records each as a `context_compacted` through the last message before
it. Its auto compaction keeps the latest messages verbatim after the summary
(`compact_metadata.preserved_messages`, by Claude Code's own message ids, which capd does
not know): the record counts them as summarised. The manifest's `limits.compact_at`
reaches it as CLAUDE_AUTOCOMPACT_PCT_OVERRIDE (a percentage of the window less the reply's
room; Claude Code only ever lowers its own threshold with it), unless `engine.env` sets it.
A compaction that begins while an interrupted turn winds down is not recorded.

MCP servers. The manifest's go in `--mcp-config` (with `--strict-mcp-config`, so the pod
gets exactly its own), `${VAR}`s left for the CLI to expand (`capd.engines.mcp_handover`);
each `init` says how each one is doing (`status.mcp`).
"""

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from capd.engines.base import CompactOrder, Engine, Turn, TurnHost, TurnOutcome, never_asks
from capd.engines.mcp_handover import claude_code_config
from capd.engines.process import EngineDied, ExternalEngine
from capd.engines.slots import EngineSlot
from capd.proc.launcher import environment
from capd.proc.limits import PodLimits
from capd.proc.sandbox import Confinement, SandboxRefused
from capd.tools.mcp.secrets import referenced
from protocol.errors import ProtocolError
from protocol.events import (
    AssistantMessage,
    CompactionStarted,
    CompactionTrigger,
    ContextCompacted,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    ToolCallStart,
    ToolResult,
    Usage,
)
from protocol.framing import within_bounds
from protocol.manifest import ClaudeCodeEngine as ClaudeCodeConfig
from protocol.manifest import Manifest, McpServerConfig, McpStdioServer

log = logging.getLogger(__name__)

STREAM_JSON_ARGS = (
    "-p",
    "--input-format",
    "stream-json",
    "--output-format",
    "stream-json",
    "--verbose",
    "--include-partial-messages",
)
LIMIT_SUBTYPES = frozenset({"error_max_turns", "error_max_budget_usd"})
NO_SESSION = "No conversation found"
"""How the CLI says that the session given to --resume does not exist."""
COMPACT_COMMAND = "compact"
AUTOCOMPACT_PCT = "CLAUDE_AUTOCOMPACT_PCT_OVERRIDE"
SUMMARY_KEPT = (
    "(Claude Code compacted its session and keeps the summary there; it did not show it.)"
)
"""The summary recorded when the CLI's stream carries none."""


@dataclass(frozen=True, slots=True)
class _Boundary:
    """A compaction the CLI reported (`compact_boundary`), its summary yet to come."""

    trigger: CompactionTrigger
    tokens_before: int
    tokens_after: int


@dataclass
class _Step:
    message_id: str = ""
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    thinking: list[ThinkingBlock] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)


@dataclass
class _TurnState:
    step: _Step = field(default_factory=_Step)
    partial: str = ""
    """Text streamed for a block whose `assistant` message has not come yet."""
    streamed: set[str] = field(default_factory=set)
    """Ids of the API messages whose deltas came as stream events."""
    block_calls: dict[int, str] = field(default_factory=dict)
    """Tool-use ids by content block index, in the message streaming now."""
    names: dict[str, str] = field(default_factory=dict)
    """Tool names by tool-use id."""
    usage: dict[str, Usage] = field(default_factory=dict)
    """Usage by API message id, as the stream events report it."""
    streaming: str = ""
    """The id of the API message streaming now."""
    recorded: set[str] = field(default_factory=set)
    """Ids of the API messages whose step (and so usage) is recorded."""
    compacting: bool = False
    """The CLI said it is compacting (`compaction_started` sent)."""
    boundary: _Boundary | None = None
    """A compaction reported and not yet recorded: the next message may be its summary."""


class ClaudeCodeEngine(ExternalEngine):
    kind = "claude-code"
    can_compact = True

    def __init__(
        self,
        config: ClaudeCodeConfig,
        manifest: Manifest,
        sandbox: Confinement | None,
        pod_limits: PodLimits | None = None,
        slot: EngineSlot | None = None,
    ) -> None:
        assert manifest.cwd is not None
        super().__init__(
            Path(manifest.cwd), config, manifest.mcp_servers, sandbox, pod_limits, slot
        )
        self._env = {AUTOCOMPACT_PCT: f"{manifest.limits.compact_at * 100:g}", **config.env}
        if sandbox is not None:
            # Claude Code expands its servers' ${VAR}s itself: it gets those capd has,
            # as it would unconfined, whatever sandbox.env lists.
            self._env = {**_referenced(manifest.mcp_servers.values()), **self._env}
        self._mcp_config, self._mcp_left_out = claude_code_config(
            self._mcp.servers, environment(self._env)
        )
        """`--mcp-config`'s JSON, and the servers that cannot be handed over (name: why)."""
        self._mcp.starting(self._mcp_left_out)  # those show failed from the start
        self._config = config
        self._system_prompt = manifest.system_prompt
        self._resuming = False
        """This process was started with --resume and has said nothing yet."""
        self._request_ids = itertools.count(1)
        self._busy = False
        """Whether the CLI is working on a prompt (sent, its `result` not yet read)."""
        self._commands: frozenset[str] | None = None
        """The slash commands the CLI's latest `init` listed (None before any)."""
        self._cost_counted = 0.0
        """The process's running `total_cost_usd` as far as it has been recorded."""

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        raise never_asks(self.kind)

    def _working(self) -> bool:
        return self._busy

    def take_over(self, old: Engine) -> None:
        """Only the session (ExternalEngine's): the CLI's running total starts anew with
        each process, as this engine's count of it does."""
        super().take_over(old)

    async def _start(self, host: TurnHost, turn: Turn | None) -> None:
        config = self._config
        argv = [*config.command, *STREAM_JSON_ARGS]
        if config.model:
            argv += ["--model", config.model]
        argv += ["--max-turns", str(host.manifest.limits.max_steps)]
        if config.permission_mode:
            argv += ["--permission-mode", config.permission_mode]
        if self._system_prompt:
            argv += ["--append-system-prompt", self._system_prompt]
        if self._mcp.servers:
            argv += ["--mcp-config", self._mcp_config, "--strict-mcp-config"]
            self._mcp.starting(self._mcp_left_out)
        self._session_id = self._session_to_resume(host)
        self._resuming = self._session_id is not None
        self._fresh = not self._resuming
        if self._session_id:
            argv += ["--resume", self._session_id]
        await self._spawn([*argv, *config.args])
        self._busy = False
        self._cost_counted = 0.0

    async def compact(self, host: TurnHost, order: CompactOrder) -> None:
        """Send `/compact [instructions]` as the session's next prompt (resuming the
        session first if the CLI is not running) and record the compaction it reports.
        What the CLI says instead of compacting ("No messages to compact", "/compact isn't
        available in this environment.") is refused as invalid_request; a compaction that
        fails is a provider_error."""
        await self._settle()
        if self._proc is None and self._session_to_resume(host) is None:
            raise ProtocolError(
                "invalid_request", "claude-code has no session to compact yet; run a turn first"
            )
        if self._commands is not None and COMPACT_COMMAND not in self._commands:
            raise ProtocolError(
                "invalid_request",
                "claude-code offers no /compact in this session (DISABLE_COMPACT or "
                "--disable-slash-commands)",
            )
        state = _TurnState()
        try:
            if self._proc is None:
                await self._start_or_discard(host, None)
            command = f"/{COMPACT_COMMAND} {order.instructions or ''}".rstrip()
            self._send_prompt(command)
            await self._read_compaction(host, state)
        except EngineDied as exc:
            await self._discard()
            raise ProtocolError(
                "provider_error", f"claude-code engine died while compacting: {exc}"
            ) from None
        except asyncio.CancelledError:
            if self._busy:
                self._interrupt()
            raise
        finally:
            self._touch()

    async def _read_compaction(self, host: TurnHost, state: _TurnState) -> None:
        turn_id = host.turn.turn_id if host.turn is not None else None
        said, failed, recorded = "", "", False
        while True:
            message = await self._next_message()
            if message.get("parent_tool_use_id"):
                continue
            if state.boundary is not None:
                summary = _summary(message)
                self._record_compaction(host, turn_id, state, summary)
                recorded = True
                if summary is not None:
                    continue
            match message.get("type"), message.get("subtype"):
                case "system", "init":
                    self._init(message)
                    self._record_session(host, host.turn)
                case "system", "status":
                    failed = str(message.get("compact_error") or failed)
                    self._compacting(host, turn_id, state, message, "request")
                case "system", "compact_boundary":
                    state.boundary = _boundary(message)
                case "assistant", _:
                    said = _text(message.get("message") or {}) or said
                case "result", _:
                    self._busy = False
                    self._note_session(message.get("session_id"))
                    self._record_session(host, host.turn)
                    if recorded:
                        return
                    if failed or message.get("is_error"):
                        reason = failed or _error_text(message)
                        raise ProtocolError("provider_error", f"claude-code compaction: {reason}")
                    reason = said or str(message.get("result") or "") or "it gave no reason"
                    raise ProtocolError("invalid_request", f"claude-code did not compact: {reason}")

    def _init(self, message: dict[str, Any]) -> None:
        self._note_session(message.get("session_id"))
        commands = message.get("slash_commands")
        if isinstance(commands, list):
            self._commands = frozenset(str(c).removeprefix("/") for c in commands)

    def _compacting(
        self,
        host: TurnHost,
        turn_id: str | None,
        state: _TurnState,
        status: dict[str, Any],
        trigger: CompactionTrigger,
    ) -> None:
        """A `status` message: the first "compacting" one of a compaction starts it."""
        compacting = status.get("status") == "compacting"
        if compacting and not state.compacting:
            host.emit_ephemeral(CompactionStarted(turn_id=turn_id, trigger=trigger))
        state.compacting = compacting

    def _record_compaction(
        self, host: TurnHost, turn_id: str | None, state: _TurnState, summary: str | None
    ) -> None:
        """Record the reported compaction through the last message so far; the session
        has been given everything up to there."""
        boundary, state.boundary = state.boundary, None
        assert boundary is not None
        through = host.context.last_message_seq()
        host.commit_compaction(
            ContextCompacted(
                turn_id=turn_id,
                trigger=boundary.trigger,
                summary=summary or SUMMARY_KEPT,
                through_seq=through,
                tokens_before=boundary.tokens_before,
                tokens_after=boundary.tokens_after,
            )
        )
        self._sent = through

    def _send_prompt(self, prompt: str) -> None:
        # A CLI that has exited already is left to `_read_turn`, which reads what it said
        # before it died (such as why it could not resume its session) and then its death.
        with contextlib.suppress(EngineDied):
            self._send({"type": "user", "message": {"role": "user", "content": prompt}})
        self._busy = True

    async def _read_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        state = _TurnState()
        try:
            while True:
                message = await self._next_message()
                if message.get("parent_tool_use_id"):
                    continue
                self._answered = True
                outcome = self._apply(host, turn, state, message)
                if outcome is not None:
                    return outcome
        except EngineDied:
            self._flush(host, turn, state)
            raise
        except asyncio.CancelledError:
            self._flush(host, turn, state)
            self._record_cut_short(host, turn, state)
            if self._busy:
                self._interrupt(lambda late: self._record_late_message(host, turn, state, late))
            raise

    def _apply(
        self, host: TurnHost, turn: Turn, state: _TurnState, message: dict[str, Any]
    ) -> TurnOutcome | None:
        if state.boundary is not None:
            summary = _summary(message)
            self._record_compaction(host, turn.turn_id, state, summary)
            if summary is not None:
                return None
        match message.get("type"):
            case "system" if message.get("subtype") == "init":
                self._init(message)
                self._record_session(host, turn)
            case "system" if message.get("subtype") == "status":
                self._compacting(host, turn.turn_id, state, message, "auto")
            case "system" if message.get("subtype") == "compact_boundary":
                self._flush(host, turn, state)
                state.boundary = _boundary(message)
            case "stream_event":
                self._stream_event(host, turn, state, message.get("event") or {})
            case "assistant":
                self._assistant(host, turn, state, message.get("message") or {})
            case "user":
                for result in self._tool_results(turn, state, message.get("message") or {}):
                    self._flush(host, turn, state)
                    host.emit(result)
            case "result":
                self._busy = False
                self._flush(host, turn, state)
                self._record_cost(host, turn, message.get("total_cost_usd"))
                self._note_session(message.get("session_id"))
                self._record_session(host, turn)
                return _outcome(turn, message)
        return None

    def _stream_event(
        self, host: TurnHost, turn: Turn, state: _TurnState, event: dict[str, Any]
    ) -> None:
        turn_id = turn.turn_id
        match event.get("type"):
            case "message_stop":
                self._flush(host, turn, state)
            case "message_start":
                message = event.get("message") or {}
                state.streaming = str(message.get("id", ""))
                state.streamed.add(state.streaming)
                state.usage[state.streaming] = _usage(message.get("usage"))
                state.block_calls.clear()
            case "message_delta":
                # The `assistant` messages carry message_start's counts (output_tokens 1):
                # the real ones come here, as running totals.
                before = state.usage.get(state.streaming, Usage())
                state.usage[state.streaming] = _usage(event.get("usage"), before)
            case "content_block_start":
                block = event.get("content_block") or {}
                if block.get("type") == "tool_use":
                    call_id, name = str(block.get("id", "")), str(block.get("name", ""))
                    state.block_calls[event.get("index", -1)] = call_id
                    host.emit_ephemeral(ToolCallStart(turn_id=turn_id, call_id=call_id, name=name))
            case "content_block_delta":
                delta = event.get("delta") or {}
                match delta.get("type"):
                    case "text_delta":
                        text = str(delta.get("text", ""))
                        state.partial += text
                        host.emit_ephemeral(TextDelta(turn_id=turn_id, text=text))
                    case "thinking_delta":
                        thinking = str(delta.get("thinking", ""))
                        host.emit_ephemeral(ThinkingDelta(turn_id=turn_id, text=thinking))
                    case "input_json_delta":
                        call_id = state.block_calls.get(event.get("index", -1), "")
                        fragment = str(delta.get("partial_json", ""))
                        host.emit_ephemeral(
                            ToolCallDelta(turn_id=turn_id, call_id=call_id, json=fragment)
                        )

    def _assistant(
        self, host: TurnHost, turn: Turn, state: _TurnState, message: dict[str, Any]
    ) -> None:
        message_id = str(message.get("id", ""))
        if message_id != state.step.message_id:
            self._flush(host, turn, state)
            state.step.message_id = message_id
        step, streamed = state.step, message_id in state.streamed
        state.partial = ""
        for block in message.get("content") or []:
            match block.get("type"):
                case "text":
                    text = str(block.get("text", ""))
                    step.text += text
                    if not streamed:
                        host.emit_ephemeral(TextDelta(turn_id=turn.turn_id, text=text))
                case "thinking":
                    thinking = str(block.get("thinking", ""))
                    signature = str(block.get("signature", ""))
                    step.thinking.append(ThinkingBlock(text=thinking, signature=signature))
                    if not streamed:
                        host.emit_ephemeral(ThinkingDelta(turn_id=turn.turn_id, text=thinking))
                case "tool_use":
                    call = ToolCall(
                        id=str(block.get("id", "")),
                        name=str(block.get("name", "")),
                        arguments=within_bounds(block.get("input") or {}),
                    )
                    step.tool_calls.append(call)
                    state.names[call.id] = call.name
                    if not streamed:
                        host.emit_ephemeral(
                            ToolCallStart(turn_id=turn.turn_id, call_id=call.id, name=call.name)
                        )
        step.usage = _usage(message.get("usage"))

    def _tool_results(
        self, turn: Turn, state: _TurnState, message: dict[str, Any]
    ) -> list[ToolResult]:
        content = message.get("content")
        if not isinstance(content, list):
            return []
        return [
            ToolResult(
                turn_id=turn.turn_id,
                call_id=str(block.get("tool_use_id", "")),
                name=state.names.get(str(block.get("tool_use_id", "")), ""),
                output=_result_text(block.get("content")),
                is_error=bool(block.get("is_error")),
            )
            for block in content
            if block.get("type") == "tool_result"
        ]

    def _flush(self, host: TurnHost, turn: Turn, state: _TurnState) -> None:
        """Record the step so far as an `assistant_message`, if it has anything, and a
        compaction reported since (its summary did not come)."""
        if state.boundary is not None:
            self._record_compaction(host, turn.turn_id, state, None)
        step = state.step
        if step.text or step.tool_calls or step.thinking:
            host.emit(
                AssistantMessage(
                    turn_id=turn.turn_id,
                    text=step.text,
                    tool_calls=step.tool_calls,
                    usage=state.usage.get(step.message_id, step.usage),
                    thinking=step.thinking,
                )
            )
            state.recorded.add(step.message_id)
        state.step = _Step(message_id=step.message_id)

    def _record_cut_short(self, host: TurnHost, turn: Turn, state: _TurnState) -> None:
        """Record what an interrupt cut short: the text streamed so far, with the usage
        the stream reported for its API message (unless its step recorded that already);
        that usage alone if no text came."""
        usage = Usage()
        if state.streaming not in state.recorded:
            usage = state.usage.get(state.streaming, usage)
        if state.partial:
            text = state.partial
            host.emit(
                AssistantMessage(turn_id=turn.turn_id, text=text, interrupted=True, usage=usage)
            )
        elif usage != Usage():
            host.emit(AssistantMessage(turn_id=turn.turn_id, text="", usage=usage))

    def _record_cost(self, host: TurnHost, turn: Turn, total: object) -> None:
        """Record what the CLI's prompts cost since the last record, as a usage-only
        `assistant_message` (no step). `total_cost_usd` is the process's running total (a
        /compact's, or an interrupted turn's, is in the next one); a new process starts
        from 0."""
        if not isinstance(total, int | float) or total <= self._cost_counted:
            return
        cost, self._cost_counted = total - self._cost_counted, float(total)
        host.emit(AssistantMessage(turn_id=turn.turn_id, text="", usage=Usage(cost_usd=cost)))

    def _interrupt(self, record: Callable[[dict[str, Any]], None] | None = None) -> None:
        """Send an interrupt, then read until the CLI has stopped (`_wind_down`)."""
        request_id = f"capd-{next(self._request_ids)}"
        interrupt = {"subtype": "interrupt"}
        try:
            self._send({"type": "control_request", "request_id": request_id, "request": interrupt})
        except EngineDied:
            return
        self._settling = asyncio.create_task(self._wind_down(request_id, record))

    async def _wind_down(
        self, request_id: str, record: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        """Read until the interrupt is acknowledged and the CLI's turn (or its /compact)
        has ended; `record` records what an interrupted turn still reports."""
        acked = False
        while self._busy or not acked:
            message = await self._next_message()
            match message.get("type"):
                case "system" if message.get("subtype") == "init":
                    self._init(message)
                case "result":
                    self._busy = False
                    self._note_session(message.get("session_id"))
                case "control_response":
                    acked = (message.get("response") or {}).get("request_id") == request_id
            if record is not None:
                record(message)

    def _record_late_message(
        self, host: TurnHost, turn: Turn, state: _TurnState, message: dict[str, Any]
    ) -> None:
        """What an interrupted turn's winding down reports: its session, its tool results
        and, while the turn is still the pod's (paused), what its prompt cost; after a
        cancel that cost is in the next prompt's `result`."""
        match message.get("type"):
            case "system" if message.get("subtype") == "init":
                self._record_late(host, turn)
            case "user" if not message.get("parent_tool_use_id"):
                for result in self._tool_results(turn, state, message.get("message") or {}):
                    self._record_late(host, turn, result)
            case "result":
                self._record_late(host, turn)
                if host.turn is turn:
                    self._record_cost(host, turn, message.get("total_cost_usd"))

    def _dispatch(self, message: dict[str, Any]) -> bool:
        if message.get("type") == "system" and message.get("subtype") == "init":
            self._mcp.claude_code_reported(message.get("mcp_servers"), message.get("tools"))
        if self._resuming and self._resume_refused(message):
            return False
        if message.get("type") != "control_request":
            return True
        # Only asked for with options capd does not pass (e.g. a permission prompt tool).
        request = message.get("request") or {}
        self._send(
            {
                "type": "control_response",
                "response": {
                    "subtype": "error",
                    "request_id": message.get("request_id"),
                    "error": f"capd does not answer {request.get('subtype')} requests",
                },
            }
        )
        return False

    def _resume_refused(self, message: dict[str, Any]) -> bool:
        """Whether the first message of a `--resume` says the session cannot be resumed.

        `claude -p --resume ID` of a session it does not have (Claude Code deletes
        transcripts older than cleanupPeriodDays; another HOME or CLAUDE_CONFIG_DIR hides
        them) writes an error `result` before any `init` and exits 1. Taken as the turn's
        answer, every later turn would fail the same way: the session is replaced. The
        question is open until `init` or a `result` (other messages, such as hook events,
        may come first)."""
        kind = message.get("type")
        if kind == "system" and message.get("subtype") == "init":
            self._resuming = False
        if kind != "result":
            return False
        self._resuming = False
        if not message.get("is_error"):
            return False
        assert self._session_id is not None
        self._session_lost(self._session_id, _error_text(message))
        return True

    def _on_death(self, died: EngineDied) -> None:
        self._busy = False
        if self._resuming:
            # Dead before `init` after --resume, saying on stderr that the session is gone
            # (older CLIs write no result first): it is lost, lest every later start die on
            # it the same way. Any other early death (a bad flag, an OOM kill) keeps it.
            self._resuming = False
            assert self._session_id is not None
            if self._session_id in str(died) or NO_SESSION in str(died):
                self._session_lost(self._session_id, str(died))


def _referenced(servers: Iterable[McpServerConfig]) -> dict[str, str]:
    """The variables of capd's environment that the servers' `${VAR}`s name."""
    names = [
        name
        for server in servers
        for name in referenced(server.env if isinstance(server, McpStdioServer) else server.headers)
    ]
    return {name: os.environ[name] for name in names if name in os.environ}


def state_paths(env: Mapping[str, str]) -> list[Path]:
    """What Claude Code writes outside the cwd, writable in its sandbox, as the engine's
    environment `env` over capd's own says: `$CLAUDE_CONFIG_DIR` (made when missing),
    else `<HOME>/.claude` (made when missing) and `<HOME>/.claude.json` (its login and
    settings). SandboxRefused, in one line, when the directory cannot be made."""
    config_dir = env.get("CLAUDE_CONFIG_DIR") or os.environ.get("CLAUDE_CONFIG_DIR")
    home = Path(env.get("HOME") or os.environ.get("HOME") or Path.home())
    paths = [Path(config_dir)] if config_dir else [home / ".claude", home / ".claude.json"]
    paths = [Path(os.path.abspath(os.path.expanduser(path))) for path in paths]
    try:
        paths[0].mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise SandboxRefused(
            f"claude-code: cannot create its config dir {paths[0]}: {exc.strerror or exc}; "
            "set CLAUDE_CONFIG_DIR (or HOME) in engine.env to a directory capd can write"
        ) from None
    return [path.resolve() for path in paths]


def _outcome(turn: Turn, result: dict[str, Any]) -> TurnOutcome:
    subtype = str(result.get("subtype", ""))
    if subtype == "success" and not result.get("is_error"):
        return TurnOutcome("finished", turn.output)
    outcome = "limit_reached" if subtype in LIMIT_SUBTYPES else "errored"
    return TurnOutcome(outcome, turn.output, f"claude-code: {_error_text(result)}")


def _error_text(result: dict[str, Any]) -> str:
    errors = result.get("errors")
    if isinstance(errors, list) and errors:
        return "; ".join(str(error) for error in errors)
    text = result.get("result")
    if isinstance(text, str) and text.strip():
        return text.strip().splitlines()[0]
    return str(result.get("subtype") or "the turn ended in an error")


def _usage(raw: object, before: Usage | None = None) -> Usage:
    """An API usage object's counts over `before`'s; input counts cached prompt tokens too,
    as for the builtin engine."""
    counts = before or Usage()
    if not isinstance(raw, dict):
        return counts
    input_tokens, output_tokens = counts.input_tokens, counts.output_tokens
    if isinstance(raw.get("input_tokens"), int):
        cached = ("cache_creation_input_tokens", "cache_read_input_tokens")
        input_tokens = raw["input_tokens"] + sum(int(raw.get(key) or 0) for key in cached)
    if isinstance(raw.get("output_tokens"), int):
        output_tokens = raw["output_tokens"]
    return Usage(input_tokens=input_tokens, output_tokens=output_tokens)


def _result_text(content: object) -> str:
    """A tool_result's content: a string, or blocks whose text is joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [str(b.get("text", "")) for b in content if isinstance(b, dict) and "text" in b]
        if texts:
            return "\n".join(texts)
    return "" if content is None else orjson.dumps(content).decode()


def _boundary(message: dict[str, Any]) -> _Boundary:
    """A `compact_boundary`'s trigger ("manual": capd's request) and token counts."""
    metadata = message.get("compact_metadata") or {}
    trigger: CompactionTrigger = "auto" if metadata.get("trigger") == "auto" else "request"
    before, after = metadata.get("pre_tokens"), metadata.get("post_tokens")
    return _Boundary(
        trigger,
        before if isinstance(before, int) else 0,
        after if isinstance(after, int) else 0,
    )


def _summary(message: dict[str, Any]) -> str | None:
    """The text of a compaction's summary: the synthetic `user` message after its
    boundary; None for any other message."""
    if message.get("type") != "user" or not message.get("isSynthetic"):
        return None
    return _result_text((message.get("message") or {}).get("content"))


def _text(message: dict[str, Any]) -> str:
    """The text blocks of an `assistant` message."""
    blocks = message.get("content") or []
    return "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
