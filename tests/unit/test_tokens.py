"""The token estimate: UTF-8 bytes / 4, rounded up, plus a per-message overhead."""

from capd.chat import ChatMessage
from capd.tokens import MESSAGE_OVERHEAD, message_tokens, text_tokens
from protocol.events import ToolCall


def test_a_text_is_its_utf8_bytes_over_four_rounded_up() -> None:
    assert text_tokens("") == 0
    assert text_tokens("abcd") == 1
    assert text_tokens("abcde") == 2
    assert text_tokens("é" * 4) == 2  # two bytes each


def test_a_message_adds_its_overhead_and_its_tool_calls() -> None:
    call = ToolCall(id="c1", name="bash", arguments={"command": "ls"})
    assert message_tokens(ChatMessage("user", "abcd")) == MESSAGE_OVERHEAD + 1
    # "bash" is 1, '{"command":"ls"}' is 16 bytes: 4
    assert message_tokens(ChatMessage("assistant", "", (call,))) == MESSAGE_OVERHEAD + 1 + 4
