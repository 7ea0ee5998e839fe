"""The agent loop on the `openai` provider, through a real capd and a local SSE server."""

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from capd.providers.base import CONTINUE_CUT_TEXT, CONTINUE_TEXT
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.fakes.openai_flavors import LLAMA_CPP_PYTHON, LLAMA_SERVER
from tests.fakes.openai_server import (
    ErrorReply,
    FunctionCall,
    OpenAITestServer,
    OverflowReply,
    TextReply,
    ToolCallsReply,
    validation_errors,
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

pytestmark = pytest.mark.shared_capd


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


def _model(server: OpenAITestServer, **extra: object) -> dict[str, object]:
    return {"provider": "openai", "name": "test-model", "base_url": server.base_url, **extra}


async def test_tool_calls_round_trip_through_the_model(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    (tmp_path / "notes.txt").write_text("the answer is 42\n")
    server.enqueue(
        ToolCallsReply([FunctionCall("read_file", {"path": "notes.txt"})], text=["Let me look."]),
        TextReply(["It is ", "42."]),
    )
    await spawn(
        capd,
        "w1",
        _model(server),
        cwd=str(tmp_path),
        tools=["read_file"],
        system_prompt="Be brief.",
    )
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "what is the answer?"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert end["result"] == "finished"
    assert end["output"] == "It is 42."
    assert "tool_call_start" in kinds(seen)
    result = next(e for e in seen if e["event"] == "tool_result")
    assert "the answer is 42" in result["output"]
    assert result["is_error"] is False
    second = server.requests[1]
    assert second["model"] == "test-model"
    assert second["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["messages"][3]["tool_call_id"] == result["call_id"]
    assert [t["function"]["name"] for t in second["tools"]] == ["read_file"]


async def test_a_tool_loop_of_two_calls_against_llama_cpp_python(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """llama-cpp-python refuses an assistant message whose content is null (HTTP 500)."""
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    async with OpenAITestServer(LLAMA_CPP_PYTHON) as server:
        server.enqueue(
            ToolCallsReply([FunctionCall("read_file", {"path": "a.txt"})]),
            ToolCallsReply([FunctionCall("read_file", {"path": "b.txt"})]),
            TextReply("alpha and beta"),
        )
        await spawn(capd, "w1", _model(server), cwd=str(tmp_path), tools=["read_file"])
        async with await connect_pod(capd, "w1") as pod:
            await pod.request({"method": "run", "text": "read both"})
            end, seen = await wait_for(pod, is_event("turn_end"))
    assert (end["result"], end["output"]) == ("finished", "alpha and beta")
    assert "retry" not in kinds(seen)
    calls = [m for r in server.requests for m in r["messages"] if m.get("tool_calls")]
    assert [m["content"] for m in calls[-2:]] == ["", ""]


async def test_retryable_errors_retry_with_an_event(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    server.enqueue(
        ErrorReply(429, "slow down", type="rate_limit_error", retry_after="0"),
        ErrorReply(500, "boom", type="server_error", retry_after="0"),
        TextReply("recovered"),
    )
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    retries = [e for e in seen if e["event"] == "retry"]
    assert [(r["attempt"], r["max_attempts"]) for r in retries] == [(1, 4), (2, 4)]
    assert "slow down" in retries[0]["error"]
    assert (end["result"], end["output"]) == ("finished", "recovered")


async def test_the_same_500_twice_is_not_retried_again(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    server.enqueue(
        *[ErrorReply(500, "Jinja Exception: bad template", type="server_error")] * 3,
        TextReply("never sent"),
    )
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert [e["attempt"] for e in seen if e["event"] == "retry"] == [1]
    assert end["result"] == "errored"
    assert "Jinja Exception: bad template (the same answer twice" in end["error"]
    assert len(server.requests) == 2


async def test_a_passing_500_in_the_same_generic_words_is_retried_as_usual(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    sorry = "The server had an error while processing your request. Sorry about that!"
    server.enqueue(
        *[ErrorReply(500, sorry, type="server_error", retry_after="0")] * 3,
        TextReply("Back again."),
    )
    await spawn(capd, "w1", _model(server, max_retries=3))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert [e["attempt"] for e in seen if e["event"] == "retry"] == [1, 2, 3]
    assert (end["result"], end["output"]) == ("finished", "Back again.")


async def test_a_500_validation_error_fails_at_once_with_the_whole_reason(
    capd: CapdProcess,
) -> None:
    words = validation_errors(2, {"role": "assistant", "content": None})
    async with OpenAITestServer(LLAMA_CPP_PYTHON) as server:
        server.enqueue(ErrorReply(500, words, type="internal_server_error"))
        await spawn(capd, "w1", _model(server))
        async with await connect_pod(capd, "w1") as pod:
            await pod.request({"method": "run", "text": "hi"})
            end, seen = await wait_for(pod, is_event("turn_end"))
    assert "retry" not in kinds(seen)
    assert end["result"] == "errored"
    assert end["error"].endswith(" ".join(words.split()))


async def test_an_overflow_ends_the_turn_with_one_line_and_the_pod_goes_on(
    capd: CapdProcess,
) -> None:
    async with OpenAITestServer(LLAMA_SERVER) as server:
        server.enqueue(
            OverflowReply(prompt_tokens=4476, n_ctx=4096),
            TextReply("the user told a long story"),
            TextReply("short"),
        )
        await spawn(capd, "w1", _model(server))
        async with await connect_pod(capd, "w1") as pod:
            await pod.request({"method": "run", "text": "a long story"})
            end, seen = await wait_for(pod, is_event("turn_end"))
            await pod.request({"method": "run", "text": "hi"})
            after, _ = await wait_for(pod, is_event("turn_end"))
    assert "retry" not in kinds(seen)
    assert end["result"] == "errored"
    error = end["error"]
    assert error.startswith("the newest messages (about 7 tokens) do not fit")
    assert "--ctx-size" in error
    assert "exceeds the available context size (4096 tokens)" in error
    assert "\n" not in error
    assert (after["result"], after["output"]) == ("finished", "short")


async def test_status_shows_the_context_size_against_the_window(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    server.enqueue(TextReply("Hello!", prompt_tokens=1000))
    await spawn(capd, "w1", _model(server, context_window=32768), system_prompt="Be brief.")
    async with await connect_pod(capd, "w1") as pod:
        before = await pod.request({"method": "status"})
        await pod.request({"method": "run", "text": "hi"})
        await wait_for(pod, is_event("turn_end"))
        after = await pod.request({"method": "status"})
    # estimates: "Be brief." 3 tokens; each message 4 plus its UTF-8 bytes / 4 rounded up
    assert before["context"] == {"tokens": 3, "window": 32768}
    assert after["context"] == {"tokens": 1000 + 4 + 2, "window": 32768}


async def test_the_window_is_learned_from_the_first_overflow(capd: CapdProcess) -> None:
    async with OpenAITestServer(LLAMA_SERVER) as server:
        server.enqueue(OverflowReply(prompt_tokens=4476, n_ctx=4096))
        await spawn(capd, "w1", _model(server))
        async with await connect_pod(capd, "w1") as pod:
            before = await pod.request({"method": "status"})
            await pod.request({"method": "run", "text": "a long story"})
            await wait_for(pod, is_event("turn_end"))
            after = await pod.request({"method": "status"})
    assert before["context"]["window"] is None
    assert after["context"]["window"] == 4096


async def test_client_errors_fail_the_turn_at_once(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    server.enqueue(ErrorReply(400, "model 'test-model' does not exist"))
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        end, seen = await wait_for(pod, is_event("turn_end"))
        status = await pod.request({"method": "status"})
    assert "retry" not in kinds(seen)
    assert end["result"] == "errored"
    assert "400" in end["error"]
    assert "does not exist" in end["error"]
    assert status["status"] == "idle"


async def test_retries_give_up_with_a_clear_error(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    server.enqueue(*[ErrorReply(503, "overloaded", type="server_error", retry_after="0")] * 3)
    await spawn(capd, "w1", _model(server, max_retries=2))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "hi"})
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert end["result"] == "errored"
    assert "overloaded" in end["error"]
    assert "gave up after 3 attempts" in end["error"]


async def test_pause_interrupts_a_streaming_http_response(
    capd: CapdProcess, server: OpenAITestServer
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
    assert end["result"] == "finished"
    resumed = server.requests[1]["messages"]
    assert resumed[-2:] == [
        {"role": "assistant", "content": partial["text"]},
        {"role": "user", "content": CONTINUE_TEXT},
    ]


async def test_a_reply_cut_off_by_max_tokens_is_continued(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    server.enqueue(
        TextReply(["The answer ", "is"], finish_reason="length"), TextReply([" 4", "2."])
    )
    await spawn(capd, "w1", _model(server, max_tokens=5))
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "what is it?"})
        end, seen = await wait_for(pod, is_event("turn_end"))
        history = await pod.request({"method": "history", "after_seq": 0})
    steps = [e for e in seen if e["event"] == "assistant_message"]
    assert [(s["text"], s["truncated"]) for s in steps] == [
        ("The answer is", True),
        (" 42.", False),
    ]
    assert (end["result"], end["output"]) == ("finished", "The answer is 42.")
    assert server.requests[1]["messages"][-2:] == [
        {"role": "assistant", "content": "The answer is"},
        {"role": "user", "content": CONTINUE_CUT_TEXT},
    ]
    stored = [e for e in history["events"] if e["event"] == "assistant_message"]
    assert [s["truncated"] for s in stored] == [True, False]


async def test_continuations_stop_at_the_limit(capd: CapdProcess, server: OpenAITestServer) -> None:
    server.enqueue(
        TextReply("one ", finish_reason="length"),
        TextReply("two ", finish_reason="length"),
        TextReply("three", finish_reason="length"),
    )
    await spawn(capd, "w1", _model(server), limits={"max_continuations": 1})
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "count"})
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert (end["result"], end["output"]) == ("finished", "one two ")
    assert len(server.requests) == 2


async def test_a_tool_call_cut_off_is_not_run(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    cut = FunctionCall("write_file", '{"path": "big.txt", "content": "aaaaaaa')
    server.enqueue(
        ToolCallsReply([cut], text=["Writing it."], finish_reason="length"),
        TextReply("I will write it in parts."),
    )
    await spawn(capd, "w1", _model(server), cwd=str(tmp_path), tools=["write_file"])
    async with await connect_pod(capd, "w1") as pod:
        await pod.request({"method": "run", "text": "write a big file"})
        end, seen = await wait_for(pod, is_event("turn_end"))
    step = next(e for e in seen if e["event"] == "assistant_message")
    result = next(e for e in seen if e["event"] == "tool_result")
    assert step["truncated"] is True
    assert result["is_error"] is True
    assert result["output"].startswith("not run: max_tokens cut the reply off")
    assert not (tmp_path / "big.txt").exists()
    assert (end["result"], end["output"]) == ("finished", "I will write it in parts.")
    assert [m["role"] for m in server.requests[1]["messages"]] == ["user", "assistant", "tool"]


async def test_tool_choice_goes_with_the_first_call_of_each_turn(
    capd: CapdProcess, server: OpenAITestServer, tmp_path: Path
) -> None:
    (tmp_path / "a.txt").write_text("alpha\n")
    server.enqueue(
        ToolCallsReply([FunctionCall("read_file", {"path": "a.txt"})]),
        TextReply("alpha"),
        TextReply("again"),
    )
    model = _model(server, tool_choice="read_file")
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["read_file"])
    async with await connect_pod(capd, "w1") as pod:
        for text in ("read a.txt", "and now?"):
            await pod.request({"method": "run", "text": text})
            end, _ = await wait_for(pod, is_event("turn_end"))
            assert end["result"] == "finished"
    forced = {"type": "function", "function": {"name": "read_file"}}
    assert [body.get("tool_choice") for body in server.requests] == [forced, None, forced]


async def test_tool_choice_must_name_an_offered_tool(capd: CapdProcess) -> None:
    model = {"provider": "openai", "name": "m", "tool_choice": "bash"}
    with pytest.raises(ProtocolError) as refused:
        await spawn(capd, "w1", model, tools=["read_file"])
    assert refused.value.code == "invalid_request"
    assert "tool_choice 'bash'" in refused.value.message
