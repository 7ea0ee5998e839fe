"""Restore: a pod rebuilt from its stored events and pending rows after a capd died."""

from pathlib import Path

from capd.context import INTERRUPTED_TOOL_OUTPUT
from capd.store import Store
from protocol.events import AssistantMessage, PermissionRequest, Usage
from protocol.methods import Cancel, Notify, PodEvent, Resume, Run
from tests.fakes.engine import Drive
from tests.unit.pods import Rig


async def _running(rig: Rig) -> Drive:
    await rig.call(Run(text="go"))
    return await rig.engine.next_drive()


def _after_a_crash(tmp_path: Path, store: Store) -> Rig:
    """The pod of the next capd: a new controller and engine on the same store."""
    return Rig.build(tmp_path, store).restore()


async def test_a_turn_in_flight_comes_back_paused_and_resumes_the_same_turn(
    tmp_path: Path, store: Store
) -> None:
    old = Rig.build(tmp_path, store).start()
    drive = await _running(old)
    drive.say("checking", "bash")
    await old.crash()
    crashed_at = old.pod.last_seq

    new = _after_a_crash(tmp_path, store)
    assert new.pod.status == "paused"
    assert new.pod.turn is not None
    assert new.pod.turn.turn_id == drive.turn.turn_id
    assert new.pod.turn.started_seq == drive.turn.started_seq
    assert new.pod.turn.output == "checking"
    assert new.kinds(crashed_at) == ["status"]
    assert new.events()[-1]["status"] == "paused"
    assert new.pod.context.messages == old.pod.context.messages
    assert new.pod.context.seqs == old.pod.context.seqs

    new.start()
    try:
        await new.call(Resume())
        again = await new.engine.next_drive()
        assert again.turn.turn_id == drive.turn.turn_id
        [closed] = new.events("tool_result")
        assert (closed["call_id"], closed["output"]) == ("bash-0", INTERRUPTED_TOOL_OUTPUT)
    finally:
        await new.close()


async def test_queued_runs_and_unread_notes_come_back_in_order(
    tmp_path: Path, store: Store
) -> None:
    old = Rig.build(tmp_path, store).start()
    await _running(old)
    queued = [(await old.call(Run(text=t, if_busy="queue")))["turn_id"] for t in ("a", "b")]
    await old.call(Notify(text="note", source="ci"))
    await old.call(PodEvent(event={"kind": "shut_down", "pod": "c1", "event_id": "c1/1"}))
    await old.crash()

    new = _after_a_crash(tmp_path, store).start()
    try:
        assert new.pod.status_result([])["queued"] == 2
        assert [(n.kind, n.source, n.text) for n in new.pod.notes] == [
            ("notify", "ci", "note"),
            ("pod_event", "pod c1", "pod c1 shut down"),
        ]
        await new.call(Cancel())  # the paused turn; the first queued run follows
        first = await new.engine.next_drive()
        assert first.turn.turn_id == queued[0]
        notes = new.events("notification")
        assert [n["text"] for n in notes] == ["note", "pod c1 shut down"]
        assert {n["turn_id"] for n in notes} == {queued[0]}
        first.finish()
        assert (await new.engine.next_drive()).turn.turn_id == queued[1]
        assert store.pending("p") == []
    finally:
        await new.close()


async def test_a_report_already_read_does_not_come_back_and_is_still_a_duplicate(
    tmp_path: Path, store: Store
) -> None:
    old = Rig.build(tmp_path, store).start()
    drive = await _running(old)
    await old.call(PodEvent(event={"kind": "x", "event_id": "c1/1"}))
    drive.read_notes()
    await old.call(PodEvent(event={"kind": "x", "event_id": "c1/2"}))
    await old.crash()

    new = _after_a_crash(tmp_path, store).start()
    try:
        [note] = new.pod.notes
        assert '"c1/2"' in note.text
        for event_id in ("c1/1", "c1/2"):
            ack = await new.call(PodEvent(event={"kind": "x", "event_id": event_id}))
            assert ack == {"duplicate": True}
    finally:
        await new.close()


async def test_an_idle_pod_comes_back_idle_with_nothing_added(tmp_path: Path, store: Store) -> None:
    old = Rig.build(tmp_path, store).start()
    drive = await _running(old)
    drive.finish()
    await old.until("idle")
    await old.crash()

    new = _after_a_crash(tmp_path, store)
    assert (new.pod.status, new.pod.turn) == ("idle", None)
    assert new.pod.last_seq == old.pod.last_seq


async def test_questions_left_open_are_resolved_at_restore(tmp_path: Path, store: Store) -> None:
    old = Rig.build(tmp_path, store).start()
    drive = await _running(old)
    drive.host.emit(PermissionRequest(turn_id=drive.turn.turn_id, request_id="r1"))
    assert [p["request_id"] for p in old.pod.status_result([])["permissions"]] == ["r1"]
    await old.crash()
    crashed_at = old.pod.last_seq

    new = _after_a_crash(tmp_path, store)
    assert new.kinds(crashed_at) == ["permission_resolved", "status"]
    [resolved] = new.events("permission_resolved")
    assert (resolved["request_id"], resolved["option_id"]) == ("r1", None)
    assert new.pod.status_result([])["permissions"] == []


async def test_usage_totals_come_back(tmp_path: Path, store: Store) -> None:
    old = Rig.build(tmp_path, store).start()
    drive = await _running(old)
    for tokens in (10, 20):
        drive.host.emit(
            AssistantMessage(
                turn_id=drive.turn.turn_id,
                text="step",
                usage=Usage(input_tokens=tokens, output_tokens=1),
            )
        )
    await old.crash()

    new = _after_a_crash(tmp_path, store)
    assert new.pod.status_result([])["usage"] == {
        "input_tokens": 30,
        "output_tokens": 2,
        "cost_usd": None,
    }
    assert new.pod.turn is not None
    assert new.pod.turn.steps == 2


async def test_a_queued_run_that_already_started_is_dropped(tmp_path: Path, store: Store) -> None:
    """Its row goes with its turn_start in one commit: both at once means a damaged store."""
    old = Rig.build(tmp_path, store).start()
    drive = await _running(old)
    store.add_pending("p", "run", "go", turn_id=drive.turn.turn_id)
    await old.crash()

    new = _after_a_crash(tmp_path, store)
    assert new.pod.status_result([])["queued"] == 0
    assert store.pending("p") == []
