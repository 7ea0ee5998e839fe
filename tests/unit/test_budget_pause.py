"""The pause of an external engine's turn whose step spent the budget: the actor decides
it from its mailbox (`_BudgetPause`), after whatever was queued before it."""

import asyncio

from protocol.events import AssistantMessage, Usage
from protocol.methods import Permission, Run, SetBudget
from tests.fakes.engine import WAIT_S
from tests.unit.pods import Rig


async def _spending_step(rig: Rig, tokens: int) -> None:
    """An external engine's step that reports `tokens` input tokens."""
    drive = rig.engine.drives[-1]
    step = AssistantMessage(turn_id=drive.turn.turn_id, text="hi", usage=Usage(input_tokens=tokens))
    rig.pod.emit(step)


async def test_a_stop_queued_before_a_step_spends_the_budget_ends_the_actor_cleanly(
    rig: Rig,
) -> None:
    await rig.call(SetBudget(tokens=10))
    await rig.call(Run(text="go"))
    await rig.engine.next_drive()
    stopping = asyncio.ensure_future(rig.pod.stop("cancel"))
    await asyncio.sleep(0)  # the stop waits in the mailbox
    await _spending_step(rig, 20)
    async with asyncio.timeout(WAIT_S):
        await stopping
        assert rig.actor is not None
        await asyncio.wait([rig.actor])
    assert rig.actor.exception() is None


async def test_a_budget_raised_before_the_pause_is_served_leaves_the_turn_running(
    rig: Rig,
) -> None:
    await rig.call(SetBudget(tokens=10))
    await rig.call(Run(text="go"))
    await rig.engine.next_drive()
    raising = asyncio.ensure_future(rig.call(SetBudget(tokens=1000)))
    await asyncio.sleep(0)  # the raise waits in the mailbox, before the pause
    await _spending_step(rig, 20)
    assert (await raising)["budget"] == {"tokens": 1000, "usd": None}
    await rig.call(Permission(request_id="r", option_id=None))  # served after the pause
    assert rig.pod.status == "running"
    assert rig.events("budget_exhausted") == []
