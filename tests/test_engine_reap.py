"""Idle engines (docs/protocol.md "Idle engines"): an idle pod's external engine process is
stopped after `limits.engine_idle_s` and resumes its session at the next turn, through a
real capd and the stand-in engines. Stops are awaited as the daemon's `pod_activity`
events, never slept for; that a pod keeps its process is read once another pod with the
same `engine_idle_s`, idle since later, has lost its own."""

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from capd.config import Config
from capd.engines.process import LOST
from protocol.client import Client
from tests.conftest import CapdProcess, _delete_every_pod, _stopped_at_exit
from tests.engine_scaffold import (
    STAND_IN_ACP_AGENT,
    STAND_IN_CLAUDE,
    UNCONFINED,
    engine_starts,
    spawn_on_engine,
    stand_in_log,
)
from tests.helpers import (
    alive,
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    pause_turn,
    resume_turn,
    run_turn,
    until,
    wait_for,
)
from tests.test_activity import activity_feed
from tests.test_capctl import ok

pytestmark = pytest.mark.shared_capd

IDLE = {"engine_idle_s": 0.3}


@pytest.fixture
async def feed(capd: CapdProcess) -> AsyncIterator[Client]:
    """The daemon's activity events."""
    async with await activity_feed(capd) as client:
        yield client


def engine_stopped(pod: str, reaped: int = 1) -> Any:
    """A pod_activity saying the pod's engine process was stopped the `reaped`th time."""
    return lambda e: (
        e.get("event") == "pod_activity"
        and e.get("pod") == pod
        and (e.get("engine") or {}).get("state") == "stopped"
        and e["engine"]["reaped"] == reaped
    )


def _prompts(state: Path) -> list[str]:
    return [
        entry["read"]["message"]["content"]
        for entry in stand_in_log(state)
        if entry.get("read", {}).get("type") == "user"
    ]


def _calls(state: Path) -> list[str]:
    return [entry["call"] for entry in stand_in_log(state) if "call" in entry]


async def _engine(capd: CapdProcess, name: str) -> dict[str, Any]:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        return (await pod.request({"method": "status"}))["engine"]


@pytest.mark.parametrize("sandboxed", [False, True])
async def test_an_idle_claude_code_engine_stops_and_resumes_its_session(
    capd: CapdProcess, feed: Client, tmp_path: Path, sandboxed: bool
) -> None:
    extra = {} if sandboxed else {"sandbox": UNCONFINED}
    await spawn_on_engine(capd, "cc", STAND_IN_CLAUDE.engine(tmp_path), limits=IDLE, **extra)
    async with await connect_pod(capd, "cc") as pod:
        first, _ = await run_turn(pod, "hello")
        running = (await pod.request({"method": "status"}))["engine"]
        stopped, _ = await wait_for(feed, engine_stopped("cc"))
        listed = (await daemon_request(capd, {"method": "list"}))["pods"][0]["engine"]
        shown = await asyncio.to_thread(ok, capd.runtime_dir, "status", "cc")
        second, _ = await run_turn(pod, "again")
        history = await full_history(pod)
    assert (running["state"], running["reaped"]) == ("running", 0)
    assert not alive(running["pid"])
    assert stopped["engine"]["pid"] is None
    assert stopped["engine"]["since"] >= running["since"]
    assert listed == stopped["engine"]
    assert re.search(
        r"^engine: +stopped \(starts at the next turn\), stopped while idle 1x", shown, re.M
    )
    assert (first["result"], second["output"]) == ("finished", "You said: again")
    (session,) = [e["session_id"] for e in history if e["event"] == "engine_session"]
    one, two = engine_starts(tmp_path)
    assert "--resume" not in one["argv"]
    assert two["argv"][two["argv"].index("--resume") + 1] == session
    assert _prompts(tmp_path) == ["hello", "again"]  # nothing sent again, no continue
    # The second process went on in the first one's session, which holds both turns.
    assert (tmp_path / "sessions" / session).read_text().split() == ['"hello"', '"again"']


async def test_a_session_lost_after_a_stop_is_primed_with_the_context(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    """The CLI cannot resume the stopped engine's session (pruned meanwhile): the new
    session's first prompt carries the pod's context, as after a rewind."""
    await spawn_on_engine(capd, "cc", STAND_IN_CLAUDE.engine(tmp_path), limits=IDLE)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "remember 42")
        await wait_for(feed, engine_stopped("cc"))
        for saved in (tmp_path / "sessions").iterdir():
            saved.unlink()
        end, _ = await run_turn(pod, "what was it?")
        history = await full_history(pod)
    first, replacing = [e for e in history if e["event"] == "engine_session"]
    assert replacing["replaced"] == first["session_id"]
    primed = _prompts(tmp_path)[-1]
    assert primed.startswith(f"[capd: {LOST}")
    assert "remember 42" in primed
    assert primed.endswith("what was it?")
    assert end["result"] == "finished"


async def test_an_acp_session_lost_after_a_stop_is_primed_with_the_context(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    """As an agent whose session store is not writable in its sandbox: `session/load`
    fails after the stop, and the new session is given the context."""
    await spawn_on_engine(capd, "ag", STAND_IN_ACP_AGENT.engine(tmp_path), limits=IDLE)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "remember 42")
        await wait_for(feed, engine_stopped("ag"))
        for saved in (tmp_path / "sessions").iterdir():
            saved.unlink()
        end, _ = await run_turn(pod, "what was it?")
    prompts = [e["texts"][-1] for e in stand_in_log(tmp_path) if e.get("call") == "prompt"]
    assert prompts[-1].startswith(f"[capd: {LOST}")
    assert "remember 42" in prompts[-1]
    assert end["result"] == "finished"


async def test_an_idle_acp_engine_stops_and_loads_its_session(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    engine = STAND_IN_ACP_AGENT.engine(tmp_path)
    await spawn_on_engine(capd, "ag", engine, limits=IDLE)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
        await wait_for(feed, engine_stopped("ag"))
        end, _ = await run_turn(pod, "again")
    calls = _calls(tmp_path)
    assert calls == ["initialize", "new_session", "prompt", "initialize", "load_session", "prompt"]
    assert (end["result"], end["output"]) == ("finished", "You said: again")


async def _reaped_meanwhile(capd: CapdProcess, feed: Any, state: Path) -> None:
    """Run a turn on a control pod with IDLE and wait until its engine stops."""
    state.mkdir()
    await spawn_on_engine(capd, "control", STAND_IN_CLAUDE.engine(state), limits=IDLE)
    async with await connect_pod(capd, "control") as pod:
        await run_turn(pod, "hi")
    await wait_for(feed, engine_stopped("control"))


async def test_an_acp_agent_that_cannot_load_sessions_keeps_its_process(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    (agent := tmp_path / "agent").mkdir()
    (agent / "no-load").touch()
    await spawn_on_engine(capd, "ag", STAND_IN_ACP_AGENT.engine(agent), limits=IDLE)
    async with await connect_pod(capd, "ag") as pod:
        await run_turn(pod, "hello")
        await _reaped_meanwhile(capd, feed, tmp_path / "control")
        engine = (await pod.request({"method": "status"}))["engine"]
        end, _ = await run_turn(pod, "again")
    assert engine["state"] == "running"
    assert alive(engine["pid"])
    assert _calls(agent) == ["initialize", "new_session", "prompt", "prompt"]
    assert end["result"] == "finished"


async def test_no_stop_while_a_permission_question_is_open(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    (agent := tmp_path / "agent").mkdir()
    engine = STAND_IN_ACP_AGENT.engine(agent, permission="ask")
    await spawn_on_engine(capd, "ag", engine, limits=IDLE)
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "tool:true"})
        asked, _ = await wait_for(pod, is_event("permission_request"))
        await _reaped_meanwhile(capd, feed, tmp_path / "control")
        during = (await pod.request({"method": "status"}))["engine"]
        answer = {"request_id": asked["request_id"], "option_id": "allow"}
        await pod.request({"method": "permission", **answer})
        end, _ = await wait_for(pod, is_event("turn_end"))
    after, _ = await wait_for(feed, engine_stopped("ag"))  # once idle, it goes
    assert (during["state"], during["reaped"]) == ("running", 0)
    assert end["result"] == "finished"
    assert after["engine"]["reaped"] == 1


async def test_no_stop_between_a_turn_and_the_run_queued_behind_it(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    await spawn_on_engine(capd, "cc", STAND_IN_CLAUDE.engine(tmp_path), limits=IDLE)
    async with await connect_pod(capd, "cc") as pod:
        await pod.request({"method": "run", "text": "slow:20"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "run", "text": "queued", "if_busy": "queue"})
        await wait_for(pod, is_event("turn_end"))
        second, _ = await wait_for(pod, is_event("turn_end"))
    await wait_for(feed, engine_stopped("cc"))
    assert second["output"] == "You said: queued"
    assert len(engine_starts(tmp_path)) == 1


async def test_engine_idle_s_set_by_reconfigure_applies_from_the_next_idle_spell(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    engine = STAND_IN_CLAUDE.engine(tmp_path)
    manifest = {"name": "cc", "engine": engine, "sandbox": {"writable": [str(tmp_path)]}}
    await daemon_request(
        capd, {"method": "spawn", "manifest": {**manifest, "limits": {"engine_idle_s": None}}}
    )
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
        changed = await pod.request(
            {"method": "reconfigure", "manifest": {**manifest, "limits": IDLE}}
        )
        await run_turn(pod, "again")  # the reconfigure stopped the engine: it starts again
        await wait_for(feed, engine_stopped("cc"))
    assert changed["changed"] == ["limits"]
    _, restarted = engine_starts(tmp_path)
    assert "--resume" in restarted["argv"]


async def test_the_builtin_engine_has_no_engine_state(capd: CapdProcess) -> None:
    script = {"provider": "scripted", "script": [{"text": "hi"}]}
    await daemon_request(capd, {"method": "spawn", "manifest": {"name": "b", "model": script}})
    assert await _engine(capd, "b") is None
    (entry,) = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert entry["engine"] is None


@pytest.fixture(scope="module")
def _limited_module_capd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CapdProcess]:
    with contextlib.closing(_stopped_at_exit(tmp_path_factory.mktemp("limited"))) as runs:
        proc = next(runs)
        proc.extra_args = ["--max-engine-processes", "2"]
        proc.log = proc.state_dir / "capd.log"
        proc.start()
        yield proc


@pytest.fixture
def limited(_limited_module_capd: CapdProcess) -> Iterator[CapdProcess]:
    """The module's capd with --max-engine-processes 2, emptied of pods after the test: its
    counters and log go on from earlier tests, so a test reads what changed in them."""
    yield _limited_module_capd
    _delete_every_pod(_limited_module_capd)


async def _counters(capd: CapdProcess) -> dict[str, float]:
    """The daemon's metrics as name{labels} -> value."""
    text = (await daemon_request(capd, {"method": "metrics"}))["text"]
    lines = [line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#")]
    return {name: float(value) for name, value in lines}


def _grown(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0) - before.get(name, 0)


LIMIT_STOPS = 'capd_engine_stops_total{reason="limit"}'


async def _spawn_limited(capd: CapdProcess, tmp_path: Path, names: list[str]) -> None:
    """Spawn `names` on the claude stand-in, in the capd with --max-engine-processes 2."""
    for name in names:
        (tmp_path / name).mkdir()
        engine = STAND_IN_CLAUDE.engine(tmp_path / name)
        await spawn_on_engine(capd, name, engine, sandbox=UNCONFINED)


async def _running_engines(capd: CapdProcess) -> dict[str, dict[str, Any]]:
    pods = (await daemon_request(capd, {"method": "list"}))["pods"]
    return {p["name"]: p["engine"] for p in pods if p["engine"]["state"] == "running"}


async def test_the_longest_idle_engine_stops_for_a_new_one(
    limited: CapdProcess, tmp_path: Path
) -> None:
    capd, names = limited, [f"e{i}" for i in range(5)]
    before = await _counters(capd)
    await _spawn_limited(capd, tmp_path, names)
    running = []
    for name in [*names, "e0"]:
        async with await connect_pod(capd, name) as pod:
            end, _ = await run_turn(pod, f"hello {name}")
        assert end["result"] == "finished"
        live = await _running_engines(capd)
        running.append(sorted(live))
        assert all(alive(engine["pid"]) for engine in live.values())
    assert running == [
        ["e0"],
        ["e0", "e1"],
        ["e1", "e2"],
        ["e2", "e3"],
        ["e3", "e4"],
        ["e0", "e4"],  # e0 resumes its session; e3 was idle longest
    ]
    starts = engine_starts(tmp_path / "e0")
    assert len(starts) == 2
    assert "--resume" in starts[1]["argv"]
    pods = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert [p["engine"]["reaped"] for p in pods] == [1, 1, 1, 1, 0]
    after = await _counters(capd)
    assert _grown(before, after, LIMIT_STOPS) == 4
    assert after["capd_engine_processes"] == 2
    table = await asyncio.to_thread(ok, capd.runtime_dir, "ps")
    engines = {row.split()[0]: row.split()[6:-1] for row in table.splitlines()[1:]}
    assert engines["e0"] == ["pid", str(pods[0]["engine"]["pid"])]
    assert engines["e1"] == ["stopped"]


async def test_when_every_engine_is_busy_one_more_starts_and_is_stopped_once_idle(
    limited: CapdProcess, tmp_path: Path
) -> None:
    capd, names = limited, ["b0", "b1", "b2"]
    assert capd.log is not None
    logged, before = len(capd.output()), await _counters(capd)
    await _spawn_limited(capd, tmp_path, names)
    async with await activity_feed(capd) as feed:
        pods = [await connect_pod(capd, name) for name in names]
        for pod in pods:
            await pod.request({"method": "run", "text": "slow:500"})
            await wait_for(pod, is_event("text_delta"))
        over = await _running_engines(capd)
        await pods[0].request({"method": "cancel"})
        await wait_for(feed, engine_stopped("b0"))
        for pod in pods[1:]:
            await pod.request({"method": "cancel"})
            await wait_for(pod, is_event("turn_end"))
        for pod in pods:
            await pod.close()
    after = await _counters(capd)
    assert sorted(over) == names
    assert sorted(await _running_engines(capd)) == ["b1", "b2"]
    assert _grown(before, after, "capd_engine_limit_exceeded_total") == 1
    assert _grown(before, after, LIMIT_STOPS) == 1
    log = capd.output()[logged:]
    warned = [line for line in log.splitlines() if "engine limit 2 exceeded" in line]
    assert len(warned) == 1
    assert "pod b2 starts one more" in warned[0]


def test_a_negative_engine_limit_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        Config.from_args(["--max-engine-processes", "-1"])
    assert exited.value.code == 2
    assert "--max-engine-processes must be 0 (no limit) or more, got -1" in capsys.readouterr().err


async def test_an_engine_that_died_while_idle_gives_its_place_back(
    limited: CapdProcess, tmp_path: Path
) -> None:
    """Its dead process counts no more: `pod_activity` says so, a new engine takes its
    place under the limit rather than stopping a live one, and its own next turn resumes
    its session."""
    capd, names = limited, ["e0", "e1", "e2"]
    counted = await _counters(capd)
    await _spawn_limited(capd, tmp_path, names)
    for name in names[:2]:
        async with await connect_pod(capd, name) as pod:
            await run_turn(pod, f"hello {name}")
    before = await _running_engines(capd)
    async with await activity_feed(capd) as feed:
        os.kill(before["e1"]["pid"], signal.SIGKILL)
        await wait_for(feed, engine_stopped("e1", reaped=0))  # watchers are told
    async with await connect_pod(capd, "e2") as pod:
        await run_turn(pod, "hello e2")
    kept = await _running_engines(capd)
    async with await connect_pod(capd, "e1") as pod:
        end, _ = await run_turn(pod, "again")
    pods = (await daemon_request(capd, {"method": "list"}))["pods"]
    stops = _grown(counted, await _counters(capd), LIMIT_STOPS)
    assert sorted(kept) == ["e0", "e2"]
    assert kept["e0"]["pid"] == before["e0"]["pid"]
    assert [p["engine"]["reaped"] for p in pods] == [1, 0, 0]  # e0, for e1 again
    assert stops == 1
    assert end["output"] == "You said: again"
    assert "--resume" in engine_starts(tmp_path / "e1")[1]["argv"]


async def test_a_stopped_engine_starts_again_to_compact_its_session(
    capd: CapdProcess, feed: Client, tmp_path: Path
) -> None:
    """`/compact` on an idle pod whose engine stopped resumes the session to compact it;
    the engine stops again once the compaction is over."""
    await spawn_on_engine(capd, "cc", STAND_IN_CLAUDE.engine(tmp_path), limits=IDLE)
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "hello")
        await wait_for(feed, engine_stopped("cc"))
        await pod.request({"method": "compact"})
        compacted, _ = await wait_for(pod, is_event("context_compacted"))
        await wait_for(feed, engine_stopped("cc", reaped=2))
        end, _ = await run_turn(pod, "again")
    one, two, three = engine_starts(tmp_path)
    session = two["argv"][two["argv"].index("--resume") + 1]
    assert "--resume" not in one["argv"]
    assert three["argv"][three["argv"].index("--resume") + 1] == session
    assert _prompts(tmp_path) == ["hello", "/compact", "again"]
    assert compacted["trigger"] == "request"
    assert end["output"] == "You said: again"


async def test_a_start_paused_midway_waits_for_the_old_process_before_the_next(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A pause while the agent starts stops it; the turn's resume starts another only
    once the first has exited, so the two never hold the session at once (the agent
    takes a while to exit, as one saving its session does)."""
    await spawn_on_engine(capd, "ag", STAND_IN_ACP_AGENT.engine(tmp_path), sandbox=UNCONFINED)
    (tmp_path / "hold-init").touch()
    (tmp_path / "linger").touch()
    async with await connect_pod(capd, "ag") as pod:
        await pod.request({"method": "run", "text": "again"})
        await until(lambda: _calls(tmp_path)[-1:] == ["initialize"])
        await pause_turn(pod)
        (tmp_path / "hold-init").unlink()
        end, _ = await resume_turn(pod)
    (tmp_path / "linger").unlink()  # the second one, deleted after the test, need not
    log = stand_in_log(tmp_path)
    starts = [i for i, entry in enumerate(log) if "argv" in entry]
    (exited,) = [i for i, entry in enumerate(log) if entry.get("exit") == log[starts[0]]["pid"]]
    assert len(starts) == 2
    assert exited < starts[1]
    assert end["output"] == "You said: again"


async def test_a_session_lost_after_a_reconfigure_is_primed_too(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A reconfigure stops the engine's process as an idle stop does: should its
    session not resume, the new one is given the context all the same."""
    engine = STAND_IN_CLAUDE.engine(tmp_path)
    manifest = {"name": "cc", "engine": engine, "sandbox": UNCONFINED}
    await daemon_request(capd, {"method": "spawn", "manifest": manifest})
    async with await connect_pod(capd, "cc") as pod:
        await run_turn(pod, "remember 42")
        await pod.request(
            {"method": "reconfigure", "manifest": {**manifest, "system_prompt": "Be brief."}}
        )
        for saved in (tmp_path / "sessions").iterdir():
            saved.unlink()
        end, _ = await run_turn(pod, "what was it?")
    primed = _prompts(tmp_path)[-1]
    assert primed.startswith(f"[capd: {LOST}")
    assert "remember 42" in primed
    assert end["result"] == "finished"


async def test_a_compaction_counts_as_activity_for_the_limit(
    limited: CapdProcess, tmp_path: Path
) -> None:
    """Compacted after b's turn, a's engine is the more recently active: c's start stops
    b's."""
    capd, names = limited, ["a", "b", "c"]
    await _spawn_limited(capd, tmp_path, names)
    for name in names[:2]:
        async with await connect_pod(capd, name) as pod:
            await run_turn(pod, f"hello {name}")
    async with await connect_pod(capd, "a") as pod:
        await pod.request({"method": "compact"})
        await wait_for(pod, is_event("context_compacted"))
    async with await connect_pod(capd, "c") as pod:
        await run_turn(pod, "hello c")
    assert sorted(await _running_engines(capd)) == ["a", "c"]
