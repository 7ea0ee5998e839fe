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
"""

import asyncio
import contextlib
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from capd.engines.base import Turn, TurnHost, TurnOutcome, never_asks
from capd.engines.process import EngineDied, ExternalEngine
from protocol.events import (
    AssistantMessage,
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
from protocol.manifest import Manifest

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


class ClaudeCodeEngine(ExternalEngine):
    kind = "claude-code"

    def __init__(self, config: ClaudeCodeConfig, manifest: Manifest) -> None:
        assert manifest.cwd is not None
        super().__init__(Path(manifest.cwd), config)
        self._config = config
        self._system_prompt = manifest.system_prompt
        self._resuming = False
        """This process was started with --resume and has said nothing yet."""
        self._request_ids = itertools.count(1)
        self._busy = False
        """Whether the CLI is working on a prompt (sent, its `result` not yet read)."""

    def answer_permission(self, request_id: str, option_id: str | None) -> None:
        raise never_asks(self.kind)

    async def _start(self, host: TurnHost, turn: Turn) -> None:
        config = self._config
        argv = [*config.command, *STREAM_JSON_ARGS]
        if config.model:
            argv += ["--model", config.model]
        argv += ["--max-turns", str(host.manifest.limits.max_steps)]
        if config.permission_mode:
            argv += ["--permission-mode", config.permission_mode]
        if self._system_prompt:
            argv += ["--append-system-prompt", self._system_prompt]
        self._session_id = self._session_to_resume(host)
        self._resuming = self._session_id is not None
        self._fresh = not self._resuming
        if self._session_id:
            argv += ["--resume", self._session_id]
        await self._spawn([*argv, *config.args])
        self._busy = False

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
            if state.partial:
                text = state.partial
                host.emit(AssistantMessage(turn_id=turn.turn_id, text=text, interrupted=True))
            if self._busy:
                self._interrupt(host, turn, state)
            raise

    def _apply(
        self, host: TurnHost, turn: Turn, state: _TurnState, message: dict[str, Any]
    ) -> TurnOutcome | None:
        match message.get("type"):
            case "system" if message.get("subtype") == "init":
                self._note_session(message.get("session_id"))
                self._record_session(host, turn)
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
        """Record the step so far as an `assistant_message`, if it has anything."""
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
        state.step = _Step(message_id=step.message_id)

    def _interrupt(self, host: TurnHost, turn: Turn, state: _TurnState) -> None:
        request_id = f"capd-{next(self._request_ids)}"
        interrupt = {"subtype": "interrupt"}
        try:
            self._send({"type": "control_request", "request_id": request_id, "request": interrupt})
        except EngineDied:
            return
        self._settling = asyncio.create_task(self._wind_down(host, turn, state, request_id))

    async def _wind_down(
        self, host: TurnHost, turn: Turn, state: _TurnState, request_id: str
    ) -> None:
        """Read until the interrupt is acknowledged and the CLI's turn has ended."""
        acked = False
        while self._busy or not acked:
            message = await self._next_message()
            match message.get("type"):
                case "system" if message.get("subtype") == "init":
                    self._note_session(message.get("session_id"))
                    self._record_late(host, turn)
                case "user" if not message.get("parent_tool_use_id"):
                    for result in self._tool_results(turn, state, message.get("message") or {}):
                        self._record_late(host, turn, result)
                case "result":
                    self._busy = False
                    self._note_session(message.get("session_id"))
                    self._record_late(host, turn)
                case "control_response":
                    acked = (message.get("response") or {}).get("request_id") == request_id

    def _dispatch(self, message: dict[str, Any]) -> bool:
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
