"""OpenAI-compatible chat completions (`POST {base_url}/chat/completions`), streamed over SSE.

Works with api.openai.com and with the many servers that copy its wire format (vLLM,
llama.cpp, Ollama, LM Studio, OpenRouter, ...).
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
from capd.providers.http import (
    SseEndpoint,
    error_reason,
    excerpt,
    is_retryable_status,
    key_variable,
    read_to_end,
)
from protocol.events import ToolCall, Usage
from protocol.manifest import TOOL_CHOICES, ModelConfig

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT_S = 600.0

_TRANSIENT_HINTS = (
    "overload",
    "rate limit",
    "rate_limit",
    "capacity",
    "unavailable",
    "server_error",
)
"""Words that mark an in-stream `error` object as worth retrying."""


class OpenAIProvider:
    """A `Provider` for any server that speaks OpenAI's streaming chat completions."""

    def __init__(self, config: ModelConfig) -> None:
        self._config = config
        url = f"{(config.base_url or DEFAULT_BASE_URL).rstrip('/')}/chat/completions"
        self._endpoint = SseEndpoint("openai", url, config.request_timeout_s or DEFAULT_TIMEOUT_S)

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if api_key := self._api_key():
            headers["Authorization"] = f"Bearer {api_key}"
        body = orjson.dumps(self._request_body(request))
        assembler = _ReplyAssembler()
        saw_done = False
        async with self._endpoint.events(body, headers) as events:
            async for data in events:
                if data == "[DONE]":
                    saw_done = True
                    break
                for item in assembler.feed(self._parse_chunk(data)):
                    yield item
            if saw_done:
                await read_to_end(events)
        if not assembler.finished:
            # A server whose reply broke off may not serve that connection again (llama-cpp-
            # python closes it, late): the next request must not go out on it.
            await self._endpoint.aclose()
            raise self._cut_short(assembler.started, saw_done)
        yield assembler.reply()

    async def aclose(self) -> None:
        await self._endpoint.aclose()

    def _api_key(self) -> str | None:
        """The key named by `api_key_env`, else OPENAI_API_KEY if set and the server is
        OpenAI's own; local servers need none."""
        name = key_variable(self._config, self._endpoint.url, DEFAULT_BASE_URL, DEFAULT_KEY_ENV)
        key = os.environ.get(name, "").strip() if name else ""
        if self._config.api_key_env and not key:
            raise ProviderError(
                f"openai: environment variable {name} (model.api_key_env) is not set; "
                "set it to the API key in capd's environment"
            )
        return key or None

    def _request_body(self, request: ModelRequest) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.extend(_wire_messages(request.messages))
        body: dict[str, Any] = {
            "model": self._config.name,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [_wire_tool(tool) for tool in request.tools]
            if request.tool_choice is not None:
                body["tool_choice"] = _wire_tool_choice(request.tool_choice)
        max_tokens = request.max_tokens or self._config.max_tokens
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        if self._config.temperature is not None:
            body["temperature"] = self._config.temperature
        return body

    def _cut_short(self, started: bool, saw_done: bool) -> ProviderError:
        """A stream without a finish_reason: the reply is incomplete, even after [DONE]."""
        url = self._endpoint.url
        if saw_done:
            return ProviderError(
                f"openai: stream from {url} ended with [DONE] but no finish_reason; "
                "llama-cpp-python's server stops a reply so when a newer request arrives "
                "(start it with --interrupt_requests False when pods share it)",
                retryable=True,
            )
        if started:
            return ProviderError(
                f"openai: stream ended early from {url} (no [DONE], no finish_reason)",
                retryable=True,
            )
        # llama-cpp-python checks the window inside the stream it has answered 200 to, and
        # ends it empty when the prompt does not fit: taken as an overflow, so the pod
        # compacts its context instead of failing every turn from then on.
        return ProviderError(
            f"openai: stream ended before any reply from {url} (no [DONE], no "
            "finish_reason); llama-cpp-python's server ends it so when the conversation no "
            "longer fits the model's context window",
            status=200,
            overflow=True,
        )

    def _parse_chunk(self, data: str) -> "_Chunk":
        try:
            chunk = _Chunk.model_validate_json(data)
        except ValidationError as exc:
            raise ProviderError(
                f"openai: malformed stream chunk from {self._endpoint.url}: {excerpt(data)}",
                retryable=True,
            ) from exc
        if chunk.error is not None:
            reason = error_reason(chunk.error)
            raise ProviderError(
                f"openai: error in stream from {self._endpoint.url}: {reason.text}",
                retryable=_looks_transient(chunk.error) and not reason.deterministic,
                overflow=reason.overflow,
            )
        return chunk


# -- request ------------------------------------------------------------------------------


def _wire_messages(messages: Sequence[ChatMessage]) -> Iterator[dict[str, Any]]:
    """A reply cut short (by a pause or max_tokens) that would be last or followed by its
    continuation is followed by a user line asking to continue it: servers take a last
    assistant message as the start of a new reply or as a prefill, and some chat
    templates (gemma's) want roles to alternate."""
    for message, following in zip(messages, [*messages[1:], None], strict=False):
        yield _wire_message(message)
        if message.unfinished and (following is None or following.role == "assistant"):
            yield {"role": "user", "content": continue_text(message)}


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.call_id, "content": message.text}
    if message.role == "user":
        return {"role": "user", "content": message.text}
    # Content stays a string beside tool calls: llama-cpp-python refuses null (HTTP 500),
    # and OpenAI, vLLM, Ollama and llama-server take "".
    wire: dict[str, Any] = {"role": "assistant", "content": message.text}
    if message.tool_calls:
        wire["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": orjson.dumps(call.arguments).decode()},
            }
            for call in message.tool_calls
        ]
    return wire


def _wire_tool_choice(choice: str) -> str | dict[str, Any]:
    if choice in TOOL_CHOICES:
        return choice
    return {"type": "function", "function": {"name": choice}}


def _wire_tool(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": tool.name,
            "description": tool.description,
            "parameters": tool.parameters,
        },
    }


# -- response -----------------------------------------------------------------------------


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _FunctionDelta(_Lenient):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(_Lenient):
    index: int | None = None
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(_Lenient):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(_Lenient):
    delta: _Delta | None = None
    finish_reason: str | None = None


class _ChunkUsage(_Lenient):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Chunk(_Lenient):
    """One `chat.completion.chunk`; servers differ in which fields they send or null out."""

    choices: list[_Choice] | None = None
    usage: _ChunkUsage | None = None
    error: Any = None


@dataclass(slots=True)
class _PendingCall:
    call_id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    begun: bool = False


class _ReplyAssembler:
    """Turns chunks into stream items as they come and keeps what the final ModelReply needs."""

    def __init__(self) -> None:
        self.started = False
        self.finished = False
        self._finish_reason = ""
        self._text: list[str] = []
        self._calls: dict[int, _PendingCall] = {}
        self._usage = Usage()

    def feed(self, chunk: _Chunk) -> Iterator[StreamItem]:
        self.started = True
        if chunk.usage is not None:
            self._usage = Usage(
                input_tokens=chunk.usage.prompt_tokens,
                output_tokens=chunk.usage.completion_tokens,
            )
        if not chunk.choices:
            return
        choice = chunk.choices[0]
        if choice.finish_reason is not None:
            self.finished = True
            self._finish_reason = choice.finish_reason
        delta = choice.delta
        if delta is None:
            return
        if thinking := delta.reasoning_content or delta.reasoning:
            yield ThinkingChunk(thinking)
        if delta.content:
            self._text.append(delta.content)
            yield TextChunk(delta.content)
        for fragment in delta.tool_calls or ():
            yield from self._feed_tool_call(fragment)

    def reply(self) -> ModelReply:
        return ModelReply(
            text="".join(self._text),
            tool_calls=[
                ToolCall(
                    id=call.call_id or _new_call_id(index),
                    name=call.name,
                    arguments=parse_tool_arguments("".join(call.arguments)),
                )
                for index, call in sorted(self._calls.items())
            ],
            usage=self._usage,
            truncated=self._finish_reason == "length",
        )

    def _feed_tool_call(self, fragment: _ToolCallDelta) -> Iterator[StreamItem]:
        index = self._index_of(fragment)
        call = self._calls.setdefault(index, _PendingCall())
        call.call_id = call.call_id or fragment.id or ""
        function = fragment.function or _FunctionDelta()
        call.name = call.name or function.name or ""
        if function.arguments:
            call.arguments.append(function.arguments)
        if call.begun:
            if function.arguments:
                yield ToolCallArgs(call.call_id, function.arguments)
        elif call.name:
            # Begin once the name is known; any arguments that came first follow at once.
            call.begun = True
            call.call_id = call.call_id or _new_call_id(index)
            yield ToolCallBegin(call.call_id, call.name)
            if call.arguments:
                yield ToolCallArgs(call.call_id, "".join(call.arguments))

    def _index_of(self, fragment: _ToolCallDelta) -> int:
        """The fragment's `index`; servers that omit it send one whole call per new id."""
        if fragment.index is not None:
            return fragment.index
        if not self._calls:
            return 0
        last = max(self._calls)
        if fragment.id and self._calls[last].call_id not in ("", fragment.id):
            return last + 1
        return last


def _new_call_id(index: int) -> str:
    return f"call_{index}_{secrets.token_hex(6)}"


# -- errors -------------------------------------------------------------------------------


def _looks_transient(error: Any) -> bool:
    if isinstance(error, dict) and isinstance(code := error.get("code"), int):
        return is_retryable_status(code)
    text = str(error).lower()
    return any(hint in text for hint in _TRANSIENT_HINTS)
