"""Budgets (docs/protocol.md, "Budgets"): spending counted for a pod and its ancestors, a
turn paused at its next step boundary once a budget is spent, `set_budget` then `resume`
going on. The scripted model reports usage as word counts: input, the words of every
message it was sent; output, the words of its reply."""

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from capctl.render import describe
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.engine_scaffold import STAND_IN_ACP_AGENT, STAND_IN_CLAUDE, spawn_on_engine
from tests.fakes.claude import PRICE
from tests.helpers import (
    PS_HEADER,
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    kinds,
    run_turn,
    scripted,
    spawn,
    wait_for,
)
from tests.test_capctl import ok

pytestmark = pytest.mark.shared_capd

COST_PER_PROMPT = 0.25
"""What the stand-in ACP agent says each prompt cost (tests/fakes/acp_agent.py)."""
DOLLAR_A_TOKEN = {"input_per_mtok": 1_000_000, "output_per_mtok": 2_000_000}
"""$1 an input token, $2 an output token: costs that are easy to add up."""


def _tool_then(text: str, command: str = "true") -> dict[str, Any]:
    """A script: one step saying `text` with a bash call, then one saying "done"."""
    call = {"name": "bash", "arguments": {"command": command}}
    return scripted({"text": text, "tool_calls": [call]}, {"text": "done"})


async def test_a_spent_budget_pauses_the_turn_before_its_next_model_call_and_a_raise_resumes_it(
    capd: CapdProcess,
) -> None:
    model = {**_tool_then("one two three"), "price": DOLLAR_A_TOKEN}
    # The first step: 1 word in ("go"), 3 out: 4 tokens, $7, which is the whole budget.
    await spawn(capd, "b1", model, tools=["bash"], budget={"tokens": 4})
    async with await connect_pod(capd, "b1") as pod:
        turn_id = (await pod.request({"method": "run", "text": "go"}))["turn_id"]
        spent, seen = await wait_for(pod, is_event("budget_exhausted"))
        _, after = await wait_for(pod, is_event("status"))
        status = await pod.request({"method": "status"})
        raised = await pod.request({"method": "set_budget", "tokens": 100})
        await pod.request({"method": "resume"})
        end, resumed = await wait_for(pod, is_event("turn_end"))
    assert kinds(seen, durable_only=True)[-3:] == [
        "assistant_message",
        "tool_result",
        "budget_exhausted",
    ]
    step = next(e for e in seen if e["event"] == "assistant_message")
    assert step["usage"] == {"input_tokens": 1, "output_tokens": 3, "cost_usd": 7.0}
    assert (spent["turn_id"], spent["scope"]) == (turn_id, "b1")
    assert spent["used"] == {"tokens": 4, "usd": 7.0}
    assert spent["budget"] == {"tokens": 4, "usd": None}
    assert after[-1]["status"] == "paused"
    assert (status["status"], status["turn_id"]) == ("paused", turn_id)
    assert status["budget"] == {"tokens": 4, "usd": None}
    assert status["spent"] == {"tokens": 4, "usd": 7.0}
    assert status["usage"] == {"input_tokens": 1, "output_tokens": 3, "cost_usd": 7.0}
    assert raised == {"budget": {"tokens": 100, "usd": None}}
    assert (end["turn_id"], end["result"], end["output"]) == (turn_id, "finished", "done")
    assert "budget_exhausted" not in kinds(resumed)


async def test_a_turn_that_starts_with_the_budget_spent_pauses_before_its_first_call(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "b2", scripted({"text": "never said"}), budget={"tokens": 0})
    async with await connect_pod(capd, "b2") as pod:
        await pod.request({"method": "run", "text": "go"})
        spent, seen = await wait_for(pod, is_event("budget_exhausted"))
        await wait_for(pod, is_event("status", status="paused"))
        # Resumed while still spent, it pauses again at once.
        await pod.request({"method": "resume"})
        again, _ = await wait_for(pod, is_event("budget_exhausted"))
        await wait_for(pod, is_event("status", status="paused"))
        # Removing the limit (null) lets it go on.
        assert await pod.request({"method": "set_budget", "tokens": None}) == {
            "budget": {"tokens": None, "usd": None}
        }
        await pod.request({"method": "resume"})
        end, _ = await wait_for(pod, is_event("turn_end"))
    assert "assistant_message" not in kinds(seen)
    assert spent["used"] == {"tokens": 0, "usd": None}
    assert again["turn_id"] == spent["turn_id"] == end["turn_id"]
    assert end["output"] == "never said"


async def test_a_childs_spending_pauses_it_and_its_running_parent_on_the_parents_budget(
    capd: CapdProcess, tmp_path: Path
) -> None:
    flag = tmp_path / "child-spent"
    wait = f"while [ ! -e {flag} ]; do sleep 0.02; done"
    parent = await spawn(
        capd, "bp", _tool_then("waiting", wait), tools=["bash"], cwd=str(tmp_path),
        budget={"tokens": 6},
    )  # fmt: skip
    child_manifest = {
        "name": "bc",
        "model": _tool_then("a b c d e"),
        "tools": ["bash"],
        "cwd": str(tmp_path),
    }
    await daemon_request(
        capd, {"method": "spawn", "manifest": child_manifest, "parent": str(parent)}
    )
    async with await connect_pod(capd, "bp") as bp, await connect_pod(capd, "bc") as bc:
        await bp.request({"method": "run", "text": "go"})
        await wait_for(bp, is_event("assistant_message"))  # 1 word in, 1 out: 2 tokens
        await bc.request({"method": "run", "text": "go"})  # 1 in, 5 out: 6 more
        child_spent, _ = await wait_for(bc, is_event("budget_exhausted"))
        await wait_for(bc, is_event("status", status="paused"))
        flag.touch()
        parent_spent, _ = await wait_for(bp, is_event("budget_exhausted"))
        await wait_for(bp, is_event("status", status="paused"))
        parent_status = await bp.request({"method": "status"})
        child_status = await bc.request({"method": "status"})
        listed = {p["name"]: p for p in (await daemon_request(capd, {"method": "list"}))["pods"]}
        # Deleting the child that spent the budget gives none of it back: the parent,
        # resumed, pauses again at once.
        await daemon_request(capd, {"method": "delete", "name": "bc"})
        after_delete = await bp.request({"method": "status"})
        await bp.request({"method": "resume"})
        again, _ = await wait_for(bp, is_event("budget_exhausted"))
    assert child_spent["scope"] == parent_spent["scope"] == "bp"
    assert child_spent["used"] == {"tokens": 8, "usd": None}
    assert child_spent["budget"] == {"tokens": 6, "usd": None}
    assert parent_status["spent"] == {"tokens": 8, "usd": None}
    assert child_status["spent"] == {"tokens": 6, "usd": None}
    assert child_status["budget"] == {"tokens": None, "usd": None}
    assert listed["bp"]["spent"] == {"tokens": 8, "usd": None}
    assert listed["bc"]["spent"] == {"tokens": 6, "usd": None}
    assert after_delete["spent"] == {"tokens": 8, "usd": None}
    assert again["used"] == {"tokens": 8, "usd": None}


async def test_a_dollar_budget_over_a_model_without_a_price_is_refused(
    capd: CapdProcess, tmp_path: Path
) -> None:
    with pytest.raises(ProtocolError) as refused:
        await spawn(capd, "bu", scripted(), budget={"usd": 1.0})
    assert refused.value.code == "invalid_request"
    assert refused.value.message == (
        "pod bu has budget.usd but its model scripted has no known price: set its model.price "
        "{input_per_mtok, output_per_mtok}, or budget tokens only"
    )
    parent = await spawn(
        capd, "bq", {**scripted(), "price": DOLLAR_A_TOKEN}, cwd=str(tmp_path),
        budget={"usd": 1.0},
    )  # fmt: skip
    child = {"name": "br", "model": scripted(), "cwd": str(tmp_path)}
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "spawn", "manifest": child, "parent": str(parent)})
    assert refused.value.message.startswith("pod bq's budget.usd would cover pod br, but its ")
    await spawn(capd, "bs", scripted())
    async with await connect_pod(capd, "bs", subscribe=False) as pod:
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "set_budget", "usd": 2})
    assert refused.value.message.startswith("cannot set budget.usd=2 on pod bs: pod bs's model ")


async def test_what_claude_code_reports_it_spent_counts(capd: CapdProcess, tmp_path: Path) -> None:
    state = tmp_path / "claude"
    state.mkdir()
    await spawn_on_engine(capd, "bcc", STAND_IN_CLAUDE.engine(state), None, budget={"usd": 1})
    async with await connect_pod(capd, "bcc") as pod:
        await run_turn(pod, "hello")
        await run_turn(pod, "hello again")
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    steps = [e for e in history if e["event"] == "assistant_message"]
    # Each turn: one text step (10 input tokens, 3 output a chunk of 5 characters), then what the
    # CLI's result said the prompt cost (its running total less what was counted before).
    tokens = [(s["usage"]["input_tokens"], s["usage"]["output_tokens"]) for s in steps]
    assert tokens == [(10, 9), (0, 0), (10, 15), (0, 0)]
    costs = [s["usage"]["cost_usd"] for s in steps]
    assert costs[0] is costs[2] is None
    assert costs[1] == pytest.approx((10 * PRICE[0] + 9 * PRICE[1]) / 1e6)
    assert costs[3] == pytest.approx((10 * PRICE[0] + 15 * PRICE[1]) / 1e6)
    assert status["spent"]["tokens"] == 44
    assert status["spent"]["usd"] == pytest.approx(costs[1] + costs[3])
    assert status["usage"]["cost_usd"] == pytest.approx(costs[1] + costs[3])


async def test_an_external_engines_turn_pauses_after_the_step_that_spent_the_budget(
    capd: CapdProcess, tmp_path: Path
) -> None:
    state = tmp_path / "claude"
    state.mkdir()
    await spawn_on_engine(capd, "bx", STAND_IN_CLAUDE.engine(state), None, budget={"tokens": 30})
    async with await connect_pod(capd, "bx") as pod:
        turn_id = (await pod.request({"method": "run", "text": "tool:echo hi"}))["turn_id"]
        # The tool_use step: 10 tokens in, 20 out. capd sees no step boundary inside
        # Claude Code, so it pauses the turn as `pause` does, after that step.
        spent, seen = await wait_for(pod, is_event("budget_exhausted"))
        await wait_for(pod, is_event("status", status="paused"))
        await pod.request({"method": "set_budget", "tokens": None})
        await pod.request({"method": "resume"})
        end, _ = await wait_for(pod, is_event("turn_end"))
    step = next(e for e in seen if e["event"] == "assistant_message")
    assert step["usage"]["output_tokens"] == 20
    assert (spent["turn_id"], spent["scope"], spent["used"]["tokens"]) == (turn_id, "bx", 30)
    assert (end["turn_id"], end["result"]) == (turn_id, "finished")


async def test_the_cost_an_acp_agent_reports_counts(capd: CapdProcess, tmp_path: Path) -> None:
    state = tmp_path / "acp"
    state.mkdir()
    (state / "report-cost").touch()
    engine = STAND_IN_ACP_AGENT.engine(state)
    await spawn_on_engine(capd, "ba", engine, None, budget={"usd": COST_PER_PROMPT * 2})
    async with await connect_pod(capd, "ba") as pod:
        await run_turn(pod, "hello")
        await run_turn(pod, "hello again")
        # The budget is spent: the next turn pauses before its prompt is sent.
        await pod.request({"method": "run", "text": "once more"})
        spent, seen = await wait_for(pod, is_event("budget_exhausted"))
        status = await pod.request({"method": "status"})
        history = await full_history(pod)
    costs = [e["usage"]["cost_usd"] for e in history if e["event"] == "assistant_message"]
    assert costs == [COST_PER_PROMPT, COST_PER_PROMPT]
    assert status["spent"]["usd"] == spent["used"]["usd"] == COST_PER_PROMPT * 2
    assert "assistant_message" not in kinds(seen)


async def test_what_an_acp_agent_said_a_prompt_a_pause_cut_short_cost_counts(
    capd: CapdProcess, tmp_path: Path
) -> None:
    state = tmp_path / "acp"
    state.mkdir()
    (state / "report-cost").touch()
    await spawn_on_engine(capd, "bap", STAND_IN_ACP_AGENT.engine(state), None)
    async with await connect_pod(capd, "bap") as pod:
        await pod.request({"method": "run", "text": "slow:500"})
        # The agent reports the prompt's cost between its first chunk and its second.
        await wait_for(pod, is_event("text_delta"))
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "pause"})
        # The text cut short carries that cost; the usage the agent's `cancelled` answer
        # reports, once the paused prompt has wound down, is recorded after it.
        cut, _ = await wait_for(pod, is_event("assistant_message", interrupted=True))
        late, _ = await wait_for(pod, is_event("assistant_message", text=""))
        status = await pod.request({"method": "status"})
    assert cut["usage"] == {"input_tokens": 0, "output_tokens": 0, "cost_usd": COST_PER_PROMPT}
    assert late["usage"] == {"input_tokens": 28, "output_tokens": 10, "cost_usd": None}
    assert status["spent"] == {"tokens": 38, "usd": COST_PER_PROMPT}


async def test_what_claude_code_said_a_prompt_a_pause_cut_short_spent_counts(
    capd: CapdProcess, tmp_path: Path
) -> None:
    state = tmp_path / "claude"
    state.mkdir()
    await spawn_on_engine(capd, "bcq", STAND_IN_CLAUDE.engine(state), None)
    async with await connect_pod(capd, "bcq") as pod:
        await pod.request({"method": "run", "text": "slow:500"})
        await wait_for(pod, is_event("text_delta"))
        await pod.request({"method": "pause"})
        # The tokens its API message reported so far go with the text cut short; the cost
        # the CLI's `result` reports as the interrupted prompt ends is recorded after it.
        cut, _ = await wait_for(pod, is_event("assistant_message", interrupted=True))
        cost, _ = await wait_for(pod, is_event("assistant_message", text=""))
        status = await pod.request({"method": "status"})
    assert cut["usage"]["input_tokens"] == 10
    assert cost["usage"]["cost_usd"] == pytest.approx(10 * PRICE[0] / 1e6)
    assert status["spent"]["usd"] == pytest.approx(10 * PRICE[0] / 1e6)


async def test_capctl_budget_shows_and_sets_the_budget_and_ps_shows_spend(
    capd: CapdProcess,
) -> None:
    await spawn(
        capd, "bk", {**scripted({"text": "four words said here"}), "price": DOLLAR_A_TOKEN},
        budget={"tokens": 1000},
    )  # fmt: skip
    async with await connect_pod(capd, "bk") as pod:
        await run_turn(pod, "go")  # 1 in, 4 out: 5 tokens, $9
    shown = ok(capd.runtime_dir, "budget", "bk")
    assert shown.splitlines() == ["bk: 5 / 1,000 tokens, $9.00 (no limit)"]
    ok(capd.runtime_dir, "budget", "bk", "--usd", "20", "--tokens", "none")
    as_json = json.loads(ok(capd.runtime_dir, "budget", "bk", "--json"))
    assert as_json == {
        "budget": {"tokens": None, "usd": 20.0},
        "spent": {"tokens": 5, "usd": 9.0},
    }
    header, *rows = ok(capd.runtime_dir, "ps").splitlines()
    assert header.split() == PS_HEADER
    assert rows[0].split()[:5] == ["bk", "idle", "-", "5", "$9.00"]


@pytest.mark.own_capd
async def test_a_budget_set_at_run_time_and_the_spending_survive_a_restart(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "bt", {**scripted({"text": "two words"}), "price": DOLLAR_A_TOKEN})
    async with await connect_pod(capd, "bt") as pod:
        await run_turn(pod, "go")  # 1 in, 2 out: 3 tokens, $5
        await pod.request({"method": "set_budget", "tokens": 3, "usd": 50})
        await pod.request({"method": "set_budget", "usd": 40})  # tokens stays 3
    capd.stop()
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "bt") as pod:
        status = await pod.request({"method": "status"})
        await pod.request({"method": "run", "text": "go"})
        spent, _ = await wait_for(pod, is_event("budget_exhausted"))
    assert status["budget"] == {"tokens": 3, "usd": 40.0}
    assert status["spent"] == {"tokens": 3, "usd": 5.0}
    assert spent["used"] == {"tokens": 3, "usd": 5.0}


def test_watch_shows_budget_exhausted_in_one_line() -> None:
    event = {
        "event": "budget_exhausted",
        "pod": "kid",
        "turn_id": "t-1",
        "scope": "boss",
        "used": {"tokens": 1234, "usd": 0.5},
        "budget": {"tokens": None, "usd": 0.5},
    }
    assert describe(event) == (
        "── budget of boss spent: 1,234 tokens (no limit), $0.50 / $0.50; "
        "paused: raise it with capctl budget boss, then capctl resume kid"
    )
