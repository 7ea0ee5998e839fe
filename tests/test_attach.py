"""`capctl attach` on a real capd: the AttachScreen driven by textual's Pilot (fast, in
process), then `capctl attach` in a real terminal (tmux)."""

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import RichLog, Static

from capctl.tui.attach import AttachApp, AttachScreen
from protocol.client import Client
from tests.conftest import CapdProcess
from tests.helpers import (
    EVENT_TIMEOUT_S,
    connect_pod,
    is_event,
    run_turn,
    scripted,
    spawn,
    wait_for,
)
from tests.test_capctl import assert_one_line_error, capctl

pytestmark = pytest.mark.shared_capd

SIZE = (100, 30)


def sleep_call(seconds: int) -> dict[str, Any]:
    return {"name": "bash", "arguments": {"command": f"sleep {seconds}"}}


def shown(screen: AttachScreen) -> str:
    """What the screen shows: the header, the transcript, the line still streaming and
    the open question."""
    log = screen.query_one(RichLog)
    lines = ["".join(segment.text for segment in strip) for strip in log.lines]
    parts = [str(screen.query_one(f"#{name}", Static).render()) for name in ("head", "partial")]
    asked = str(screen.query_one("#asked", Static).render())
    return "\n".join([parts[0], *(line.rstrip() for line in lines), parts[1], asked])


async def until_shown(
    pilot: Pilot[Any], screen: AttachScreen, check: Callable[[str], bool], what: str
) -> str:
    """Let the app run until what it shows passes `check` (the screen offers nothing to
    await, so it is looked at after each pass of the app's message loop)."""
    deadline = asyncio.get_running_loop().time() + EVENT_TIMEOUT_S
    while not check(text := shown(screen)):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{text}")
        await pilot.pause(0.02)
    return text


@asynccontextmanager
async def attached(
    capd: CapdProcess, turns: int = 3
) -> AsyncIterator[tuple[AttachApp, Pilot[Any]]]:
    app = AttachApp(str(capd.pod_socket("w1")), "w1", turns)
    async with app.run_test(size=SIZE) as pilot:
        yield app, pilot


async def test_replays_the_last_turns_then_streams_live(capd: CapdProcess) -> None:
    streaming = {"text": "streamed " * 40, "chunk_chars": 3, "delay_ms": 15}
    steps = [{"text": f"reply-{n}"} for n in range(1, 5)]
    await spawn(capd, "w1", scripted(*steps, streaming))
    async with await connect_pod(capd, "w1") as pod:
        for n in range(1, 5):
            await run_turn(pod, f"message-{n}")
        async with attached(capd, turns=2) as (app, pilot):
            screen = app.attached
            text = await until_shown(pilot, screen, lambda t: "live from here" in t, "the replay")
            assert "reply-3" in text
            assert "reply-4" in text
            assert "message-2" not in text
            assert "reply-2" not in text
            assert text.index("reply-3") < text.index("reply-4") < text.index("live from here")
            assert "w1 · idle" in text

            await pod.request({"method": "run", "text": "stream please"})
            # The step's text shows as it streams, before its assistant_message.
            partial = screen.query_one("#partial", Static)
            await until_shown(
                pilot, screen, lambda _: "streamed" in str(partial.render()), "deltas"
            )
            assert "w1 · running" in shown(screen)
            await wait_for(pod, is_event("turn_end"))
            text = await until_shown(pilot, screen, lambda t: "w1 · idle" in t, "the turn's end")
            assert text.count("user: stream please") == 1, "no event twice"
            assert str(partial.render()) == ""


async def test_typed_line_queues_while_busy_pause_resume_and_detach(
    capd: CapdProcess, tmp_path: Path
) -> None:
    model = scripted(
        {"text": "working", "tool_calls": [sleep_call(10)]},
        {"text": "worked"},
        {"tool_calls": [sleep_call(30)]},
    )
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod, attached(capd) as (app, pilot):
        screen = app.attached
        await until_shown(pilot, screen, lambda t: "live from here" in t, "the subscription")
        first = (await pod.request({"method": "run", "text": "go"}))["turn_id"]
        await until_shown(pilot, screen, lambda t: "sleep 10" in t, "the tool call")
        await pilot.press(*"later", "enter")
        await until_shown(pilot, screen, lambda t: "[queued] later" in t, "[queued]")
        assert (await pod.request({"method": "status"}))["queued"] == 1

        await pilot.press("escape")
        await wait_for(pod, is_event("status", status="paused"))
        await until_shown(pilot, screen, lambda t: "w1 · paused" in t, "paused")
        await pilot.press(*"nope", "enter")
        await until_shown(pilot, screen, lambda t: "resume it first" in t, "the refusal")
        assert (await pod.request({"method": "status"}))["turn_id"] == first

        await pilot.press("f2")
        await wait_for(pod, is_event("turn_end", turn_id=first))
        started, _ = await wait_for(pod, is_event("turn_start"))
        text = await until_shown(pilot, screen, lambda t: "user: later" in t, "the queued run")
        assert text.index("[queued] later") < text.index("worked") < text.index("user: later")
        assert "user: nope" not in text
        await until_shown(pilot, screen, lambda t: "sleep 30" in t, "the second tool call")
        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_value is None
        assert not app.is_running
    async with await connect_pod(capd, "w1", subscribe=False) as pod:
        status = await pod.request({"method": "status"})
    assert (status["status"], status["turn_id"]) == ("running", started["turn_id"])


async def test_a_permission_question_is_answered_with_y(capd: CapdProcess, tmp_path: Path) -> None:
    permissions = {"rules": [{"tool": "bash", "action": "ask"}]}
    model = scripted({"tool_calls": [{"name": "bash", "arguments": {"command": "echo asked"}}]})
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"], permissions=permissions)
    async with await connect_pod(capd, "w1") as pod, attached(capd) as (app, pilot):
        screen = app.attached
        await until_shown(pilot, screen, lambda t: "live from here" in t, "the subscription")
        await pod.request({"method": "run", "text": "go"})
        await until_shown(pilot, screen, lambda t: "y allows" in t, "the question")
        assert "permission question" in str(screen.query_one("#head", Static).render())
        await pilot.press("y")
        resolved, _ = await wait_for(pod, is_event("permission_resolved"))
        assert resolved["option_id"] == "allow_once"
        await wait_for(pod, is_event("turn_end", result="finished"))
        await until_shown(pilot, screen, lambda t: "← bash: asked" in t, "the tool's result")
        assert str(screen.query_one("#asked", Static).render()) == ""


async def test_a_pod_that_goes_away_ends_attach_with_why(capd: CapdProcess) -> None:
    await spawn(capd, "w1", scripted())
    async with attached(capd) as (app, pilot):
        await until_shown(pilot, app.attached, lambda t: "live from here" in t, "the subscription")
        async with await Client.connect(capd.socket) as daemon:
            await daemon.request({"method": "stop", "name": "w1"})
        async with asyncio.timeout(EVENT_TIMEOUT_S):
            while app.is_running:
                await pilot.pause(0.02)
    assert app.return_value == "pod w1 closed the connection (stopped?)"


def test_capctl_loads_textual_only_for_the_full_screen_commands(tmp_path: Path) -> None:
    """`capctl status` and the like stay fast; attach without a terminal says what to use."""
    probe = "import sys, capctl.cli; print(sorted(m for m in sys.modules if 'textual' in m))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.stdout == "[]\n", done.stderr
    done = capctl(tmp_path, "attach", "w1")
    assert_one_line_error(done, "attach needs a terminal; capctl watch w1 follows it as lines")
