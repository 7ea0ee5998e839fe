"""How many tokens a model's context holds, estimated without a tokenizer.

capd downloads no tokenizer, so between the provider's own counts it estimates: a text is
its UTF-8 bytes / 4, rounded up (about four bytes a token for English and code with the
BPE tokenizers of current models; other scripts use more bytes a token, which errs on
the side of a larger count), and each message adds `MESSAGE_OVERHEAD` for its role and
framing. A tool call counts its name and its arguments as JSON.
"""

import math

import orjson

from capd.chat import ChatMessage, ToolSpec

BYTES_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4
"""Tokens a message costs besides its text: role markers and the chat template's framing."""


def text_tokens(text: str) -> int:
    """The estimate for one text: its UTF-8 bytes / 4, rounded up."""
    return math.ceil(len(text.encode()) / BYTES_PER_TOKEN)


def message_tokens(message: ChatMessage) -> int:
    """The estimate for one message of the context, its tool calls included."""
    tokens = MESSAGE_OVERHEAD + text_tokens(message.text)
    for call in message.tool_calls:
        tokens += text_tokens(call.name) + text_tokens(orjson.dumps(call.arguments).decode())
    return tokens


def spec_tokens(spec: ToolSpec) -> int:
    """The estimate for one tool definition a call sends: its name, description and schema."""
    return text_tokens(spec.name + spec.description + orjson.dumps(spec.parameters).decode())
