"""Anthropic Messages (`POST {base_url}/v1/messages`), streamed over SSE.

Our messages become the alternating user / assistant turns of content blocks the API
insists on: tool results are `tool_result` blocks of a user turn, user turns in a row
merge, empty text is left out, and an assistant turn a pause or max_tokens cut short is
followed by a note to continue. With `thinking_budget_tokens` the model thinks first; its
thinking streams as ThinkingChunk, and the complete signed blocks come back in the
ModelReply so they can be sent back with the step's tool calls, which the API requires.
"""

import os
import secrets
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from capd.chat import ChatMessage, ToolSpec, parse_tool_arguments
from capd.providers.base import (
    ModelReply,
    ModelRequest,
    ProviderError,
    StreamItem,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
    continue_text,
)
from capd.providers.http import SseEndpoint, error_reason, excerpt, key_variable, read_to_end
from protocol.events import ThinkingBlock, ToolCall, Usage
from protocol.manifest import ModelConfig

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_KEY_ENV = "ANTHROPIC_API_KEY"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 8192
"""The API requires max_tokens; this is what the reply may use besides any thinking budget."""
DEFAULT_TIMEOUT_S = 600.0

_OVERFLOW_STOP = "model_context_window_exceeded"
"""The stop reason of a reply cut off because the context window filled up while the
model wrote (newer models): an overflow, not a truncation by max_tokens."""

_RETRYABLE_STREAM_ERRORS = frozenset(
    {"overloaded_error", "rate_limit_error", "api_error", "timeout_error"}
)
"""In-stream `error.type`s worth retrying; the others (invalid_request_error, ...) are not."""


class AnthropicProvider:
    """A `Provider` for the Anthropic Messages API and servers that copy it."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        url = f"{(config.base_url or DEFAULT_BASE_URL).rstrip('/')}/v1/messages"
        timeout_s = config.request_timeout_s or DEFAULT_TIMEOUT_S
        self._endpoint = SseEndpoint("anthropic", url, timeout_s)

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        headers = {
            "accept": "text/event-stream",
            "content-type": "application/json",
            "anthropic-version": API_VERSION,
        }
        if api_key := self._api_key():
            headers["x-api-key"] = api_key
        body = orjson.dumps(self._request_body(request))
        assembler = _ReplyAssembler()
        async with self._endpoint.events(body, headers) as events:
            async for data in events:
                for item in assembler.feed(self._parse_event(data)):
                    yield item
                if assembler.finished:
                    await read_to_end(events)
                    break
        if not assembler.finished:
            raise ProviderError(
                f"anthropic: stream ended early from {self._endpoint.url} (no message_stop)",
                retryable=True,
            )
        if assembler.stop_reason == _OVERFLOW_STOP:
            raise ProviderError(
                f"anthropic: the context window filled up while the model wrote its reply "
                f"(stop_reason {_OVERFLOW_STOP})",
                overflow=True,
            )
        yield assembler.reply()

    async def aclose(self) -> None:
        await self._endpoint.aclose()

    def _api_key(self) -> str | None:
        """The key named by `api_key_env`, else ANTHROPIC_API_KEY for Anthropic's own
        server, which needs one; another server gets none unless the manifest names it."""
        name = key_variable(self._config, self._endpoint.url, DEFAULT_BASE_URL, DEFAULT_KEY_ENV)
        if name is None:
            return None
        key = os.environ.get(name, "").strip()
        if not key:
            raise ProviderError(
                f"anthropic: environment variable {name} (model.api_key_env) is not set; "
                "set it to the API key in capd's environment"
            )
        return key

    def _request_body(self, request: ModelRequest) -> dict[str, Any]:
        config = self._config
        budget = config.thinking_budget_tokens
        body: dict[str, Any] = {
            "model": config.name,
            "max_tokens": _max_tokens(request, config),
            "messages": _wire_messages(request.messages),
            "stream": True,
        }
        if request.system_prompt:
            body["system"] = request.system_prompt
        if request.tools:
            body["tools"] = [_wire_tool(tool) for tool in request.tools]
            if request.tool_choice is not None:
                body["tool_choice"] = _wire_tool_choice(request.tool_choice)
        if config.temperature is not None:
            body["temperature"] = config.temperature
        if budget is not None:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        return body

    def _parse_event(self, data: str) -> "_Event":
        try:
            event = _Event.model_validate_json(data)
        except ValidationError as exc:
            raise ProviderError(
                f"anthropic: malformed stream event from {self._endpoint.url}: {excerpt(data)}",
                retryable=True,
            ) from exc
        if event.type == "error":
            reason = error_reason(event.error)
            detail = reason.text + (f" ({reason.type})" if reason.type else "")
            raise ProviderError(
                f"anthropic: error in stream from {self._endpoint.url}: {detail}",
                retryable=reason.type in _RETRYABLE_STREAM_ERRORS,
                overflow=reason.overflow,
            )
        return event


# -- request ------------------------------------------------------------------------------


def _max_tokens(request: ModelRequest, config: ModelConfig) -> int:
    """`model.max_tokens` counts the thinking; capd's default and a summary call's limit
    get the thinking budget on top."""
    budget = config.thinking_budget_tokens or 0
    if request.max_tokens is not None:
        return request.max_tokens + budget
    return config.max_tokens or DEFAULT_MAX_TOKENS + budget


def _wire_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """An assistant turn that would be last or followed by another one (a reply a pause or
    max_tokens cut short) is followed by a user turn asking to continue it."""
    turns: list[dict[str, Any]] = []
    last_reply = ChatMessage("assistant")
    for message in messages:
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _assistant_blocks(message) if role == "assistant" else _user_blocks(message)
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role == "user":
            turns[-1]["content"].extend(blocks)
            continue
        if turns and turns[-1]["role"] == role:
            turns.append(_continue_turn(last_reply))
        turns.append({"role": role, "content": blocks})
        if role == "assistant":
            last_reply = message
    if turns and turns[-1]["role"] == "assistant":
        turns.append(_continue_turn(last_reply))
    return turns


def _continue_turn(reply: ChatMessage) -> dict[str, Any]:
    return {"role": "user", "content": [_text_block(continue_text(reply))]}


def _user_blocks(message: ChatMessage) -> list[dict[str, Any]]:
    if message.role == "user":
        return [_text_block(message.text)] if message.text else []
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.call_id}
    if message.text:
        result["content"] = message.text
    result["is_error"] = message.is_error
    return [result]


def _assistant_blocks(message: ChatMessage) -> list[dict[str, Any]]:
    blocks = [_wire_thinking(block) for block in message.thinking]
    blocks = [block for block in blocks if block is not None]
    if message.text:
        blocks.append(_text_block(message.text))
    blocks.extend(
        {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
        for call in message.tool_calls
    )
    return blocks


def _wire_thinking(block: ThinkingBlock) -> dict[str, Any] | None:
    """The block as the API sent it; None for one it would refuse (no signature)."""
    if block.redacted:
        return {"type": "redacted_thinking", "data": block.redacted}
    if block.signature:
        return {"type": "thinking", "thinking": block.text, "signature": block.signature}
    return None


def _text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _wire_tool_choice(choice: str) -> dict[str, Any]:
    """Anthropic's names: `required` is `any`; a tool's name is `{"type": "tool", ...}`."""
    kinds = {"auto": "auto", "required": "any", "none": "none"}
    if choice in kinds:
        return {"type": kinds[choice]}
    return {"type": "tool", "name": choice}


def _wire_tool(tool: ToolSpec) -> dict[str, Any]:
    return {"name": tool.name, "description": tool.description, "input_schema": tool.parameters}


# -- response -----------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _EventUsage(_Lenient):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class _Message(_Lenient):
    usage: _EventUsage | None = None


class _ContentBlock(_Lenient):
    type: str
    id: str = ""
    name: str = ""
    text: str = ""
    thinking: str = ""
    data: str = ""
    input: dict[str, Any] | None = None


class _Delta(_Lenient):
    type: str = ""
    text: str = ""
    thinking: str = ""
    signature: str = ""
    partial_json: str = ""
    stop_reason: str | None = None
    """message_delta's: end_turn, tool_use, max_tokens, ..."""


class _Event(_Lenient):
    """One stream event; which fields it has depends on `type`."""

    type: str
    index: int = 0
    message: _Message | None = None
    content_block: _ContentBlock | None = None
    delta: _Delta | None = None
    usage: _EventUsage | None = None
    error: Any = None


@dataclass(slots=True)
class _OpenBlock:
    type: str
    call_id: str = ""
    name: str = ""
    parts: list[str] = field(default_factory=list)
    signature: str = ""
    redacted: str = ""


class _ReplyAssembler:
    """Turns events into stream items as they come and keeps what the final ModelReply needs."""

    def __init__(self) -> None:
        self.finished = False
        self.stop_reason = ""
        self._blocks: dict[int, _OpenBlock] = {}
        self._input_tokens = 0
        self._output_tokens = 0

    def feed(self, event: _Event) -> Iterator[StreamItem]:
        match event.type:
            case "message_start" if event.message is not None:
                self._count(event.message.usage)
            case "content_block_start" if event.content_block is not None:
                yield from self._start(event.index, event.content_block)
            case "content_block_delta" if event.delta is not None:
                yield from self._delta(event.index, event.delta)
            case "message_delta":
                self._count(event.usage)
                if event.delta is not None and event.delta.stop_reason is not None:
                    self.stop_reason = event.delta.stop_reason
            case "message_stop":
                self.finished = True
        # ping, content_block_stop and event types added after this was written need nothing.

    def reply(self) -> ModelReply:
        blocks = [block for _, block in sorted(self._blocks.items())]
        return ModelReply(
            text="".join(part for block in blocks if block.type == "text" for part in block.parts),
            tool_calls=[
                ToolCall(
                    id=block.call_id,
                    name=block.name,
                    arguments=parse_tool_arguments("".join(block.parts)),
                )
                for block in blocks
                if block.type == "tool_use"
            ],
            usage=Usage(input_tokens=self._input_tokens, output_tokens=self._output_tokens),
            thinking=[
                ThinkingBlock(
                    text="".join(block.parts), signature=block.signature, redacted=block.redacted
                )
                for block in blocks
                if block.type in ("thinking", "redacted_thinking")
            ],
            truncated=self.stop_reason == "max_tokens",
        )

    def _start(self, index: int, content: _ContentBlock) -> Iterator[StreamItem]:
        block = _OpenBlock(content.type, content.id, content.name, redacted=content.data)
        self._blocks[index] = block
        match content.type:
            case "text" if content.text:
                block.parts.append(content.text)
                yield TextChunk(content.text)
            case "thinking" if content.thinking:
                block.parts.append(content.thinking)
                yield ThinkingChunk(content.thinking)
            case "tool_use":
                block.call_id = block.call_id or f"toolu_{index}_{secrets.token_hex(6)}"
                yield ToolCallBegin(block.call_id, block.name)
                if content.input:
                    arguments = orjson.dumps(content.input).decode()
                    block.parts.append(arguments)
                    yield ToolCallArgs(block.call_id, arguments)

    def _delta(self, index: int, delta: _Delta) -> Iterator[StreamItem]:
        block = self._blocks.get(index)
        if block is None:
            return
        match delta.type:
            case "text_delta" if delta.text:
                block.parts.append(delta.text)
                yield TextChunk(delta.text)
            case "thinking_delta" if delta.thinking:
                block.parts.append(delta.thinking)
                yield ThinkingChunk(delta.thinking)
            case "signature_delta":
                block.signature += delta.signature
            case "input_json_delta" if delta.partial_json:
                block.parts.append(delta.partial_json)
                yield ToolCallArgs(block.call_id, delta.partial_json)

    def _count(self, usage: _EventUsage | None) -> None:
        """Input counts cached prompt tokens too; message_delta's counts are running totals."""
        if usage is None:
            return
        if usage.input_tokens is not None:
            self._input_tokens = (
                usage.input_tokens
                + (usage.cache_creation_input_tokens or 0)
                + (usage.cache_read_input_tokens or 0)
            )
        if usage.output_tokens is not None:
            self._output_tokens = usage.output_tokens
