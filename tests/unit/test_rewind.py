"""Rewind inside one pod's actor (tests/unit/pods.py): the cost of rebuilding the context
a `rewound` goes back to."""

import pytest

from capd.journal import Journal
from protocol.methods import Rewind, Run
from tests.unit.pods import Rig


async def test_retrying_the_last_turn_again_and_again_reads_each_event_once_per_rewind(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ "Undo the last turn and try again", repeated: each rewind rebuilds the context from
    the one before it, instead of replaying every earlier rewind again (2**n rebuilds)."""
    rebuilt = 0
    rebuild = Journal.context_before

    def counted(journal: Journal, seq: int):  # type: ignore[no-untyped-def]
        nonlocal rebuilt
        rebuilt += 1
        return rebuild(journal, seq)

    monkeypatch.setattr(Journal, "context_before", counted)
    retries = 12
    for n in range(retries):
        started = await rig.call(Run(text=f"try {n}"))
        drive = await rig.engine.next_drive()
        drive.say(f"answer {n}")
        drive.finish()
        await rig.until("idle")
        rebuilt = 0
        await rig.call(Rewind(turn_id=started["turn_id"]))
        assert rebuilt <= n + 1
    assert rig.pod.context.messages == []
