"""Compaction: the pod's own model summarises the older part of its context, and the summary
takes that part's place (docs/protocol.md, Context compaction).

Where the cut falls: the newest messages stay verbatim — always those the model has not
answered yet (what came after its latest reply, or that reply and its tool results when it
called tools or was cut short), and older ones too while they fit in `KEEP_SHARE` of the
room a call has. The cut never falls between a tool call and its result. The part before the
cut is written out as a plain transcript and summarised in pieces that each fit the window,
each piece's summary carried into the next, so a context of any size can be compacted.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from capd.chat import ChatMessage
from capd.tokens import BYTES_PER_TOKEN, message_tokens, text_tokens
from protocol.manifest import ModelConfig

KEEP_SHARE = 0.3
"""The share of a call's room the verbatim recent messages may take after a compaction."""
SUMMARY_SHARE = 0.2
"""The share of a call's room a summary may take: the summary call's max_tokens."""
MIN_SUMMARY_TOKENS = 128
MIN_PIECE_TOKENS = 256
PROMPT_TOKENS = 400
"""Room kept for the summary prompt's own words around the transcript."""
CLIPPED = "\n[... {} characters left out ...]\n"
SUMMARY_HEADING = (
    "[Summary of the earlier conversation, written when the context was compacted; "
    "the messages after it are verbatim]"
)

EXCERPT_HEADING = "[The model wrote no summary: the start and the end of the transcript]"

SUMMARY_SYSTEM_PROMPT = (
    "You summarise an AI agent's work so far so that it can go on after the older part of "
    "its conversation is removed from its context. Reply with the summary only."
)

SUMMARY_PROMPT = """\
Below is the older part of an AI agent's conversation{continuing}. Write a summary that will \
replace it in the agent's context: the agent will see only your summary and the newer \
messages, so keep everything it needs to go on, under these headings:

1. Task: what the user asked for (in their words where the wording matters) and every \
constraint they set.
2. Decisions: what was decided and why; approaches tried and given up, and why.
3. Files and commands: the files read, created or changed (full paths) and what changed; \
commands whose results matter, with those results.
4. State: what is done, what is in progress, problems and errors not solved yet.
5. Last request: what the user (or a notification) asked most recently, and what the agent \
was about to do next.

Be brief and exact: keep names, paths, numbers and error messages as they are; invent nothing.\
{instructions}
{previous}
<transcript>
{transcript}
</transcript>"""


@dataclass(frozen=True, slots=True)
class Room:
    """How many tokens the calls of a pod may use."""

    window: int
    """The context window measured against."""
    call: int
    """What a call's context should hold: `compact_at` of the window, less the reply's room."""
    fit: int
    """What a call's context can hold at most: the window less the reply's room."""
    summary: int
    """The summary's own room: the summary call's max_tokens."""
    piece: int
    """The transcript a summary call may take, besides the summary so far and the prompt."""

    @classmethod
    def of(cls, window: int, compact_at: float, reply: int) -> "Room":
        share = math.floor(window * compact_at)
        call = max(0, share - reply)
        summary = max(MIN_SUMMARY_TOKENS, int(call * SUMMARY_SHARE))
        piece = max(MIN_PIECE_TOKENS, share - 2 * summary - PROMPT_TOKENS)
        return cls(window, call, max(0, window - reply), summary, piece)


@dataclass(frozen=True, slots=True)
class Cut:
    """Where a compaction cuts the context: `messages[:index]` are summarised."""

    index: int
    kept_tokens: int
    """The estimate of the verbatim messages after the cut."""
    fits: bool
    """Whether those messages fit the window with what every call sends; when they do not,
    the cut takes the whole context, and the turn ends saying that its newest messages do
    not fit. (With the summary they may not: then the call overflows, and the overflow's
    compaction decides.)"""


def reply_tokens(model: ModelConfig) -> int:
    """The room a call keeps for its reply: `max_tokens`, or the Anthropic provider's
    default when unset (it must send one); other APIs reply into what is left."""
    if model.max_tokens is not None:
        return model.max_tokens
    if model.provider == "anthropic":
        # Here, not at the top: the provider module brings httpx, which capd's start
        # does without until a pod calls an HTTP model.
        from capd.providers.anthropic import DEFAULT_MAX_TOKENS

        return DEFAULT_MAX_TOKENS + (model.thinking_budget_tokens or 0)
    return 0


def unread_start(messages: Sequence[ChatMessage]) -> int:
    """The index of the first message the model has not answered: after its latest reply,
    or that reply itself when it called tools (they stay with their results) or was cut
    short (it goes on in the next step)."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if message.role == "assistant":
            return index if message.tool_calls or message.unfinished else index + 1
    return 0


def plan_cut(
    messages: Sequence[ChatMessage], fixed_tokens: int, room: Room, *, keep_recent: bool
) -> Cut:
    """Where to cut. `fixed_tokens` is what every call sends besides its messages (the
    system prompt and tool definitions); `keep_recent` keeps older messages verbatim
    within `KEEP_SHARE` of the room (a requested compaction keeps only the unread ones)."""
    sizes = [message_tokens(message) for message in messages]
    start = unread_start(messages)
    kept = sum(sizes[start:])
    if fixed_tokens + kept > room.fit:
        return Cut(len(messages), 0, fits=False)
    index = start
    if keep_recent:
        budget = room.call * KEEP_SHARE
        while index > 0 and kept + sizes[index - 1] <= budget:
            index -= 1
            kept += sizes[index]
    while index < start and messages[index].role == "tool":
        kept -= sizes[index]
        index += 1
    return Cut(index, kept, fits=True)


def transcript_lines(messages: Sequence[ChatMessage], line_tokens: int) -> list[str]:
    """The messages as a plain transcript, one entry each, each at most `line_tokens`
    (a longer text keeps its start and its end)."""
    lines = []
    for message in messages:
        match message.role:
            case "user":
                line = f"[user]\n{message.text}"
            case "assistant":
                calls = "".join(
                    f"\n[called {call.name}] {orjson.dumps(call.arguments).decode()}"
                    for call in message.tool_calls
                )
                line = f"[assistant]\n{message.text}{calls}"
            case "tool":
                failed = ", failed" if message.is_error else ""
                line = f"[result of {message.name}{failed}]\n{message.text}"
        lines.append(clip(line, line_tokens * BYTES_PER_TOKEN))
    return lines


def pieces(lines: Sequence[str], piece_tokens: int) -> list[str]:
    """The transcript in consecutive pieces of at most `piece_tokens` each (a line is
    never split; `transcript_lines` bounds each line)."""
    found: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        tokens = text_tokens(line) + 1
        if current and size + tokens > piece_tokens:
            found.append("\n\n".join(current))
            current, size = [], 0
        current.append(line)
        size += tokens
    if current:
        found.append("\n\n".join(current))
    return found


def summary_prompt(transcript: str, previous: str | None, instructions: str | None) -> str:
    return SUMMARY_PROMPT.format(
        continuing=", which continues the summary of what came before it" if previous else "",
        instructions=f"\n\nAlso: {instructions}" if instructions else "",
        previous=f"\n<summary-so-far>\n{previous}\n</summary-so-far>" if previous else "",
        transcript=transcript,
    )


def excerpt_summary(piece: str, previous: str | None, summary_tokens: int) -> str:
    """What stands in for a summary the model left empty (a small model, greedy, may write
    nothing for this prompt, and again each time it is asked): the summary so far and the
    piece, cut to the summary's room, so that the compaction still frees the window."""
    text = f"{previous}\n\n{piece}" if previous else piece
    return EXCERPT_HEADING + "\n" + clip(text, summary_tokens * BYTES_PER_TOKEN)


def summary_message(summary: str) -> ChatMessage:
    """The message a summary becomes at the head of the context."""
    return ChatMessage("user", f"{SUMMARY_HEADING}\n{summary}")


def clip(text: str, chars: int) -> str:
    """`text` in at most about `chars` characters: its start and its end around a note
    of how much was left out."""
    if len(text) <= chars:
        return text
    head = chars * 2 // 3
    tail = chars - head
    return text[:head] + CLIPPED.format(len(text) - head - tail) + text[-tail:]
