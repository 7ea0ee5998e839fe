"""Chaos (issue 14): SIGKILL a busy capd at random moments, again and again.

Pods stream (the scripted model, with delays), run bash tools that each append a unique
marker to a file, take queued runs, notifies and pod_events, and spawn a child that
reports to its parent. After every restart the test holds capd to what clients were told:
every durable event a subscriber saw before the kill is in `history`, unchanged; no seq
gap; every pod is listed; a turn in flight came back paused; nothing the killed capd
started is still running. At the end every paused turn is resumed to its finish, and each
acked run, notify, pod_event and child report took effect exactly once, each tool at most
once (exactly once where its result was recorded).

The seed is random and printed; CAPD_CHAOS_SEED=N replays its choices (the timing of a
kill against the pods' work still varies). It runs 6 rounds, a new seed each time it runs;
CAPD_CHAOS_ROUNDS=N runs longer.
"""

import asyncio
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from capd.proc.groups import KILL_GRACE_S
from capd.proc.leftovers import OWNER_ENV, OWNER_FILE
from protocol.client import Client, ConnectionClosed
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import (
    Event,
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    open_turn,
    pids_with_env,
    scripted,
    sigkill,
    spawn,
    until,
    wait_for,
)

SEED = int(os.environ.get("CAPD_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
ROUNDS = int(os.environ.get("CAPD_CHAOS_ROUNDS") or 6)
STEPS = 20 + 12 * ROUNDS
"""Script steps per pod: more than the model calls the rounds make, so tools keep running."""
SETTLE_TIMEOUT_S = 60.0
LEFTOVER_TIMEOUT_S = KILL_GRACE_S + 2
"""The next capd SIGTERMs the killed one's tools as it starts, and SIGKILLs them after the
grace; a tool that outlives this is a leak (the sleeper's tools would run until the
settling starts)."""
SLEEPER = "w2"
"""A pod whose every turn runs a tool that waits for the settling to start (30 s at most),
so most kills leave a tool running, and the settling need not wait for it."""
MARKER = re.compile(r"chaos-[a-z0-9]+-\d+")


@dataclass
class Ledger:
    """What clients saw and what capd acked, held against every restart."""

    markers: Path
    pods: set[str] = field(default_factory=set)
    seen: defaultdict[str, dict[int, Event]] = field(default_factory=lambda: defaultdict(dict))
    runs: defaultdict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    """pod → turn_id → text of each acked `run`."""
    unacked_runs: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """pod → texts of runs sent as capd was killed, their ack never read."""
    notes: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    pod_events: defaultdict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    """pod → event_ids of acked `pod_event`s."""
    came_back_paused: defaultdict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    old_owners: set[str] = field(default_factory=set)
    """The CAPD_OWNER tokens of every capd killed so far."""
    crashes_in_turns: int = 0


def _step(rng: random.Random, pod: str, index: int, markers: Path) -> dict[str, Any]:
    """A step that streams for tens of milliseconds; half of them call bash, which
    appends the step's marker after a short sleep (the sleeper's every other step, once
    the settling has started)."""
    text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(40, 160)))
    step: dict[str, Any] = {"text": text, "chunk_chars": 4, "delay_ms": 3}
    wait = f"sleep 0.{rng.randint(2, 40):02d}"
    if pod == SLEEPER:
        until_settling = f"until [ -e {_settling(markers)} ]; do sleep 0.1; done"
        wait = f"timeout --foreground 30 sh -c '{until_settling}'" if index % 2 == 0 else ""
    elif rng.random() < 0.5:
        wait = ""
    if wait:
        command = f"{wait}; echo chaos-{pod}-{index} >> {markers}"
        step["tool_calls"] = [{"name": "bash", "arguments": {"command": command}}]
    return step


def _settling(markers: Path) -> Path:
    """The file whose existence ends the sleeper's waits: made when the settling starts."""
    return markers.with_name("settling")


def _script(rng: random.Random, pod: str, markers: Path, kids: dict[int, str]) -> list[Any]:
    """`pod`'s script; step i in `kids` spawns that child with a script of its own."""
    steps = []
    for index in range(STEPS):
        if index in kids:
            kid = kids[index]
            model = {"script": _script(rng, kid, markers, {})[: STEPS // 2]}
            spawn_pod = {"name": kid, "task": f"{kid} first task", "model": model}
            steps.append({"tool_calls": [{"name": "spawn_pod", "arguments": spawn_pod}]})
        else:
            steps.append(_step(rng, pod, index, markers))
    return steps


def _same(seen: Event, stored: Event) -> bool:
    """Byte for byte, as the wire carries them (orjson keeps the key order)."""
    return orjson.dumps(seen) == orjson.dumps(stored)


async def _watch(pod: Client, seen: dict[int, Event]) -> None:
    """Record every durable event this subscriber receives until capd goes away."""
    try:
        while True:
            event = await pod.next_event()
            if "seq" in event:
                seen[event["seq"]] = event
    except ConnectionClosed:
        return


async def _act(pod: Client, name: str, rng: random.Random, ledger: Ledger, tag: str) -> bool:
    """Random work for one pod: resume, run (queued when busy), notify, pod_event, and a
    pod_event sent again. Returns whether the pod is left paused. The sleeper only
    resumes and runs when idle, so no long tool waits behind another."""
    status = await pod.request({"method": "status"})
    paused = status["status"] == "paused"
    if paused and rng.random() < 0.8:
        await pod.request({"method": "resume"})
        paused = False
    if name == SLEEPER:
        if status["status"] == "idle":
            text = f"run {tag} {name}"
            ack = await pod.request({"method": "run", "text": text})
            ledger.runs[name][ack["turn_id"]] = text
        return paused
    if not paused and rng.random() < 0.6:
        text = f"run {tag} {name}"
        ack = await pod.request({"method": "run", "text": text, "if_busy": "queue"})
        ledger.runs[name][ack["turn_id"]] = text
    if rng.random() < 0.4:
        text = f"note {tag} {name}"
        await pod.request({"method": "notify", "text": text, "source": "chaos"})
        ledger.notes[name].append(text)
    if rng.random() < 0.3:
        event_id = f"chaos/{rng.randrange(16**16):016x}"
        event = {"kind": "chaos", "pod": "chaos", "event_id": event_id, "tag": tag}
        ack = await pod.request({"method": "pod_event", "event": event})
        assert "duplicate" not in ack, ack
        ledger.pod_events[name].append(event_id)
    if ledger.pod_events[name] and rng.random() < 0.3:
        event_id = rng.choice(ledger.pod_events[name])
        event = {"kind": "chaos", "pod": "chaos", "event_id": event_id, "tag": "again"}
        ack = await pod.request({"method": "pod_event", "event": event})
        assert ack == {"duplicate": True}, f"{name}: {event_id} taken twice"
    return paused


async def _round(capd: CapdProcess, rng: random.Random, ledger: Ledger, number: int) -> None:
    """Subscribe to every pod, give them work, and SIGKILL capd while they do it."""
    pods = {name: await connect_pod(capd, name, subscribe=False) for name in sorted(ledger.pods)}
    watchers = []
    try:
        left_paused = set()
        for name, pod in pods.items():
            last = max(ledger.seen[name], default=0)
            await pod.request({"method": "subscribe", "after_seq": last})
            watchers.append(asyncio.create_task(_watch(pod, ledger.seen[name])))
            if await _act(pod, name, rng, ledger, f"r{number}"):
                left_paused.add(name)
        await asyncio.sleep(rng.uniform(0.05, 0.6))
        unacked = None
        if (busy := sorted(pods.keys() - left_paused - {SLEEPER})) and rng.random() < 0.3:
            name = rng.choice(busy)
            text = f"unacked r{number} {name}"
            run = {"method": "run", "text": text, "if_busy": "queue"}
            unacked = (name, text, asyncio.create_task(pods[name].request(run)))
            await asyncio.sleep(rng.uniform(0, 0.002))
        # Every token in the file is a killed capd's: this one's, and any kept from earlier.
        owners = (capd.state_dir / OWNER_FILE).read_text().splitlines()
        ledger.old_owners.update(line.split()[0] for line in owners if line.strip())
        await sigkill(capd)
        if unacked is not None:
            name, text, request = unacked
            try:
                ledger.runs[name][(await request)["turn_id"]] = text
            except (ConnectionClosed, ProtocolError):
                ledger.unacked_runs[name].append(text)
        await asyncio.gather(*watchers)
    finally:
        for task in watchers:
            task.cancel()
        for pod in pods.values():
            await pod.close()


def _check_history(name: str, history: list[Event], ledger: Ledger) -> None:
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1)), f"{name}: seq gap"
    for seq, event in ledger.seen[name].items():
        assert seq <= len(history), f"{name}: seq {seq} was seen, then lost"
        assert _same(event, history[seq - 1]), f"{name}: seq {seq} changed"


async def _check_restart(capd: CapdProcess, ledger: Ledger, restarted_at: float) -> None:
    """What a client may rely on right after a restart."""
    listing = await _listing(capd)
    for name in sorted(ledger.pods):
        assert name in listing, f"pod {name} is missing after the restart"
        assert listing[name]["status"] != "stopped", listing[name]
        assert listing[name]["error"] is None, listing[name]
        async with await connect_pod(capd, name, subscribe=False) as pod:
            status = await pod.request({"method": "status"})
            history = await full_history(pod)
        _check_history(name, history, ledger)
        in_flight = open_turn([e for e in history if e["ts"] < restarted_at])
        if in_flight is not None:
            assert (status["status"], status["turn_id"]) == ("paused", in_flight), name
            ledger.came_back_paused[name].add(in_flight)
            ledger.crashes_in_turns += 1
        elif status["status"] == "running":
            start = next(e for e in history if is_event("turn_start", turn_id=status["turn_id"])(e))
            assert start["ts"] >= restarted_at, f"{name}: a turn came back running"
        else:
            assert status["status"] == "idle", status
    ledger.pods.update(listing)
    try:
        await until(lambda: not pids_with_env(OWNER_ENV, ledger.old_owners), LEFTOVER_TIMEOUT_S)
    except TimeoutError:
        left = {pid: _cmdline(pid) for pid in pids_with_env(OWNER_ENV, ledger.old_owners)}
        raise AssertionError(f"a killed capd's processes still run: {left}") from None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return "(gone)"


async def _listing(capd: CapdProcess) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in (await daemon_request(capd, {"method": "list"}))["pods"]}


async def _settle(capd: CapdProcess, ledger: Ledger) -> dict[str, list[Event]]:
    """Resume what is paused and wait until every pod is idle with nothing queued and
    every child's report has reached its parent; returns the histories."""
    _settling(ledger.markers).touch()
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        while True:
            listing = await _listing(capd)
            ledger.pods.update(listing)
            histories, settled = {}, True
            for name in sorted(ledger.pods):
                async with await connect_pod(capd, name, subscribe=False) as pod:
                    status = await pod.request({"method": "status"})
                    if status["status"] == "paused":
                        await pod.request({"method": "resume"})
                    settled &= (status["status"], status["queued"]) == ("idle", 0)
                    histories[name] = await full_history(pod)
            parents = {str(capd.pod_socket(name)): name for name in listing}
            kids = {name: parents[p["parent"]] for name, p in listing.items() if p["parent"]}
            if settled and not _reports_owed(histories, kids):
                return histories
            await asyncio.sleep(0.05)


def _reports_owed(histories: dict[str, list[Event]], parents: dict[str, str]) -> set[str]:
    """The turn_ids of ended turns a `run` started in a child whose report its parent has
    not received yet."""
    owed = set()
    for kid, parent in parents.items():
        received = Counter(
            e["payload"].get("turn_id")
            for e in histories[parent]
            if e["event"] == "pod_event_received" and e["payload"].get("pod") == kid
        )
        for turn_id in _run_turns_ended(histories[kid]):
            assert received[turn_id] <= 1, f"{parent} got {kid}'s {turn_id} twice"
            if not received[turn_id]:
                owed.add(turn_id)
    return owed


def _run_turns_ended(history: list[Event]) -> list[str]:
    runs = {e["turn_id"] for e in history if is_event("turn_start", invoke="run")(e)}
    return [e["turn_id"] for e in history if e["event"] == "turn_end" and e["turn_id"] in runs]


def _check_exactly_once(name: str, history: list[Event], ledger: Ledger, marks: Counter) -> None:
    _check_history(name, history, ledger)
    starts = Counter(e["turn_id"] for e in history if e["event"] == "turn_start")
    ended = Counter(e["turn_id"] for e in history if e["event"] == "turn_end")
    assert starts == ended, f"{name}: each turn starts once and ends once"
    assert set(starts.values()) <= {1}, f"{name}: each turn starts once and ends once"
    ends = {e["turn_id"]: e for e in history if e["event"] == "turn_end"}
    for turn_id in ledger.came_back_paused[name]:
        assert ends[turn_id]["result"] == "finished", ends[turn_id]
    prompts = Counter(e["text"] for e in history if e["event"] == "user_message")
    for turn_id, text in ledger.runs[name].items():
        assert turn_id in ends, f"{name}: acked run {text!r} never ended"
        assert prompts[text] == 1, f"{name}: acked run {text!r} started {prompts[text]} times"
    for text in ledger.unacked_runs[name]:
        assert prompts[text] <= 1, f"{name}: unacked run {text!r} ran twice"
    notes = Counter((e["source"], e["text"]) for e in history if e["event"] == "notification")
    for text in ledger.notes[name]:
        assert notes[("chaos", text)] == 1, f"{name}: notify {text!r}"
    received = {
        e["payload"]["event_id"]: e["seq"]
        for e in history
        if e["event"] == "pod_event_received" and "event_id" in e["payload"]
    }
    assert len(received) == len([e for e in history if e["event"] == "pod_event_received"])
    delivered = Counter(e["pod_event_seq"] for e in history if e["event"] == "notification")
    for seq in received.values():
        assert delivered[seq] == 1, f"{name}: pod_event_received {seq} delivered"
    assert set(ledger.pod_events[name]) <= received.keys(), name
    _check_tools(name, history, marks)


def _check_tools(name: str, history: list[Event], marks: Counter) -> None:
    """A recorded bash result means its marker was written once; none, at most once.
    Call ids restart with capd (the scripted model counts from call_1), so each result
    belongs to the latest call with its id."""
    commands: dict[str, str] = {}
    for event in history:
        if event["event"] == "assistant_message":
            commands |= {c["id"]: c["arguments"].get("command", "") for c in event["tool_calls"]}
        elif event["event"] == "tool_result" and event["name"] == "bash":
            marker = MARKER.search(commands[event["call_id"]])
            assert marker is not None, commands[event["call_id"]]
            if not event["is_error"]:
                assert marks[marker.group()] == 1, f"{name}: {marker.group()} ran"


async def test_sigkill_a_busy_capd_at_random_moments(capd: CapdProcess, tmp_path: Path) -> None:
    print(f"chaos seed {SEED}, {ROUNDS} rounds: replay with CAPD_CHAOS_SEED={SEED}")
    rng = random.Random(SEED)
    ledger = Ledger(markers=tmp_path / "markers")
    for name in ("boss", "w1", SLEEPER):
        kids = {0: "kid1", 6: "kid2"} if name == "boss" else {}
        model = scripted(*_script(rng, name, ledger.markers, kids))
        await spawn(capd, name, model, cwd=str(tmp_path), tools=["bash", "spawn_pod"])
        ledger.pods.add(name)
    async with await connect_pod(capd, "boss") as boss:
        await boss.request({"method": "run", "text": "start"})
        await wait_for(boss, is_event("child_spawned"))
    ledger.pods.add("kid1")

    for number in range(ROUNDS):
        await _round(capd, rng, ledger, number)
        restarted_at = time.time()
        await asyncio.to_thread(capd.start)
        await _check_restart(capd, ledger, restarted_at)

    histories = await _settle(capd, ledger)
    marks = Counter(ledger.markers.read_text().split() if ledger.markers.exists() else [])
    assert [mark for mark, count in marks.items() if count > 1] == [], "tools ran twice"
    for name, history in histories.items():
        _check_exactly_once(name, history, ledger, marks)
    seen = sum(map(len, ledger.seen.values()))
    print(f"{seen} events seen, {len(marks)} tools ran, {ledger.crashes_in_turns} turns paused")
    assert ledger.crashes_in_turns >= ROUNDS // 2, "the kills should land inside turns"
