"""The pod actor's state machine (docs/protocol.md, "Pods, turns and steps"), row by row,
with a `FakeEngine` at the engine seam."""

import asyncio

import orjson
import pytest

from capd.context import INTERRUPTED_TOOL_OUTPUT
from capd.store import Store
from protocol.errors import ProtocolError
from protocol.events import Usage
from protocol.methods import Cancel, Notify, Pause, Permission, PodEvent, Resume, Run
from tests.fakes.engine import Drive
from tests.unit.pods import PARENT, Rig


async def _running(rig: Rig, text: str = "go") -> Drive:
    await rig.call(Run(text=text))
    return await rig.engine.next_drive()


async def _paused(rig: Rig) -> Drive:
    drive = await _running(rig)
    await rig.call(Pause())
    return drive


async def _refused(rig: Rig, request: object) -> str:
    with pytest.raises(ProtocolError) as err:
        await rig.call(request)
    return err.value.code


# -- run ----------------------------------------------------------------------------------


async def test_run_on_an_idle_pod_starts_a_turn_whose_first_events_commit_together(
    rig: Rig,
) -> None:
    ack = await rig.call(Run(text="hello"))
    assert ack["queued"] is False
    drive = await rig.engine.next_drive()
    assert (drive.turn.turn_id, drive.turn.invoke) == (ack["turn_id"], "run")
    status, start, user = rig.events()
    assert (status["event"], status["status"]) == ("status", "running")
    assert (start["event"], start["invoke"]) == ("turn_start", "run")
    assert (user["event"], user["text"]) == ("user_message", "hello")
    assert status["ts"] == start["ts"] == user["ts"]  # one commit
    assert drive.turn.started_seq == start["seq"]
    assert rig.pod.status == "running"
    assert rig.pod.turn is drive.turn


async def test_a_turn_the_engine_finishes_ends_with_its_output_then_idle(rig: Rig) -> None:
    drive = await _running(rig)
    drive.say("looking", "bash")
    drive.say("done")
    drive.finish()
    await rig.until("idle")
    end, idle = rig.events()[-2:]
    assert (end["event"], end["result"], end["output"]) == ("turn_end", "finished", "done")
    assert (idle["status"], idle["turn_id"]) == ("idle", None)
    assert rig.pod.turn is None
    assert drive.turn.steps == 2


async def test_text_an_interruption_cut_off_begins_the_output(rig: Rig) -> None:
    drive = await _running(rig)
    drive.say("the ans", interrupted=True)
    drive.say("wer is 4")
    drive.finish()
    await rig.until("idle")
    [end] = rig.events("turn_end")
    assert end["output"] == "the answer is 4"


async def test_run_on_a_running_pod_is_rejected_by_default_and_changes_nothing(
    rig: Rig, store: Store
) -> None:
    await _running(rig)
    before = rig.pod.last_seq
    assert await _refused(rig, Run(text="again")) == "already_running"
    assert rig.pod.last_seq == before
    assert store.pending("p") == []


async def test_queued_runs_start_one_after_another_in_order(rig: Rig, store: Store) -> None:
    first = await _running(rig)
    acks = [await rig.call(Run(text=t, if_busy="queue")) for t in ("two", "three")]
    assert all(ack["queued"] for ack in acks)
    assert rig.pod.status_result([])["queued"] == 2
    assert [(row.kind, row.turn_id) for row in store.pending("p")] == [
        ("run", ack["turn_id"]) for ack in acks
    ]
    first.finish()
    second = await rig.engine.next_drive()
    assert second.turn.turn_id == acks[0]["turn_id"]
    assert [row.text for row in store.pending("p")] == ["three"]  # gone with its start
    second.finish()
    third = await rig.engine.next_drive()
    assert third.turn.turn_id == acks[1]["turn_id"]
    assert store.pending("p") == []
    [*_, user] = rig.events("user_message")
    assert user["text"] == "three"


async def test_run_interrupt_cancels_the_running_turn_and_starts_the_new_one(rig: Rig) -> None:
    old = await _running(rig)
    ack = await rig.call(Run(text="instead", if_busy="interrupt"))
    assert old.interrupted.is_set()
    new = await rig.engine.next_drive()
    assert new.turn.turn_id == ack["turn_id"] != old.turn.turn_id
    [end] = rig.events("turn_end")
    assert (end["turn_id"], end["result"]) == (old.turn.turn_id, "cancelled")
    assert rig.kinds(end["seq"]) == ["status", "status", "turn_start", "user_message"]


@pytest.mark.parametrize("if_busy", ["reject", "queue", "interrupt"])
async def test_run_on_a_paused_pod_cancels_the_paused_turn_whatever_if_busy_says(
    rig: Rig, if_busy: str
) -> None:
    old = await _paused(rig)
    ack = await rig.call(Run(text="new", if_busy=if_busy))
    assert ack["queued"] is False
    new = await rig.engine.next_drive()
    assert new.turn.turn_id == ack["turn_id"]
    [end] = rig.events("turn_end")
    assert (end["turn_id"], end["result"]) == (old.turn.turn_id, "cancelled")


# -- pause and resume ---------------------------------------------------------------------


async def test_pause_on_an_idle_pod_is_not_running(rig: Rig) -> None:
    assert await _refused(rig, Pause()) == "not_running"


async def test_pause_interrupts_the_turn_and_leaves_it_open(rig: Rig) -> None:
    drive = await _running(rig)
    assert await rig.call(Pause()) == {}
    assert drive.interrupted.is_set()
    assert rig.pod.status == "paused"
    assert rig.pod.turn is drive.turn
    assert rig.events()[-1]["status"] == "paused"
    assert rig.events("turn_end") == []


async def test_pause_on_a_paused_pod_changes_nothing(rig: Rig) -> None:
    await _paused(rig)
    before = rig.pod.last_seq
    assert await rig.call(Pause()) == {}
    assert rig.pod.last_seq == before


async def test_resume_on_an_idle_pod_is_not_paused(rig: Rig) -> None:
    assert await _refused(rig, Resume()) == "not_paused"


async def test_resume_on_a_running_pod_is_not_paused(rig: Rig) -> None:
    await _running(rig)
    assert await _refused(rig, Resume()) == "not_paused"


async def test_resume_drives_the_same_turn_after_closing_its_open_calls(rig: Rig) -> None:
    drive = await _running(rig)
    asked = drive.say("", "bash", "read_file")
    drive.answer(asked.tool_calls[0])
    await rig.call(Pause())
    paused_at = rig.pod.last_seq
    assert await rig.call(Resume()) == {}
    again = await rig.engine.next_drive()
    assert again.turn is drive.turn
    assert rig.kinds(paused_at) == ["status", "tool_result"]
    [*_, closed] = rig.events("tool_result")
    assert closed["call_id"] == "read_file-1"
    assert (closed["output"], closed["is_error"]) == (INTERRUPTED_TOOL_OUTPUT, True)
    assert rig.pod.context.orphaned_calls() == []


# -- cancel -------------------------------------------------------------------------------


async def test_cancel_on_an_idle_pod_is_not_running(rig: Rig) -> None:
    assert await _refused(rig, Cancel()) == "not_running"


async def test_cancel_ends_the_turn_closing_its_open_calls_then_the_next_queued_starts(
    rig: Rig,
) -> None:
    drive = await _running(rig)
    drive.say("", "bash")
    queued = await rig.call(Run(text="next", if_busy="queue"))
    assert await rig.call(Cancel()) == {"cleared": 0}
    assert drive.interrupted.is_set()
    [closed] = rig.events("tool_result")
    assert (closed["call_id"], closed["output"]) == ("bash-0", INTERRUPTED_TOOL_OUTPUT)
    assert rig.kinds(closed["seq"] - 1)[:5] == [
        "tool_result",
        "turn_end",
        "status",  # idle
        "status",  # running: the queued run
        "turn_start",
    ]
    assert rig.events("turn_end")[0]["result"] == "cancelled"
    assert (await rig.engine.next_drive()).turn.turn_id == queued["turn_id"]


async def test_cancel_all_drops_the_queued_runs_with_the_turn(rig: Rig, store: Store) -> None:
    await _running(rig)
    for text in ("two", "three"):
        await rig.call(Run(text=text, if_busy="queue"))
    assert await rig.call(Cancel(all=True)) == {"cleared": 2}
    assert store.pending("p") == []
    assert rig.pod.status == "idle"
    assert rig.engine.no_drive_waiting()


async def test_cancel_on_a_paused_pod_ends_the_paused_turn(rig: Rig) -> None:
    drive = await _paused(rig)
    await rig.call(Cancel())
    [end] = rig.events("turn_end")
    assert (end["turn_id"], end["result"]) == (drive.turn.turn_id, "cancelled")
    assert rig.pod.status == "idle"


# -- notify and pod_event -----------------------------------------------------------------


async def test_notify_on_an_idle_pod_starts_a_notify_turn_that_reads_it(
    rig: Rig, store: Store
) -> None:
    ack = await rig.call(Notify(text="build broke", source="ci"))
    assert ack == {"buffered": 1, "turn_id": None}
    drive = await rig.engine.next_drive()
    assert drive.turn.invoke == "notify"
    assert rig.kinds() == ["status", "turn_start", "notification"]
    [note] = rig.events("notification")
    assert (note["turn_id"], note["source"], note["text"]) == (
        drive.turn.turn_id,
        "ci",
        "build broke",
    )
    assert store.pending("p") == []
    assert rig.pod.context.messages[-1].text == "[notification from ci]\nbuild broke"


async def test_notify_without_a_source_comes_from_notify(rig: Rig) -> None:
    await rig.call(Notify(text="hi"))
    await rig.engine.next_drive()
    [note] = rig.events("notification")
    assert note["source"] == "notify"


async def test_notify_while_running_waits_until_the_engine_reads_the_notes(
    rig: Rig, store: Store
) -> None:
    drive = await _running(rig)
    assert await rig.call(Notify(text="a")) == {"buffered": 1, "turn_id": drive.turn.turn_id}
    assert (await rig.call(Notify(text="b")))["buffered"] == 2
    assert rig.events("notification") == []
    drive.read_notes()
    assert [n["text"] for n in rig.events("notification")] == ["a", "b"]
    assert {n["turn_id"] for n in rig.events("notification")} == {drive.turn.turn_id}
    assert rig.pod.notes == []
    assert store.pending("p") == []


async def test_a_note_the_turn_did_not_read_starts_the_next_turn(rig: Rig) -> None:
    drive = await _running(rig)
    await rig.call(Notify(text="later"))
    drive.finish()
    following = await rig.engine.next_drive()
    assert following.turn.invoke == "notify"
    [note] = rig.events("notification")
    assert note["turn_id"] == following.turn.turn_id


async def test_a_queued_run_goes_before_notes_and_reads_them(rig: Rig) -> None:
    drive = await _running(rig)
    await rig.call(Notify(text="fyi"))
    queued = await rig.call(Run(text="next", if_busy="queue"))
    drive.finish()
    following = await rig.engine.next_drive()
    assert (following.turn.turn_id, following.turn.invoke) == (queued["turn_id"], "run")
    [note] = rig.events("notification")
    assert note["turn_id"] == queued["turn_id"]


async def test_notify_on_a_paused_pod_is_read_when_the_turn_resumes(rig: Rig) -> None:
    drive = await _paused(rig)
    assert (await rig.call(Notify(text="meanwhile")))["turn_id"] == drive.turn.turn_id
    assert rig.events("notification") == []
    await rig.call(Resume())
    await rig.engine.next_drive()
    [note] = rig.events("notification")
    assert note["turn_id"] == drive.turn.turn_id


async def test_pod_event_is_recorded_and_starts_a_turn_that_reads_its_rendering(
    rig: Rig,
) -> None:
    report = {
        "kind": "turn_ended",
        "pod": "c1",
        "event_id": "c1/1",
        "turn_id": "t-1",
        "result": "finished",
        "output": "all green",
    }
    ack = await rig.call(PodEvent(event=report))
    assert ack == {"buffered": 1, "turn_id": None}
    drive = await rig.engine.next_drive()
    assert drive.turn.invoke == "pod_event"
    [received] = rig.events("pod_event_received")
    assert received["payload"] == report
    [note] = rig.events("notification")
    assert note["pod_event_seq"] == received["seq"]
    assert note["source"] == "pod c1"
    assert note["text"] == "pod c1 ended turn t-1 (finished):\nall green"


async def test_a_pod_event_received_before_is_a_duplicate_and_changes_nothing(rig: Rig) -> None:
    drive = await _running(rig)
    await rig.call(PodEvent(event={"kind": "x", "event_id": "c1/7"}))
    before = rig.pod.last_seq
    assert await rig.call(PodEvent(event={"kind": "x", "event_id": "c1/7"})) == {"duplicate": True}
    assert rig.pod.last_seq == before
    drive.read_notes()
    assert len(rig.events("notification")) == 1


async def test_a_burst_of_reports_is_answered_each_and_one_that_fails_fails_alone(
    rig: Rig,
) -> None:
    drive = await _running(rig)
    unstorable = {"kind": "x", "event_id": "c1/2", "value": object()}  # no JSON for it
    reports = [{"kind": "x", "event_id": "c1/1"}, unstorable, {"kind": "x", "event_id": "c1/3"}]
    answers = await asyncio.gather(
        *(rig.call(PodEvent(event=report)) for report in reports), return_exceptions=True
    )
    turn_id = rig.pod.turn.turn_id if rig.pod.turn else None
    assert answers[0] == {"buffered": 1, "turn_id": turn_id}
    assert isinstance(answers[1], ProtocolError)
    assert answers[1].code == "internal"
    assert answers[2] == {"buffered": 2, "turn_id": turn_id}
    received = [e["payload"]["event_id"] for e in rig.events("pod_event_received")]
    assert received == ["c1/1", "c1/3"]
    drive.read_notes()


async def test_a_status_is_made_again_once_anything_it_shows_changed(rig: Rig) -> None:
    """`status` is cached between changes: a descendant's spending reaches the pod's ledger
    with no event of its own, and a child comes and goes, and both show."""
    pod = rig.pod
    first = pod.status_json([], "n1")
    assert pod.status_json([], "n1") is first
    pod._ledger.spend(pod.name, Usage(), Usage(input_tokens=3, output_tokens=4))
    spent = orjson.loads(pod.status_json([], "n1"))
    with_child = orjson.loads(pod.status_json(["c1"], "n1"))
    assert (orjson.loads(first)["spent"]["tokens"], spent["spent"]["tokens"]) == (0, 7)
    assert (spent["children"], with_child["children"]) == ([], ["c1"])


# -- the rest -----------------------------------------------------------------------------


async def test_permission_answers_go_to_the_engine(rig: Rig) -> None:
    await _running(rig)
    assert await rig.call(Permission(request_id="r1", option_id="allow")) == {}
    assert rig.engine.answers == [("r1", "allow")]


async def test_a_turn_whose_engine_raises_ends_errored_and_the_pod_goes_on(rig: Rig) -> None:
    drive = await _running(rig)
    drive.fail(RuntimeError("boom"))
    await rig.until("idle")
    [end] = rig.events("turn_end")
    assert (end["result"], end["error"]) == ("errored", "internal error: RuntimeError: boom")
    await _running(rig)


async def test_the_engine_outcome_is_the_turn_result(rig: Rig) -> None:
    drive = await _running(rig)
    drive.finish("limit_reached", "too many steps")
    await rig.until("idle")
    [end] = rig.events("turn_end")
    assert (end["result"], end["error"]) == ("limit_reached", "too many steps")


async def test_status_describes_the_turn_and_the_queue(rig: Rig) -> None:
    drive = await _running(rig)
    await rig.call(Run(text="later", if_busy="queue"))
    status = rig.pod.status_result(["c1"])
    assert status["status"] == "running"
    assert status["turn_id"] == drive.turn.turn_id
    assert status["queued"] == 1
    assert status["last_seq"] == rig.pod.last_seq == len(rig.events())
    assert status["children"] == ["c1"]
    assert status["model"] == "scripted"


async def test_stop_cancel_ends_the_turn_and_lets_go_of_the_engine(rig: Rig) -> None:
    drive = await _running(rig)
    await rig.pod.stop("cancel")
    assert drive.interrupted.is_set()
    [end] = rig.events("turn_end")
    assert end["result"] == "cancelled"
    assert rig.engine.closed.is_set()
    assert await _refused(rig, Run(text="more")) == "shutting_down"


async def test_stop_pause_leaves_the_turn_open_for_the_next_start(rig: Rig) -> None:
    drive = await _running(rig)
    await rig.pod.stop("pause")
    assert drive.interrupted.is_set()
    assert rig.events("turn_end") == []
    assert rig.events()[-1]["status"] == "paused"
    assert rig.engine.closed.is_set()


async def test_the_statuses_the_supervisor_hears_follow_the_turn(rig: Rig) -> None:
    await _paused(rig)
    await rig.call(Resume())
    (await rig.engine.next_drive()).finish()
    await rig.until("idle")
    assert rig.statuses.seen == ["running", "paused", "running", "idle"]


# -- the parent ---------------------------------------------------------------------------


async def test_a_run_turn_owes_the_parent_a_report_committed_with_its_end(
    child: Rig, store: Store
) -> None:
    drive = await _running(child)
    drive.say("result")
    drive.finish()
    await child.until("idle")
    [entry] = store.reports_for(PARENT, 10)
    report = orjson.loads(entry.payload)
    [end] = child.events("turn_end")
    assert report["kind"] == "turn_ended"
    assert (report["pod"], report["turn_id"]) == ("c", end["turn_id"])
    assert (report["result"], report["output"]) == ("finished", "result")
    assert child.outbox.poked == [PARENT]


async def test_an_errored_turn_reports_its_error(child: Rig, store: Store) -> None:
    drive = await _running(child)
    drive.finish("errored", "the model is down")
    await child.until("idle")
    [entry] = store.reports_for(PARENT, 10)
    report = orjson.loads(entry.payload)
    assert (report["kind"], report["message"]) == ("errored", "the model is down")


async def test_a_turn_a_note_started_owes_the_parent_nothing(child: Rig, store: Store) -> None:
    await child.call(PodEvent(event={"kind": "turn_ended", "pod": "grandchild"}))
    (await child.engine.next_drive()).finish()
    await child.until("idle")
    assert store.reports_for(PARENT, 10) == []
    assert child.outbox.poked == []


async def test_a_message_from_the_parent_queues_a_run_behind_the_turn(child: Rig) -> None:
    await _running(child)
    ack = await child.pod.deliver("also this", "pod parent")
    assert ack["queued"] is True


async def test_a_message_from_the_parent_to_a_paused_pod_waits_as_a_note(child: Rig) -> None:
    drive = await _paused(child)
    ack = await child.pod.deliver("when you can", "pod parent")
    assert ack == {"buffered": 1, "turn_id": drive.turn.turn_id}
    assert child.pod.status == "paused"


async def test_a_child_adopted_during_a_turn_is_recorded_in_it(child: Rig) -> None:
    drive = await _running(child)
    await child.pod.adopt("gc", "/run/gc.sock", drive.turn.turn_id)
    [spawned] = child.events("child_spawned")
    assert (spawned["name"], spawned["socket"], spawned["turn_id"]) == (
        "gc",
        "/run/gc.sock",
        drive.turn.turn_id,
    )
