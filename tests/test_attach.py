"""`capctl attach` on a real capd: the AttachScreen driven by textual's Pilot (fast, in
process), then `capctl attach` in a real terminal (tmux)."""

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import RichLog, Static

from capctl import session
from capctl.tui.attach import AttachApp, AttachScreen, MessageInput
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
from tests.test_capctl import assert_one_line_error, capctl, capctl_cmd
from tests.tmux import Screen

pytestmark = pytest.mark.shared_capd

SIZE = (100, 30)
NO_CHECKPOINTS = {"checkpoints": False}
"""Tests of what attach shows need no checkpoint of the cwd at every step."""


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
    app = AttachApp("w1", partial(session.connect_pod, capd.runtime_dir, "w1"), turns)
    async with app.run_test(size=SIZE) as pilot:
        yield app, pilot


async def test_replays_the_last_turns_then_streams_live(capd: CapdProcess) -> None:
    streaming = {"text": "streamed " * 100, "chunk_chars": 3, "delay_ms": 30}  # 10 s
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
            await pod.request({"method": "cancel"})
            await wait_for(pod, is_event("turn_end"))
            text = await until_shown(pilot, screen, lambda t: "w1 · idle" in t, "the turn's end")
            assert text.count("user: stream please") == 1, "no event twice"
            assert "cancelled" in text


async def test_a_line_typed_while_paused_is_refused_and_detach_leaves_the_turn(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A run would cancel the paused turn, so attach does not send it; F2 pauses like
    Esc; Ctrl-C ends attach and leaves the turn as it is. (Queueing, Esc and what the
    terminal shows: `test_attach_in_a_terminal`.)"""
    model = scripted({"text": "working", "tool_calls": [sleep_call(30)]})
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"], workspace=NO_CHECKPOINTS)
    async with await connect_pod(capd, "w1") as pod, attached(capd) as (app, pilot):
        screen = app.attached
        await until_shown(pilot, screen, lambda t: "live from here" in t, "the subscription")
        turn = (await pod.request({"method": "run", "text": "go"}))["turn_id"]
        await until_shown(pilot, screen, lambda t: "sleep 30" in t, "the tool call")
        await pilot.press("f2")
        await wait_for(pod, is_event("status", status="paused"))
        await until_shown(pilot, screen, lambda t: "w1 · paused" in t, "paused")
        await pilot.press(*"nope", "enter")
        await until_shown(pilot, screen, lambda t: "resume it first" in t, "the refusal")
        assert screen.query_one(MessageInput).value == "nope", "the line is kept"

        await pilot.press("ctrl+c")
        await pilot.pause()
        assert app.return_value is None
        assert not app.is_running
        status = await pod.request({"method": "status"})
    assert (status["status"], status["turn_id"], status["queued"]) == ("paused", turn, 0)


async def test_a_permission_question_is_answered_with_y(capd: CapdProcess, tmp_path: Path) -> None:
    permissions = {"rules": [{"tool": "bash", "action": "ask"}]}
    model = scripted({"tool_calls": [{"name": "bash", "arguments": {"command": "echo asked"}}]})
    await spawn(
        capd,
        "w1",
        model,
        cwd=str(tmp_path),
        tools=["bash"],
        permissions=permissions,
        workspace=NO_CHECKPOINTS,
    )
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


async def test_attach_in_a_terminal(capd: CapdProcess, tmp_path: Path) -> None:
    """What a person sees: the last two of three turns, then the live turn; a line typed while it
    runs is queued and runs after; Esc pauses and resumes; Ctrl-C detaches, exit 0, and
    the pod's turn goes on."""
    model = scripted(
        *({"text": f"reply-{n}"} for n in range(1, 4)),
        {
            "text": "alpha streaming",
            "chunk_chars": 1,
            "delay_ms": 20,
            "tool_calls": [sleep_call(20)],
        },
        {"text": "beta after resume"},
        {"tool_calls": [sleep_call(31)]},
    )
    await spawn(capd, "w1", model, cwd=str(tmp_path), tools=["bash"], workspace=NO_CHECKPOINTS)
    argv = [*capctl_cmd(capd.runtime_dir, "attach", "w1", "--turns", "2")]
    async with await connect_pod(capd, "w1") as pod:
        for n in range(1, 4):
            await run_turn(pod, f"message-{n}")
        with Screen(argv, width=110, height=40, conf_dir=tmp_path) as screen:
            text = await asyncio.to_thread(screen.wait_for, "live from here")
            assert "reply-2" in text
            assert "reply-3" in text
            assert "reply-1" not in text

            first = (await pod.request({"method": "run", "text": "go"}))["turn_id"]
            await asyncio.to_thread(screen.wait_for, "sleep 20")
            assert "assistant: alpha streaming" in screen.text()
            screen.type("later")
            screen.keys("Enter")
            await asyncio.to_thread(screen.wait_for, "[queued] later")

            screen.keys("Escape")
            await wait_for(pod, is_event("status", status="paused"))
            await asyncio.to_thread(screen.wait_for, "w1 · paused")
            screen.keys("Escape")
            await wait_for(pod, is_event("turn_end", turn_id=first))
            started, _ = await wait_for(pod, is_event("turn_start"))
            text = await asyncio.to_thread(screen.wait_for, "sleep 31")
            assert text.index("beta after resume") < text.index("user: later")

            screen.keys("C-c")
            assert await asyncio.to_thread(screen.wait_exit) == 0
            assert "detached from w1; its turn goes on" in screen.text(history=True)
        status = await pod.request({"method": "status"})
    assert (status["status"], status["turn_id"]) == ("running", started["turn_id"])


class Host(App[None]):
    """An app that opens the AttachScreen over its own, as `capctl top` does."""

    ENABLE_COMMAND_PALETTE = False

    def __init__(self, runtime_dir: Path) -> None:
        super().__init__()
        self.runtime_dir = runtime_dir
        self.results: list[str | None] = []

    async def open(self) -> AttachScreen:
        connect = partial(session.connect_pod, self.runtime_dir, "w1")
        screen = AttachScreen("w1", connect, escape_detaches=True)
        await self.push_screen(screen, self.results.append)
        return screen


async def test_an_app_that_pushes_the_screen_gets_back_on_ctrl_c_and_esc(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "w1", scripted())
    host = Host(capd.runtime_dir)
    async with host.run_test(size=SIZE) as pilot:
        for key in ("ctrl+c", "escape"):
            screen = await host.open()
            await until_shown(pilot, screen, lambda t: "live from here" in t, "the subscription")
            assert "F2 pause/resume" in shown(screen)
            await pilot.press(key)
            await pilot.pause()
            assert host.screen is not screen
            assert host.is_running
        assert host.results == [None, None]
