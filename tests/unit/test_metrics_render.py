"""The exposition capd.metrics writes: strictly 0.0.4 (tests/promcheck.py), with the values
prometheus-client's parser reads back; and the strict checker refuses what it must."""

import math
import re
from pathlib import Path

import pytest

from capd.metrics import DaemonSample, Hot, PodSample, render
from tests.promcheck import NotExposition, check, samples, value

WEIRD = 'we"ird\\tool\nname'


def daemon() -> DaemonSample:
    return DaemonSample(
        version="1.2.3",
        start_time=1_700_000_000.5,
        subscribers={"daemon": 1, "pod": 3},
        connections={"daemon": 2, "pod": 4},
        outbox_reports=5,
        outbox_targets=2,
    )


def pods() -> list[PodSample]:
    return [
        PodSample("a", "idle", 10, 20, 0.25, 40, 0.5, 123, 1000, 1, 2, 0),
        PodSample("b", "running", 1, 2, None, 3, None, 45, None, 0, 0, 1),
        PodSample("c", "stopped", 7, 8, None, 15, None),
    ]


def test_render_is_strict_and_reads_back() -> None:
    hot = Hot()
    hot.turns = {("a", "finished"): 3, ("a", "errored"): 1, ("gone", "finished"): 9}
    hot.retries = {"openai": 2}
    hot.lagged = 4
    for seconds in (0.1, 0.3, 0.3, 700.0):
        hot.model_calls.observe(("openai", "gpt-x", "ok"), seconds)
    hot.tool_calls.observe((WEIRD, "error"), 0.02)
    found = samples(render(daemon(), pods(), hot))
    assert value(found, "capd_build_info", version="1.2.3") == 1
    assert value(found, "capd_start_time_seconds") == 1_700_000_000.5
    assert [value(found, "capd_pods", status=s) for s in ("idle", "running", "stopped")] == [
        1,
        1,
        1,
    ]
    assert value(found, "capd_pods", status="error") == 0
    assert value(found, "capd_turns_total", pod="a", result="finished") == 3
    assert value(found, "capd_turns_total", pod="a", result="errored") == 1
    # A pod capd no longer knows has no series.
    assert not [key for key in found if ("pod", "gone") in key[1]]
    assert value(found, "capd_tokens_total", pod="c", type="output") == 8
    assert value(found, "capd_cost_usd_total", pod="a") == 0.25
    assert ("capd_cost_usd_total", frozenset({("pod", "b")})) not in found
    assert value(found, "capd_subtree_spent_tokens", pod="c") == 15
    assert value(found, "capd_context_window_tokens", pod="a") == 1000
    assert ("capd_context_tokens", frozenset({("pod", "c")})) not in found
    assert value(found, "capd_open_permission_requests", pod="b") == 1
    model = {"provider": "openai", "model": "gpt-x", "outcome": "ok"}
    assert value(found, "capd_model_call_duration_seconds_bucket", **model, le="0.25") == 1
    assert value(found, "capd_model_call_duration_seconds_bucket", **model, le="0.5") == 3
    assert value(found, "capd_model_call_duration_seconds_bucket", **model, le="600.0") == 3
    assert value(found, "capd_model_call_duration_seconds_bucket", **model, le="+Inf") == 4
    assert value(found, "capd_model_call_duration_seconds_count", **model) == 4
    assert math.isclose(value(found, "capd_model_call_duration_seconds_sum", **model), 700.7)
    assert value(found, "capd_model_call_retries_total", provider="openai") == 2
    assert value(found, "capd_tool_call_duration_seconds_count", tool=WEIRD, outcome="error") == 1
    assert value(found, "capd_subscriptions_lagged_total") == 4
    assert value(found, "capd_subscribers", socket="pod") == 3
    assert value(found, "capd_connections", socket="daemon") == 2
    assert value(found, "capd_outbox_reports") == 5
    assert value(found, "capd_outbox_targets") == 2
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_open_fds") > 0


def test_label_values_are_escaped() -> None:
    hot = Hot()
    hot.tool_calls.observe((WEIRD, "ok"), 0.5)
    text = render(daemon(), [], hot)
    assert 'tool="we\\"ird\\\\tool\\nname"' in text
    check(text)


def test_an_observation_on_a_bound_counts_in_that_bucket() -> None:
    hot = Hot()
    hot.tool_calls.observe(("bash", "ok"), 0.01)
    found = samples(render(daemon(), [], hot))
    assert (
        value(found, "capd_tool_call_duration_seconds_bucket", tool="bash", outcome="ok", le="0.01")
        == 1
    )


def test_forget_pod_drops_its_series() -> None:
    hot = Hot()
    hot.turns = {("a", "finished"): 1, ("b", "finished"): 2}
    hot.stopped_usage = {"a": (1, 2, None)}
    hot.forget_pod("a")
    assert hot.turns == {("b", "finished"): 2}
    assert hot.stopped_usage == {}


GOOD = """# HELP x_total A counter.
# TYPE x_total counter
x_total{a="1"} 1
# TYPE h histogram
h_bucket{le="1"} 1
h_bucket{le="+Inf"} 2
h_sum 3.5
h_count 2
"""


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (GOOD.rstrip("\n"), "newline"),
        (GOOD + 'x_total{a="2"} 2\n', "continues after another family"),
        (GOOD.replace("h_count 2", "h_count 3"), "+Inf bucket is not _count"),
        (GOOD.replace('h_bucket{le="+Inf"} 2', 'h_bucket{le="+Inf"} 0'), "not cumulative"),
        (GOOD.replace('h_bucket{le="+Inf"} 2\n', ""), "+Inf"),
        (GOOD.replace('x_total{a="1"} 1', 'x_total{a="1"} 1\nx_total{a="1"} 2'), "twice"),
        (GOOD.replace("TYPE x_total counter", "TYPE x_total gauge"), "_total"),
        ("x 1\n# TYPE x gauge\n", "TYPE after"),
        ('x{a="\\q"} 1\n', "bad labels"),
        ('x{a="1",a="2"} 1\n', "label a twice"),
        ("9x 1\n", "not a sample"),
        ("x one\n", "not a number"),
        ("# TYPE x gauge\n# TYPE x gauge\nx 1\n", "second TYPE"),
    ],
)
def test_the_checker_refuses(text: str, why: str) -> None:
    check(GOOD)
    with pytest.raises(NotExposition, match=re.escape(why)):
        check(text)


def test_docs_list_every_metric() -> None:
    """docs/protocol.md's Metrics table names each family rendered, and no other."""
    hot = Hot()
    hot.retries = {"openai": 1}
    hot.model_calls.observe(("openai", "m", "ok"), 1.0)
    text = render(daemon(), pods(), hot)
    rendered = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    table = doc.split("\n### Metrics\n", 1)[1].split("\n### ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.MULTILINE))
    assert documented == rendered
