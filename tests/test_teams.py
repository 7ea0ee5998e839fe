"""Teams (§16): `spawn {team}`, `capctl apply -f FILE` and `capctl down -f FILE` against a
real capd, with scripted models; and `stop {keep_turn: true}`, which `down` builds on. One
module, so that they share one capd."""

import asyncio
import contextlib
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import yaml

from capctl.team import plan_lines, read_team
from protocol.client import Client, ConnectionClosed
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.engine_scaffold import STAND_IN_CLAUDE, engine_starts
from tests.fakes.openai_server import OpenAITestServer, TextReply
from tests.fakes.sse_server import HeldReply
from tests.gitrepo import IDENTITY, branch_tip, git, make_repo
from tests.helpers import (
    EVENT_TIMEOUT_S,
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    resume_turn,
    run_turn,
    scripted,
    sigkill,
    sleeper,
    spawn,
    until,
    wait_for,
)
from tests.test_activity import activity_feed
from tests.test_capctl import TIMEOUT_S, assert_one_line_error, capctl, ok, start_capctl
from tests.test_engine_reap import engine_stopped

pytestmark = pytest.mark.shared_capd


async def test_spawn_team_is_in_list_status_and_ps(capd: CapdProcess, tmp_path: Path) -> None:
    for name, team in (("tm1", "pay"), ("tm2", None)):
        manifest = {"name": name, "model": scripted(), "cwd": str(tmp_path)}
        await daemon_request(capd, {"method": "spawn", "manifest": manifest, "team": team})
    listed = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert {pod["name"]: pod["team"] for pod in listed} == {"tm1": "pay", "tm2": None}
    async with await connect_pod(capd, "tm1", subscribe=False) as pod:
        assert (await pod.request({"method": "status"}))["team"] == "pay"
    header, *rows = ok(capd.runtime_dir, "ps").splitlines()
    column = header.split().index("TEAM")
    assert {row.split()[0]: row.split()[column] for row in rows} == {"tm1": "pay", "tm2": "-"}
    await daemon_request(capd, {"method": "stop", "name": "tm1"})
    await daemon_request(capd, {"method": "start", "name": "tm1"})
    async with await connect_pod(capd, "tm1", subscribe=False) as pod:
        assert (await pod.request({"method": "status"}))["team"] == "pay"


def _team_file(tmp_path: Path, pods: list[dict[str, Any]], team: str = "crew") -> Path:
    path = tmp_path / "team.yaml"
    path.write_text(yaml.safe_dump({"team": team, "pods": pods}, sort_keys=False))
    return path


def _crew(lead_prompt: str = "lead", qa_tools: tuple[str, ...] = ("bash",)) -> list[dict]:
    """Five pods, two of them roots: lead > dev > doc, lead > qa; ops."""
    model = {"provider": "scripted"}
    return [
        {"name": "lead", "model": model, "cwd": ".", "system_prompt": lead_prompt}
        | {"tools": ["bash", "read_file"]},
        {"name": "dev", "parent": "lead", "model": model, "tools": ["bash", "read_file"]},
        {"name": "qa", "parent": "lead", "model": model, "tools": list(qa_tools)},
        {"name": "doc", "parent": "dev", "model": model, "tools": ["read_file"]},
        {"name": "ops", "model": model, "cwd": ".", "tools": ["bash"]},
    ]


def _capctl_apply(capd: CapdProcess, path: Path, *flags: str) -> list[str]:
    return ok(capd.runtime_dir, "apply", "-f", str(path), *flags).splitlines()


async def _apply(capd: CapdProcess, path: Path, prune: bool = False) -> list[str]:
    """What `capctl apply` sends and prints, without its start-up."""
    team = read_team(path)
    pods = [pod.model_dump(mode="json", exclude_unset=True) for pod in team.pods]
    request = {"method": "apply", "team": team.team, "pods": pods, "prune": prune}
    return plan_lines((await daemon_request(capd, request))["plan"])


async def test_apply_spawns_a_team_then_changes_nothing_then_reconfigures(
    capd: CapdProcess, tmp_path: Path
) -> None:
    path = _team_file(tmp_path, _crew())
    assert _capctl_apply(capd, path) == [
        "+ spawn lead",
        "+ spawn dev",
        "+ spawn doc",
        "+ spawn qa",
        "+ spawn ops",
    ]
    listed = {pod["name"]: pod for pod in (await daemon_request(capd, {"method": "list"}))["pods"]}
    assert {name: pod["team"] for name, pod in listed.items()} == dict.fromkeys(listed, "crew")
    parents = {name: pod["parent"] for name, pod in listed.items()}
    assert parents["doc"] == str(capd.pod_socket("dev"))
    assert parents["qa"] == parents["dev"] == str(capd.pod_socket("lead"))
    assert parents["lead"] is parents["ops"] is None
    async with await connect_pod(capd, "doc", subscribe=False) as pod:
        assert (await pod.request({"method": "status"}))["cwd"] == str(tmp_path.resolve())
    assert await _apply(capd, path) == [
        f"= unchanged {name}" for name in ("lead", "dev", "doc", "qa", "ops")
    ]

    changed = _team_file(tmp_path, _crew("lead, changed", ("bash", "read_file")))
    expected = [
        "~ reconfigure lead (system_prompt)",
        "= unchanged dev",
        "= unchanged doc",
        "~ reconfigure qa (tools)",
        "= unchanged ops",
    ]
    assert _capctl_apply(capd, changed, "--dry-run") == [*expected, "dry run: nothing was changed"]
    assert await _tools(capd, "qa") == ["bash"]
    assert await _apply(capd, changed) == expected
    assert await _tools(capd, "qa") == ["bash", "read_file"]
    assert await _apply(capd, changed) == [
        f"= unchanged {name}" for name in ("lead", "dev", "doc", "qa", "ops")
    ]

    fewer = _team_file(tmp_path, _crew("lead, changed", ("bash", "read_file"))[:3])
    assert (await _apply(capd, fewer))[-1] == "= unchanged qa"
    assert _capctl_apply(capd, fewer, "--prune", "--dry-run")[-3:] == [
        "- delete doc",
        "- delete ops",
        "dry run: nothing was changed",
    ]
    assert (await _apply(capd, fewer, prune=True))[-2:] == ["- delete doc", "- delete ops"]
    listed = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert sorted(pod["name"] for pod in listed) == ["dev", "lead", "qa"]

    # Narrowing a parent and its children together: each child first, as capd refuses a
    # parent narrower than its child. (dev, woken by doc's shut_down report, is idle first.)
    async with await connect_pod(capd, "dev", subscribe=False) as dev:
        await dev.request({"method": "subscribe", "after_seq": 0})
        await wait_for(dev, is_event("turn_end"))
    narrow = [pod | {"tools": ["bash"]} for pod in _crew("lead, changed")[:3]]
    assert await _apply(capd, _team_file(tmp_path, narrow)) == [
        "~ reconfigure dev (tools)",
        "~ reconfigure qa (tools)",
        "~ reconfigure lead (tools)",
    ]


async def _tools(capd: CapdProcess, name: str) -> list[str]:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        return (await pod.request({"method": "status"}))["tools"]


def _held(gate: Path, *then: str) -> dict[str, Any]:
    """A scripted model whose first step's tool waits on the FIFO `gate`."""
    wait = {"name": "bash", "arguments": {"command": f"read -r _ < {gate}"}}
    return scripted({"tool_calls": [wait]}, *({"text": text} for text in then))


async def test_a_running_pods_change_is_deferred_to_its_turns_end(
    capd: CapdProcess, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    pod = {"name": "busy", "model": _held(gate, "done"), "cwd": ".", "tools": ["bash"]}
    path = _team_file(tmp_path, [pod], team="solo")
    assert await _apply(capd, path) == ["+ spawn busy"]
    release = os.open(gate, os.O_RDWR)
    try:
        async with await connect_pod(capd, "busy") as busy:
            await busy.request({"method": "run", "text": "go"})
            await wait_for(busy, is_event("assistant_message"))
            await busy.request({"method": "run", "text": "next", "if_busy": "queue"})
            changed = _team_file(tmp_path, [pod | {"system_prompt": "new"}], team="solo")
            assert _capctl_apply(capd, changed) == [
                "… deferred busy (system_prompt): pod busy is running; its change applies "
                "when its turn ends"
            ]
            assert await _apply(capd, changed) == [
                "… deferred busy (system_prompt): pod busy is running; its change applies "
                "when its turn ends"
            ]
            os.write(release, b"go\n")
            _, seen = await wait_for(busy, is_event("turn_start"))
            durable = [e["event"] for e in seen if "seq" in e and e["event"] != "status"]
            assert durable[-3:] == ["turn_end", "reconfigured", "turn_start"]
            await wait_for(busy, is_event("turn_end"))
    finally:
        os.close(release)
    assert await _apply(capd, changed) == ["= unchanged busy"]


async def test_down_drains_pauses_and_stops_children_first(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """`held` outlives the drain timeout, `quick` finishes within it with a run queued;
    their parent `boss`, idle, hears of both but starts no turn while the team goes down;
    it takes its change as the next apply starts it, before those reports wake it."""
    held_gate, quick_gate = tmp_path / "held", tmp_path / "quick"
    for gate in (held_gate, quick_gate):
        os.mkfifo(gate)
    model = {"provider": "scripted"}
    pods = [
        {"name": "boss", "model": model, "cwd": ".", "tools": ["bash"]},
        {"name": "held", "parent": "boss", "model": _held(held_gate, "held done")}
        | {"tools": ["bash"]},
        {"name": "quick", "parent": "boss", "model": _held(quick_gate, "quick done")}
        | {"tools": ["bash"]},
    ]
    path = _team_file(tmp_path, pods, team="dn")
    await _apply(capd, path)
    release = os.open(quick_gate, os.O_RDWR)
    boss = await connect_pod(capd, "boss")
    quick = await connect_pod(capd, "quick")
    try:
        for name in ("held", "quick"):
            async with await connect_pod(capd, name) as pod:
                await pod.request({"method": "run", "text": "go"})
                await wait_for(pod, is_event("assistant_message"))
        await quick.request({"method": "run", "text": "later", "if_busy": "queue"})
        down = start_capctl(capd.runtime_dir, "down", "-f", str(path), "--drain-timeout", "2")
        try:
            await until_refused(quick)
            os.write(release, b"go\n")
            out, err = await asyncio.to_thread(down.communicate, timeout=TIMEOUT_S)
        finally:
            down.kill()
        assert down.returncode == 0, err
        assert out.decode().splitlines() == ["boss: stopped", "held: paused", "quick: finished"]
        boss_saw = await events_until_closed(boss)
        quick_saw = await events_until_closed(quick)
    finally:
        os.close(release)
        await boss.close()
        await quick.close()
    assert "turn_start" not in [e["event"] for e in boss_saw]
    turns = [e["event"] for e in quick_saw if e["event"] in ("turn_start", "turn_end")]
    assert turns == ["turn_start", "turn_end"], "the queued run started during the drain"
    listed = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert {pod["name"]: pod["status"] for pod in listed} == dict.fromkeys(
        ("boss", "held", "quick"), "stopped"
    )

    pods[0]["system_prompt"] = "you are back"
    assert await _apply(capd, _team_file(tmp_path, pods, team="dn")) == [
        "> start boss",
        "~ reconfigure boss (system_prompt)",
        "> start held: paused: `capctl resume held`",
        "> start quick",
    ]
    async with await connect_pod(capd, "boss", subscribe=False) as boss:
        await boss.request({"method": "subscribe", "after_seq": 0})
        await wait_for(boss, is_event("turn_end"))  # the buffered reports woke it
        history = await full_history(boss)
    woke = [e["event"] for e in history if e["event"] in ("reconfigured", "turn_start")]
    # The reports kept while it was stopped and those the outbox delivers as it starts may
    # wake it once or twice, as they arrive; the change comes before the first.
    assert woke[:2] == ["reconfigured", "turn_start"], woke
    assert woke.count("reconfigured") == 1, woke
    async with await connect_pod(capd, "held") as held:
        end, _ = await resume_turn(held)
    assert (end["result"], end["output"]) == ("finished", "held done")
    async with await connect_pod(capd, "quick", subscribe=False) as quick:
        history = await full_history(quick)
    assert [e["text"] for e in history if e["event"] == "user_message"][-1] == "later"


async def until_refused(pod: Client) -> None:
    """Wait until the running pod refuses a `run` as its team goes down (until then it
    answers `already_running`, which changes nothing)."""
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        while True:
            try:
                await pod.request({"method": "run", "text": "probe", "if_busy": "reject"})
            except ProtocolError as exc:
                refused = exc.code
            else:
                raise AssertionError("a running pod started another run")
            if refused == "shutting_down":
                return
            assert refused == "already_running", refused
            await asyncio.sleep(0.02)


async def events_until_closed(pod: Client) -> list[dict[str, Any]]:
    """The events a subscribed pod sent until it stopped."""
    seen = []
    with contextlib.suppress(ConnectionClosed):
        while True:
            seen.append(await pod.next_event(EVENT_TIMEOUT_S))
    return seen


async def test_a_plain_child_of_a_lead_with_its_own_work_dir_works_in_it(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A lead with no cwd works in its own work dir, made by its first turn; its plain
    child works there too, and the child's spawn makes it."""
    model = {"provider": "scripted"}
    pods = [
        {"name": "boss", "model": model, "tools": ["bash"]},
        {"name": "hand", "parent": "boss", "model": model, "tools": ["bash"]},
    ]
    assert await _apply(capd, _team_file(tmp_path, pods)) == ["+ spawn boss", "+ spawn hand"]
    work = capd.state_dir.resolve() / "pods" / "boss" / "work"
    async with await connect_pod(capd, "boss") as boss, await connect_pod(capd, "hand") as hand:
        cwds = [(await pod.request({"method": "status"}))["cwd"] for pod in (boss, hand)]
    assert cwds == [str(work), str(work)]
    assert work.is_dir()


async def test_apply_checks_every_pod_before_it_changes_anything(
    capd: CapdProcess, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    rt = capd.runtime_dir
    (tmp_path / "elsewhere").mkdir()
    manifest = {"name": "loner", "model": scripted(), "cwd": str(tmp_path)}
    await daemon_request(capd, {"method": "spawn", "manifest": manifest})
    model = {"provider": "scripted"}
    lead = {"name": "lead", "model": model, "cwd": ".", "tools": ["bash"]}
    cases = [
        (
            [lead, {"name": "loner", "model": model, "cwd": "."}],
            "already_exists: pod loner: name: pod loner exists and is not of team crew (it "
            "has no team)",
        ),
        (
            [lead, {"name": "qa", "parent": "lead", "model": model, "tools": ["read_file"]}],
            "forbidden: pod qa: tools read_file are not among parent pod lead's tools (bash)",
        ),
        (
            [
                lead,
                {"name": "qa", "parent": "lead", "model": model, "cwd": "elsewhere/.."},
                {"name": "x", "parent": "qa", "model": model, "cwd": "/"},
            ],
            "forbidden: pod x: cwd / is outside",
        ),
        (
            [lead, {"name": "ghost", "model": model, "cwd": "missing"}],
            f"invalid_request: pod ghost: cwd {tmp_path / 'missing'} is not a directory",
        ),
    ]
    path = _team_file(tmp_path, cases[0][0])
    done = capctl(rt, "apply", "-f", str(path))
    assert_one_line_error(done)
    assert done.stderr.startswith(f"capctl: {path}: {cases[0][1]}"), done.stderr
    for pods, expected in cases:
        refusal = await _refusal(capd, _team_file(tmp_path, pods))
        assert refusal.startswith(expected), refusal
        listed = (await daemon_request(capd, {"method": "list"}))["pods"]
        assert [pod["name"] for pod in listed] == ["loner"], "something changed"

    # A worktree child's cwd is its own work tree (the same repository is its spawn's
    # rule), not its parent's directory; a repository its confined parent can write is
    # refused before anything changes (capd's own git there would run the parent's hooks).
    git = _git(str(make_repo(tmp_path / "proj")))
    tester = {"name": "tester", "parent": "lead", "model": model, "tools": ["bash"]} | git
    request = {"method": "apply", "team": "crew", "pods": [lead, tester], "dry_run": True}
    request["pods"][0] = lead | {"cwd": str(tmp_path)}
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, request)
    assert refused.value.code == "invalid_request"
    assert refused.value.message.startswith("pod tester: workspace.git.repo: "), refused.value
    assert "which pod lead can write" in refused.value.message
    git = _git(str(make_repo(tmp_path_factory.mktemp("apart") / "proj")))  # not loner's
    request["pods"][0] = {k: v for k, v in lead.items() if k != "cwd"} | git
    request["pods"][1] = tester | git
    planned = await daemon_request(capd, request)
    assert plan_lines(planned["plan"]) == ["+ spawn lead", "+ spawn tester"]
    assert not planned["done"]

    path = _team_file(tmp_path, [lead])
    assert await _apply(capd, path) == ["+ spawn lead"]
    for change, expected in (
        ({"cwd": "elsewhere"}, "invalid_request: pod lead: cannot reconfigure pod lead: cwd "),
        ({"parent": "other"}, "invalid_request: pod lead: parent: other is not its parent null"),
    ):
        pods = [lead | change, {"name": "other", "model": model, "cwd": "."}]
        refusal = await _refusal(capd, _team_file(tmp_path, pods))
        assert refusal.startswith(expected), refusal


async def _refusal(capd: CapdProcess, path: Path) -> str:
    """How `apply` refuses the file: `code: message`."""
    with pytest.raises(ProtocolError) as refused:
        await _apply(capd, path)
    return f"{refused.value.code}: {refused.value.message}"


@pytest.mark.own_capd
async def test_a_deferred_change_survives_a_crash_of_capd(
    capd: CapdProcess, tmp_path: Path
) -> None:
    pod = {"name": "keep", "model": sleeper("done"), "cwd": ".", "tools": ["bash"]}
    path = _team_file(tmp_path, [pod], team="solo")
    await _apply(capd, path)
    async with await connect_pod(capd, "keep") as keep:
        await keep.request({"method": "run", "text": "go"})
        await wait_for(keep, is_event("assistant_message"))
    changed = _team_file(tmp_path, [pod | {"system_prompt": "new"}], team="solo")
    assert (await _apply(capd, changed))[0].startswith("… deferred keep (system_prompt)")
    await sigkill(capd)
    capd.start()
    async with await connect_pod(capd, "keep") as keep:
        assert (await keep.request({"method": "status"}))["status"] == "paused"
        end, _ = await resume_turn(keep)
        assert end["output"] == "done"
        event, _ = await wait_for(keep, lambda e: e["event"] in ("reconfigured", "turn_start"))
    assert (event["event"], event["changed"]) == ("reconfigured", ["system_prompt"])
    assert await _apply(capd, changed) == ["= unchanged keep"]


@pytest.mark.own_capd
async def test_a_failing_step_says_which_steps_were_done(capd: CapdProcess, tmp_path: Path) -> None:
    """`bad`'s stored history is damaged, so its start fails after `a`'s step."""
    model = {"provider": "scripted"}
    path = _team_file(tmp_path, [{"name": name, "model": model, "cwd": "."} for name in "ab"])
    await _apply(capd, path)
    async with await connect_pod(capd, "b") as pod:
        await run_turn(pod, "hi")
    capd.stop()
    damaged = "UPDATE events SET data = '{\"event\": \"turn_st' WHERE pod = 'b' AND seq = 2"
    with contextlib.closing(sqlite3.connect(capd.state_dir / "capd.db")) as db, db:
        db.execute(damaged)
    await asyncio.to_thread(capd.start)
    refusal = await _refusal(capd, path)
    assert refusal.startswith(
        "internal: applied 1 of 2 steps (= unchanged a); pod b: pod b cannot be restored: "
    ), refusal

    # A change of `b` the failed start would have taken is not left for a later `start`.
    pods = [{"name": name, "model": model, "cwd": ".", "system_prompt": "new"} for name in "ab"]
    refusal = await _refusal(capd, _team_file(tmp_path, pods))
    assert refusal.startswith("internal: applied 1 of 3 steps (~ reconfigure a); pod b: ")
    with contextlib.closing(sqlite3.connect(capd.state_dir / "capd.db")) as db:
        kept = db.execute("SELECT pending_manifest FROM pods WHERE name = 'b'").fetchall()
    assert kept == [(None,)]


@pytest.mark.own_capd
async def test_a_team_going_down_stays_down_after_a_crash_of_capd(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """capd dies during `down`'s drain: at its next start the team's pods stay stopped,
    their turns kept, instead of coming back to start what the drain held back (`boss`'s
    buffered notification)."""
    pods = [
        {"name": "boss", "model": {"provider": "scripted"}, "cwd": ".", "tools": ["bash"]},
        {"name": "busy", "parent": "boss", "model": sleeper("done"), "tools": ["bash"]},
    ]
    path = _team_file(tmp_path, pods, team="dc")
    await _apply(capd, path)
    request = {"method": "down", "team": "dc", "drain_timeout_s": 600}
    async with await connect_pod(capd, "busy") as busy:
        await busy.request({"method": "run", "text": "go"})
        await wait_for(busy, is_event("assistant_message"))
        down = asyncio.create_task(daemon_request(capd, request))
        await until_refused(busy)
    async with await connect_pod(capd, "boss", subscribe=False) as boss:
        assert (await boss.request({"method": "notify", "text": "later"}))["buffered"] == 1
    # A dry run changes nothing, so it does not wait for the down to finish.
    team = read_team(path)
    dry = {"method": "apply", "team": "dc", "dry_run": True}
    dry["pods"] = [pod.model_dump(mode="json", exclude_unset=True) for pod in team.pods]
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        planned = await daemon_request(capd, dry)
    assert plan_lines(planned["plan"]) == ["= unchanged boss", "= unchanged busy"]
    await sigkill(capd)
    with pytest.raises((ConnectionClosed, OSError)):
        await down
    await asyncio.to_thread(capd.start)
    listed = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert {pod["name"]: pod["status"] for pod in listed} == {"boss": "stopped", "busy": "stopped"}
    started = ["> start boss", "> start busy: paused: `capctl resume busy`"]
    assert await _apply(capd, path) == started


async def test_a_reconfigure_after_a_deferred_change_wins(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """The user's `reconfigure` of the paused pod comes after `apply`'s deferred change:
    the turn's end does not bring the older change back (nor would a restart: the store
    forgot it with the reconfigure's commit)."""
    pod = {"name": "later", "model": sleeper("done"), "cwd": ".", "tools": ["bash"]}
    path = _team_file(tmp_path, [pod], team="rw")
    await _apply(capd, path)
    changed = _team_file(tmp_path, [pod | {"system_prompt": "from apply"}], team="rw")
    async with await connect_pod(capd, "later") as later:
        await later.request({"method": "run", "text": "go"})
        await wait_for(later, is_event("assistant_message"))
        assert (await _apply(capd, changed))[0].startswith("… deferred later (system_prompt)")
        await later.request({"method": "pause"})
        manifest = {k: v for k, v in pod.items() if k != "cwd"} | {"system_prompt": "user's"}
        await later.request({"method": "reconfigure", "manifest": manifest})
        end, _ = await resume_turn(later)
        assert end["output"] == "done"
        await later.request({"method": "status"})  # after what the turn's end did
        history = await full_history(later)
    assert [e["changed"] for e in history if e["event"] == "reconfigured"] == [["system_prompt"]]
    assert await _apply(capd, changed) == ["~ reconfigure later (system_prompt)"]


async def test_a_compacting_pods_change_waits_for_the_compaction(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """An idle pod that compacts cannot be reconfigured (its engine is in use): apply
    defers the change to the compaction's end rather than failing."""
    async with OpenAITestServer() as server:
        model = {"provider": "openai", "name": "test-model", "base_url": server.base_url}
        pod = {"name": "squeeze", "model": model, "cwd": "."}
        await _apply(capd, _team_file(tmp_path, [pod], team="cz"))
        changed = _team_file(tmp_path, [pod | {"system_prompt": "new"}], team="cz")
        async with await connect_pod(capd, "squeeze") as squeeze:
            server.enqueue(TextReply("first"), TextReply("second"))
            for text in ("ALPHA", "BRAVO"):
                await run_turn(squeeze, text)
            answer = asyncio.Event()
            server.enqueue(HeldReply(TextReply("the summary"), answer))
            asked = asyncio.create_task(daemon_compact(capd, "squeeze"))
            await server.wait_requests(3)
            assert await _apply(capd, changed) == [
                "… deferred squeeze (system_prompt): pod squeeze is compacting; its change "
                "applies when the compaction ends"
            ]
            answer.set()
            await asked
            event, _ = await wait_for(squeeze, is_event("reconfigured"))
        assert event["changed"] == ["system_prompt"]
        assert await _apply(capd, changed) == ["= unchanged squeeze"]


async def daemon_compact(capd: CapdProcess, name: str) -> None:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        await pod.request({"method": "compact"})


async def test_apply_checks_work_trees_before_it_changes_anything(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """What a `workspace.git` spawn refuses, and a child outside its work-tree parent's
    cwd, are refused before the first pod of the file is spawned."""
    repo = str(make_repo(tmp_path / "repo"))
    model = {"provider": "scripted"}
    first = {"name": "first", "model": model, "cwd": ".", "tools": ["bash"]}
    lead = {"name": "wlead", "model": model, "workspace": {"git": {"repo": repo}}}
    cases = [
        (
            [first, {"name": "typo", "model": model} | _git(repo, base="mian")],
            "invalid_request: pod typo: workspace.git.base 'mian' is not a branch, tag or "
            "commit of ",
        ),
        (
            [first, {"name": "both", "model": model, "cwd": "."} | _git(repo)],
            "invalid_request: pod both: cwd and workspace.git are both set",
        ),
        (
            [
                {"name": "b1", "model": model} | _git(repo, branch="work"),
                {"name": "b2", "model": model} | _git(repo, branch="work"),
            ],
            "already_exists: pod b2: workspace.git.branch work of ",
        ),
        (
            [
                lead | {"tools": ["bash"]},
                {"name": "in", "parent": "wlead", "model": model},
                first | {"parent": "wlead", "cwd": "/"},
            ],
            "forbidden: pod first: cwd / is outside ",
        ),
    ]
    for pods, expected in cases:
        refusal = await _refusal(capd, _team_file(tmp_path, pods, team="wt"))
        assert refusal.startswith(expected), refusal
        listed = (await daemon_request(capd, {"method": "list"}))["pods"]
        assert [pod for pod in listed if pod["team"] == "wt"] == [], "something changed"
    assert git(Path(repo), "branch", "--format=%(refname:short)").split() == ["main"]

    # A child with neither cwd nor workspace.git works in its new parent's work tree.
    pods = [lead | {"tools": ["bash"]}, {"name": "in", "parent": "wlead", "model": model}]
    assert await _apply(capd, _team_file(tmp_path, pods, team="wt")) == [
        "+ spawn wlead",
        "+ spawn in",
    ]
    cwds = []
    for name in ("wlead", "in"):
        async with await connect_pod(capd, name, subscribe=False) as pod:
            cwds.append((await pod.request({"method": "status"}))["cwd"])
    assert cwds == [str(capd.state_dir.resolve() / "worktrees" / "wlead" / "work")] * 2


async def test_apply_refuses_what_spawn_and_reconfigure_refuse_before_any_step(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """`apply` plans with spawn's and reconfigure's own checks (`Supervisor.check_spawn`,
    `check_change`): a new pod, or a changed one, that could write another pod's work
    tree's repository is refused before the file's first step, not midway."""
    repo = make_repo(tmp_path / "repo")
    holder = {"name": "holder", "model": scripted()} | _git(str(repo))
    await daemon_request(capd, {"method": "spawn", "manifest": holder})
    (tmp_path / "own").mkdir()
    model = {"provider": "scripted"}
    mine = {"name": "mine", "model": model, "cwd": "own", "tools": ["bash"]}
    writer = {"name": "writer", "model": model, "cwd": str(repo)}
    refusal = await _refusal(capd, _team_file(tmp_path, [mine, writer], team="seam"))
    assert refusal.startswith("invalid_request: pod writer: workspace.git.repo: "), refusal
    assert "which pod writer can write" in refusal
    # The same two new in one file, the writer after the work tree.
    other = make_repo(tmp_path / "other")
    pods = [{"name": "tree", "model": model} | _git(str(other)), writer | {"cwd": str(other)}]
    refusal = await _refusal(capd, _team_file(tmp_path, pods, team="seam"))
    assert refusal.startswith("invalid_request: pod tree: workspace.git.repo: "), refusal
    assert "which pod writer can write" in refusal
    assert git(other, "branch", "--format=%(refname:short)").split() == ["main"]
    assert await _apply(capd, _team_file(tmp_path, [mine], team="seam")) == ["+ spawn mine"]

    widened = mine | {"sandbox": {"writable": [str(repo)]}}
    pods = [{"name": "new", "model": model, "cwd": "own"}, widened]
    refusal = await _refusal(capd, _team_file(tmp_path, pods, team="seam"))
    assert refusal.startswith("invalid_request: pod mine: workspace.git.repo: "), refusal
    listed = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert [pod["name"] for pod in listed if pod["team"] == "seam"] == ["mine"]

    # A child the file does not list: refused as a reconfigure refuses it.
    kid = {"name": "kid", "model": scripted(), "cwd": str(tmp_path / "own"), "tools": ["bash"]}
    parent = str(capd.pod_socket("mine"))
    await daemon_request(capd, {"method": "spawn", "manifest": kid, "parent": parent})
    refusal = await _refusal(capd, _team_file(tmp_path, [mine | {"tools": []}], team="seam"))
    assert refusal.startswith(
        "forbidden: pod mine: pod mine would be narrower than its child pod kid: tools bash"
    ), refusal
    for name in ("kid", "mine", "holder"):  # the module's other pods never meet this repository
        await daemon_request(
            capd, {"method": "delete", "name": name, "delete_branch": name == "holder"}
        )


def _git(repo: str, **spec: str) -> dict[str, Any]:
    return {"workspace": {"git": {"repo": repo, **spec}}}


async def test_a_child_spawned_or_sent_to_while_its_team_drains_keeps_its_task(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """The parent's turn goes on during the drain and spawns a child and sends to another:
    both take the message as a queued run, started when they are started again, instead
    of a spawn that fails with the child made anyway and a message refused."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    kid_model = {"provider": "scripted", "script": [{"text": "kid done"}]}
    spawn_kid = {"name": "spawn_pod", "arguments": {"name": "dkid", "task": "work"}}
    spawn_kid["arguments"]["model"] = kid_model
    send = {"name": "send_to_pod", "arguments": {"name": "dsib", "text": "hello"}}
    lead_model = _held(gate, "sent")
    lead_model["script"][1:1] = [{"tool_calls": [spawn_kid, send]}]
    pods = [
        {"name": "dlead", "model": lead_model, "cwd": "."}
        | {"tools": ["bash", "spawn_pod", "send_to_pod"]},
        {"name": "dsib", "parent": "dlead", "model": kid_model},
    ]
    path = _team_file(tmp_path, pods, team="dk")
    await _apply(capd, path)
    release = os.open(gate, os.O_RDWR)
    try:
        async with await connect_pod(capd, "dlead") as lead:
            await lead.request({"method": "run", "text": "go"})
            await wait_for(lead, is_event("assistant_message"))
            request = {"method": "down", "team": "dk", "drain_timeout_s": EVENT_TIMEOUT_S}
            down = asyncio.create_task(daemon_request(capd, request))
            await until_refused(lead)
            os.write(release, b"go\n")
            _, seen = await wait_for(lead, is_event("turn_end"))
    finally:
        os.close(release)
    assert (await down)["pods"] == [
        {"pod": "dlead", "outcome": "finished"},
        {"pod": "dsib", "outcome": "stopped"},
    ]
    results = [e["output"] for e in seen if e["event"] == "tool_result"][-2:]
    assert "cannot" not in results[0], results
    assert results[1].startswith("pod dsib's team is going down; your message is queued")
    for name in ("dkid", "dsib"):
        await daemon_request(capd, {"method": "start", "name": name})
        async with await connect_pod(capd, name, subscribe=False) as pod:
            await pod.request({"method": "subscribe", "after_seq": 0})
            end, _ = await wait_for(pod, is_event("turn_end"))
            history = await full_history(pod)
        assert end["output"] == "kid done"
        assert [e["text"] for e in history if e["event"] == "user_message"] == [
            {"dkid": "work", "dsib": "hello"}[name]
        ]


@pytest.mark.own_capd
async def test_a_child_spawned_during_down_stays_down_after_a_crash_of_capd(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """As the team's own pods, a child a draining pod spawned is stored stopped at once:
    a capd that dies before `down` stops it does not restore it to start its task."""
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    kid_model = {"provider": "scripted", "script": [{"text": "kid done"}]}
    spawn_kid = {"name": "spawn_pod", "arguments": {"name": "ckid", "task": "work"}}
    spawn_kid["arguments"]["model"] = kid_model
    sleep = {"name": "bash", "arguments": {"command": "sleep 30"}}
    lead_model = _held(gate, "done")
    lead_model["script"][1:1] = [{"tool_calls": [spawn_kid]}, {"tool_calls": [sleep]}]
    lead = {"name": "clead", "model": lead_model, "cwd": ".", "tools": ["bash", "spawn_pod"]}
    await _apply(capd, _team_file(tmp_path, [lead], team="ck"))
    release = os.open(gate, os.O_RDWR)
    try:
        async with await connect_pod(capd, "clead") as pod:
            await pod.request({"method": "run", "text": "go"})
            await wait_for(pod, is_event("assistant_message"))
            request = {"method": "down", "team": "ck", "drain_timeout_s": 600}
            down = asyncio.create_task(daemon_request(capd, request))
            await until_refused(pod)
            os.write(release, b"go\n")
            await wait_for(pod, lambda e: e["event"] == "tool_result" and "ckid" in e["output"])
        await sigkill(capd)
    finally:
        os.close(release)
    with pytest.raises((ConnectionClosed, OSError)):
        await down
    await asyncio.to_thread(capd.start)
    listed = (await daemon_request(capd, {"method": "list"}))["pods"]
    assert {pod["name"]: pod["status"] for pod in listed} == {"clead": "stopped", "ckid": "stopped"}


@pytest.mark.own_capd
async def test_a_deferred_change_that_cannot_be_read_is_dropped_and_logged(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """A stored change capd cannot read back (a newer capd's, a damaged row) is dropped with
    a line in the log, not kept forever in silence."""
    path = _team_file(tmp_path, [{"name": "odd", "model": scripted(), "cwd": "."}], team="od")
    await _apply(capd, path)
    capd.stop()
    with contextlib.closing(sqlite3.connect(capd.state_dir / "capd.db")) as db, db:
        db.execute("UPDATE pods SET pending_manifest = '{\"name\": 1}' WHERE name = 'odd'")
    await asyncio.to_thread(capd.start)
    await daemon_request(capd, {"method": "list"})
    with contextlib.closing(sqlite3.connect(capd.state_dir / "capd.db")) as db:
        kept = db.execute("SELECT pending_manifest FROM pods WHERE name = 'odd'").fetchall()
    assert kept == [(None,)]
    capd.stop()
    assert "pod odd: the change apply deferred cannot be read; dropped:" in capd.output()


async def test_down_needs_only_the_files_team(capd: CapdProcess, tmp_path: Path) -> None:
    """A file whose pods no longer check can still bring its team down: `down` sends only
    `team`. A file without a team name is refused, naming the file and the field."""
    path = _team_file(tmp_path, [{"name": "x", "colour": "red"}], team="gone")
    done = capctl(capd.runtime_dir, "down", "-f", str(path))
    assert_one_line_error(done, f"{path}: not_found: no pod is of team gone")
    path.write_text("pods: []\n")
    done = capctl(capd.runtime_dir, "down", "-f", str(path))
    assert_one_line_error(done, f"{path}: team: ")


async def test_work_tree_pods_on_an_external_engine_apply_twice_sync_and_resume(
    capd: CapdProcess, tmp_path: Path
) -> None:
    """The three parts of §16 together: a team whose child runs Claude Code (the stand-in)
    in a work tree of its own with a short engine_idle_s. The second apply changes nothing
    (manifests resolved with cwd = the work tree); the engine's commits reach the branch;
    its stopped process resumes its session after a change of engine_idle_s."""
    repo, state = make_repo(tmp_path / "repo"), tmp_path / "cc"
    state.mkdir()
    engine = STAND_IN_CLAUDE.engine(state)
    engine["env"] |= IDENTITY
    workspace, sandbox = {"git": {"repo": str(repo)}}, {"writable": [str(state)]}
    lead = {"name": "wlead", "model": scripted(), "tools": ["bash"], "workspace": workspace}
    tester = {"name": "wtest", "parent": "wlead", "engine": engine, "workspace": workspace}
    tester["limits"] = {"engine_idle_s": 0.3}
    pods = [lead | {"sandbox": sandbox}, tester | {"sandbox": sandbox}]
    path = _team_file(tmp_path, pods, team="wt")
    assert _capctl_apply(capd, path) == ["+ spawn wlead", "+ spawn wtest"]
    assert await _apply(capd, path) == ["= unchanged wlead", "= unchanged wtest"]
    commit = "tool:echo t > t.txt && git add t.txt && git commit -qm t && git rev-parse HEAD"
    async with await activity_feed(capd) as feed, await connect_pod(capd, "wtest") as pod:
        _, seen = await run_turn(pod, commit)
        [made] = [event["output"] for event in seen if event["event"] == "tool_result"]
        await until(lambda: branch_tip(repo, "capd/wtest") == made.strip())
        await wait_for(feed, engine_stopped("wtest"))
        pods[1]["limits"] = {"engine_idle_s": 60}
        changed = _team_file(tmp_path, pods, team="wt")
        assert await _apply(capd, changed) == ["= unchanged wlead", "~ reconfigure wtest (limits)"]
        end, _ = await run_turn(pod, "again")
    assert end["output"] == "You said: again"
    first, again = engine_starts(state)
    assert "--resume" not in first["argv"]
    assert "--resume" in again["argv"]
    work = capd.state_dir.resolve() / "worktrees" / "wtest" / "work"
    assert first["cwd"] == again["cwd"] == str(work)
    assert await _apply(capd, changed) == ["= unchanged wlead", "= unchanged wtest"]


# `stop {keep_turn: true}`: the pod's and its descendants' turns are paused, not cancelled,
# and come back `paused` at `start`; `resume` finishes them. Plain `stop` still cancels.
# The turns are held in a `sleep 30` tool call.


async def _running_in_tool(capd: CapdProcess, name: str) -> str:
    """Start a turn of the sleeper pod; once its `sleep 30` call is committed, its turn id."""
    async with await connect_pod(capd, name) as pod:
        started = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("assistant_message"))
    return started["turn_id"]


async def _status(capd: CapdProcess, name: str) -> str:
    async with await connect_pod(capd, name, subscribe=False) as pod:
        return (await pod.request({"method": "status"}))["status"]


async def test_stop_keep_turn_pauses_the_pod_and_its_child(
    capd: CapdProcess, tmp_path: Path
) -> None:
    parent = await spawn(capd, "kp", sleeper("parent done"), cwd=str(tmp_path), tools=["bash"])
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": "kc", "model": sleeper("child done"), "tools": ["bash"]}
            | {"cwd": str(tmp_path)},
            "parent": str(parent),
        },
    )
    turns = {name: await _running_in_tool(capd, name) for name in ("kp", "kc")}
    ok(capd.runtime_dir, "stop", "kp", "--keep-turn")
    for name in ("kp", "kc"):
        await daemon_request(capd, {"method": "start", "name": name})
        assert await _status(capd, name) == "paused"
    for name, text in (("kc", "child done"), ("kp", "parent done")):
        async with await connect_pod(capd, name) as pod:
            end, _ = await resume_turn(pod)
            assert (end["turn_id"], end["result"], end["output"]) == (turns[name], "finished", text)
            history = await full_history(pod)
        assert [e["result"] for e in history if e["event"] == "turn_end"] == ["finished"]


async def test_plain_stop_cancels_the_turn(capd: CapdProcess, tmp_path: Path) -> None:
    await spawn(capd, "ks", sleeper("never"), cwd=str(tmp_path), tools=["bash"])
    turn = await _running_in_tool(capd, "ks")
    ok(capd.runtime_dir, "stop", "ks")
    await daemon_request(capd, {"method": "start", "name": "ks"})
    assert await _status(capd, "ks") == "idle"
    async with await connect_pod(capd, "ks", subscribe=False) as pod:
        history = await full_history(pod)
    ends = [(e["turn_id"], e["result"]) for e in history if e["event"] == "turn_end"]
    assert ends == [(turn, "cancelled")]
