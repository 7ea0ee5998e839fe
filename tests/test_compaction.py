"""Context compaction (§10) through a real capd and the local OpenAI-compatible server:
automatic, on overflow and on request; interrupted by pause and by SIGKILL; restored."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from capd.compaction import EXCERPT_HEADING, SUMMARY_HEADING, SUMMARY_SYSTEM_PROMPT
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.fakes.anthropic_server import AnthropicTestServer
from tests.fakes.anthropic_server import ErrorReply as AnthropicError
from tests.fakes.anthropic_server import TextReply as AnthropicText
from tests.fakes.openai_flavors import LLAMA_CPP_PYTHON, LLAMA_SERVER
from tests.fakes.openai_server import (
    FunctionCall,
    OpenAITestServer,
    OverflowReply,
    TextReply,
    ToolCallsReply,
)
from tests.fakes.sse_server import HeldReply
from tests.helpers import (
    connect_pod,
    full_history,
    is_event,
    kinds,
    pause_turn,
    resume_turn,
    run_turn,
    sigkill,
    spawn,
    wait_for,
)

pytestmark = pytest.mark.shared_capd

LONG = 4000
"""Characters of a long prompt: about 1,000 tokens by capd's estimate."""


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


def _model(server: OpenAITestServer, **extra: object) -> dict[str, object]:
    return {"provider": "openai", "name": "test-model", "base_url": server.base_url, **extra}


def _prompt(tag: str) -> str:
    return f"{tag} " + "lorem ipsum " * (LONG // 12)


def _is_summary_call(request: dict[str, Any]) -> bool:
    return request["messages"][0]["content"] == SUMMARY_SYSTEM_PROMPT


def _texts(request: dict[str, Any]) -> str:
    return "\n".join(str(m.get("content") or "") for m in request["messages"])


def _hold_next_call(server: OpenAITestServer) -> None:
    """The next model call waits for an answer that never comes (a pause or a cancel
    ends it)."""
    server.enqueue(HeldReply(TextReply("never sent"), asyncio.Event()))


async def _two_turns(pod: Any, server: OpenAITestServer) -> None:
    """Two short turns, ALPHA and BRAVO, for a compaction to summarise."""
    server.enqueue(TextReply("first answer"), TextReply("second answer"))
    for tag in ("ALPHA", "BRAVO"):
        end, _ = await run_turn(pod, f"{tag} lorem ipsum")
        assert end["result"] == "finished"


async def test_a_call_that_would_pass_compact_at_compacts_first(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server, context_window=2500, max_tokens=100))
    async with await connect_pod(capd, "w1") as pod:
        server.enqueue(TextReply("noted ALPHA", prompt_tokens=1100))
        _, first = await run_turn(pod, _prompt("ALPHA"))
        before = (await pod.request({"method": "status"}))["context"]
        server.enqueue(TextReply("summary: the user said ALPHA"), TextReply("noted BRAVO"))
        end, seen = await run_turn(pod, _prompt("BRAVO"))
        after = (await pod.request({"method": "status"}))["context"]
    assert (end["result"], end["output"]) == ("finished", "noted BRAVO")
    compacted = next(e for e in seen if e["event"] == "context_compacted")
    assert kinds(seen).index("compaction_started") < kinds(seen).index("context_compacted")
    assert compacted["trigger"] == "auto"
    assert compacted["summary"] == "summary: the user said ALPHA"
    assert compacted["window"] == 2500
    assert compacted["tokens_before"] > 2000 > compacted["tokens_after"]
    assert (
        compacted["through_seq"]
        == next(e for e in first if e["event"] == "assistant_message")["seq"]
    )
    summary_call, next_call = server.requests[1], server.requests[2]
    assert _is_summary_call(summary_call)
    assert "tools" not in summary_call
    assert summary_call["max_tokens"] < 2500
    assert "ALPHA" in _texts(summary_call)
    assert "BRAVO" not in _texts(summary_call)
    assert next_call["messages"][0]["content"].startswith(SUMMARY_HEADING)
    assert "lorem" not in next_call["messages"][0]["content"]
    assert "ALPHA lorem" not in _texts(next_call)
    assert "BRAVO lorem" in _texts(next_call)
    assert before["tokens"] >= 1100
    assert after["tokens"] < before["tokens"] + 500


async def test_a_model_that_writes_no_summary_gets_an_excerpt_in_its_place(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    """gemma-3-270m under llama-cpp-python's chatml-function-calling writes nothing for the
    summary prompt, each time it is asked (greedy): the compaction takes an excerpt of the
    transcript instead of failing the turn, and every turn after it."""
    await spawn(capd, "w1", _model(server, context_window=2500, max_tokens=100))
    async with await connect_pod(capd, "w1") as pod:
        server.enqueue(TextReply("noted ALPHA", prompt_tokens=1100))
        await run_turn(pod, _prompt("ALPHA"))
        server.enqueue(TextReply(""), TextReply("noted BRAVO"))
        end, seen = await run_turn(pod, _prompt("BRAVO"))
    assert (end["result"], end["output"]) == ("finished", "noted BRAVO")
    assert not [e for e in seen if e["event"] == "retry"]
    compacted = next(e for e in seen if e["event"] == "context_compacted")
    assert compacted["summary"].startswith(EXCERPT_HEADING)
    assert "ALPHA lorem" in compacted["summary"]
    assert compacted["tokens_after"] < 2000
    assert len(server.requests) == 3


async def test_an_overflow_compacts_and_calls_again_once(capd: CapdProcess) -> None:
    async with OpenAITestServer(LLAMA_SERVER) as server:
        await spawn(capd, "w1", _model(server))
        async with await connect_pod(capd, "w1") as pod:
            await _two_turns(pod, server)
            server.enqueue(
                OverflowReply(prompt_tokens=4476, n_ctx=4096),
                TextReply("summary of ALPHA and BRAVO"),
                TextReply("went on"),
            )
            end, seen = await run_turn(pod, _prompt("CHARLIE"))
            status = await pod.request({"method": "status"})
    assert (end["result"], end["output"]) == ("finished", "went on")
    compacted = next(e for e in seen if e["event"] == "context_compacted")
    assert (compacted["trigger"], compacted["window"]) == ("overflow", 4096)
    assert status["context"]["window"] == 4096
    retried = server.requests[-1]
    assert "summary of ALPHA and BRAVO" in _texts(retried)
    assert "CHARLIE lorem" in _texts(retried)
    assert "ALPHA lorem" not in _texts(retried)


async def test_llama_cpp_pythons_empty_stream_is_an_overflow_that_compacts(
    capd: CapdProcess,
) -> None:
    """Streamed, llama-cpp-python answers a prompt longer than its window with an empty 200
    (it names no window): the pod compacts and goes on instead of failing every turn.
    The window is then taken to be at most what was sent, so the turns are long."""
    async with OpenAITestServer(LLAMA_CPP_PYTHON) as server:
        await spawn(capd, "w1", _model(server))
        async with await connect_pod(capd, "w1") as pod:
            server.enqueue(TextReply("first answer"), TextReply("second answer"))
            for tag in ("ALPHA", "BRAVO"):
                end, _ = await run_turn(pod, _prompt(tag))
                assert end["result"] == "finished"
            server.enqueue(
                OverflowReply(),
                TextReply("summary of ALPHA"),
                TextReply("summary of ALPHA and BRAVO"),
                TextReply("went on"),
            )
            end, seen = await run_turn(pod, _prompt("CHARLIE"))
    assert (end["result"], end["output"]) == ("finished", "went on")
    assert [_is_summary_call(r) for r in server.requests[2:]] == [False, True, True, False]
    assert not [e for e in seen if e["event"] == "retry"]
    compacted = next(e for e in seen if e["event"] == "context_compacted")
    assert (compacted["trigger"], compacted["window"]) == ("overflow", None)
    retried = server.requests[-1]
    assert "summary of ALPHA and BRAVO" in _texts(retried)
    assert "ALPHA lorem" not in _texts(retried)


async def test_a_second_overflow_ends_the_turn_and_the_next_turn_works(capd: CapdProcess) -> None:
    async with OpenAITestServer(LLAMA_SERVER) as server:
        await spawn(capd, "w1", _model(server))
        async with await connect_pod(capd, "w1") as pod:
            await _two_turns(pod, server)
            server.enqueue(
                OverflowReply(),
                TextReply("summary one"),
                OverflowReply(),
                TextReply("summary of everything"),
            )
            end, seen = await run_turn(pod, _prompt("CHARLIE"))
            assert end["result"] == "errored"
            assert "even after it was compacted" in end["error"]
            assert [e["trigger"] for e in seen if e["event"] == "context_compacted"] == [
                "overflow",
                "overflow",
            ]
            server.enqueue(TextReply("fine now"))
            end, _ = await run_turn(pod, "short question")
    assert (end["result"], end["output"]) == ("finished", "fine now")
    last = server.requests[-1]
    assert [m["role"] for m in last["messages"]] == ["user", "user"]
    assert "summary of everything" in _texts(last)
    assert "CHARLIE lorem" not in _texts(last)


async def test_a_message_that_alone_does_not_fit_leaves_the_context(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server, context_window=1000, max_tokens=100))
    async with await connect_pod(capd, "w1") as pod:
        server.enqueue(TextReply("summary of a huge message"))
        end, seen = await run_turn(pod, _prompt("HUGE") * 2)
        assert end["result"] == "errored"
        assert "do not fit the model's context window (1000 tokens" in end["error"]
        compacted = next(e for e in seen if e["event"] == "context_compacted")
        user = next(e for e in seen if e["event"] == "user_message")
        assert compacted["through_seq"] == user["seq"]
        server.enqueue(TextReply("small answer"))
        end, _ = await run_turn(pod, "small question")
        history = await full_history(pod)
    assert (end["result"], end["output"]) == ("finished", "small answer")
    assert "HUGE lorem" not in _texts(server.requests[-1])
    assert any(e["event"] == "user_message" and "HUGE" in e["text"] for e in history)


async def test_compact_on_an_idle_pod_answers_when_it_is_done(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await _two_turns(pod, server)
        server.enqueue(TextReply("the summary"))
        await pod.request({"method": "compact", "instructions": "keep the word ZULU"})
        compacted, _ = await wait_for(pod, is_event("context_compacted"))
        with pytest.raises(ProtocolError) as nothing:
            await pod.request({"method": "compact"})
        server.enqueue(TextReply("after"))
        await run_turn(pod, "go on")
    assert compacted["trigger"] == "request"
    assert compacted["turn_id"] is None
    summary_call = server.requests[2]
    assert "keep the word ZULU" in _texts(summary_call)
    assert "ALPHA lorem" in _texts(summary_call)
    assert "BRAVO lorem" in _texts(summary_call)
    assert "BRAVO lorem" not in _texts(server.requests[3])
    assert nothing.value.code == "invalid_request"
    assert "nothing to compact" in str(nothing.value)


async def test_compact_while_running_waits_for_the_next_step(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        await _two_turns(pod, server)
        answer = asyncio.Event()
        server.enqueue(
            HeldReply(ToolCallsReply([FunctionCall("bash", {"command": "echo hi"})]), answer),
            TextReply("the summary"),
            TextReply("done"),
        )
        await pod.request({"method": "run", "text": "CHARLIE"})
        await server.wait_requests(3)
        assert await pod.request({"method": "compact"}) == {}
        answer.set()
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert (end["result"], end["output"]) == ("finished", "done")
    order = [e["event"] for e in seen if e["event"] in ("tool_result", "context_compacted")]
    assert order == ["tool_result", "context_compacted"]
    last = server.requests[-1]
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "tool"]


async def test_a_paused_compaction_runs_again_on_resume(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server, context_window=2500, max_tokens=100))
    async with await connect_pod(capd, "w1") as pod:
        server.enqueue(TextReply("noted ALPHA", prompt_tokens=1100))
        await run_turn(pod, _prompt("ALPHA"))
        _hold_next_call(server)
        await pod.request({"method": "run", "text": _prompt("BRAVO")})
        await wait_for(pod, is_event("compaction_started"))
        await server.wait_requests(2)
        paused = await pause_turn(pod)
        server.enqueue(TextReply("the summary"), TextReply("noted BRAVO"))
        end, resumed = await resume_turn(pod)
    assert "context_compacted" not in kinds(paused)
    assert [e["summary"] for e in resumed if e["event"] == "context_compacted"] == ["the summary"]
    assert (end["result"], end["output"]) == ("finished", "noted BRAVO")


async def test_pause_stops_a_compaction_of_an_idle_pod(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await _two_turns(pod, server)
        _hold_next_call(server)
        async with await connect_pod(capd, "w1", subscribe=False) as asker:
            asked = asyncio.create_task(asker.request({"method": "compact"}))
            await server.wait_requests(3)
            assert await pod.request({"method": "pause"}) == {}
            with pytest.raises(ProtocolError) as stopped:
                await asked
        history = await full_history(pod)
        status = await pod.request({"method": "status"})
    assert "stopped by a pause" in str(stopped.value)
    assert "context_compacted" not in kinds(history)
    assert status["status"] == "idle"


async def test_a_run_during_an_idle_compaction_starts_after_it(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await _two_turns(pod, server)
        answer = asyncio.Event()
        server.enqueue(HeldReply(TextReply("the summary"), answer), TextReply("after"))
        async with await connect_pod(capd, "w1", subscribe=False) as asker:
            asked = asyncio.create_task(asker.request({"method": "compact"}))
            await server.wait_requests(3)
            await pod.request({"method": "run", "text": "CHARLIE"})
            answer.set()
            assert await asked == {}
        end, seen = await wait_for(pod, is_event("turn_end"))
    assert end["output"] == "after"
    assert kinds(seen).index("user_message") < kinds(seen).index("context_compacted")
    last = server.requests[-1]
    assert "the summary" in _texts(last)
    assert "CHARLIE" in _texts(last)
    assert "BRAVO lorem" not in _texts(last)


@pytest.mark.own_capd
async def test_a_crash_mid_compaction_loses_nothing_and_restore_starts_from_it(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server, context_window=2500, max_tokens=100))
    async with await connect_pod(capd, "w1") as pod:
        server.enqueue(TextReply("noted ALPHA", prompt_tokens=1100, completion_tokens=7))
        await run_turn(pod, _prompt("ALPHA"))
        _hold_next_call(server)
        await pod.request({"method": "run", "text": _prompt("BRAVO")})
        await wait_for(pod, is_event("compaction_started"))
    await server.wait_requests(2)
    await sigkill(capd)
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "w1") as pod:
        history = await full_history(pod)
        assert "context_compacted" not in kinds(history)
        assert (await pod.request({"method": "status"}))["status"] == "paused"
        server.enqueue(TextReply("the summary", prompt_tokens=3, completion_tokens=2))
        server.enqueue(TextReply("noted BRAVO", prompt_tokens=400, completion_tokens=5))
        end, _ = await resume_turn(pod)
        assert end["output"] == "noted BRAVO"
        usage = (await pod.request({"method": "status"}))["usage"]
    await asyncio.to_thread(capd.stop)
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "w1") as pod:
        server.enqueue(TextReply("still here"))
        end, _ = await run_turn(pod, "DELTA")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    assert end["output"] == "still here"
    assert usage == {"input_tokens": 1100 + 3 + 400, "output_tokens": 7 + 2 + 5, "cost_usd": None}
    assert status["usage"]["input_tokens"] == usage["input_tokens"] + 10
    last = server.requests[-1]
    assert "the summary" in _texts(last)
    assert "ALPHA lorem" not in _texts(last)
    assert "BRAVO lorem" in _texts(last)
    assert history[0]["seq"] == 1
    assert any("ALPHA" in e.get("text", "") for e in history)


@pytest.mark.own_capd
async def test_a_report_the_model_has_not_read_outlives_a_compaction_and_a_restart(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "boss", _model(server))
    async with await connect_pod(capd, "boss") as pod:
        await _two_turns(pod, server)
        _hold_next_call(server)
        await pod.request({"method": "run", "text": "CHARLIE: wait for w2"})
        await server.wait_requests(3)
        await pause_turn(pod)
        report = {
            "kind": "turn_ended",
            "pod": "w2",
            "event_id": "w2/5be0c1d2a3f49687",
            "turn_id": "t-51c0ffee0001",
            "result": "finished",
            "output": "REPORT: fixed the flaky test",
        }
        await pod.request({"method": "pod_event", "event": report})
        server.enqueue(TextReply("the summary"))
        assert await pod.request({"method": "compact"}) == {}
        compacted, _ = await wait_for(pod, is_event("context_compacted"))
        history = await full_history(pod)
    received = next(e for e in history if e["event"] == "pod_event_received")
    assert compacted["restore_from"] == compacted["through_seq"] + 1 < received["seq"]
    assert "REPORT" not in _texts(server.requests[-1])
    await asyncio.to_thread(capd.stop)
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "boss") as pod:
        server.enqueue(TextReply("thanks, w2"))
        end, _ = await resume_turn(pod)
    assert end["output"] == "thanks, w2"
    last = server.requests[-1]
    assert "REPORT: fixed the flaky test" in _texts(last)
    assert "the summary" in _texts(last)
    assert "CHARLIE: wait for w2" in _texts(last)
    assert "ALPHA lorem" not in _texts(last)


@pytest.mark.own_capd
async def test_a_report_received_before_a_compaction_and_a_restart_is_still_a_duplicate(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    report = {
        "kind": "turn_ended",
        "pod": "w2",
        "event_id": "w2/0d1e2f3a4b5c6d7e",
        "turn_id": "t-51c0ffee0002",
        "result": "finished",
        "output": "REPORT: the build is green",
    }
    await spawn(capd, "boss", _model(server))
    async with await connect_pod(capd, "boss") as pod:
        server.enqueue(TextReply("noted the report"))
        assert "duplicate" not in await pod.request({"method": "pod_event", "event": report})
        await wait_for(pod, is_event("turn_end"))
        await _two_turns(pod, server)
        server.enqueue(TextReply("the summary"))
        assert await pod.request({"method": "compact"}) == {}
        compacted, _ = await wait_for(pod, is_event("context_compacted"))
        history = await full_history(pod)
    received = next(e for e in history if e["event"] == "pod_event_received")
    assert received["seq"] < compacted["restore_from"]
    await asyncio.to_thread(capd.stop)
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "boss") as pod:
        ack = await pod.request({"method": "pod_event", "event": report})
        history = await full_history(pod)
    assert ack == {"duplicate": True}
    assert kinds(history).count("pod_event_received") == 1


async def test_anthropic_prompt_too_long_compacts_and_calls_again(capd: CapdProcess) -> None:
    async with AnthropicTestServer() as server:
        model = {"provider": "anthropic", "name": "claude-test", "base_url": server.base_url}
        await spawn(capd, "w1", model)
        async with await connect_pod(capd, "w1") as pod:
            server.enqueue(AnthropicText("first answer"), AnthropicText("second answer"))
            for tag in ("ALPHA", "BRAVO"):
                await run_turn(pod, f"{tag} lorem ipsum")
            server.enqueue(
                AnthropicError(400, "prompt is too long: 208310 tokens > 200000 maximum"),
                AnthropicText("summary of ALPHA and BRAVO"),
                AnthropicText("went on"),
            )
            end, seen = await run_turn(pod, "CHARLIE")
    assert (end["result"], end["output"]) == ("finished", "went on")
    compacted = next(e for e in seen if e["event"] == "context_compacted")
    assert (compacted["trigger"], compacted["window"]) == ("overflow", 200_000)
    summary_call, retried = server.requests[-2], server.requests[-1]
    assert summary_call["system"] == SUMMARY_SYSTEM_PROMPT
    assert "tools" not in summary_call
    assert [m["role"] for m in retried["messages"]] == ["user"]
    assert "summary of ALPHA and BRAVO" in str(retried["messages"])
    assert "CHARLIE" in str(retried["messages"])
    assert "ALPHA lorem" not in str(retried["messages"])


async def test_a_cancel_drops_the_compaction_its_turn_was_asked_for(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await _two_turns(pod, server)
        _hold_next_call(server)
        await pod.request({"method": "run", "text": "CHARLIE"})
        await server.wait_requests(3)
        assert await pod.request({"method": "compact"}) == {}
        await pod.request({"method": "cancel"})
        skipped, _ = await wait_for(pod, is_event("compaction_skipped"))
        end, _ = await wait_for(pod, is_event("turn_end"))
        history = await full_history(pod)
    assert skipped["reason"] == "the turn was cancelled before it compacted"
    assert end["result"] == "cancelled"
    assert "context_compacted" not in kinds(history)
    assert len(server.requests) == 3


async def test_a_prompt_that_fits_the_window_is_sent_even_past_compact_at(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    """2,500 tokens and 100 for the reply fit 3,000 though they pass 0.8 of it: with
    nothing older to summarise, the call is made, not refused."""
    await spawn(capd, "w1", _model(server, context_window=3000, max_tokens=100))
    async with await connect_pod(capd, "w1") as pod:
        server.enqueue(TextReply("fine"))
        end, seen = await run_turn(pod, "word " * 2000)
    assert (end["result"], end["output"]) == ("finished", "fine")
    assert "context_compacted" not in kinds(seen)
    assert len(server.requests) == 1
