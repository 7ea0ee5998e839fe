"""The model context as durable events make it: messages known by the seq of their event."""

import pytest

from capd.chat import ChatMessage
from capd.compaction import summary_message
from capd.context import Context, describe_pod_event
from capd.tokens import message_tokens, text_tokens
from protocol.events import (
    AssistantMessage,
    ContextCompacted,
    DurableEvent,
    EngineSession,
    Notification,
    StatusChanged,
    ToolCall,
    ToolResult,
    TurnEnd,
    TurnStart,
    Usage,
    UserMessage,
)

T = "t-1"
BASH = ToolCall(id="c1", name="bash", arguments={"command": "ls"})
READ = ToolCall(id="c2", name="read_file")


def _context(*events: DurableEvent) -> Context:
    context = Context()
    for seq, event in enumerate(events, 1):
        event.seq = seq
        context.apply(event)
    return context


def test_each_message_is_known_by_the_seq_of_the_event_that_made_it() -> None:
    context = _context(
        StatusChanged(status="running", turn_id=T),
        TurnStart(turn_id=T, invoke="run"),
        UserMessage(turn_id=T, text="list files"),
        Notification(turn_id=T, source="ci", text="red"),
        AssistantMessage(turn_id=T, text="", tool_calls=[BASH]),
        ToolResult(turn_id=T, call_id="c1", name="bash", output="a.txt"),
    )
    assert context.messages == [
        ChatMessage("user", "list files"),
        ChatMessage("user", "[notification from ci]\nred"),
        ChatMessage("assistant", "", (BASH,)),
        ChatMessage("tool", "a.txt", call_id="c1", name="bash"),
    ]
    assert context.seqs == [3, 4, 5, 6]
    assert context.last_message_seq() == 6


@pytest.mark.parametrize(("seq", "index"), [(0, 0), (1, 0), (2, 1), (3, 1), (5, 3), (6, 4)])
def test_index_after_finds_where_the_messages_after_a_seq_begin(seq: int, index: int) -> None:
    context = _context(
        TurnStart(turn_id=T, invoke="run"),
        UserMessage(turn_id=T, text="a"),
        StatusChanged(status="paused"),  # no message: seq 3 is skipped
        UserMessage(turn_id=T, text="b"),
        UserMessage(turn_id=T, text="c"),
        UserMessage(turn_id=T, text="d"),
    )
    assert context.seqs == [2, 4, 5, 6]
    assert context.index_after(seq) == index


def test_an_empty_context_has_no_last_message() -> None:
    assert Context().last_message_seq() == 0


def test_orphaned_calls_are_the_latest_steps_calls_without_a_result() -> None:
    context = _context(
        AssistantMessage(turn_id=T, text="", tool_calls=[BASH, READ]),
        ToolResult(turn_id=T, call_id="c1", name="bash", output="ok"),
    )
    assert context.orphaned_calls() == [READ]


def test_an_interrupted_step_is_passed_over_for_the_one_before_it() -> None:
    context = _context(
        AssistantMessage(turn_id=T, text="", tool_calls=[BASH]),
        AssistantMessage(turn_id=T, text="partial", interrupted=True),
    )
    assert context.orphaned_calls() == [BASH]


def test_calls_all_answered_or_a_step_without_calls_leave_no_orphans() -> None:
    answered = _context(
        AssistantMessage(turn_id=T, text="", tool_calls=[BASH]),
        ToolResult(turn_id=T, call_id="c1", name="bash", output="ok"),
    )
    assert answered.orphaned_calls() == []
    later = _context(
        AssistantMessage(turn_id=T, text="", tool_calls=[BASH]),
        AssistantMessage(turn_id=T, text="never mind"),
    )
    assert later.orphaned_calls() == []


def test_the_latest_engine_session_is_the_one_to_resume() -> None:
    context = _context(EngineSession(session_id="s1"), EngineSession(session_id="s2"))
    assert context.engine_session == "s2"
    assert context.messages == []


@pytest.mark.parametrize(
    ("payload", "text"),
    [
        (
            {"kind": "turn_ended", "pod": "c", "turn_id": "t-2", "result": "finished",
             "output": "done", "truncated": True, "event_id": "c/1"},
            "pod c ended turn t-2 (finished):\ndone\n"
            "[output cut short; read_pod_output shows all of it]",
        ),
        (
            {"kind": "errored", "pod": "c", "turn_id": "t-2", "message": "no model",
             "event_id": "c/1"},
            "pod c: turn t-2 errored: no model",
        ),
        ({"kind": "shut_down", "pod": "c", "event_id": "c/1"}, "pod c shut down"),
        ({"kind": "custom", "n": 1}, 'event from pod ?: {"kind":"custom","n":1}'),
    ],
)  # fmt: skip
def test_a_report_reads_as_a_sentence_and_anything_else_as_its_json(
    payload: dict[str, object], text: str
) -> None:
    assert describe_pod_event(payload) == text


def test_the_size_is_estimated_before_any_call_reports_one() -> None:
    context = _context(UserMessage(turn_id=T, text="hello there"))
    assert context.tokens("Be brief.") == text_tokens("Be brief.") + message_tokens(
        ChatMessage("user", "hello there")
    )


def test_the_size_is_the_last_reported_input_plus_an_estimate_of_what_came_since() -> None:
    context = _context(
        UserMessage(turn_id=T, text="list files"),
        AssistantMessage(turn_id=T, text="", tool_calls=[BASH], usage=Usage(input_tokens=900)),
        ToolResult(turn_id=T, call_id="c1", name="bash", output="a.txt"),
        AssistantMessage(turn_id=T, text="one file"),
    )
    since = context.messages[1:]
    assert context.tokens("ignored once a call reported") == 900 + sum(
        message_tokens(m) for m in since
    )


def test_an_overflow_error_in_a_stored_turn_end_teaches_the_window() -> None:
    overflow = (
        "the conversation no longer fits the model's context window ...; the server said: "
        "request (4476 tokens) exceeds the available context size (4096 tokens)"
    )
    context = _context(
        TurnEnd(turn_id=T, result="errored", error=overflow),
        TurnEnd(turn_id="t-2", result="errored", error="model call failed: HTTP 503"),
    )
    assert context.learned_window == 4096


def test_a_compaction_puts_its_summary_in_place_of_what_it_covers() -> None:
    context = _context(
        UserMessage(turn_id=T, text="first"),
        AssistantMessage(turn_id=T, text="one", usage=Usage(input_tokens=900)),
        UserMessage(turn_id=T, text="second"),
        ContextCompacted(
            turn_id=T,
            trigger="overflow",
            summary="they said first",
            through_seq=2,
            tokens_before=950,
            tokens_after=40,
            window=4096,
        ),
        AssistantMessage(turn_id=T, text="two"),
    )
    assert context.messages == [
        summary_message("they said first"),
        ChatMessage("user", "second"),
        ChatMessage("assistant", "two"),
    ]
    assert context.seqs == [2, 3, 5]
    assert context.summary == "they said first"
    assert context.learned_window == 4096
    assert context.tokens("") == sum(map(message_tokens, context.messages))


def test_a_compaction_takes_results_whose_call_it_summarised() -> None:
    context = _context(
        UserMessage(turn_id=T, text="list"),
        AssistantMessage(turn_id=T, text="", tool_calls=[BASH]),
        ToolResult(turn_id=T, call_id="c1", name="bash", output="interrupted"),
        ContextCompacted(
            turn_id=None,
            trigger="request",
            summary="listed",
            through_seq=2,
            tokens_before=50,
            tokens_after=10,
        ),
    )
    assert context.messages == [summary_message("listed")]
    assert context.seqs == [2]
