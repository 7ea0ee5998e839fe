"""The Anthropic stand-in (tests/fakes/anthropic_server.py) takes what the real Claude Code CLI
sends and fails the way the real API fails. The requests below are the shapes Claude Code
2.1.332 sent it, cut down by hand (texts shortened, tools reduced to one)."""

import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.fakes.anthropic_server import AnthropicTestServer, TextReply, ToolUse, ToolUseReply

HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
    "context-management-2025-06-27,per-turn-control-2026-07-01,effort-2025-11-24",
    "x-api-key": "sk-ant-dummy",
    "x-app": "cli",
}
BASH = {
    "name": "Bash",
    "description": "Executes a bash command and returns its output.",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
        "additionalProperties": False,
    },
}
EPHEMERAL = {"type": "ephemeral"}


def _first_request() -> dict[str, Any]:
    """The first request of a turn: system blocks, the user's prompt, then a system entry."""
    return {
        "model": "claude-opus-5-5",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>\nAttribution...</system-reminder>"},
                    {"type": "text", "text": "run it"},
                ],
            },
            {
                "role": "system",
                "content": [
                    {"type": "text", "text": "# Environment\n...", "cache_control": EPHEMERAL}
                ],
            },
        ],
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332.1c9;"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": EPHEMERAL},
            {"type": "text", "text": "\nYou are an agent...", "cache_control": EPHEMERAL},
        ],
        "tools": [copy.deepcopy(BASH)],
        "metadata": {"user_id": json.dumps({"device_id": "d2", "session_id": "19331c8a"})},
        "max_tokens": 128000,
        "thinking": {"type": "adaptive", "display": "updates"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "stream": True,
    }


def _after_tool_use() -> dict[str, Any]:
    """The next request: the step's text and tool use (no thinking: adaptive thinking did
    not think), then the tool's result; the earlier system entry lost its marker."""
    body = _first_request()
    body["messages"][1] = {"role": "system", "content": "# Environment\n..."}
    body["messages"] += [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Running."},
                {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "tool_use_id": "toolu_1",
                    "type": "tool_result",
                    "content": "hi from bash",
                    "is_error": False,
                    "cache_control": EPHEMERAL,
                }
            ],
        },
    ]
    return body


@pytest.fixture
async def server() -> AsyncIterator[AnthropicTestServer]:
    async with AnthropicTestServer() as srv:
        yield srv


async def _post(server: AnthropicTestServer, path: str, body: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        return await client.post(path, json=body, headers=HEADERS)


@pytest.mark.parametrize("body", [_first_request(), _after_tool_use()])
async def test_claude_codes_requests_are_answered(
    server: AnthropicTestServer, body: dict[str, Any]
) -> None:
    server.enqueue(TextReply("Hello"))
    response = await _post(server, "/v1/messages?beta=true", body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/event-stream"
    assert '"text":"Hello"' in response.text
    assert server.requests == [body]


async def test_a_request_that_does_not_stream_gets_the_whole_message(
    server: AnthropicTestServer,
) -> None:
    """Claude Code's fallback when a stream fails: the same request with `stream: false`."""
    server.enqueue(
        ToolUseReply([ToolUse("Bash", {"command": "ls"}, id="toolu_1")], text=["Look", "ing."])
    )
    response = await _post(server, "/v1/messages?beta=true", {**_first_request(), "stream": False})
    assert response.status_code == 200
    message = response.json()
    assert (message["type"], message["role"], message["stop_reason"]) == (
        "message",
        "assistant",
        "tool_use",
    )
    assert message["content"] == [
        {"type": "text", "text": "Looking."},
        {"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {"command": "ls"}},
    ]
    assert message["usage"]["output_tokens"] == 5


async def test_count_tokens_is_answered_with_an_estimate(server: AnthropicTestServer) -> None:
    body = {"model": "claude-opus-5-5", "messages": [{"role": "user", "content": "foo"}]}
    response = await _post(server, "/v1/messages/count_tokens?beta=true", body)
    assert response.status_code == 200
    assert response.json()["input_tokens"] > 0
    assert server.requests == []


async def test_an_unknown_route_is_a_not_found_error(server: AnthropicTestServer) -> None:
    response = await _post(server, "/v1/complete", {})
    assert response.status_code == 404
    error = response.json()
    assert (error["type"], error["error"]["type"]) == ("error", "not_found_error")
    assert error["request_id"].startswith("req_")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda body: body["messages"].append({"role": "assistant", "content": "prefill"}),
            "Prefilling assistant messages is not supported for this model.",
        ),
        (
            lambda body: body["tools"][0].pop("input_schema"),
            "tools.0.custom.input_schema: Field required",
        ),
        (
            lambda body: body["system"].extend(
                [{"type": "text", "text": "more", "cache_control": EPHEMERAL}] * 2
            ),
            "A maximum of 4 blocks with cache_control may be provided. Found 5.",
        ),
        (
            lambda body: body["messages"].insert(1, {"role": "system", "content": ""}),
            "messages.1: all messages must have non-empty content",
        ),
    ],
)
async def test_requests_the_api_refuses_are_refused_as_it_refuses_them(
    server: AnthropicTestServer, change: Any, message: str
) -> None:
    body = _first_request()
    change(body)
    response = await _post(server, "/v1/messages?beta=true", body)
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"] == {"type": "invalid_request_error", "message": message}
