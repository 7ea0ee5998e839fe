"""Where a compaction cuts the context, and how it writes the older part for the summary."""

import math

import pytest

from capd.chat import ChatMessage
from capd.compaction import (
    KEEP_SHARE,
    MIN_SUMMARY_TOKENS,
    Room,
    pieces,
    plan_cut,
    summary_prompt,
    transcript_lines,
    unread_start,
)
from capd.tokens import message_tokens, text_tokens
from protocol.events import ToolCall

BASH = ToolCall(id="c1", name="bash", arguments={"command": "ls"})


def _user(chars: int, tag: str = "u") -> ChatMessage:
    return ChatMessage("user", tag * chars)


def _turns(count: int, chars: int) -> list[ChatMessage]:
    """`count` turns of a user message of `chars` characters and a short answer."""
    messages = []
    for _ in range(count):
        messages += [_user(chars), ChatMessage("assistant", "ok")]
    return messages


def test_room_keeps_the_reply_out_of_the_share_and_floors_the_summary() -> None:
    room = Room.of(2048, 0.8, 200)
    assert (room.window, room.call, room.fit) == (2048, 1638 - 200, 2048 - 200)
    assert room.summary == int(room.call * 0.2)
    assert Room.of(300, 0.8, 200).summary == MIN_SUMMARY_TOKENS


@pytest.mark.parametrize(
    ("messages", "start"),
    [
        ([_user(4)], 0),
        ([_user(4), ChatMessage("assistant", "a"), _user(4)], 2),
        ([_user(4), ChatMessage("assistant", "", (BASH,)), ChatMessage("tool", "x")], 1),
        ([_user(4), ChatMessage("assistant", "cut", truncated=True)], 1),
        ([_user(4), ChatMessage("assistant", "done")], 2),
    ],
)
def test_unread_messages_start_after_the_models_last_finished_reply(
    messages: list[ChatMessage], start: int
) -> None:
    assert unread_start(messages) == start


def test_an_automatic_cut_keeps_recent_turns_within_the_keep_share() -> None:
    messages = [*_turns(10, 400), _user(400, "n")]
    room = Room.of(4000, 0.8, 0)
    cut = plan_cut(messages, 0, room, keep_recent=True)
    kept = messages[cut.index :]
    assert cut.fits
    assert cut.kept_tokens == sum(map(message_tokens, kept)) <= room.call * KEEP_SHARE
    assert kept[-1] == _user(400, "n")
    assert message_tokens(messages[cut.index - 1]) + cut.kept_tokens > room.call * KEEP_SHARE


def test_a_requested_cut_keeps_only_what_the_model_has_not_answered() -> None:
    messages = [*_turns(3, 40), _user(40, "n")]
    cut = plan_cut(messages, 0, Room.of(100_000, 0.8, 0), keep_recent=False)
    assert messages[cut.index :] == [_user(40, "n")]


def test_a_cut_never_parts_a_tool_call_from_its_result() -> None:
    call = ChatMessage("assistant", "", (BASH,))
    result = ChatMessage("tool", "r" * 4000, call_id="c1", name="bash")
    messages = [_user(400), call, result, ChatMessage("assistant", "seen"), _user(4)]
    # Room for the last three messages, not for the call: the walk stops at the result.
    keep = sum(map(message_tokens, messages[2:]))
    window = math.ceil((math.ceil(keep / KEEP_SHARE) + 1) / 0.8)
    cut = plan_cut(messages, 0, Room.of(window, 0.8, 0), keep_recent=True)
    assert cut.fits
    assert cut.index == 3


def test_newest_messages_too_large_for_the_window_take_the_whole_context() -> None:
    messages = [*_turns(2, 40), _user(8000)]
    cut = plan_cut(messages, 100, Room.of(1000, 0.8, 100), keep_recent=True)
    assert (cut.index, cut.fits) == (len(messages), False)


def test_the_transcript_names_roles_calls_and_failures_and_clips_long_texts() -> None:
    lines = transcript_lines(
        [
            ChatMessage("user", "hello"),
            ChatMessage("assistant", "looking", (BASH,)),
            ChatMessage("tool", "no such file", call_id="c1", name="bash", is_error=True),
            ChatMessage("user", "a" * 600 + "z" * 600),
        ],
        line_tokens=100,
    )
    assert lines[0] == "[user]\nhello"
    assert lines[1] == '[assistant]\nlooking\n[called bash] {"command":"ls"}'
    assert lines[2] == "[result of bash, failed]\nno such file"
    assert lines[3].startswith("[user]\naaa")
    assert lines[3].endswith("zzz")
    assert "characters left out" in lines[3]
    assert len(lines[3]) < 500


def test_pieces_hold_whole_lines_within_their_size() -> None:
    lines = [f"line {n} " + "x" * 100 for n in range(10)]
    found = pieces(lines, 70)
    assert "\n\n".join(found) == "\n\n".join(lines)
    assert all(text_tokens(piece) <= 70 for piece in found)
    assert len(found) == 5


def test_the_prompt_carries_the_summary_so_far_and_the_instructions() -> None:
    prompt = summary_prompt("[user]\nhi", "earlier: the task", "keep the file names")
    assert "<summary-so-far>\nearlier: the task\n</summary-so-far>" in prompt
    assert "Also: keep the file names" in prompt
    assert prompt.endswith("<transcript>\n[user]\nhi\n</transcript>")
    bare = summary_prompt("[user]\nhi", None, None)
    assert "summary-so-far" not in bare
    assert "Also:" not in bare
