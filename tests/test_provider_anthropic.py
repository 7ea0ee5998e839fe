"""AnthropicProvider against a local server that speaks the real Messages streaming format."""

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import pytest
from pydantic import ValidationError

from capd.chat import INVALID_JSON_KEY, ChatMessage, ToolSpec
from capd.providers import http
from capd.providers.anthropic import AnthropicProvider
from capd.providers.base import (
    CONTINUE_CUT_TEXT,
    CONTINUE_TEXT,
    ModelReply,
    ModelRequest,
    ProviderError,
    StreamItem,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
)
from capd.providers.http import NO_KEY_HINT
from protocol.events import ThinkingBlock, ToolCall, Usage
from protocol.manifest import ModelConfig
from tests.fakes.anthropic_server import (
    AnthropicTestServer,
    DropReply,
    ErrorReply,
    RawStreamReply,
    StreamErrorReply,
    TextReply,
    ToolUse,
    ToolUseReply,
)

TIMEOUT_S = 5.0
HELLO = ModelRequest(system_prompt="", messages=[ChatMessage(role="user", text="hi")])

ProviderFactory = Callable[..., AnthropicProvider]


@pytest.fixture
async def server() -> AsyncIterator[AnthropicTestServer]:
    async with AnthropicTestServer() as running:
        yield running


@pytest.fixture
async def make_provider(
    server: AnthropicTestServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ProviderFactory]:
    """Providers aimed at `server` by default, closed after the test."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    providers: list[AnthropicProvider] = []

    def make(**fields: object) -> AnthropicProvider:
        config = {"provider": "anthropic", "name": "claude-test", "base_url": server.base_url}
        provider = AnthropicProvider(ModelConfig.model_validate({**config, **fields}))
        providers.append(provider)
        return provider

    yield make
    for provider in providers:
        await provider.aclose()


async def collect(provider: AnthropicProvider, request: ModelRequest = HELLO) -> list[StreamItem]:
    async with asyncio.timeout(TIMEOUT_S):
        return [item async for item in provider.stream(request)]


async def failure(provider: AnthropicProvider, request: ModelRequest = HELLO) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await collect(provider, request)
    return caught.value


async def sent_messages(
    server: AnthropicTestServer, provider: AnthropicProvider, *messages: ChatMessage
) -> list[dict[str, object]]:
    """The `messages` the provider sends for `messages` (which the server accepted)."""
    await collect(provider, ModelRequest(system_prompt="", messages=messages))
    assert isinstance(server.requests[-1]["messages"], list)
    return server.requests[-1]["messages"]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def text(value: str) -> dict[str, str]:
    return {"type": "text", "text": value}


# -- streaming ----------------------------------------------------------------------------


async def test_text_streams_in_order(server: AnthropicTestServer, make_provider: ProviderFactory):
    server.enqueue(TextReply(["Hel", "lo", ", world"], input_tokens=12, output_tokens=3))

    items = await collect(make_provider())

    assert items == [
        TextChunk("Hel"),
        TextChunk("lo"),
        TextChunk(", world"),
        ModelReply(text="Hello, world", usage=Usage(input_tokens=12, output_tokens=3)),
    ]


async def test_thinking_streams_first_and_comes_back_signed(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply(["42"], thinking=["Let me ", "think."], signature="sig-1"))

    items = await collect(make_provider())

    assert items == [
        ThinkingChunk("Let me "),
        ThinkingChunk("think."),
        TextChunk("42"),
        ModelReply(
            text="42",
            usage=Usage(input_tokens=10, output_tokens=5),
            thinking=[ThinkingBlock(text="Let me think.", signature="sig-1")],
        ),
    ]


async def test_parallel_tool_uses_split_across_chunks(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    bash_input = {"command": "ls -la /tmp", "timeout_s": 30}
    read_input = {"path": "notes/todo.md", "limit": 20}
    server.enqueue(
        ToolUseReply(
            [
                ToolUse("bash", bash_input, id="toolu_bash"),
                ToolUse("read_file", read_input, id="toolu_read"),
            ],
            text=["Checking."],
            thinking=["Two things to look at."],
            fragment_chars=5,
            input_tokens=40,
            output_tokens=25,
        )
    )

    items = await collect(make_provider())

    begins = [item for item in items if isinstance(item, ToolCallBegin)]
    assert begins == [ToolCallBegin("toolu_bash", "bash"), ToolCallBegin("toolu_read", "read_file")]
    for begin, expected in zip(begins, (bash_input, read_input), strict=True):
        fragments = [
            (position, item)
            for position, item in enumerate(items)
            if isinstance(item, ToolCallArgs) and item.call_id == begin.call_id
        ]
        assert len(fragments) > 1
        assert items.index(begin) < fragments[0][0]
        assert json.loads("".join(item.json for _, item in fragments)) == expected
    assert items[:2] == [ThinkingChunk("Two things to look at."), TextChunk("Checking.")]
    reply = items[-1]
    assert isinstance(reply, ModelReply)
    assert reply.text == "Checking."
    assert reply.tool_calls == [
        ToolCall(id="toolu_bash", name="bash", arguments=bash_input),
        ToolCall(id="toolu_read", name="read_file", arguments=read_input),
    ]
    assert reply.usage == Usage(input_tokens=40, output_tokens=25)


async def test_unparseable_and_empty_input(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(ToolUseReply([ToolUse("bash", '{"command": "ls'), ToolUse("list_pods", "")]))

    reply = (await collect(make_provider()))[-1]

    assert isinstance(reply, ModelReply)
    assert [call.arguments for call in reply.tool_calls] == [
        {INVALID_JSON_KEY: '{"command": "ls'},
        {},
    ]


async def test_redacted_thinking_is_kept(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(
        ToolUseReply(
            [ToolUse("list_pods")], thinking=["Hmm."], signature="sig-2", redacted="EmwKAhgB"
        )
    )

    reply = (await collect(make_provider()))[-1]

    assert isinstance(reply, ModelReply)
    assert reply.thinking == [
        ThinkingBlock(text="Hmm.", signature="sig-2"),
        ThinkingBlock(redacted="EmwKAhgB"),
    ]


async def test_tolerates_sse_variants(server: AnthropicTestServer, make_provider: ProviderFactory):
    """Data without `event:` lines, comments, `data:` without a space, CRLF, event types
    and blocks it does not know, and a tool_use whose input comes whole in its start."""

    tool_use = {"type": "tool_use", "name": "list_pods", "input": {"all": True}}
    events = [
        {"type": "message_start", "message": {"usage": {}}},
        {"type": "content_block_start", "index": 0, "content_block": text("ok")},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "web_search"}},
        {"type": "brand_new_event", "index": 1},
        {"type": "content_block_start", "index": 2, "content_block": tool_use},
        {"type": "message_stop"},
    ]
    frames = [f"data: {json.dumps(event)}\n\n" for event in events]
    frames[1:1] = [": keep-alive\n\n", 'event: ping\ndata:{"type":"ping"}\r\n\r\n']
    server.enqueue(RawStreamReply(frames))

    items = await collect(make_provider())

    assert items[0] == TextChunk("ok")
    begin = items[1]
    assert isinstance(begin, ToolCallBegin)
    assert (begin.name, begin.call_id[:8]) == ("list_pods", "toolu_2_")
    assert items[2:] == [
        ToolCallArgs(begin.call_id, '{"all":true}'),
        ModelReply(
            text="ok",
            tool_calls=[ToolCall(id=begin.call_id, name="list_pods", arguments={"all": True})],
        ),
    ]


async def test_usage_counts_cached_input_and_the_final_output(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    """Input is the prompt, cached or not; message_delta's output count is a running total."""
    usage = {
        "input_tokens": 5,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 1000,
        "output_tokens": 1,
    }
    events = [
        ("message_start", {"type": "message_start", "message": {"usage": usage}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 7}}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 42}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    server.enqueue(RawStreamReply([f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events]))

    items = await collect(make_provider())

    assert items == [ModelReply(text="", usage=Usage(input_tokens=1105, output_tokens=42))]


async def test_empty_queue_answers_with_placeholder(make_provider: ProviderFactory):
    reply = (await collect(make_provider()))[-1]

    assert isinstance(reply, ModelReply)
    assert reply.text == "(no scripted reply)"


# -- request ------------------------------------------------------------------------------


async def test_request_body_and_headers(
    server: AnthropicTestServer, make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("CAPD_TEST_ANTHROPIC_KEY", "sk-ant-test-123")
    provider = make_provider(
        name="claude-sonnet-4-5",
        api_key_env="CAPD_TEST_ANTHROPIC_KEY",
        max_tokens=2048,
        temperature=0.2,
    )
    schema = {"type": "object", "properties": {"command": {"type": "string"}}}
    calls = (
        ToolCall(id="toolu_1", name="bash", arguments={"command": "ls"}),
        ToolCall(id="toolu_2", name="bash", arguments={"command": "false"}),
    )
    request = ModelRequest(
        system_prompt="You are careful.",
        messages=[
            ChatMessage(role="user", text="list files"),
            ChatMessage(role="assistant", tool_calls=calls),
            ChatMessage(role="tool", call_id="toolu_1", name="bash", text="a.txt\nb.txt"),
            ChatMessage(role="tool", call_id="toolu_2", name="bash", text="", is_error=True),
            ChatMessage(role="user", text="[notification from ci]\nCI is green"),
            ChatMessage(role="assistant", text="Two files."),
            ChatMessage(role="user", text="thanks"),
        ],
        tools=[ToolSpec(name="bash", description="Run a command.", parameters=schema)],
    )

    await collect(provider, request)

    assert server.requests == [
        {
            "model": "claude-sonnet-4-5",
            "max_tokens": 2048,
            "messages": [
                {"role": "user", "content": [text("list files")]},
                {
                    "role": "assistant",
                    "content": [
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "bash",
                            "input": calls[0].arguments,
                        },
                        {
                            "type": "tool_use",
                            "id": "toolu_2",
                            "name": "bash",
                            "input": calls[1].arguments,
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_1",
                            "content": "a.txt\nb.txt",
                            "is_error": False,
                        },
                        {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True},
                        text("[notification from ci]\nCI is green"),
                    ],
                },
                {"role": "assistant", "content": [text("Two files.")]},
                {"role": "user", "content": [text("thanks")]},
            ],
            "stream": True,
            "system": "You are careful.",
            "tools": [{"name": "bash", "description": "Run a command.", "input_schema": schema}],
            "temperature": 0.2,
        }
    ]
    headers = server.headers[0]
    assert headers["x-api-key"] == "sk-ant-test-123"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["content-type"] == "application/json"


async def test_minimal_request_without_key(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    await collect(make_provider())

    assert server.requests == [
        {
            "model": "claude-test",
            "max_tokens": 8192,
            "messages": [{"role": "user", "content": [text("hi")]}],
            "stream": True,
        }
    ]
    assert "x-api-key" not in server.headers[0]
    assert "authorization" not in server.headers[0]


async def test_anthropic_api_key_goes_only_to_anthropic(
    server: AnthropicTestServer, make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
):
    """ANTHROPIC_API_KEY is for api.anthropic.com; a server at another base_url gets a key
    only when the manifest names its variable (tests/test_api_keys.py)."""
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-default")

    await collect(make_provider())

    assert "x-api-key" not in server.headers[0]


@pytest.mark.parametrize(
    ("fields", "variable"),
    [
        ({"api_key_env": "CAPD_TEST_MISSING_KEY"}, "CAPD_TEST_MISSING_KEY"),
        ({"base_url": None}, "ANTHROPIC_API_KEY"),
    ],
)
async def test_missing_key_is_a_clear_error(
    server: AnthropicTestServer,
    make_provider: ProviderFactory,
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, object],
    variable: str,
):
    """A named variable must be set; so must ANTHROPIC_API_KEY for the real API."""
    monkeypatch.delenv("CAPD_TEST_MISSING_KEY", raising=False)

    error = await failure(make_provider(**fields))

    assert not error.retryable
    assert error.message == (
        f"anthropic: environment variable {variable} (model.api_key_env) is not set; "
        "set it to the API key in capd's environment"
    )
    assert server.requests == []


@pytest.mark.parametrize(("max_tokens", "sent"), [(None, 8192 + 2048), (4096, 4096)])
async def test_thinking_budget(
    server: AnthropicTestServer,
    make_provider: ProviderFactory,
    max_tokens: int | None,
    sent: int,
):
    await collect(make_provider(thinking_budget_tokens=2048, max_tokens=max_tokens))

    body = server.requests[0]
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["max_tokens"] == sent


async def test_thinking_goes_back_with_its_tool_calls(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    call = ToolCall(id="toolu_1", name="list_pods")
    thinking = (
        ThinkingBlock(text="Who runs?", signature="sig-1"),
        ThinkingBlock(redacted="EmwKAhgB"),
        ThinkingBlock(text="cut short by a pause, never signed"),
    )

    messages = await sent_messages(
        server,
        make_provider(thinking_budget_tokens=1024),
        ChatMessage(role="user", text="who runs?"),
        ChatMessage(role="assistant", text="Looking.", tool_calls=(call,), thinking=thinking),
        ChatMessage(role="tool", call_id="toolu_1", name="list_pods", text="w1 idle"),
    )

    assert messages[1] == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Who runs?", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "EmwKAhgB"},
            text("Looking."),
            {"type": "tool_use", "id": "toolu_1", "name": "list_pods", "input": {}},
        ],
    }


async def test_an_interrupted_reply_is_followed_by_a_note_to_continue(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    """A pause leaves the context ending in partial text, which the API would take as a
    prefill; the next reply follows that text in the context, which roles forbid."""
    provider = make_provider()
    hello = ChatMessage(role="user", text="write a poem")
    partial = ChatMessage(role="assistant", text="Roses are ", interrupted=True)

    on_resume = await sent_messages(server, provider, hello, partial)
    later = await sent_messages(
        server,
        provider,
        hello,
        partial,
        ChatMessage(role="assistant", text="red."),
        ChatMessage(role="user", text="another"),
    )

    assert on_resume == [
        {"role": "user", "content": [text("write a poem")]},
        {"role": "assistant", "content": [text("Roses are ")]},
        {"role": "user", "content": [text(CONTINUE_TEXT)]},
    ]
    assert later == [
        *on_resume,
        {"role": "assistant", "content": [text("red.")]},
        {"role": "user", "content": [text("another")]},
    ]


async def test_a_reply_cut_off_by_max_tokens_is_truncated(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(
        TextReply("Roses are", stop_reason="max_tokens"),
        ToolUseReply([ToolUse("write_file", '{"path": "a.txt", "cont')], stop_reason="max_tokens"),
        TextReply("."),
    )
    provider = make_provider()

    replies = [(await collect(provider))[-1] for _ in range(3)]

    truncated = [isinstance(r, ModelReply) and r.truncated for r in replies]
    assert truncated == [True, True, False]
    cut = replies[1]
    assert isinstance(cut, ModelReply)
    assert INVALID_JSON_KEY in cut.tool_calls[0].arguments


async def test_a_reply_cut_off_by_the_context_window_is_an_overflow(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply("red", stop_reason="model_context_window_exceeded"))

    error = await failure(make_provider())

    assert error.overflow
    assert not error.retryable
    assert "model_context_window_exceeded" in error.message


async def test_a_truncated_reply_is_followed_by_a_note_to_continue(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    hello = ChatMessage(role="user", text="write a poem")
    cut = ChatMessage(role="assistant", text="Roses are", truncated=True)

    sent = await sent_messages(server, make_provider(), hello, cut)

    assert sent[-1] == {"role": "user", "content": [text(CONTINUE_CUT_TEXT)]}


@pytest.mark.parametrize(
    ("choice", "wire"),
    [
        ("auto", {"type": "auto"}),
        ("required", {"type": "any"}),
        ("none", {"type": "none"}),
        ("bash", {"type": "tool", "name": "bash"}),
    ],
)
async def test_tool_choice(
    server: AnthropicTestServer, make_provider: ProviderFactory, choice: str, wire: object
):
    spec = ToolSpec(name="bash", description="Run a command.", parameters={"type": "object"})
    request = ModelRequest("", [ChatMessage(role="user", text="hi")], [spec], choice)

    await collect(make_provider(), request)

    assert server.requests[0]["tool_choice"] == wire


async def test_empty_messages_are_left_out(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    """The API refuses empty text and empty turns; the user turns around them merge."""
    messages = await sent_messages(
        server,
        make_provider(),
        ChatMessage(role="user", text="first"),
        ChatMessage(role="assistant", text=""),
        ChatMessage(role="user", text=""),
        ChatMessage(role="user", text="second"),
    )

    assert messages == [{"role": "user", "content": [text("first"), text("second")]}]


def test_manifest_checks_the_thinking_budget():
    with pytest.raises(ValidationError, match="for provider anthropic only"):
        ModelConfig.model_validate({"provider": "openai", "thinking_budget_tokens": 2048})
    with pytest.raises(ValidationError, match="less than max_tokens"):
        ModelConfig.model_validate(
            {"provider": "anthropic", "thinking_budget_tokens": 2048, "max_tokens": 2048}
        )
    with pytest.raises(ValidationError, match="greater than or equal to 1024"):
        ModelConfig.model_validate({"provider": "anthropic", "thinking_budget_tokens": 1000})


# -- errors -------------------------------------------------------------------------------


async def test_rate_limit_is_retryable_with_retry_after(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(
        ErrorReply(
            429,
            "Number of request tokens has exceeded your per-minute rate limit",
            type="rate_limit_error",
            retry_after="7",
        )
    )

    error = await failure(make_provider())

    assert error.retryable
    assert error.status == 429
    assert error.retry_after_s == 7.0
    assert "per-minute rate limit" in error.message


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (529, "overloaded_error", True),
        (500, "api_error", True),
        (400, "invalid_request_error", False),
        (401, "authentication_error", False),
        (404, "not_found_error", False),
    ],
)
async def test_http_errors(
    server: AnthropicTestServer,
    make_provider: ProviderFactory,
    status: int,
    kind: str,
    retryable: bool,
):
    server.enqueue(ErrorReply(status, "Something specific went wrong", type=kind))

    error = await failure(make_provider())

    assert error.retryable is retryable
    assert error.status == status
    assert error.retry_after_s is None
    # A refusal for want of a key, when capd sent none, says how to send one.
    hint = f"; {NO_KEY_HINT}" if status == 401 else ""
    assert error.message == (
        f"anthropic: HTTP {status} from {server.base_url}/v1/messages: "
        f"Something specific went wrong{hint}"
    )


async def test_a_prompt_too_long_is_an_overflow(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(ErrorReply(400, "prompt is too long: 208310 tokens > 200000 maximum"))

    error = await failure(make_provider())

    assert error.overflow
    assert not error.retryable
    assert error.message.endswith("prompt is too long: 208310 tokens > 200000 maximum")


async def test_connection_refused_is_retryable(make_provider: ProviderFactory):
    base_url = f"http://127.0.0.1:{closed_port()}"

    error = await failure(make_provider(base_url=base_url))

    assert error.retryable
    assert f"anthropic: cannot connect to {base_url}/v1/messages" in error.message


async def test_dropped_connection_is_retryable(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(DropReply(["partial ", "answer"]))
    seen: list[StreamItem] = []

    async def consume() -> None:
        async for item in make_provider().stream(HELLO):
            seen.append(item)

    with pytest.raises(ProviderError) as caught:
        await asyncio.wait_for(consume(), TIMEOUT_S)

    assert seen == [TextChunk("partial "), TextChunk("answer")]
    assert caught.value.retryable
    assert server.base_url in caught.value.message


async def test_stream_ending_before_message_stop_is_retryable(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "cut"},
    }
    server.enqueue(
        RawStreamReply(
            [
                f"event: content_block_start\ndata: {json.dumps(start)}\n\n",
                f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n",
            ]
        )
    )

    error = await failure(make_provider())

    assert error.retryable
    assert error.message == (
        f"anthropic: stream ended early from {server.base_url}/v1/messages (no message_stop)"
    )


@pytest.mark.parametrize(
    ("reply", "retryable"),
    [
        (StreamErrorReply("Overloaded", type="overloaded_error", text=["Hel"]), True),
        (StreamErrorReply("Internal server error", type="api_error"), True),
        (StreamErrorReply("Output blocked by policy", type="invalid_request_error"), False),
    ],
)
async def test_error_event_inside_stream(
    server: AnthropicTestServer,
    make_provider: ProviderFactory,
    reply: StreamErrorReply,
    retryable: bool,
):
    server.enqueue(reply)

    error = await failure(make_provider())

    assert error.retryable is retryable
    assert error.message == (
        f"anthropic: error in stream from {server.base_url}/v1/messages: "
        f"{reply.message} ({reply.type})"
    )


async def test_malformed_event_is_retryable(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(RawStreamReply(["event: message_start\ndata: {not json\n\n"]))

    error = await failure(make_provider())

    assert error.retryable
    assert "malformed stream event" in error.message
    assert "{not json" in error.message


async def test_read_timeout_is_retryable(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply(["slow", "er"], delay_ms=2_000))

    error = await failure(make_provider(request_timeout_s=0.2))

    assert error.retryable
    assert "no data" in error.message
    await server.wait_disconnects(1, timeout=TIMEOUT_S)


# -- cancellation -------------------------------------------------------------------------


async def test_cancelling_the_consumer_aborts_the_request(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply(["tick"] * 1_000, delay_ms=20))
    provider = make_provider()
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async for item in provider.stream(HELLO):
            if isinstance(item, TextChunk):
                first_chunk.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), TIMEOUT_S)
    task.cancel()

    done, _ = await asyncio.wait({task}, timeout=1.0)
    assert task in done
    assert task.cancelled()
    await server.wait_disconnects(1, timeout=TIMEOUT_S)


async def test_closing_the_stream_aborts_the_request(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply(["tick"] * 1_000, delay_ms=20))

    async with asyncio.timeout(TIMEOUT_S), aclosing(make_provider().stream(HELLO)) as stream:
        assert await anext(stream) == TextChunk("tick")

    await server.wait_disconnects(1, timeout=TIMEOUT_S)
    assert server.disconnects == 1


# -- connections --------------------------------------------------------------------------


async def test_consecutive_requests_share_a_connection(
    server: AnthropicTestServer, make_provider: ProviderFactory
):
    server.enqueue(TextReply("one"), TextReply("two"))
    provider = make_provider()

    replies = [(await collect(provider))[-1], (await collect(provider))[-1]]

    assert [reply.text for reply in replies if isinstance(reply, ModelReply)] == ["one", "two"]
    assert server.connections == 1


async def test_body_left_open_after_message_stop_does_not_hold_the_reply(
    server: AnthropicTestServer, make_provider: ProviderFactory, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(http, "TAIL_TIMEOUT_S", 0.05)
    start = {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "done"},
    }
    server.enqueue(
        RawStreamReply(
            [
                f"data: {json.dumps(start)}\n\ndata: {json.dumps(delta)}\n\n"
                'data: {"type": "message_stop"}\n\n',
                ": much later\n\n",
            ],
            delay_ms=60_000,
        )
    )

    items = await collect(make_provider())

    assert items[-1] == ModelReply(text="done")
