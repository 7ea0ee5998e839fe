"""OpenTelemetry traces: a real capd exporting to a real OTLP/HTTP receiver
(tests/fakes/otlp_receiver.py), and a capd that loads no OpenTelemetry code when off."""

import asyncio
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from capd import semconv as t
from capd.otel import SHUTDOWN_S
from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.fakes.otlp_receiver import OtlpReceiver, attributes
from tests.helpers import connect_pod, full_history, is_event, scripted, spawn, wait_for

KID_TASK = "count the files"
CONTENT_KEYS = {t.TOOL_ARGUMENTS, t.TOOL_RESULT, "gen_ai.input.messages", "gen_ai.output.messages"}


def _traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def _lead_model() -> dict[str, Any]:
    kid_script = [{"text": "kid done"}, {"text": "kid two"}, {"text": "SUMMARY"}]  # compacted
    kid = {"name": "kid", "task": KID_TASK, "model": {"script": kid_script}}
    more = {"name": "kid", "text": "more"}
    return {
        **scripted(
            {"tool_calls": [{"name": "bash", "arguments": {"command": "echo hi"}}]},
            {"tool_calls": [{"name": "spawn_pod", "arguments": kid}]},
            {"tool_calls": [{"name": "send_to_pod", "arguments": more}]},
            {"text": "lead done"},
        ),
        "name": "script-1",
    }


def _failing_model() -> dict[str, Any]:
    """A tool call that fails, then a model call that fails twice (retried once)."""
    nope = {"tool_calls": [{"name": "nope", "arguments": {}}]}
    return {**scripted(nope, {"error": "boom", "retryable": True}), "max_retries": 1}


def _check_failures(spans: list[Span]) -> None:
    turn = _one(spans, "invoke_agent bad")
    assert turn.status.code == Status.STATUS_CODE_ERROR
    assert attributes(turn.attributes)[t.ERROR_TYPE] == "errored"
    assert attributes(turn.attributes)[t.TURN_RESULT] == "errored"
    tool = _one(spans, "execute_tool unknown")  # a name the pod does not offer
    assert attributes(tool.attributes)[t.TOOL_NAME] == "nope"
    assert tool.parent_span_id == turn.span_id
    assert tool.status.code == Status.STATUS_CODE_ERROR
    assert attributes(tool.attributes)[t.ERROR_TYPE] == "tool_error"
    chats = [s for s in _named(spans, "chat") if s.parent_span_id == turn.span_id]
    assert [s.status.code for s in chats] == [Status.STATUS_CODE_UNSET, Status.STATUS_CODE_ERROR]
    failed = chats[1]
    assert attributes(failed.attributes)[t.ERROR_TYPE] == "ProviderError"
    assert [(e.name, attributes(e.attributes)["attempt"]) for e in failed.events] == [("retry", 1)]


def _traced(capd: CapdProcess, receiver: OtlpReceiver) -> None:
    capd.env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "20",
    }
    capd.log = capd.state_dir.with_name(capd.state_dir.name + ".log")


async def _capctl(
    capd: CapdProcess, env: dict[str, str], *args: str
) -> "subprocess.CompletedProcess[str]":
    command = [sys.executable, "-m", "capctl", "--runtime-dir", str(capd.runtime_dir), *args]
    return await asyncio.to_thread(
        subprocess.run,
        command,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=10,
    )


def _named(spans: list[Span], name: str) -> list[Span]:
    return [span for span in spans if span.name == name]


def _outside_turns(spans: list[Span], since: int) -> list[Span]:
    """The `chat` spans started since `since` whose parent is no turn: none, or (wrongly)
    the parent's `spawn_pod` call."""
    spawn_pod = {s.span_id for s in _named(spans, "execute_tool spawn_pod")}
    return [
        s
        for s in spans
        if s.name.startswith("chat")
        and s.start_time_unix_nano >= since
        and (not s.parent_span_id or s.parent_span_id in spawn_pod)
    ]


def _one(spans: list[Span], name: str, **attrs: Any) -> Span:
    found = [s for s in _named(spans, name) if attrs.items() <= attributes(s.attributes).items()]
    assert len(found) == 1, f"{name} {attrs}: {[(s.name, attributes(s.attributes)) for s in spans]}"
    return found[0]


async def test_a_turn_its_model_calls_tools_and_child_are_spans(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    asked_by = _traceparent()
    async with OtlpReceiver() as receiver:
        _traced(capd_dirs, receiver)
        await asyncio.to_thread(capd_dirs.start)
        await spawn(
            capd_dirs,
            "lead",
            _lead_model(),
            cwd=str(tmp_path),
            tools=["bash", "spawn_pod", "send_to_pod"],
        )
        await spawn(capd_dirs, "bad", _failing_model(), cwd=str(tmp_path), tools=["bash"])
        async with await connect_pod(capd_dirs, "lead", subscribe=False) as lead:
            run = await lead.request({"method": "run", "text": "go", "traceparent": asked_by})
        async with await connect_pod(capd_dirs, "bad", subscribe=False) as bad:
            await bad.request({"method": "run", "text": "go"})
        spans = await receiver.wait_for_spans(
            lambda spans: (
                any(
                    attributes(s.attributes).get(t.TURN_ID) == run["turn_id"]
                    and s.name == "invoke_agent lead"
                    for s in spans
                )
                and len(_named(spans, "invoke_agent kid")) == 2
                and _named(spans, "invoke_agent bad")
            )
        )
        async with await connect_pod(capd_dirs, "kid") as kid:
            if (await kid.request({"method": "status"}))["status"] != "idle":
                await wait_for(kid, is_event("status", status="idle"))
            compacting = time.time_ns()
            await kid.request({"method": "compact"})  # idle: answered once compacted
            kid_start = next(e for e in await full_history(kid) if e["event"] == "turn_start")
        spans = await receiver.wait_for_spans(lambda spans: _outside_turns(spans, compacting))
        await asyncio.to_thread(capd_dirs.stop)
    turn = _one(spans, "invoke_agent lead", **{t.TURN_ID: run["turn_id"]})
    assert turn.kind == Span.SPAN_KIND_INTERNAL
    assert not turn.parent_span_id
    assert attributes(turn.attributes) == {
        t.OPERATION: "invoke_agent",
        t.PROVIDER: "capd.scripted",
        t.AGENT_NAME: "lead",
        t.AGENT_ID: "lead",
        t.CONVERSATION_ID: "lead",
        t.REQUEST_MODEL: "script-1",
        t.TURN_ID: run["turn_id"],
        t.TURN_INVOKE: "run",
        t.TURN_RESULT: "finished",
    }
    _, trace_id, span_id, _ = asked_by.split("-")
    assert [(link.trace_id.hex(), link.span_id.hex()) for link in turn.links] == [
        (trace_id, span_id)
    ]
    assert attributes(turn.links[0].attributes) == {t.LINK_KIND: "run"}

    in_turn = [s for s in spans if s.parent_span_id == turn.span_id]
    assert all(s.trace_id == turn.trace_id for s in in_turn)
    chats = [s for s in in_turn if s.name == "chat script-1"]
    assert [attributes(s.attributes)[t.FINISH_REASONS] for s in chats] == [
        ["tool_calls"],
        ["tool_calls"],
        ["tool_calls"],
        ["stop"],
    ]
    for chat in chats:
        assert chat.kind == Span.SPAN_KIND_CLIENT
        assert {t.OPERATION: "chat", t.PROVIDER: "capd.scripted"}.items() <= attributes(
            chat.attributes
        ).items()
        assert {t.INPUT_TOKENS, t.OUTPUT_TOKENS} <= attributes(chat.attributes).keys()
    bash = _one(in_turn, "execute_tool bash")
    spawn_pod = _one(in_turn, "execute_tool spawn_pod")
    send_to_pod = _one(in_turn, "execute_tool send_to_pod")
    for tool, name in ((bash, "bash"), (spawn_pod, "spawn_pod"), (send_to_pod, "send_to_pod")):
        assert tool.kind == Span.SPAN_KIND_INTERNAL
        found = attributes(tool.attributes)
        assert found[t.OPERATION] == "execute_tool"
        assert found[t.TOOL_NAME] == name
        assert found[t.TOOL_TYPE] == "function"
        assert found[t.TOOL_CALL_ID]
        assert t.ERROR_TYPE not in found

    # The child's compaction is outside any turn: a trace of its own, not the parent's.
    [summary] = _outside_turns(spans, compacting)
    assert not summary.parent_span_id

    kid_turn, kid_more = sorted(
        _named(spans, "invoke_agent kid"), key=lambda span: span.start_time_unix_nano
    )
    for kid_span, asker in ((kid_turn, spawn_pod), (kid_more, send_to_pod)):
        assert kid_span.trace_id != turn.trace_id
        assert not kid_span.parent_span_id
        assert [(link.trace_id, link.span_id) for link in kid_span.links] == [
            (asker.trace_id, asker.span_id)
        ]
    assert kid_start["traceparent"].startswith(
        f"00-{spawn_pod.trace_id.hex()}-{spawn_pod.span_id.hex()}-"
    )

    _check_failures(spans)
    for span in spans:
        assert "gen_ai.system" not in attributes(span.attributes)
        assert not CONTENT_KEYS & attributes(span.attributes).keys()
    resource = attributes(receiver.requests[0].resource_spans[0].resource.attributes)
    assert resource["service.name"] == "capd"
    assert "exporting traces (OTLP/HTTP)" in capd_dirs.output()


@pytest.mark.parametrize(
    "env",
    [{}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}],
    ids=["unset", "disabled"],
)
async def test_off_loads_no_opentelemetry_and_keeps_run_traceparent(
    capd_dirs: CapdProcess, tmp_path: Path, env: dict[str, str]
) -> None:
    capd_dirs.env = {**env, "PYTHONPROFILEIMPORTTIME": "1"}
    capd_dirs.log = capd_dirs.state_dir.with_name(capd_dirs.state_dir.name + ".log")
    capd_dirs.start()
    model = scripted({"tool_calls": [{"name": "bash", "arguments": {"command": "true"}}]})
    await spawn(capd_dirs, "p", model, cwd=str(tmp_path), tools=["bash"])
    asked_by = _traceparent()
    async with await connect_pod(capd_dirs, "p") as pod:
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "run", "text": "go", "traceparent": "00-nothex-01"})
        assert refused.value.code == "invalid_request"
        await pod.request({"method": "run", "text": "go", "traceparent": asked_by})
        start, _ = await wait_for(pod, is_event("turn_start"))
        await wait_for(pod, is_event("status", status="idle"))
    assert start["traceparent"] == asked_by
    capd_dirs.stop()
    imported = capd_dirs.output()
    assert "capd.tools.shell" in imported  # the import log is there
    assert "opentelemetry" not in imported
    # Nor, with a scripted model, an HTTP client and the CLI libraries it drags in.
    assert not re.findall(r"\|\s+(httpx|rich|click)$", imported, re.MULTILINE)


async def test_capctl_send_passes_traceparent(capd: CapdProcess, tmp_path: Path) -> None:
    await spawn(capd, "p", scripted({"text": "fine"}), cwd=str(tmp_path))
    by_capctl = _traceparent()
    sent = await _capctl(capd, {"TRACEPARENT": by_capctl}, "send", "p", "go")
    assert sent.returncode == 0, sent.stderr
    async with await connect_pod(capd, "p", subscribe=False) as pod:
        history = await full_history(pod)
    assert [e["traceparent"] for e in history if e["event"] == "turn_start"] == [by_capctl]
    # A later version: its first four fields. One that does not parse: ignored (W3C).
    later = "01" + _traceparent()[2:] + "-more"
    sent = await _capctl(capd, {"TRACEPARENT": later}, "send", "p", "later")
    assert (sent.returncode, sent.stderr) == (0, "")
    ignored = await _capctl(capd, {"TRACEPARENT": "00-1-2-3"}, "send", "p", "more")
    assert ignored.returncode == 0
    assert ignored.stderr.splitlines() == [
        "capctl: ignoring TRACEPARENT=00-1-2-3: not a W3C traceparent "
        "(00-<32 hex>-<16 hex>-<2 hex>)"
    ]
    async with await connect_pod(capd, "p", subscribe=False) as pod:
        history = await full_history(pod)
    starts = [e.get("traceparent") for e in history if e["event"] == "turn_start"]
    assert starts == [by_capctl, "00" + later[2:-5], None]


async def test_a_missing_extra_is_one_warning(capd_dirs: CapdProcess, tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['opentelemetry.sdk'] = None\n")
    path = os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH")]))
    capd_dirs.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "PYTHONPATH": path}
    capd_dirs.log = capd_dirs.state_dir.with_name(capd_dirs.state_dir.name + ".log")
    capd_dirs.start()
    await spawn(capd_dirs, "p", scripted({"text": "fine"}), cwd=str(tmp_path))
    async with await Client.connect(capd_dirs.pod_socket("p")) as pod:
        await pod.request({"method": "subscribe"})
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("turn_end", result="finished"))
    capd_dirs.stop()
    warnings = [line for line in capd_dirs.output().splitlines() if "capd[otel]" in line]
    assert len(warnings) == 1
    assert "OTEL_EXPORTER_OTLP_ENDPOINT is set" in warnings[0]


async def test_segments_of_a_paused_turn_and_a_queued_run_keep_their_links(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    """Each running segment is a span (a pause ends it; a resume links to it); a queued
    run's traceparent and a paused turn's survive a restart of capd. Content capture is
    on here: the tool calls carry their arguments."""
    first, queued = _traceparent(), _traceparent()
    sleep = {"tool_calls": [{"name": "bash", "arguments": {"command": "sleep 30"}}]}
    async with OtlpReceiver() as receiver:
        _traced(capd_dirs, receiver)
        capd_dirs.env[t.CAPTURE_CONTENT_VARIABLE] = "true"
        await asyncio.to_thread(capd_dirs.start)
        model = scripted(sleep, sleep, {"text": "after"}, {"text": "next"}, sleep)
        await spawn(capd_dirs, "s", model, cwd=str(tmp_path), tools=["bash"])
        async with await connect_pod(capd_dirs, "s") as pod:
            run = await pod.request({"method": "run", "text": "go", "traceparent": first})
            await wait_for(pod, is_event("tool_call_start"))
            await pod.request({"method": "pause"})
            await pod.request({"method": "resume"})
            await wait_for(pod, is_event("tool_call_start"))
            later = {"method": "run", "text": "next", "if_busy": "queue", "traceparent": queued}
            second = await pod.request(later)
        await asyncio.to_thread(capd_dirs.stop)  # pauses the turn; the run stays queued
        await asyncio.to_thread(capd_dirs.start)
        async with await connect_pod(capd_dirs, "s") as pod:
            await pod.request({"method": "resume"})
            await wait_for(pod, is_event("turn_end", turn_id=second["turn_id"]))
            history = await full_history(pod)
            third = await pod.request({"method": "run", "text": "then"})
            await wait_for(pod, is_event("tool_call_start"))
            await pod.request({"method": "pause"})
            await pod.request({"method": "cancel"})  # while paused: no segment runs
            await wait_for(pod, is_event("turn_end", result="cancelled"))
        spans = await receiver.wait_for_spans(
            lambda spans: len(_named(spans, "invoke_agent s")) == 6
        )
        await asyncio.to_thread(capd_dirs.stop)
    starts = {e["turn_id"]: e["traceparent"] for e in history if e["event"] == "turn_start"}
    assert starts == {run["turn_id"]: first, second["turn_id"]: queued}
    segments = _named(spans, "invoke_agent s")
    segments.sort(key=lambda span: span.start_time_unix_nano)
    turns = [attributes(s.attributes)[t.TURN_ID] for s in segments]
    assert turns == [run["turn_id"]] * 3 + [second["turn_id"]] + [third["turn_id"]] * 2
    ends = [attributes(s.attributes).get(t.TURN_RESULT) for s in segments]
    assert ends == [None, None, "finished", "finished", None, "cancelled"]
    paused = [attributes(s.attributes).get(t.TURN_PAUSED) for s in segments]
    assert paused == [True, True, None, None, True, None]
    # The cancel of the paused turn is a zero-length segment after the paused one.
    assert segments[5].end_time_unix_nano - segments[5].start_time_unix_nano < 10**7

    def links(span: Span) -> list[tuple[str, str]]:
        return [
            (link.span_id.hex(), attributes(link.attributes)[t.LINK_KIND]) for link in span.links
        ]

    def span_id(traceparent: str) -> str:
        return traceparent.split("-")[2]

    assert links(segments[0]) == [(span_id(first), "run")]
    assert links(segments[1]) == [(span_id(first), "run"), (segments[0].span_id.hex(), "resumed")]
    assert links(segments[2]) == [(span_id(first), "run")]  # after the restart
    assert links(segments[3]) == [(span_id(queued), "run")]
    assert links(segments[5]) == [(segments[4].span_id.hex(), "resumed")]
    assert len({s.trace_id for s in segments}) == 6
    tools = _named(spans, "execute_tool bash")
    assert len(tools) == 3
    for tool in tools:  # both cut short by a pause or the stop: no result
        assert attributes(tool.attributes)[t.TOOL_ARGUMENTS] == '{"command":"sleep 30"}'


async def test_a_collector_that_is_down_delays_shutdown_a_bounded_time(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    capd_dirs.env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # the spans wait for the shutdown
    }
    capd_dirs.log = capd_dirs.state_dir.with_name(capd_dirs.state_dir.name + ".log")
    capd_dirs.start()
    await spawn(capd_dirs, "p", scripted({"text": "fine"}), cwd=str(tmp_path))
    async with await connect_pod(capd_dirs, "p") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("turn_end", result="finished"))
    started = time.monotonic()
    await asyncio.to_thread(capd_dirs.stop)  # exit code 0 checked
    # Unbounded, the exporter would retry for its whole timeout (10 s) first.
    assert time.monotonic() - started < SHUTDOWN_S + 4
    logged = capd_dirs.output()
    assert "WARNING opentelemetry" not in logged  # the exporter's retries are not shown


async def test_the_receiver_reports_a_request_it_cannot_take() -> None:
    """tests/fakes/otlp_receiver.py: a wrong request fails `wait_for_spans` at once."""
    async with OtlpReceiver() as receiver:
        host, port = receiver.endpoint.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/logs HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        with pytest.raises(AssertionError, match="/v1/logs"):
            await receiver.wait_for_spans(lambda spans: False, timeout=5)
        writer.close()
