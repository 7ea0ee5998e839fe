"""Human-readable output: pod events (watch, log, send), the pod table, status objects.

Events arrive as plain dicts from the wire, so fields this version does not know are
ignored and a missing field never breaks the output.
"""

import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

SUMMARY_CHARS = 120
COMPACTION_SUMMARY_LINES = 3
"""Lines of a compaction's summary that `watch` and `log` show."""


def shorten(line: str, limit: int = SUMMARY_CHARS) -> str:
    return line if len(line) <= limit else line[: limit - 1] + "…"


def one_line(text: str, limit: int = SUMMARY_CHARS) -> str:
    """The first line of `text`, shortened, with a note of how many lines were left out."""
    lines = text.strip().splitlines() or [""]
    first = shorten(lines[0], limit)
    if len(lines) > 1:
        first += f" (+{len(lines) - 1} lines)"
    return first or "(empty)"


def compact_json(value: Any, limit: int = SUMMARY_CHARS) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def clock(ts: Any) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, int | float) else ""


class Stream:
    """A text stream that knows whether its cursor is at the start of a line."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.at_line_start = True

    def write(self, text: str) -> None:
        if text:
            self.file.write(text)
            self.file.flush()
            self.at_line_start = text.endswith("\n")

    def end_line(self) -> None:
        if not self.at_line_start:
            self.write("\n")

    def line(self, text: str) -> None:
        self.end_line()
        self.write(text + "\n")


class StepText:
    """The text the current step's deltas have shown, so that the step's assistant_message
    shows only the rest: all of it in a replay, the missed tail after a `lagged` gap."""

    def __init__(self) -> None:
        self.shown: str | None = None

    def add(self, text: str) -> None:
        self.shown = (self.shown or "") + text

    def rest(self, full: str) -> str:
        shown, self.shown = self.shown or "", None
        return full[len(shown) :] if full.startswith(shown) else ""


def tool_call_line(call: dict[str, Any]) -> str:
    return f"→ {call.get('name', '?')} {compact_json(call.get('arguments', {}))}"


def tool_result_line(event: dict[str, Any]) -> str:
    marker = " error" if event.get("is_error") else ""
    return f"← {event.get('name', '?')}{marker}: {one_line(str(event.get('output', '')))}"


def turn_end_line(event: dict[str, Any]) -> str:
    line = f"── turn {event.get('turn_id', '?')} {event.get('result', '?')}"
    return f"{line}: {event['error']}" if event.get("error") else line


def pod_event_line(payload: dict[str, Any]) -> str:
    detail = payload.get("message") or payload.get("output") or ""
    result = f" {payload['result']}" if payload.get("result") else ""
    line = f"report from {payload.get('pod', '?')}: {payload.get('kind', '?')}{result}"
    return f"{line}: {one_line(str(detail))}" if detail else line


def token_count(value: Any) -> str:
    """A token count as people read it, `41,230`; `?` for a missing one."""
    return f"{value:,}" if isinstance(value, int) else "?"


def compaction_sizes(event: dict[str, Any]) -> str:
    """A `context_compacted`'s sizes: `41,230 → 6,120 tokens`, with the window when known."""
    window = event.get("window")
    of = f" of {window:,}" if isinstance(window, int) else ""
    before, after = token_count(event.get("tokens_before")), token_count(event.get("tokens_after"))
    return f"{before} → {after}{of} tokens"


def compaction_started_line(event: dict[str, Any]) -> str:
    return f"compacting the context ({event.get('trigger', '?')})…"


def context_compacted_line(event: dict[str, Any]) -> str:
    return (
        f"context compacted ({event.get('trigger', '?')}): {compaction_sizes(event)}, "
        f"through seq {event.get('through_seq', '?')}"
    )


def compacted_line(pod: str, event: dict[str, Any]) -> str:
    """`capctl compact`'s answer: `compacted w1: 41,230 → 6,120 tokens (through seq 812)`."""
    through = event.get("through_seq", "?")
    return f"compacted {pod}: {compaction_sizes(event)} (through seq {through})"


def summary_preview(summary: str, lines: int = COMPACTION_SUMMARY_LINES) -> list[str]:
    """The summary's first non-blank lines, shortened, the last noting how many are left."""
    kept = [line.strip() for line in summary.splitlines() if line.strip()]
    shown = [shorten(line) for line in kept[:lines]] or ["(empty)"]
    if len(kept) > lines:
        shown[-1] += f" (+{len(kept) - lines} lines)"
    return shown


def describe(event: dict[str, Any]) -> str | None:
    """One line for an event that is not streamed text, or None for one not worth showing."""
    kind = event.get("event")
    get = event.get
    match kind:
        case "turn_start":
            return f"── turn {get('turn_id', '?')} ({get('invoke', '?')}) {clock(get('ts'))}"
        case "user_message":
            return f"user: {get('text', '')}"
        case "notification":
            return f"notification from {get('source') or '?'}: {get('text', '')}"
        case "tool_result":
            return "  " + tool_result_line(event)
        case "turn_end":
            return turn_end_line(event)
        case "child_spawned":
            return f"child spawned: {get('name', '?')} ({get('socket', '?')})"
        case "pod_event_received":
            return pod_event_line(get("payload") or {})
        case "retry":
            return (
                f"retry {get('attempt', '?')}/{get('max_attempts', '?')} "
                f"in {get('wait_ms', '?')} ms: {get('error', '')}"
            )
        case "lagged":
            return (
                f"(fell behind: {get('missed', '?')} events missed; "
                f"resyncing from seq {get('resume_from', '?')})"
            )
        case "error":
            return f"error: {get('code', '?')}: {get('message', '')}"
        case "permission_request":
            return permission_request_line(event)
        case "permission_resolved":
            chosen = get("option_id")
            return f"permission {get('request_id', '?')}: {chosen or 'cancelled'}"
        case "engine_session" if get("replaced"):
            return session_replaced_line(event)
        case "compaction_started":
            return f"── {compaction_started_line(event)}"
        case "compaction_skipped":
            return f"── compaction not made: {get('reason', '?')}"
        case "context_compacted":
            preview = summary_preview(str(get("summary", "")))
            return "\n".join([f"── {context_compacted_line(event)}", *("   " + p for p in preview)])
        case "budget_exhausted":
            return f"── {budget_exhausted_line(event)}"
        case "rewound":
            return f"── {rewound_line(event)}"
        case "reconfigured":
            return f"── reconfigured: {', '.join(get('changed') or ['nothing'])} changed"
        case "checkpoint":
            return f"   {checkpoint_line(event)}"
        case "checkpoint_skipped":
            return f"   files not checkpointed: {get('reason', '?')}"
    return None


def usd(value: Any) -> str:
    """Dollars as people read them, `$0.42`; `-` while unknown."""
    return f"${value:,.2f}" if isinstance(value, int | float) else "-"


def spent_and_budget(spent: Any, budget: Any) -> str:
    """`5 / 1,000 tokens, $9.00 (no limit)`: what was spent against each limit."""
    spent = spent if isinstance(spent, dict) else {}
    budget = budget if isinstance(budget, dict) else {}
    tokens = token_count(spent.get("tokens"))
    if budget.get("tokens") is not None:
        tokens = f"{tokens} / {token_count(budget['tokens'])} tokens"
    else:
        tokens = f"{tokens} tokens (no limit)"
    dollars = usd(spent.get("usd"))
    if budget.get("usd") is not None:
        dollars = f"{dollars} / {usd(budget['usd'])}"
    else:
        dollars = f"{dollars} (no limit)"
    return f"{tokens}, {dollars}"


def budget_exhausted_line(event: dict[str, Any]) -> str:
    """`budget of w1 spent: 5 / 4 tokens, $7.00 (no limit); paused: raise it ...`."""
    scope = event.get("scope", "?")
    return (
        f"budget of {scope} spent: {spent_and_budget(event.get('used'), event.get('budget'))}; "
        f"paused: raise it with capctl budget {scope}, then capctl resume {event.get('pod', '?')}"
    )


def rewound_line(event: dict[str, Any]) -> str:
    files = " and files" if event.get("files_restored") else ""
    session = "; the engine goes on in a new session" if event.get("new_session") else ""
    return f"rewound context{files} to before turn {event.get('to_turn_id', '?')}{session}"


def checkpoint_line(event: dict[str, Any]) -> str:
    """A `checkpoint`: `files checkpointed (3 changed, 41 ms)`, with what was left out."""
    line = (
        f"files checkpointed ({event.get('changed', 0)} changed, {event.get('duration_ms', 0)} ms)"
    )
    left_out = event.get("left_out") or []
    if left_out:
        line += f"; too large to keep: {', '.join(map(str, left_out))}"
    return line


def session_replaced_line(event: dict[str, Any]) -> str:
    """An engine session that could not be resumed, and its replacement."""
    why = f" ({one_line(str(event['reason']))})" if event.get("reason") else ""
    return (
        f"engine session {event['replaced']} could not be resumed{why}; "
        f"new session {event.get('session_id', '?')}: earlier turns are lost to the engine"
    )


def permission_request_line(event: dict[str, Any]) -> str:
    """The question and how to answer it: `capctl permission POD REQUEST OPTION`."""
    return f"permission asked: {permission_question(event)}"


def permission_question(asked: dict[str, Any], pod: str | None = None) -> str:
    """A permission request (an event, or an entry of `status.permissions`) in a line."""
    call = asked.get("tool_call") or {}
    what = call.get("title") or call.get("kind") or compact_json(call)
    options = ", ".join(
        option_label(option) for option in asked.get("options") or [] if isinstance(option, dict)
    )
    pod, request = pod or asked.get("pod", "POD"), asked.get("request_id", "?")
    return f"{what}; options: {options or 'none'} — capctl permission {pod} {request} OPTION"


def option_label(option: dict[str, Any]) -> str:
    """`allow (allow_once)`: what to answer, and what it means unless that is its name."""
    option_id, kind = option.get("optionId"), option.get("kind") or option.get("name")
    return str(option_id) if kind == option_id else f"{option_id} ({kind})"


def pod_status(status: dict[str, Any], order: Sequence[str]) -> str:
    """`capctl status`: the status object as `key: value` lines. A running pod waiting for
    its engine's permission questions says so, and each question is a line of its own, as
    is each of its MCP servers."""
    shown = dict(status)
    if isinstance(size := shown.get("context"), dict):
        shown["context"] = context_size(size)
    more: dict[str, list[str]] = {}
    asked = [q for q in shown.pop("permissions", None) or [] if isinstance(q, dict)]
    if asked:
        if shown.get("status") == "running":
            shown["status"] = "running (waiting for permission)"
        pod = str(shown.get("name", "POD"))
        questions = [f"{q.get('request_id', '?')}: {permission_question(q, pod)}" for q in asked]
        shown["permissions"], more["permissions"] = questions[0], questions[1:]
    if isinstance(box := shown.get("sandbox"), dict):
        shown["sandbox"] = sandbox_line(box)
    if isinstance(tree := shown.get("workspace"), dict):
        shown["workspace"] = workspace_line(tree)
    if isinstance(engine := shown.get("engine"), dict):
        shown["engine"] = engine_line(engine)
    servers = [mcp_server(s) for s in shown.get("mcp") or [] if isinstance(s, dict)]
    if servers:
        shown["mcp"], more["mcp"] = servers[0], servers[1:]
    lines = key_values(shown, order).splitlines()
    for key, rest in more.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
        indent = " " * (len(lines[at]) - len(str(shown[key])))
        lines[at + 1 : at + 1] = [indent + line for line in rest]
    return "\n".join(lines)


def workspace_line(tree: dict[str, Any]) -> str:
    """`status.workspace` as "branch capd/x of /src/repo from main (1a2b3c4d)", then why
    the last sync failed, if it did."""
    base, commit = str(tree.get("base", "")), str(tree.get("base_commit", ""))
    start = commit[:8] if base == commit else f"{base} ({commit[:8]})"
    line = f"branch {tree.get('branch')} of {tree.get('repo')} from {start or '?'}"
    if error := tree.get("sync_error"):
        line += f"; not synced: {error}"
    return line


def engine_line(engine: dict[str, Any]) -> str:
    """`status.engine` as "pid 4242" or "stopped (starts at the next turn)", then how
    often capd stopped it while the pod was idle."""
    line = _engine_cell(engine)
    if engine.get("state") != "running":
        line += " (starts at the next turn)"
    if reaped := engine.get("reaped"):
        line += f", stopped while idle {reaped}x since the pod started"
    return line


def sandbox_line(box: dict[str, Any]) -> str:
    """`status.sandbox` as "workspace-write, network on, bwrap" (then how limits are
    enforced, when they are)."""
    if box.get("mode") == "off":
        return "off (not confined)"
    parts = [str(box.get("mode", "?")), f"network {'on' if box.get('network') else 'off'}"]
    parts.append(str(box.get("backend", "?")))
    if (limits := box.get("limits")) not in (None, "none"):
        parts.append(f"limits {limits}")
    return ", ".join(parts)


def mcp_server(server: dict[str, Any]) -> str:
    """One of `status.mcp`: "git: ready (12 tools, stdio, pid 4242)", then why it failed
    (or last restarted)."""
    state = server.get("state", "?")
    details = [str(server.get("transport", "stdio"))]
    if tools := server.get("tools"):
        details.insert(0, f"{tools} tool{'s' if tools != 1 else ''}")
    if pid := server.get("pid"):
        details.append(f"pid {pid}")
    if restarts := server.get("restarts"):
        details.append(f"restarted {restarts}x")
    if server.get("managed_by") == "engine":
        details.append("run by the engine")
    line = f"{server.get('name', '?')}: {state} ({', '.join(details)})"
    error = server.get("error")
    if not error:
        return line
    return f"{line}: {error}" if state == "failed" else f"{line}; last error: {error}"


def context_size(size: dict[str, Any]) -> str:
    """`status.context` as "1,234 / 32,768 tokens (4%)", or "1,234 tokens (window unknown)"."""
    tokens, window = size.get("tokens") or 0, size.get("window")
    if not isinstance(window, int) or window < 1:
        return f"{tokens:,} tokens (window unknown)"
    return f"{tokens:,} / {window:,} tokens ({tokens * 100 // window}%)"


class EventPrinter:
    """Prints a pod's events for `watch` and `log`: text deltas stream in place, everything
    else is one line (or a message's text) each. Status changes that turn boundaries already
    show (running at a turn's start, idle at its end) are left out; pauses are not."""

    def __init__(self, file: TextIO | None = None) -> None:
        self._out = Stream(file or sys.stdout)
        self._step = StepText()
        self._paused = False

    def show(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "status":
            was_paused, self._paused = self._paused, event.get("status") == "paused"
            if self._paused and not was_paused:
                self._out.line("── paused")
            elif was_paused and event.get("status") == "running":
                self._out.line("── resumed")
        elif kind == "text_delta":
            if self._step.shown is None:
                self._out.end_line()
                self._out.write("assistant: ")
            text = str(event.get("text", ""))
            self._step.add(text)
            self._out.write(text)
        elif kind == "assistant_message":
            streamed = self._step.shown is not None
            text = str(event.get("text", ""))
            rest = self._step.rest(text)
            if streamed:
                self._out.write(rest)
            elif text:
                self._out.line(f"assistant: {text}")
            for call in event.get("tool_calls") or []:
                self._out.line("  " + tool_call_line(call))
        elif (line := describe(event)) is not None:
            self._out.line(line)


class TurnPrinter:
    """Follows one turn for `send`: the assistant's text on stdout as it streams; tool
    calls, results, retries, compactions and pauses briefly on stderr."""

    def __init__(self, pod: str, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self._pod = pod
        self._out = Stream(out or sys.stdout)
        self._err = Stream(err or sys.stderr)
        self._step = StepText()
        self._text_shown = False
        self._paused = False

    def _note(self, line: str) -> None:
        if self._out.file.isatty():
            self._out.end_line()
        self._err.line(line)

    def _text(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._text_shown = True

    def show(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "text_delta":
            if self._step.shown is None:
                self._out.end_line()
            text = str(event.get("text", ""))
            self._step.add(text)
            self._text(text)
        elif kind == "assistant_message":
            streamed = self._step.shown is not None
            rest = self._step.rest(str(event.get("text", "")))
            if not streamed:
                self._out.end_line()
            self._text(rest)
            for call in event.get("tool_calls") or []:
                self._note(tool_call_line(call))
        elif kind == "tool_result":
            self._note(tool_result_line(event))
        elif kind == "status":
            self._show_status(str(event.get("status")))
        elif kind in ("retry", "lagged", "notification", "error", "permission_request"):
            self._note(describe(event) or "")
        elif kind == "engine_session" and event.get("replaced"):
            self._note(session_replaced_line(event))
        elif kind == "compaction_started":
            self._note(f"[{compaction_started_line(event)}]")
        elif kind == "context_compacted":
            self._note(f"[{context_compacted_line(event)}]")
        elif kind == "budget_exhausted":
            self._note(f"[{budget_exhausted_line(event)}]")

    def _show_status(self, status: str) -> None:
        if status == "paused":
            self._paused = True
            self._note(f"[{self._pod} paused; capctl resume {self._pod} continues the turn]")
        elif status == "running" and self._paused:
            self._paused = False
            self._note(f"[{self._pod} resumed]")

    def finish(self, turn_end: dict[str, Any]) -> int:
        """Close the output for the turn's `turn_end`; the exit status: 0 when it finished."""
        if not self._text_shown:
            self._text(str(turn_end.get("output", "")))
        self._out.end_line()
        failure = turn_failure(turn_end)
        if failure:
            self._err.line(failure)
        return 1 if failure else 0


def turn_failure(turn_end: dict[str, Any]) -> str | None:
    """None for a finished turn, else what to tell the user, e.g. `turn errored: boom`."""
    result = turn_end.get("result")
    if result == "finished":
        return None
    error = turn_end.get("error")
    return f"turn {result}: {error}" if error else f"turn {result}"


def _socket_cell(pod: dict[str, Any]) -> str:
    socket = pod.get("socket")
    return str(socket) if socket else f"on {pod.get('node') or '?'}"


def pod_table(pods: Sequence[dict[str, Any]]) -> str:
    """NAME STATUS PARENT TOKENS COST TEAM ENGINE SOCKET, each child indented under its
    parent; STATUS is `error` for a pod capd could not restore (`capctl ps --json` says why).
    TOKENS and COST are what the pod and its descendants spent (COST `-` while nothing had a
    price); TEAM is `-` for a pod of no team; ENGINE is an external engine's process (`pid
    N`, or `stopped` while it is not running), `-` for the builtin engine and a stopped pod;
    SOCKET is `-` for a stopped pod, which has none (its path still names it as a parent),
    and `on NODE` for a pod another node hosts."""
    by_ref = {pod[key]: pod["name"] for pod in pods for key in ("name", "socket") if pod.get(key)}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for pod in sorted(pods, key=lambda p: p["name"]):
        children.setdefault(by_ref.get(pod.get("parent")), []).append(pod)
    rows = [("NAME", "STATUS", "PARENT", "TOKENS", "COST", "TEAM", "ENGINE", "SOCKET")]
    seen: set[str] = set()

    def add(pod: dict[str, Any], depth: int) -> None:
        if pod["name"] in seen:
            return
        seen.add(pod["name"])
        parent = pod.get("parent")
        parent_shown = by_ref.get(parent, parent) or "-"
        spent = pod.get("spent") or {}
        rows.append(
            (
                "  " * depth + pod["name"],
                "error" if pod.get("error") else pod.get("status", "?"),
                parent_shown,
                token_count(spent.get("tokens", 0)),
                usd(spent.get("usd")),
                pod.get("team") or "-",
                _engine_cell(pod.get("engine")),
                "-" if pod.get("status") == "stopped" else _socket_cell(pod),
            )
        )
        for child in children.get(pod["name"], []):
            add(child, depth + 1)

    for pod in children.get(None, []):
        add(pod, 0)
    for pod in pods:
        add(pod, 0)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True))
        + "  "
        + row[-1]
        for row in rows
    )


def _engine_cell(engine: dict[str, Any] | None) -> str:
    if not engine:
        return "-"
    return f"pid {engine['pid']}" if engine.get("state") == "running" else "stopped"


def format_value(value: Any) -> str:
    if value is None or value == []:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


def key_values(obj: dict[str, Any], order: Sequence[str] = ()) -> str:
    """`key: value` lines, the keys in `order` first, then any others the server sent."""
    keys = [k for k in order if k in obj] + sorted(k for k in obj if k not in order)
    if not keys:
        return ""
    width = max(len(k) for k in keys) + 1
    return "\n".join(f"{k + ':':<{width}} {format_value(obj[k])}" for k in keys)


def duration(seconds: float) -> str:
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"
