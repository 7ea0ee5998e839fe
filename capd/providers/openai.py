"""OpenAI-compatible chat completions (`POST {base_url}/chat/completions`), streamed over SSE.

Works with api.openai.com and with the many servers that copy its wire format (vLLM,
llama.cpp, Ollama, LM Studio, OpenRouter, ...). Uses httpx because it streams response
bodies, closes them cleanly on cancellation and pools connections; none of which we
would want to write ourselves.
"""

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, suppress
from dataclasses import dataclass, field
from math import isfinite
from typing import Any

import httpx
import orjson
from pydantic import BaseModel, ConfigDict, ValidationError

from capd.providers.base import (
    INVALID_JSON_KEY,
    ChatMessage,
    ModelReply,
    ModelRequest,
    ProviderError,
    StreamItem,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
    ToolSpec,
)
from protocol.events import ToolCall, Usage
from protocol.manifest import ModelConfig

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_KEY_ENV = "OPENAI_API_KEY"
DEFAULT_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 10.0
EXCERPT_CHARS = 200
TAIL_TIMEOUT_S = 1.0
"""How long to wait for the body to end after [DONE] before dropping the connection."""

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
        self._url = f"{(config.base_url or DEFAULT_BASE_URL).rstrip('/')}/chat/completions"
        self._timeout_s = config.request_timeout_s or DEFAULT_TIMEOUT_S
        self._client: httpx.AsyncClient | None = None

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if api_key := self._api_key():
            headers["Authorization"] = f"Bearer {api_key}"
        body = orjson.dumps(self._request_body(request))
        assembler = _ReplyAssembler()
        saw_done = False
        try:
            http = self._http()
            async with http.stream("POST", self._url, content=body, headers=headers) as response:
                if response.status_code >= 400:
                    raise await self._status_error(response)
                async with aclosing(_sse_data(response.aiter_lines())) as events:
                    async for data in events:
                        if data == "[DONE]":
                            saw_done = True
                            break
                        for item in assembler.feed(self._parse_chunk(data)):
                            yield item
                    if saw_done:
                        await _read_to_end(events)
        except httpx.RequestError as exc:
            raise self._transport_error(exc) from exc
        except httpx.InvalidURL as exc:
            raise ProviderError(f"openai: invalid base_url {self._url}: {exc}") from exc
        if not saw_done and not assembler.finished:
            raise ProviderError(
                f"openai: stream ended early from {self._url} (no [DONE], no finish_reason)",
                retryable=True,
            )
        yield assembler.reply()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = httpx.Timeout(
                self._timeout_s, connect=min(CONNECT_TIMEOUT_S, self._timeout_s)
            )
            self._client = httpx.AsyncClient(timeout=timeout)
        return self._client

    def _api_key(self) -> str | None:
        """The key named by `api_key_env`, else OPENAI_API_KEY if set; local servers need none."""
        name = self._config.api_key_env
        key = os.environ.get(name or DEFAULT_KEY_ENV, "").strip()
        if name and not key:
            raise ProviderError(
                f"openai: environment variable {name} (model.api_key_env) is not set; "
                "set it to the API key in capd's environment"
            )
        return key or None

    def _request_body(self, request: ModelRequest) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if request.system_prompt:
            messages.append({"role": "system", "content": request.system_prompt})
        messages.extend(_wire_message(message) for message in request.messages)
        body: dict[str, Any] = {
            "model": self._config.name,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.tools:
            body["tools"] = [_wire_tool(tool) for tool in request.tools]
        if self._config.max_tokens is not None:
            body["max_tokens"] = self._config.max_tokens
        if self._config.temperature is not None:
            body["temperature"] = self._config.temperature
        return body

    def _parse_chunk(self, data: str) -> "_Chunk":
        try:
            chunk = _Chunk.model_validate_json(data)
        except ValidationError as exc:
            raise ProviderError(
                f"openai: malformed stream chunk from {self._url}: {_excerpt(data)}",
                retryable=True,
            ) from exc
        if chunk.error is not None:
            raise ProviderError(
                f"openai: error in stream from {self._url}: {_error_text(chunk.error)}",
                retryable=_looks_transient(chunk.error),
            )
        return chunk

    async def _status_error(self, response: httpx.Response) -> ProviderError:
        body = await response.aread()
        status = response.status_code
        detail = _error_message(body) or response.reason_phrase or "no details"
        return ProviderError(
            f"openai: HTTP {status} from {self._url}: {detail}",
            retryable=_is_retryable_status(status),
            status=status,
            retry_after_s=_retry_after(response.headers),
        )

    def _transport_error(self, exc: httpx.RequestError) -> ProviderError:
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return ProviderError(f"openai: cannot send request to {self._url}: {exc}")
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            what = f"cannot connect to {self._url}"
        elif isinstance(exc, httpx.ReadTimeout):
            what = f"no data from {self._url} for {self._timeout_s:g} s (model.request_timeout_s)"
        elif isinstance(exc, httpx.RemoteProtocolError):
            what = f"connection to {self._url} broke"
        else:
            what = f"request to {self._url} failed"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return ProviderError(f"openai: {what}: {detail}", retryable=True)


# -- request ------------------------------------------------------------------------------


def _wire_message(message: ChatMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.call_id, "content": message.text}
    if message.role == "user":
        return {"role": "user", "content": message.text}
    if not message.tool_calls:
        return {"role": "assistant", "content": message.text}
    return {
        "role": "assistant",
        "content": message.text or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": orjson.dumps(call.arguments).decode()},
            }
            for call in message.tool_calls
        ],
    }


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
        self.finished = False
        self._text: list[str] = []
        self._calls: dict[int, _PendingCall] = {}
        self._usage = Usage()

    def feed(self, chunk: _Chunk) -> Iterator[StreamItem]:
        if chunk.usage is not None:
            self._usage = Usage(
                input_tokens=chunk.usage.prompt_tokens,
                output_tokens=chunk.usage.completion_tokens,
            )
        if not chunk.choices:
            return
        choice = chunk.choices[0]
        self.finished = self.finished or choice.finish_reason is not None
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
                    arguments=_parse_arguments("".join(call.arguments)),
                )
                for index, call in sorted(self._calls.items())
            ],
            usage=self._usage,
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


def _parse_arguments(raw: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {INVALID_JSON_KEY: raw}


async def _sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event; comments and other fields are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


async def _read_to_end(events: AsyncIterator[str]) -> None:
    """Reads what follows [DONE] so httpx can reuse the connection; never fails the call."""
    with suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(TAIL_TIMEOUT_S):
            async for _ in events:
                pass


# -- errors -------------------------------------------------------------------------------


def _error_message(body: bytes) -> str:
    """The server's own words from an error body: `error.message` when JSON, else an excerpt."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return _excerpt(body.decode(errors="replace"))
    if isinstance(payload, dict):
        for key in ("error", "message", "detail"):
            if payload.get(key):
                return _error_text(payload[key])
    return _excerpt(body.decode(errors="replace"))


def _error_text(error: Any) -> str:
    if isinstance(error, dict) and error.get("message"):
        return _excerpt(str(error["message"]))
    if isinstance(error, str):
        return _excerpt(error)
    return _excerpt(orjson.dumps(error).decode())


def _looks_transient(error: Any) -> bool:
    if isinstance(error, dict) and isinstance(code := error.get("code"), int):
        return _is_retryable_status(code)
    text = str(error).lower()
    return any(hint in text for hint in _TRANSIENT_HINTS)


def _is_retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return max(seconds, 0.0) if isfinite(seconds) else None


def _excerpt(text: str) -> str:
    """One line of at most EXCERPT_CHARS characters."""
    line = " ".join(text.split())
    return line if len(line) <= EXCERPT_CHARS else f"{line[: EXCERPT_CHARS - 1]}…"
