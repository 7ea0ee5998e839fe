#!/usr/bin/env python3
"""A stand-in `claude` for tests: Claude Code's headless stream-json protocol, with the
message shapes the real CLI (2.1.x) writes.

Run as `claude.py -p --input-format stream-json --output-format stream-json --verbose
[--include-partial-messages] [--resume ID] ...`. Each user message starts a turn: a
`system` init (the session id) and `status`, then what the prompt asks for, as
`stream_event` partial messages, `assistant` messages (one per content block, sent before
the block's `content_block_stop` and carrying message_start's usage, whose real counts
come in `message_delta`), `user` tool results and a closing `result` (usage summed over
the turn's API messages; `total_cost_usd` the process's running total at PRICE, as the
real CLI reports it in stream-json mode, so each result restates the earlier prompts'):

    slow:N        N text chunks, 20 ms apart (default 2000)
    tool:CMD      a Bash tool_use running CMD for real, its tool_result, then "done"
    bg            starts `sleep 300` in the background (in its process group), then replies
    crash         writes to stderr and exits 3 mid-turn, and so at every later prompt
    crash-once    as crash, unless $FAKE_CLAUDE_DIR/crashed exists (which it creates)
    compact-auto  compacts the session first, as the CLI's auto compaction does, then
                  replies "done after compacting"; `compact-auto PROMPT` then does PROMPT
    anything else "You said: <prompt>"

`/compact [instructions]` runs the local command as the real CLI (2.1.332) does in print
mode: `status` "compacting", `status` with `compact_result`, `init`, `compact_boundary`
(`trigger` "manual"), the summary as a `user` message flagged `isSynthetic`, the command's
output as a replayed `user` message, then a `result` with `num_turns` 0. The summary lists
the session's prompts so far and the instructions. With no prompt in the session it says
"Error: No messages to compact" instead, and with DISABLE_COMPACT set "/compact isn't
available in this environment." (`init` then leaves `compact` out of `slash_commands`),
both as a synthetic `assistant` message. With $FAKE_CLAUDE_DIR/slow-compact present the
compaction waits until interrupted (then `compact_result` "failed" and an error
`result`).

`control_request {subtype: interrupt}` is acknowledged at once (`control_response`) and
stops the turn: a `user` message saying so, then a `result` with subtype
`error_during_execution`. A tool it stops gets a tool_result saying so (TOOL_STOPPED), as
the real CLI's does. With $FAKE_CLAUDE_DIR/deaf present, interrupts are read and ignored;
with $FAKE_CLAUDE_DIR/slow-interrupt present, the turn stops SLOW_INTERRUPT_S after the
acknowledgement (a turn winding down a while).

Sessions are files in $FAKE_CLAUDE_DIR/sessions (the real CLI's transcripts): `--resume`
of one that is not there writes an error `result` ("No conversation found with session
ID: ...") and exits 1 at once, as the real CLI does; with $FAKE_CLAUDE_DIR/die-on-resume
present, it only exits 1 instead. With $FAKE_CLAUDE_DIR/die-at-start present, every start
exits 1 at once with a usage error on stderr. `--fork-session` resumes into a new session
id, as the real CLI does.
Every start (argv, pid, pgid, cwd, CLAUDE_AUTOCOMPACT_PCT_OVERRIDE) and every message
read go to $FAKE_CLAUDE_DIR/log.jsonl.

`--mcp-config JSON` (one, inline) is read as the real CLI reads it: each server's `${VAR}`
and `${VAR:-default}` in `env` and `headers` are expanded from the environment (the start's
log entry has the config as given, `mcp_config`, and `mcp_expanded`, the values it got).
`init` lists each server in `mcp_servers`: `connected` with one tool, `mcp__<name>__echo`,
or `failed` when a `${VAR}` is not set, or when `type` is missing from an entry with a
`url` (the real CLI then takes it for stdio and rejects it).
"""

import json
import os
import queue
import re
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

STATE = Path(os.environ.get("FAKE_CLAUDE_DIR", "."))  # tests import the constants below
SESSIONS = STATE / "sessions"
MODEL = "claude-fake-1"
VERSION = "2.1.332"
TOOL_STOPPED = (
    "The user doesn't want to proceed with this tool use. The tool use was rejected (eg. if "
    "it was a file edit, the new_string was NOT written to the file). STOP what you are "
    "doing and wait for the user to tell you how to proceed."
)
INTERRUPTED = "[Request interrupted by user]"
INTERRUPTED_TOOL = "[Request interrupted by user for tool use]"
DIAGNOSTIC = "[ede_diagnostic] result_type=user last_content_type=n/a stop_reason=null"
"""The `errors` of the real CLI's result for an interrupted turn."""
INPUT_TOKENS = 10
COMPACTED_PRE_TOKENS = 4321
COMPACTED_POST_TOKENS = 321
SUMMARY_HEAD = (
    "This session is being continued from a previous conversation that ran out of context. "
    "The summary below covers the earlier portion of the conversation."
)
NO_MESSAGES = "Error: No messages to compact"
COMPACT_UNAVAILABLE = "/compact isn't available in this environment."
COMMANDS = ["clear", "compact", "context", "usage"]
SLOW_INTERRUPT_S = 0.5
PRICE = (3.0, 15.0)
"""Dollars per million input and output tokens the stand-in charges."""
_out_lock = threading.Lock()
_inbox: "queue.Queue[dict[str, Any] | None]" = queue.Queue()
_interrupt = threading.Event()
_turn_lock = threading.Lock()
_busy = False
_cost_usd = 0.0
"""The process's running total, as the real CLI's `total_cost_usd`."""
MCP: list[dict[str, str]] = []
"""The MCP servers `init` reports, as --mcp-config gave them."""


def log(entry: dict[str, Any]) -> None:
    with (STATE / "log.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def out(message: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def ack(request_id: str) -> None:
    response = {"subtype": "success", "request_id": request_id, "response": {"still_queued": []}}
    out({"type": "control_response", "response": response})


def read_stdin() -> None:
    for line in sys.stdin:
        message = json.loads(line)
        log({"read": message})
        if message.get("type") == "control_request" and (STATE / "deaf").exists():
            continue
        if message.get("type") == "control_request":
            # As the real CLI: acknowledged at once, busy or not; a busy turn then stops.
            ack(message["request_id"])
            with _turn_lock:
                if message["request"]["subtype"] == "interrupt" and _busy:
                    if (STATE / "slow-interrupt").exists():
                        threading.Timer(SLOW_INTERRUPT_S, _interrupt.set).start()
                    else:
                        _interrupt.set()
        else:
            _inbox.put(message)
    _inbox.put(None)


def usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
    }


class Turn:
    def __init__(self, session_id: str, partial: bool) -> None:
        self.session_id = session_id
        self.partial = partial
        self.count = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def base(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "session_id": self.session_id, "uuid": str(uuid.uuid4())}

    def stream(self, message_id: str, event: dict[str, Any]) -> None:
        if self.partial:
            wrapper = {"parent_tool_use_id": None, "api_message_id": message_id}
            out({**self.base("stream_event"), "event": event, **wrapper})

    def start_message(self) -> str:
        """A new API message: its id; message_start carries output_tokens 1, as the API's."""
        self.count += 1
        message_id = f"msg_{uuid.uuid4().hex[:24]}"
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(INPUT_TOKENS * self.count, 1),
        }
        self.stream(message_id, {"type": "message_start", "message": message})
        self.input_tokens += INPUT_TOKENS * self.count
        return message_id

    def block(self, message_id: str, index: int, block: dict[str, Any]) -> None:
        """The `assistant` message of a finished block, then its content_block_stop."""
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [block],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage(INPUT_TOKENS * self.count, 1),
            "context_management": None,
        }
        out({**self.base("assistant"), "message": message, "parent_tool_use_id": None})
        self.stream(message_id, {"type": "content_block_stop", "index": index})

    def end_message(self, message_id: str, stop_reason: str, output_tokens: int) -> None:
        self.output_tokens += output_tokens
        delta = {"stop_reason": stop_reason, "stop_sequence": None}
        event = {"type": "message_delta", "delta": delta, "usage": {"output_tokens": output_tokens}}
        self.stream(message_id, event)
        self.stream(message_id, {"type": "message_stop"})

    def text(self, chunks: list[str], delay_s: float = 0.0) -> bool:
        """Stream one text message; False if interrupted."""
        message_id = self.start_message()
        start = {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "text", "text": ""},
        }
        self.stream(message_id, start)
        sent = []
        for chunk in chunks:
            if _interrupt.wait(delay_s) if delay_s else _interrupt.is_set():
                self.block(message_id, 0, {"type": "text", "text": "".join(sent)})
                self.user([{"type": "text", "text": INTERRUPTED}])
                return False
            sent.append(chunk)
            delta = {"type": "text_delta", "text": chunk}
            self.stream(message_id, {"type": "content_block_delta", "index": 0, "delta": delta})
        self.block(message_id, 0, {"type": "text", "text": "".join(sent)})
        self.end_message(message_id, "end_turn", len(sent) * 3)
        return True

    def tool(self, command: str) -> bool:
        message_id = self.start_message()
        call_id = f"toolu_{uuid.uuid4().hex[:24]}"
        block = {"type": "tool_use", "id": call_id, "name": "Bash", "input": {"command": command}}
        start = {**block, "input": {}}
        self.stream(message_id, {"type": "content_block_start", "index": 0, "content_block": start})
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        self.stream(message_id, {"type": "content_block_delta", "index": 0, "delta": delta})
        self.block(message_id, 0, block)
        self.end_message(message_id, "tool_use", 20)
        # As the real CLI's Bash tool: no stdin (ours is capd's socket, and bash reads
        # ~/.bashrc when its stdin is a socket).
        proc = subprocess.Popen(
            ["bash", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        stopped = False
        while proc.poll() is None and not stopped:
            stopped = _interrupt.wait(0.02)
        if stopped:
            proc.kill()
            proc.wait()
            output, is_error = TOOL_STOPPED, True
        else:
            output = proc.stdout.read().decode().strip() if proc.stdout else ""
            is_error = proc.returncode != 0
        result = {"tool_use_id": call_id, "type": "tool_result", "content": output}
        self.user([{**result, "is_error": is_error}])
        if stopped:
            self.user([{"type": "text", "text": INTERRUPTED_TOOL}])
        return not stopped

    def compact(self, trigger: str, instructions: str) -> bool:
        """Compact the session, as the CLI does; False if interrupted."""
        status = {**self.base("system"), "subtype": "status"}
        out({**status, "status": "compacting", "compact_output_chars": 0})
        if (STATE / "slow-compact").exists() and _interrupt.wait(30):
            out({**status, "status": None, "compact_result": "failed"} | CANCELED)
            return False
        out({**status, "status": None, "compact_result": "success"})
        if trigger == "manual":
            out(init(self.session_id, sys.argv[1:]))
        metadata = {
            "trigger": trigger,
            "pre_tokens": COMPACTED_PRE_TOKENS,
            "post_tokens": COMPACTED_POST_TOKENS,
        }
        out({**self.base("system"), "subtype": "compact_boundary", "compact_metadata": metadata})
        prompts = ", ".join(session_prompts(self.session_id))
        summary = f"{SUMMARY_HEAD}\n\nSummary:\nThe user's prompts: {prompts}."
        if instructions:
            summary += f"\nAs asked: {instructions}"
        content: str | list[dict[str, Any]] = summary
        if trigger == "auto":
            content = [{"type": "text", "text": summary}]
        message = {"role": "user", "content": content}
        out({**self.base("user"), "message": message, "parent_tool_use_id": None} | SYNTHETIC)
        return True

    def said(self, text: str, source: str) -> None:
        """What a local command says, as a synthetic `assistant` message."""
        message = {
            "id": str(uuid.uuid4()),
            "model": "<synthetic>",
            "role": "assistant",
            "stop_reason": "end_turn",
            "type": "message",
            "usage": usage(0, 0),
            "content": [{"type": "text", "text": text}],
        }
        wrapped = {
            "local_command_source": f"<local-command-{source}>{text}</local-command-{source}>"
        }
        out({**self.base("assistant"), "message": message, "parent_tool_use_id": None, **wrapped})

    def user(self, content: list[dict[str, Any]]) -> None:
        message = {"role": "user", "content": content}
        out({**self.base("user"), "message": message, "parent_tool_use_id": None})

    def result(self, text: str | None, subtype: str = "success", is_error: bool = False) -> None:
        global _cost_usd
        _cost_usd += (self.input_tokens * PRICE[0] + self.output_tokens * PRICE[1]) / 1_000_000
        message = {
            **self.base("result"),
            "subtype": subtype,
            "is_error": is_error,
            "duration_ms": 1,
            "duration_api_ms": 1,
            "num_turns": self.count,
            "stop_reason": None if is_error else "end_turn",
            "total_cost_usd": _cost_usd,
            "usage": usage(self.input_tokens, self.output_tokens),
            "modelUsage": {},
            "permission_denials": [],
            "terminal_reason": "aborted_streaming" if is_error else "completed",
        }
        if text is not None:
            message["result"] = text
        else:
            message["errors"] = [DIAGNOSTIC]
        out(message)


CANCELED = {"compact_error": "Compaction canceled."}
SYNTHETIC = {"isReplay": False, "isSynthetic": True}


def session_prompts(session_id: str) -> list[str]:
    path = SESSIONS / session_id
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_compact(turn: Turn, instructions: str, args: list[str]) -> None:
    """`/compact`, a local command: no model turn (`num_turns` 0)."""
    if "DISABLE_COMPACT" in os.environ:
        out(init(turn.session_id, args))
        turn.said(COMPACT_UNAVAILABLE, "stdout")
        turn.result(COMPACT_UNAVAILABLE)
        return
    if not session_prompts(turn.session_id):
        out(init(turn.session_id, args))
        turn.said(NO_MESSAGES, "stderr")
        turn.result("")
        return
    if not turn.compact("manual", instructions):
        turn.said("Error: Compaction canceled.", "stderr")
        turn.result(None, "error_during_execution", is_error=True)
        return
    replay = {"role": "user", "content": "<local-command-stdout>Compacted </local-command-stdout>"}
    out({**turn.base("user"), "message": replay, "parent_tool_use_id": None, "isReplay": True})
    turn.result("")


def crash() -> None:
    sys.stderr.write("fake claude: boom, the process fell over\n")
    sys.stderr.flush()
    os._exit(3)


def run_turn(turn: Turn, prompt: str) -> None:
    if prompt.startswith("slow"):
        count = int(prompt.split(":", 1)[1]) if ":" in prompt else 2000
        finished = turn.text(["tok "] * count, delay_s=0.02)
        reply = "slow done"
    elif prompt.startswith("tool:"):
        finished = turn.tool(prompt.removeprefix("tool:")) and turn.text(["done"])
        reply = "done"
    elif prompt == "bg":
        subprocess.Popen(["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finished = turn.text(["started"])
        reply = "started"
    elif prompt == "crash" or (STATE / "crash-always").exists():
        (STATE / "crash-always").touch()
        turn.text(["about to "])
        crash()
    elif prompt == "crash-once" and not (STATE / "crashed").exists():
        (STATE / "crashed").touch()
        turn.text(["about to "])
        crash()
    elif prompt.startswith("compact-auto "):
        if turn.compact("auto", ""):
            run_turn(turn, prompt.removeprefix("compact-auto "))
        else:
            turn.result(None, "error_during_execution", is_error=True)
        return
    elif prompt == "compact-auto":
        finished = turn.compact("auto", "") and turn.text(["done after compacting"])
        reply = "done after compacting"
    else:
        reply = f"You said: {prompt}"
        finished = turn.text([reply[i : i + 5] for i in range(0, len(reply), 5)])
    if finished:
        turn.result(reply)
    else:
        turn.result(None, "error_during_execution", is_error=True)


def init(session_id: str, args: list[str]) -> dict[str, Any]:
    mode = args[args.index("--permission-mode") + 1] if "--permission-mode" in args else "default"
    return {
        "type": "system",
        "subtype": "init",
        "cwd": os.getcwd(),
        "session_id": session_id,
        "tools": ["Bash", *(f"mcp__{s['name']}__echo" for s in MCP if s["status"] == "connected")],
        "mcp_servers": MCP,
        "model": MODEL,
        "permissionMode": mode,
        "slash_commands": [
            c for c in COMMANDS if c != "compact" or "DISABLE_COMPACT" not in os.environ
        ],
        "apiKeySource": "ANTHROPIC_API_KEY",
        "claude_code_version": VERSION,
        "output_style": "default",
        "uuid": str(uuid.uuid4()),
    }


def refuse_resume(session_id: str) -> None:
    """As the real CLI does once a session's transcript is gone: an error result, exit 1."""
    error = f"No conversation found with session ID: {session_id}"
    if not (STATE / "die-on-resume").exists():
        turn = Turn(session_id, partial=False)
        message = {**turn.base("result"), "subtype": "error_during_execution", "is_error": True}
        message |= {"duration_ms": 0, "duration_api_ms": 0, "num_turns": 0, "stop_reason": None}
        message |= {"total_cost_usd": 0, "usage": usage(0, 0), "modelUsage": {}}
        out({**message, "permission_denials": [], "errors": [error]})
    print(error, file=sys.stderr)
    sys.exit(1)


def read_mcp_config(args: list[str]) -> dict[str, Any]:
    """What --mcp-config gives, for the start's log entry; fills MCP for `init`."""
    if "--mcp-config" not in args:
        return {}
    config = json.loads(args[args.index("--mcp-config") + 1])
    expanded: dict[str, dict[str, str]] = {}
    for name, server in config["mcpServers"].items():
        values = server.get("env") or server.get("headers") or {}
        try:
            expanded[name] = {key: expand(value) for key, value in values.items()}
            status = "connected" if "type" in server or "url" not in server else "failed"
        except KeyError:
            status = "failed"
        MCP.append({"name": name, "status": status})
    return {"mcp_config": config, "mcp_expanded": expanded, "strict": "--strict-mcp-config" in args}


def expand(value: str) -> str:
    def replace(match: re.Match[str]) -> str:
        found = os.environ.get(match.group(1)) or match.group(2)
        if found is None:
            raise KeyError(match.group(1))
        return found

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}", replace, value)


def main() -> None:
    args = sys.argv[1:]
    pct = os.environ.get("CLAUDE_AUTOCOMPACT_PCT_OVERRIDE")
    started = {"argv": args, "pid": os.getpid(), "pgid": os.getpgid(0), "cwd": os.getcwd()}
    log({**started, "pct": pct, **read_mcp_config(args)})
    if (STATE / "die-at-start").exists():
        print("error: unknown option '--new-in-a-later-version'", file=sys.stderr)
        sys.exit(1)
    session_id = args[args.index("--resume") + 1] if "--resume" in args else str(uuid.uuid4())
    if "--resume" in args and not (SESSIONS / session_id).exists():
        refuse_resume(session_id)
    if "--fork-session" in args:
        session_id = str(uuid.uuid4())
    SESSIONS.mkdir(exist_ok=True)
    partial = "--include-partial-messages" in args
    threading.Thread(target=read_stdin, daemon=True).start()
    while (message := _inbox.get()) is not None:
        if message.get("type") != "user":
            continue
        content = message["message"]["content"]
        prompt = content if isinstance(content, str) else content[0]["text"]
        (SESSIONS / session_id).touch()
        turn = Turn(session_id, partial)
        set_busy(True)
        if prompt.split(" ", 1)[0] == "/compact":
            run_compact(turn, prompt.removeprefix("/compact").strip(), args)
        else:
            with (SESSIONS / session_id).open("a") as f:
                f.write(json.dumps(prompt) + "\n")
            out(init(session_id, args))
            out({**turn.base("system"), "subtype": "status", "status": "requesting"})
            run_turn(turn, prompt)
        set_busy(False)


def set_busy(busy: bool) -> None:
    """Mark a turn running or over."""
    global _busy
    with _turn_lock:
        _busy = busy
        _interrupt.clear()


if __name__ == "__main__":
    main()
