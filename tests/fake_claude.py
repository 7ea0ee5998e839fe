#!/usr/bin/env python3
"""A stand-in `claude` for tests: Claude Code's headless stream-json protocol, as documented.

Run as `fake_claude.py -p --input-format stream-json --output-format stream-json --verbose
[--include-partial-messages] [--resume ID] ...`. Each user message starts a turn: a
`system` init (the session id), then what the prompt asks for, as `stream_event` partial
messages, `assistant` messages, `user` tool results and a closing `result`:

    slow:N        N text chunks, 20 ms apart (default 2000)
    tool:CMD      a Bash tool_use running CMD for real, its tool_result, then "done"
    bg            starts `sleep 300` in the background (in its process group), then replies
    crash         writes to stderr and exits 3 mid-turn, and so at every later prompt
    crash-once    as crash, unless $FAKE_CLAUDE_DIR/crashed exists (which it creates)
    anything else "You said: <prompt>"

`control_request {subtype: interrupt}` stops the turn: a `result` with subtype
`error_during_execution`, then the `control_response`; when idle, only the response. A
tool it stops gets a tool_result saying so (INTERRUPTED_TOOL), as the real CLI's does.
With $FAKE_CLAUDE_DIR/deaf present, interrupts are read and ignored.
Every start (argv, pid, pgid, cwd) and every message read go to $FAKE_CLAUDE_DIR/log.jsonl.
"""

import json
import os
import queue
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

STATE = Path(os.environ["FAKE_CLAUDE_DIR"])
INTERRUPTED_TOOL = "[Request interrupted by user for tool use]"
_out_lock = threading.Lock()
_inbox: "queue.Queue[dict[str, Any] | None]" = queue.Queue()
_interrupt = threading.Event()
_turn_lock = threading.Lock()
_busy = False
_pending_acks: list[str] = []


def log(entry: dict[str, Any]) -> None:
    with (STATE / "log.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def out(message: dict[str, Any]) -> None:
    with _out_lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def ack(request_id: str) -> None:
    out(
        {
            "type": "control_response",
            "response": {"subtype": "success", "request_id": request_id, "response": {}},
        }
    )


def read_stdin() -> None:
    for line in sys.stdin:
        message = json.loads(line)
        log({"read": message})
        if message.get("type") == "control_request" and (STATE / "deaf").exists():
            continue
        if message.get("type") == "control_request":
            with _turn_lock:
                if message["request"]["subtype"] == "interrupt" and _busy:
                    _pending_acks.append(message["request_id"])
                    _interrupt.set()
                else:
                    ack(message["request_id"])
        else:
            _inbox.put(message)
    _inbox.put(None)


class Turn:
    def __init__(self, session_id: str, partial: bool) -> None:
        self.session_id = session_id
        self.partial = partial
        self.count = 0

    def base(self, kind: str) -> dict[str, Any]:
        return {"type": kind, "session_id": self.session_id, "uuid": str(uuid.uuid4())}

    def new_message_id(self) -> str:
        self.count += 1
        return f"msg_{uuid.uuid4().hex[:8]}_{self.count}"

    def stream(self, event: dict[str, Any]) -> None:
        if self.partial:
            out({**self.base("stream_event"), "event": event, "parent_tool_use_id": None})

    def assistant(self, message_id: str, block: dict[str, Any]) -> None:
        message = {
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": "claude-fake",
            "content": [block],
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }
        out({**self.base("assistant"), "message": message, "parent_tool_use_id": None})

    def text(self, chunks: list[str], delay_s: float = 0.0) -> bool:
        """Stream one text message; False if interrupted."""
        message_id = self.new_message_id()
        self.stream({"type": "message_start", "message": {"id": message_id, "content": []}})
        self.stream({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}})
        sent = []
        for chunk in chunks:
            if _interrupt.wait(delay_s) if delay_s else _interrupt.is_set():
                return False
            sent.append(chunk)
            delta = {"type": "text_delta", "text": chunk}
            self.stream({"type": "content_block_delta", "index": 0, "delta": delta})
        self.stream({"type": "content_block_stop", "index": 0})
        self.assistant(message_id, {"type": "text", "text": "".join(sent)})
        self.stream({"type": "message_stop"})
        return True

    def tool(self, command: str) -> bool:
        message_id = self.new_message_id()
        call_id = f"toolu_{uuid.uuid4().hex[:8]}"
        block = {"type": "tool_use", "id": call_id, "name": "Bash", "input": {"command": command}}
        self.stream({"type": "message_start", "message": {"id": message_id, "content": []}})
        start = {**block, "input": {}}
        self.stream({"type": "content_block_start", "index": 0, "content_block": start})
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        self.stream({"type": "content_block_delta", "index": 0, "delta": delta})
        self.stream({"type": "content_block_stop", "index": 0})
        self.assistant(message_id, block)
        self.stream({"type": "message_stop"})
        proc = subprocess.Popen(
            ["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        stopped = False
        while proc.poll() is None and not stopped:
            stopped = _interrupt.wait(0.02)
        if stopped:
            proc.kill()
            proc.wait()
            output, is_error = INTERRUPTED_TOOL, True
        else:
            output = proc.stdout.read().decode().strip() if proc.stdout else ""
            is_error = proc.returncode != 0
        result = {"type": "tool_result", "tool_use_id": call_id, "content": output}
        user = {"role": "user", "content": [{**result, "is_error": is_error}]}
        out({**self.base("user"), "message": user, "parent_tool_use_id": None})
        return not stopped

    def result(self, text: str | None, subtype: str = "success", is_error: bool = False) -> None:
        message = {
            **self.base("result"),
            "subtype": subtype,
            "is_error": is_error,
            "duration_ms": 1,
            "duration_api_ms": 1,
            "num_turns": 1,
            "total_cost_usd": 0.0,
            "usage": {"input_tokens": 10, "output_tokens": 5},
        }
        if text is not None:
            message["result"] = text
        out(message)


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
    else:
        reply = f"You said: {prompt}"
        finished = turn.text([reply[i : i + 5] for i in range(0, len(reply), 5)])
    if finished:
        turn.result(reply)
    else:
        turn.result(None, "error_during_execution", is_error=True)


def main() -> None:
    args = sys.argv[1:]
    log({"argv": args, "pid": os.getpid(), "pgid": os.getpgid(0), "cwd": os.getcwd()})
    session_id = args[args.index("--resume") + 1] if "--resume" in args else str(uuid.uuid4())
    if "--resume" in args and (STATE / "forget-sessions").exists():
        # As the real CLI does once a session's transcript is gone.
        print(f"No conversation found with session ID: {session_id}", file=sys.stderr)
        sys.exit(1)
    partial = "--include-partial-messages" in args
    threading.Thread(target=read_stdin, daemon=True).start()
    while (message := _inbox.get()) is not None:
        if message.get("type") != "user":
            continue
        content = message["message"]["content"]
        prompt = content if isinstance(content, str) else content[0]["text"]
        turn = Turn(session_id, partial)
        out({**turn.base("system"), "subtype": "init", "cwd": os.getcwd(), "tools": ["Bash"]})
        set_busy(True)
        run_turn(turn, prompt)
        for request_id in set_busy(False):
            ack(request_id)


def set_busy(busy: bool) -> list[str]:
    """Mark a turn running or over; over, the interrupts it took are to be acknowledged."""
    global _busy
    with _turn_lock:
        _busy = busy
        _interrupt.clear()
        acks = list(_pending_acks)
        _pending_acks.clear()
    return acks


if __name__ == "__main__":
    main()
