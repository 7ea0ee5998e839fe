"""An Agent Client Protocol agent as a pod's engine: JSON-RPC 2.0 over the agent's stdio.

capd is the ACP client. It says it offers no file system and no terminal, so the agent
uses its own tools. Per process: `initialize`, then `session/load` of the pod's session
when the agent can load sessions and one is known, else `session/new` (cwd = the pod's,
`mcpServers` the pod's MCP servers in ACP's shapes, `capd.engines.mcp_handover`). Per
turn: one `session/prompt`, whose `session/update` notifications become events until its
response gives the `stopReason`. Pause and cancel send `session/cancel`; the agent then
answers the prompt with `cancelled`, which the next prompt waits for.
`session/request_permission` is answered by the pod's policy.

Steps: text and thought chunks, and the tool calls announced after them, make one
`assistant_message`, recorded when a chunk follows the calls, when a call has ended and
every call's input is final, or when the prompt ends; a tool call that ends `completed`
or `failed` gives its `tool_result`, recorded after its step. Agents announce a call
before its input is whole, so until the step is recorded a repeated `tool_call` or a
`tool_call_update` with `rawInput` updates the call's arguments; the input is final once
the call runs (`in_progress`), has ended, or was sent again.

Compaction. An ACP agent manages its own context; ACP has no request for a client to make
it compact (a `session/compact` is only proposed), so `compact` is refused
(`cannot_compact`). capd opts in to ACP's session compaction updates
(`clientCapabilities.session.compaction`): an agent that reports one with
`compaction_update` (`in_progress`, summary chunks, then `completed`) gets a
`compaction_started` and, when completed, a `context_compacted` (trigger "auto") through
the last message before it, with the summary it showed (else a note that it showed none);
ACP gives no token counts, so both are 0. Later updates of a completed one are patches and
change nothing, nor does a failed or cancelled one; those replayed by `session/load` are
not recorded again.
"""

import asyncio
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from capd.engines.base import Engine, Turn, TurnHost, TurnOutcome
from capd.engines.mcp_handover import acp_servers
from capd.engines.process import EngineDied, EngineError, ExternalEngine
from capd.engines.questions import Questions
from capd.engines.slots import EngineSlot
from capd.prices import add_usage
from capd.proc.launcher import environment
from capd.proc.limits import PodLimits
from capd.proc.sandbox import Confinement
from protocol.events import (
    AssistantMessage,
    CompactionStarted,
    ContextCompacted,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCall,
    ToolCallStart,
    ToolResult,
    TurnResult,
    Usage,
)
from protocol.framing import within_bounds
from protocol.manifest import AcpEngine as AcpConfig
from protocol.manifest import Manifest

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
HANDSHAKE_TIMEOUT_S = 60.0
STOP_RESULTS: dict[str, TurnResult] = {
    "end_turn": "finished",
    "cancelled": "cancelled",
    "max_tokens": "limit_reached",
    "max_turn_requests": "limit_reached",
    "refusal": "errored",
}
ANSWER_UPDATES = frozenset(
    {"agent_message_chunk", "agent_thought_chunk", "tool_call", "tool_call_update", "plan"}
)
METHOD_NOT_FOUND = -32601
ERROR_DATA_CHARS = 2000
"""The longest agent error quoted in a turn's error."""
SUMMARY_HIDDEN = "(The agent compacted its context and showed no summary of it.)"
"""The summary recorded for a compaction the agent reported without one."""
ALLOW_KINDS = ("allow_once", "allow_always")
REJECT_KINDS = ("reject_once", "reject_always")


@dataclass
class _Step:
    text: str = ""
    thinking: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    settled: set[str] = field(default_factory=set)
    """Calls whose input is final: they run (or ended), or the agent sent it again."""
    held: list[ToolResult] = field(default_factory=list)
    """Results of the step's calls, recorded after the step."""


@dataclass
class _TurnState:
    step: _Step = field(default_factory=_Step)
    names: dict[str, str] = field(default_factory=dict)
    """Tool titles by tool call id."""
    done: set[str] = field(default_factory=set)
    """Tool calls whose result is recorded."""
    summaries: dict[str, str] = field(default_factory=dict)
    """The summaries of the compactions in progress, by compactionId."""


AUTH_REQUIRED = -32000
"""ACP's error code for an agent that wants its user to log in first."""


class AcpEngineError(EngineError):
    """The agent answered a request with an error."""

    def __init__(self, message: str, code: object = None) -> None:
        super().__init__(message)
        self.code = code


class AcpEngine(ExternalEngine):
    kind = "acp"

    def __init__(
        self,
        config: AcpConfig,
        manifest: Manifest,
        sandbox: Confinement | None,
        pod_limits: PodLimits | None = None,
        slot: EngineSlot | None = None,
    ) -> None:
        assert manifest.cwd is not None
        super().__init__(
            Path(manifest.cwd), config, manifest.mcp_servers, sandbox, pod_limits, slot
        )
        self._config = config
        # A server that cannot be handed over shows failed from the start; whether the
        # agent takes http servers waits for its `initialize`.
        # capd expands the servers' ${VAR}s, from its own environment, as for its own
        # servers: they reach the agent only over its stdin, whatever its sandbox passes.
        environ = environment(self._env)
        self._mcp.starting(acp_servers(self._mcp.servers, self._cwd, environ, True)[1])
        self._system_prompt = manifest.system_prompt
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._prompt_id: int | None = None
        """The JSON-RPC id of the `session/prompt` in flight. Its answer, and the session
        updates while it runs, go to the inbox; other updates (the history `session/load`
        replays) are not for any turn."""
        self._turn: tuple[TurnHost, Turn] | None = None
        self._questions = Questions()
        self._compacted: set[str] = set()
        """The compactionIds recorded: later updates of one only patch it (claude-agent-acp
        repeats the terminal update)."""
        self._cost_seen: float | None = None
        """The session's cumulative cost as last reported (0 for a new session). None
        after a capd restart: the first report of the loaded session is where counting
        starts again, so a prompt in flight across the restart goes uncounted."""
        self._unrecorded = Usage()
        """What the agent reported spent that no event records yet: it goes with the
        next step recorded, this turn's or, after a cancel, a later turn's."""
        self._can_load = False
        """The running agent said it loads sessions (`loadSession`)."""

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        self._questions.answer(request_id, option_id)

    def _can_resume(self) -> bool:
        """An agent that cannot load sessions would lose its session with its process."""
        return self._can_load or self._session_id is None

    # -- the process --------------------------------------------------------------------

    async def _start(self, host: TurnHost, turn: Turn | None) -> None:
        self._prompt_id = None  # a wind-down cut short may have left it set
        await self._spawn(self._config.command)
        capabilities = {
            "fs": {"readTextFile": False, "writeTextFile": False},
            "terminal": False,
            "session": {"compaction": {}},
        }
        init = await self._call(
            "initialize",
            {"protocolVersion": PROTOCOL_VERSION, "clientCapabilities": capabilities},
        )
        version = init.get("protocolVersion")
        if version != PROTOCOL_VERSION:
            raise EngineError(f"acp agent speaks protocol version {version}, capd speaks 1")
        agent = init.get("agentCapabilities") or {}
        can_load = self._can_load = bool(agent.get("loadSession"))
        takes_http = bool((agent.get("mcpCapabilities") or {}).get("http"))
        servers, left_out = acp_servers(
            self._mcp.servers, self._cwd, environment(self._env), takes_http
        )
        self._mcp.starting(left_out)
        session_id = self._session_to_resume(host)
        cwd = str(self._cwd)
        if session_id and not can_load:
            self._session_lost(session_id, "the agent cannot load sessions (no loadSession)")
        elif session_id:
            try:
                await self._call(
                    "session/load", {"sessionId": session_id, "cwd": cwd, "mcpServers": servers}
                )
            except AcpEngineError as exc:
                if exc.code == AUTH_REQUIRED:
                    # Not lost: the user logs the agent in and the next turn loads it.
                    raise
                self._session_lost(session_id, str(exc))
            else:
                self._session_id, self._fresh = session_id, False
                self._mcp.taken()
                return
        created = await self._call("session/new", {"cwd": cwd, "mcpServers": servers})
        self._note_session(created.get("sessionId"))
        self._fresh = True
        self._cost_seen = 0.0
        self._mcp.taken()
        self._record_session(host, turn)

    async def _call(self, method: str, params: dict[str, Any]) -> Any:
        rpc_id = next(self._ids)
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[rpc_id] = answer
        self._send({"jsonrpc": "2.0", "id": rpc_id, "method": method, "params": params})
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                return await answer
        except TimeoutError:
            raise EngineDied(f"acp agent did not answer {method} in time") from None
        finally:
            self._waiting.pop(rpc_id, None)

    def _dispatch(self, message: dict[str, Any]) -> bool:
        method = message.get("method")
        if method is None:
            return self._answer_received(message)
        if "id" in message:
            self._request_received(message["id"], str(method), message.get("params") or {})
            return False
        return method == "session/update" and self._prompt_id is not None

    def _answer_received(self, message: dict[str, Any]) -> bool:
        rpc_id = message.get("id")
        if rpc_id is not None and rpc_id == self._prompt_id:
            return True
        answer = self._waiting.get(rpc_id) if isinstance(rpc_id, int) else None
        if answer is not None and not answer.done():
            if "error" in message:
                raw = message["error"]
                error = _error_text(raw)
                log.warning("acp agent answered a request with an error: %s", error)
                code = raw.get("code") if isinstance(raw, dict) else None
                answer.set_exception(AcpEngineError(error, code))
            else:
                answer.set_result(message.get("result") or {})
        return False

    def _request_received(self, rpc_id: Any, method: str, params: dict[str, Any]) -> None:
        if method == "session/request_permission":
            self._permission(rpc_id, params)
            return
        error = {"code": METHOD_NOT_FOUND, "message": f"capd does not offer {method}"}
        self._send({"jsonrpc": "2.0", "id": rpc_id, "error": error})

    def _on_death(self, died: EngineDied) -> None:
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(died)

    # -- permissions --------------------------------------------------------------------

    def _permission(self, rpc_id: Any, params: dict[str, Any]) -> None:
        if self._turn is None:
            # The turn is being wound down by a pause or cancel: whatever the policy, ACP
            # wants requests still pending after `session/cancel` answered `cancelled`.
            self._send_outcome(rpc_id, None)
            return
        options = [o for o in params.get("options") or [] if isinstance(o, dict)]
        policy = self._config.permission
        if policy == "ask":
            host, turn = self._turn
            self._questions.ask(
                host,
                turn.turn_id,
                params.get("toolCall") or {},
                options,
                lambda option_id: self._send_outcome(rpc_id, option_id),
            )
            return
        kinds = ALLOW_KINDS if policy == "allow" else REJECT_KINDS
        chosen = next((o.get("optionId") for o in options if o.get("kind") in kinds), None)
        self._send_outcome(rpc_id, None if chosen is None else str(chosen))

    def _send_outcome(self, rpc_id: Any, option_id: str | None) -> None:
        outcome: dict[str, Any] = (
            {"outcome": "cancelled"}
            if option_id is None
            else {"outcome": "selected", "optionId": option_id}
        )
        try:
            self._send({"jsonrpc": "2.0", "id": rpc_id, "result": {"outcome": outcome}})
        except EngineDied:
            log.info("acp agent exited before its permission request was answered")

    # -- turns --------------------------------------------------------------------------

    def _send_prompt(self, prompt: str) -> None:
        blocks = [{"type": "text", "text": prompt}]
        if self._fresh and self._system_prompt:
            blocks.insert(0, {"type": "text", "text": self._system_prompt})
        rpc_id = next(self._ids)
        params = {"sessionId": self._session_id, "prompt": blocks}
        self._send({"jsonrpc": "2.0", "id": rpc_id, "method": "session/prompt", "params": params})
        self._prompt_id = rpc_id

    async def _read_turn(self, host: TurnHost, turn: Turn) -> TurnOutcome:
        state = _TurnState()
        self._turn = (host, turn)
        try:
            while True:
                message = await self._next_message()
                if message.get("id") == self._prompt_id:
                    self._prompt_id = None
                    self._flush(host, turn, state, usage=_usage(message))
                    return _outcome(host, turn, message)
                update = (message.get("params") or {}).get("update") or {}
                # An echo of the prompt, or a usage or mode note, is not an answer: the
                # agent may not have kept the prompt, so a restart gives it again.
                self._answered |= update.get("sessionUpdate") in ANSWER_UPDATES
                self._update(host, turn, state, update)
        except EngineDied:
            self._prompt_id = None
            self._flush(host, turn, state)
            raise
        except asyncio.CancelledError:
            self._flush(host, turn, state, interrupted=True)
            self._cancel(host, turn, state)
            raise
        finally:
            self._turn = None
            # Questions still open when the prompt ends (or the agent dies) are moot.
            self._questions.cancel_all()

    def _update(
        self, host: TurnHost, turn: Turn, state: _TurnState, update: dict[str, Any]
    ) -> None:
        turn_id = turn.turn_id
        match update.get("sessionUpdate"):
            case "agent_message_chunk":
                text = _content_text(update.get("content"))
                if not text:  # claude-agent-acp sends empty chunks: they say nothing
                    return
                if state.step.calls:
                    self._flush(host, turn, state)
                state.step.text += text
                host.emit_ephemeral(TextDelta(turn_id=turn_id, text=text))
            case "agent_thought_chunk":
                text = _content_text(update.get("content"))
                if not text:
                    return
                if state.step.calls:
                    self._flush(host, turn, state)
                state.step.thinking += text
                host.emit_ephemeral(ThinkingDelta(turn_id=turn_id, text=text))
            case "tool_call" | "tool_call_update":
                self._track_call(host, turn, state, update)
                self._tool_update(host, turn, state, update)
            case "compaction_update" | "compaction_summary_chunk":
                self._compaction(host, turn, state, update)
            case "usage_update":
                self._cost(update.get("cost"))

    def take_over(self, old: Engine) -> None:
        """The session's cost as the old engine last saw it, and what it reported that no
        event records yet: the new engine loads the same session, whose next cumulative
        `cost` would otherwise start counting anew and lose a prompt's cost."""
        super().take_over(old)
        if isinstance(old, AcpEngine):
            self._cost_seen = old._cost_seen
            self._unrecorded = add_usage(self._unrecorded, old._unrecorded)

    def _cost(self, cost: object) -> None:
        """A `usage_update`'s `cost`, the session's cumulative cost: what it grew by (in
        US dollars; other currencies are not counted) goes with the next step recorded."""
        if not isinstance(cost, dict) or str(cost.get("currency", "")).upper() != "USD":
            return
        amount = cost.get("amount")
        if not isinstance(amount, int | float):
            return
        seen, self._cost_seen = self._cost_seen, float(amount)
        if seen is not None and amount > seen:
            self._unrecorded = add_usage(self._unrecorded, Usage(cost_usd=amount - seen))

    def _compaction(
        self, host: TurnHost, turn: Turn, state: _TurnState, update: dict[str, Any]
    ) -> None:
        """Follow a compaction the agent reports; record it once it is completed."""
        compaction_id = str(update.get("compactionId", ""))
        status = update.get("status")
        if compaction_id in self._compacted:
            return
        if update.get("sessionUpdate") == "compaction_summary_chunk":
            if compaction_id in state.summaries:
                state.summaries[compaction_id] += _content_text(update.get("content"))
            return
        if compaction_id not in state.summaries and status in ("in_progress", "completed"):
            host.emit_ephemeral(CompactionStarted(turn_id=turn.turn_id, trigger="auto"))
            state.summaries[compaction_id] = ""
        if "summary" in update:  # a patch: a list replaces the summary, null clears it
            blocks = update.get("summary")
            text = "".join(_content_text(b) for b in blocks) if isinstance(blocks, list) else ""
            state.summaries[compaction_id] = text
        match status:
            case "completed":
                self._flush(host, turn, state)
                through = host.context.last_message_seq()
                summary = state.summaries.pop(compaction_id, "")
                host.commit_compaction(
                    ContextCompacted(
                        turn_id=turn.turn_id,
                        trigger="auto",
                        summary=summary or SUMMARY_HIDDEN,
                        through_seq=through,
                        tokens_before=0,
                        tokens_after=0,
                    )
                )
                self._sent = through
                self._compacted.add(compaction_id)
            case "failed" | "cancelled":
                state.summaries.pop(compaction_id, None)

    def _track_call(
        self, host: TurnHost, turn: Turn, state: _TurnState, update: dict[str, Any]
    ) -> None:
        """Announce a call the first time its id is seen (a `tool_call`, or an update that
        describes a call never announced); later `tool_call`s and updates for it only bring its
        input up to date while its step is not recorded yet. Agents send the input late:
        claude-code-acp repeats `tool_call` with it, opencode sends it in an update."""
        call_id = str(update.get("toolCallId", ""))
        raw = update.get("rawInput")
        arguments = within_bounds(raw) if isinstance(raw, dict) else {}
        if update.get("status") in ("in_progress", "completed", "failed"):
            state.step.settled.add(call_id)
        if call_id in state.names:
            pending = next((c for c in state.step.calls if c.id == call_id), None)
            if pending is not None and arguments:
                pending.arguments = arguments
                state.step.settled.add(call_id)
            return
        if update.get("sessionUpdate") == "tool_call_update" and not (
            arguments or update.get("title")
        ):
            return  # nothing to announce: a result alone is recorded as one
        name = str(update.get("title") or update.get("kind") or "tool")
        state.names[call_id] = name
        host.emit_ephemeral(ToolCallStart(turn_id=turn.turn_id, call_id=call_id, name=name))
        state.step.calls.append(ToolCall(id=call_id, name=name, arguments=arguments))

    def _tool_update(
        self, host: TurnHost, turn: Turn, state: _TurnState, update: dict[str, Any]
    ) -> None:
        """Record a call's result. The step that made the call is recorded first, once
        the input of each of its calls is final: opencode runs a call while it still
        streams the next one's input."""
        result = self._tool_result(turn, state, update)
        step = state.step
        if result is not None and all(call.id != result.call_id for call in step.calls):
            host.emit(result)  # a call of a step recorded before
        elif result is not None:
            step.held.append(result)
        if step.held and all(call.id in step.settled for call in step.calls):
            self._flush(host, turn, state)

    def _tool_result(
        self, turn: Turn, state: _TurnState, update: dict[str, Any]
    ) -> ToolResult | None:
        """The result of a tool call that has just ended, once per call."""
        call_id = str(update.get("toolCallId", ""))
        status = update.get("status")
        if status not in ("completed", "failed") or call_id in state.done:
            return None
        state.done.add(call_id)
        return ToolResult(
            turn_id=turn.turn_id,
            call_id=call_id,
            name=state.names.get(call_id) or str(update.get("title") or "tool"),
            output=_tool_output(update),
            is_error=status == "failed",
        )

    def _flush(
        self,
        host: TurnHost,
        turn: Turn,
        state: _TurnState,
        interrupted: bool = False,
        usage: Usage | None = None,
    ) -> None:
        """Record the step so far as an `assistant_message`, with what the agent reported
        spent since the last one recorded. Interrupted, text with no tool call after it is
        partial (and what it cost is still recorded: with it, else as a usage-only step);
        a step with tool calls is whole, and the pod closes the calls left without a
        result. The prompt's `usage`, reported at its end, goes with its last step (an
        empty one if the last was recorded already)."""
        step = state.step
        state.step = _Step()
        if self._unrecorded != Usage():
            usage = add_usage(usage or Usage(), self._unrecorded)
            self._unrecorded = Usage()
        if interrupted and not step.calls:
            if step.text:
                cut = AssistantMessage(
                    turn_id=turn.turn_id, text=step.text, interrupted=True, usage=usage or Usage()
                )
                host.emit(cut)
            else:
                _record_step(host, turn, _Step(), usage)
            return
        _record_step(host, turn, step, usage)
        for result in step.held:
            host.emit(result)

    def _cancel(self, host: TurnHost, turn: Turn, state: _TurnState) -> None:
        """Stop the agent's turn with `session/cancel`. The questions it is asking are
        answered `cancelled` after it (`_read_turn`), in the order ACP asks for."""
        prompt_id = self._prompt_id
        if prompt_id is None:
            return
        try:
            self._send(
                {
                    "jsonrpc": "2.0",
                    "method": "session/cancel",
                    "params": {"sessionId": self._session_id},
                }
            )
        except EngineDied:
            self._prompt_id = None
            return
        self._settling = asyncio.create_task(self._wind_down(host, turn, state, prompt_id))

    async def _wind_down(
        self, host: TurnHost, turn: Turn, state: _TurnState, prompt_id: int
    ) -> None:
        """Read until the agent has answered the cancelled prompt, recording the results
        of tool calls that still ran to the end. What the agent reports the prompt cost
        meanwhile, and the answer's usage, are recorded once it has answered while the
        turn is still the pod's (paused); after a cancel they go with the next step."""
        while (message := await self._next_message()).get("id") != prompt_id:
            update = (message.get("params") or {}).get("update") or {}
            match update.get("sessionUpdate"):
                case "tool_call_update":
                    result = self._tool_result(turn, state, update)
                    if result is not None:
                        self._record_late(host, turn, result)
                case "usage_update":
                    self._cost(update.get("cost"))
        self._prompt_id = None
        self._unrecorded = add_usage(self._unrecorded, _usage(message))
        if host.turn is turn:
            self._flush(host, turn, _TurnState())  # a usage-only step, if anything was spent


def _outcome(host: TurnHost, turn: Turn, answer: dict[str, Any]) -> TurnOutcome:
    if "error" in answer:
        error = _error_text(answer["error"])
        log.warning("pod %s: acp agent answered the prompt with an error: %s", host.name, error)
        return TurnOutcome("errored", turn.output, f"acp: {error}")
    reason = str((answer.get("result") or {}).get("stopReason", ""))
    result = STOP_RESULTS.get(reason, "errored")
    if result in ("finished", "cancelled"):
        return TurnOutcome(result, turn.output)
    return TurnOutcome(result, turn.output, f"acp agent stopped: {reason or 'no stopReason'}")


def _record_step(host: TurnHost, turn: Turn, step: _Step, usage: Usage | None) -> None:
    counted = usage is not None and (
        usage.input_tokens or usage.output_tokens or usage.cost_usd is not None
    )
    if step.text or step.thinking or step.calls or counted:
        thinking = [ThinkingBlock(text=step.thinking)] if step.thinking else []
        host.emit(
            AssistantMessage(
                turn_id=turn.turn_id,
                text=step.text,
                tool_calls=step.calls,
                thinking=thinking,
                usage=usage or Usage(),
            )
        )


def _usage(answer: dict[str, Any]) -> Usage:
    """The prompt's token counts from its answer's `usage` (ACP's, unstable: per prompt in
    claude-code-acp and opencode). Cached prompt tokens count as input and thought tokens
    as output, as for capd's own providers."""
    reported = (answer.get("result") or {}).get("usage")
    if not isinstance(reported, dict):
        return Usage()

    def count(key: str) -> int:
        value = reported.get(key)
        return value if isinstance(value, int) and value > 0 else 0

    return Usage(
        input_tokens=count("inputTokens") + count("cachedReadTokens") + count("cachedWriteTokens"),
        output_tokens=count("outputTokens") + count("thoughtTokens"),
    )


def _error_text(error: object) -> str:
    """A JSON-RPC error in one line: its message, then its `data`, where agents put the
    real reason (claude-code-acp: `"Internal error"`, data `{"details": "Query closed
    before response received"}`), then its code."""
    if not isinstance(error, dict):
        return " ".join(str(error).split())
    text = str(error.get("message", "")).strip() or "error"
    data = _error_data(error.get("data"))
    if data and data not in text:
        text = f"{text}: {data}"
    return f"{' '.join(text.split())[:ERROR_DATA_CHARS]} (code {error.get('code')})"


def _error_data(data: object) -> str:
    if data is None or data == "" or data == {} or data == []:
        return ""
    match data:
        case str():
            return data
        case {"details": str(details)} | {"message": str(details)} if len(data) == 1:
            return details
    return orjson.dumps(data).decode()


def _content_text(content: object) -> str:
    if isinstance(content, dict) and content.get("type") == "text":
        return str(content.get("text", ""))
    return ""


def _tool_output(update: dict[str, Any]) -> str:
    """A finished tool call's output: its text content, else its raw output as JSON."""
    parts: list[str] = []
    for item in update.get("content") or []:
        match item:
            case {"type": "content", "content": block}:
                parts.append(_content_text(block))
            case {"type": "diff", "path": path}:
                parts.append(f"[edited {path}]")
            case {"type": "terminal", "terminalId": terminal}:
                parts.append(f"[terminal {terminal}]")
    if any(parts):
        return "\n".join(part for part in parts if part)
    raw = update.get("rawOutput")
    if raw is None:
        return ""
    return raw if isinstance(raw, str) else orjson.dumps(raw).decode()
