"""The agent loop on the `anthropic` provider, through a real capd and a local SSE server."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capd.providers.base import CONTINUE_CUT_TEXT, CONTINUE_TEXT
from tests.conftest import CapdProcess
from tests.fakes.anthropic_server import (
    AnthropicTestServer,
    ErrorReply,
    StreamErrorReply,
    TextReply,
    ToolUse,
    ToolUseReply,
)
from tests.helpers import (
    connect_pod,
    is_event,
    kinds,
    pause_turn,
    resume_turn,
    spawn,
    wait_for,
)

KEY_ENV = "CAPD_TEST_ANTHROPIC_KEY"


@pytest.fixture
async def server() -> AsyncIterator[AnthropicTestServer]:
    async with AnthropicTestServer() as srv:
        yield srv


@pytest.fixture
def capd(capd_dirs: CapdProcess) -> CapdProcess:
    """A running capd whose environment holds the API key the pods name."""
    capd_dirs.env[KEY_ENV] = "sk-ant-e2e"
    capd_dirs.start()
    return capd_dirs


def _model(server: AnthropicTestServer, **extra: object) -> dict[str, object]:
    return {
        "provider": "anthropic",
        "name": "claude-test",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        **extra,
    }


def _texts(events: list[dict[str, object]], kind: str) -> list[object]:
    return [e["text"] for e in events if e["event"] == kind]


async def test_thinking_text_and_a_tool_call_round_trip(
    capd: CapdProcess, server: AnthropicTestServer, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("the answer is 42\n")
    server.enqueue(
        ToolUseReply(
            [ToolUse("read_file", {"path": "notes.txt"})],
            text=["Let me look."],
            thinking=["The notes ", "should say."],
            signature="sig-e2e",
        ),
        TextReply(["It is ", "42."], thinking=["Found it."]),
    )
    await spawn(
        capd,
        "w1",
        _model(server, thinking_budget_tokens=1024),
        cwd=str(tmp_path),
        tools=["read_file"],
        system_prompt="Be brief.",
    )
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "what is the answer?"})
        end, seen = await wait_for(pod, is_event("turn_end"))

    assert (end["result"], end["output"]) == ("finished", "It is 42.")
    assert _texts(seen, "thinking_delta") == ["The notes ", "should say.", "Found it."]
    assert _texts(seen, "text_delta") == ["Let me look.", "It is ", "42."]
    order = kinds(seen)
    assert (
        order.index("thinking_delta")
        < order.index("text_delta")
        < order.index("tool_call_start")
        < order.index("tool_call_delta")
        < order.index("tool_result")
        < order.index("turn_end")
    )
    result = next(e for e in seen if e["event"] == "tool_result")
    assert "the answer is 42" in result["output"]
    assert result["is_error"] is False
    step = next(e for e in seen if e["event"] == "assistant_message")
    assert step["thinking"] == [
        {"text": "The notes should say.", "signature": "sig-e2e", "redacted": ""}
    ]

    second = server.requests[1]
    assert second["system"] == "Be brief."
    assert second["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert [t["name"] for t in second["tools"]] == ["read_file"]
    assert [m["role"] for m in second["messages"]] == ["user", "assistant", "user"]
    assert second["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "The notes should say.", "signature": "sig-e2e"},
        {"type": "text", "text": "Let me look."},
        {
            "type": "tool_use",
            "id": result["call_id"],
            "name": "read_file",
            "input": {"path": "notes.txt"},
        },
    ]
    assert second["messages"][2]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": result["call_id"],
            "content": result["output"],
            "is_error": False,
        }
    ]
    assert {h["x-api-key"] for h in server.headers} == {"sk-ant-e2e"}


async def test_signed_thinking_survives_a_restart_in_the_middle_of_a_tool(
    capd: CapdProcess, server: AnthropicTestServer
) -> None:
    """The API refuses tool results whose tool-use turn lost its thinking, so the
    thinking must come back from the store after capd dies."""
    server.enqueue(
        ToolUseReply(
            [ToolUse("bash", {"command": "sleep 30"})],
            thinking=["A nap first."],
            signature="sig-restart",
        ),
        TextReply("Rested."),
    )
    await spawn(capd, "w1", _model(server, thinking_budget_tokens=1024), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "rest"})
        await wait_for(pod, is_event("assistant_message"))
    assert capd.proc is not None
    capd.proc.kill()
    await asyncio.to_thread(capd.proc.wait, 10)
    await asyncio.to_thread(capd.start)

    async with await connect_pod(capd, "w1") as pod:
        assert (await pod.request({"method": "status"}))["status"] == "paused"
        end, _ = await resume_turn(pod)

    assert (end["result"], end["output"]) == ("finished", "Rested.")
    assistant, results = server.requests[1]["messages"][1:]
    assert assistant["content"][0] == {
        "type": "thinking",
        "thinking": "A nap first.",
        "signature": "sig-restart",
    }
    assert results["content"][0]["is_error"] is True


async def test_pause_mid_stream_then_resume_continues_the_reply(
    capd: CapdProcess, server: AnthropicTestServer
) -> None:
    server.enqueue(TextReply(["tok "] * 400, delay_ms=10), TextReply("the rest"))
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "write a lot"})
        await wait_for(pod, is_event("text_delta"))
        seen = await pause_turn(pod)
        await server.wait_disconnects(1)
        end, _ = await resume_turn(pod)

    partial = next(e for e in seen if e["event"] == "assistant_message")
    assert partial["interrupted"] is True
    assert partial["text"].startswith("tok ")
    assert (end["result"], end["output"]) == ("finished", partial["text"] + "the rest")
    assert server.requests[1]["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": partial["text"]}]},
        {"role": "user", "content": [{"type": "text", "text": CONTINUE_TEXT}]},
    ]


async def test_overloaded_answers_retry_with_events(
    capd: CapdProcess, server: AnthropicTestServer
) -> None:
    server.enqueue(
        ErrorReply(529, "Overloaded", type="overloaded_error", retry_after="0"),
        StreamErrorReply("Overloaded", text=["Hel"]),
        TextReply("recovered"),
    )
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        end, seen = await wait_for(pod, is_event("turn_end"))

    retries = [e for e in seen if e["event"] == "retry"]
    assert [(r["attempt"], r["max_attempts"]) for r in retries] == [(1, 4), (2, 4)]
    assert "HTTP 529" in retries[0]["error"]
    assert "error in stream" in retries[1]["error"]
    assert "overloaded_error" in retries[1]["error"]
    assert (end["result"], end["output"]) == ("finished", "recovered")


async def test_client_errors_fail_the_turn_at_once(
    capd: CapdProcess, server: AnthropicTestServer
) -> None:
    server.enqueue(ErrorReply(404, "model: claude-test", type="not_found_error"))
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        end, seen = await wait_for(pod, is_event("turn_end"))

    assert "retry" not in kinds(seen)
    assert end["result"] == "errored"
    assert end["error"] == (
        f"model call failed: anthropic: HTTP 404 from {server.base_url}/v1/messages: "
        "model: claude-test"
    )


async def test_a_reply_cut_off_by_max_tokens_is_continued(
    capd: CapdProcess, server: AnthropicTestServer
) -> None:
    server.enqueue(TextReply(["Once upon ", "a"], stop_reason="max_tokens"), TextReply(" time."))
    await spawn(capd, "w1", _model(server, max_tokens=4))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "tell a story"})
        end, seen = await wait_for(pod, is_event("turn_end"))

    steps = [e for e in seen if e["event"] == "assistant_message"]
    assert [s["truncated"] for s in steps] == [True, False]
    assert (end["result"], end["output"]) == ("finished", "Once upon a time.")
    assert server.requests[1]["messages"][1:] == [
        {"role": "assistant", "content": [{"type": "text", "text": "Once upon a"}]},
        {"role": "user", "content": [{"type": "text", "text": CONTINUE_CUT_TEXT}]},
    ]
