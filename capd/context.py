"""A pod's model context, derived from its durable events.

The same `apply` runs for each event as it is emitted and for each stored event when the
daemon restores a pod, so a restarted pod sees exactly the context it had.
"""

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

import orjson

from capd.chat import ChatMessage
from capd.compaction import summary_message
from capd.tokens import message_tokens, text_tokens
from capd.window import window_in_error
from protocol.events import (
    AssistantMessage,
    ContextCompacted,
    DurableEvent,
    EngineSession,
    Notification,
    Rewound,
    ToolCall,
    ToolResult,
    TurnEnd,
    UserMessage,
)
from protocol.reports import Errored, ShutDown, TurnEnded, parse_report

INTERRUPTED_TOOL_OUTPUT = (
    "interrupted: this tool call was stopped before it finished (the pod was paused, "
    "cancelled or restarted); run it again if it is still needed"
)


def notification_text(source: str, text: str) -> str:
    return f"[notification from {source}]\n{text}"


@dataclass
class Context:
    messages: list[ChatMessage] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    """The seq of the event that made each message: a message is known by its seq, which
    stays true when messages before it are dropped or rewritten."""
    engine_session: str | None = None
    """The external engine's session to resume (the latest `engine_session`)."""
    engine_session_seq: int = 0
    """The seq of that `engine_session` event."""
    summary: str | None = None
    """The latest compaction's summary, which heads `messages` (with the seq it covers
    up to) until a newer compaction summarises it again."""
    reported_tokens: int = 0
    """The input tokens the provider reported for the latest call that reported any."""
    reported_seq: int = 0
    """The seq of that call's assistant message; 0 while no call reported its input."""
    learned_window: int | None = None
    """The context window the provider named in the latest overflow error (read back from
    the `turn_end` it failed, or the `context_compacted` it caused), or the one the latest
    compaction measured against, so a restarted pod knows it too."""
    rewound_seq: int = 0
    """The seq of the latest `rewound` that left an external engine's session behind:
    the session started after it is primed with the context (`primer_due`)."""
    estimated: list[int] = field(default_factory=list)
    """The estimated tokens of the messages up to and including each one: a running sum,
    extended when `tokens` is asked (not as restore applies events), so a `status` costs
    the same however long the context is."""

    def apply(self, event: DurableEvent) -> None:
        made = len(self.messages)
        self._apply(event)
        if len(self.messages) > made and not isinstance(event, ContextCompacted):
            self.seqs.append(event.seq)

    def rewind_to(self, before: "Context", event: Rewound) -> None:
        """Apply a `rewound`: the messages become those of `before`, the context as it
        stood just before the turn rewound to. What the pod learned of its model (the
        window) stays; a session left behind is forgotten."""
        self.messages, self.seqs, self.summary = before.messages, before.seqs, before.summary
        self.reported_tokens, self.reported_seq = before.reported_tokens, before.reported_seq
        self.estimated.clear()
        if event.new_session:
            self.engine_session, self.engine_session_seq = None, 0
            self.rewound_seq = event.seq

    def primer_due(self) -> bool:
        """Whether an external engine's next new session must be given the context first:
        a rewind left the old session behind and no session has started since."""
        return self.rewound_seq > self.engine_session_seq

    def index_after(self, seq: int) -> int:
        """Where the messages made by events after `seq` begin in `messages`."""
        return bisect_right(self.seqs, seq)

    def last_message_seq(self) -> int:
        """The seq of the newest message's event; 0 when there is none."""
        return self.seqs[-1] if self.seqs else 0

    def tokens(self, system_prompt: str, tools: int = 0) -> int:
        """The size of the context the next call sends: the provider's count for the
        latest call that gave one plus an estimate (capd.tokens) for the messages since,
        its reply included; before any such call, an estimate of it all, with `tools` (the
        tool definitions' estimate) added."""
        for message in self.messages[len(self.estimated) :]:
            self.estimated.append(
                (self.estimated[-1] if self.estimated else 0) + message_tokens(message)
            )
        total = self.estimated[-1] if self.estimated else 0
        if not self.reported_seq:
            return text_tokens(system_prompt) + tools + total
        first = self.index_after(self.reported_seq - 1)
        before = self.estimated[first - 1] if first else 0
        return self.reported_tokens + total - before

    def _apply(self, event: DurableEvent) -> None:
        match event:
            case UserMessage(text=text):
                self.messages.append(ChatMessage("user", text))
            case Notification(source=source, text=text):
                self.messages.append(ChatMessage("user", notification_text(source, text)))
            case AssistantMessage(
                text=text,
                tool_calls=calls,
                interrupted=interrupted,
                truncated=truncated,
                thinking=thinking,
                usage=usage,
            ):
                if usage.input_tokens:
                    self.reported_tokens, self.reported_seq = usage.input_tokens, event.seq
                self.messages.append(
                    ChatMessage(
                        "assistant",
                        text,
                        tuple(calls),
                        interrupted=interrupted,
                        truncated=truncated,
                        thinking=tuple(thinking),
                    )
                )
            case EngineSession(session_id=session_id):
                self.engine_session, self.engine_session_seq = session_id, event.seq
            case ContextCompacted(summary=summary, through_seq=through, window=window):
                kept = self.index_after(through)
                # A result whose call the summary took (one committed while the summary was
                # being written) goes with it: no API takes a result without its call.
                while kept < len(self.messages) and self.messages[kept].role == "tool":
                    kept += 1
                self.messages[:kept] = [summary_message(summary)]
                self.seqs[:kept] = [through]
                self.summary = summary
                self.estimated.clear()
                self.reported_tokens = self.reported_seq = 0
                # The window it measured against, an overflow's named one included: a restart
                # reads no older event, so it learns the window here.
                self.learned_window = window or self.learned_window
            case TurnEnd(result="errored", error=error) if error:
                self.learned_window = window_in_error(error) or self.learned_window
            case ToolResult(call_id=call_id, name=name, output=output, is_error=is_error):
                self.messages.append(
                    ChatMessage("tool", output, call_id=call_id, name=name, is_error=is_error)
                )

    def orphaned_calls(self) -> list[ToolCall]:
        """Tool calls of the latest model step that never got a result."""
        answered: set[str] = set()
        for msg in reversed(self.messages):
            if msg.role == "tool":
                answered.add(msg.call_id)
            elif msg.role == "assistant" and not msg.interrupted:
                return [c for c in msg.tool_calls if c.id not in answered]
        return []


def describe_pod_event(payload: dict[str, Any]) -> str:
    """The text a model reads for a report from another pod (docs/protocol.md, Parent reports)."""
    match parse_report(payload):
        case TurnEnded(pod=pod, turn_id=turn_id, result=result, output=output, truncated=cut):
            note = "\n[output cut short; read_pod_output shows all of it]" if cut else ""
            return f"pod {pod} ended turn {turn_id} ({result}):\n{output}{note}"
        case Errored(pod=pod, turn_id=turn_id, message=message):
            return f"pod {pod}: turn {turn_id} errored: {message}"
        case ShutDown(pod=pod):
            return f"pod {pod} shut down"
    return f"event from pod {payload.get('pod', '?')}: {orjson.dumps(payload).decode()}"
