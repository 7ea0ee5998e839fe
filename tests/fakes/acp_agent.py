#!/usr/bin/env python3
"""A test ACP agent, built on the official `agent-client-protocol` SDK, run over stdio.

What a prompt (its last text block) asks for:

    slow:N        N message chunks, 20 ms apart (default 2000); `session/cancel` stops it
    tool:CMD      a tool call running CMD for real, after asking permission
                  (allow_once "allow" / reject_once "reject"), then "done"
    quiet-tool:CMD  "Running it.", then a tool call running CMD (no permission asked);
                  the prompt ends after its result, with no more text
    pair:CMD      two tool calls announced together, then both running CMD at once
                  (no permission asked), then "done"
    dup-tool:CMD  as claude-code-acp 0.16: `tool_call` twice for one id, a placeholder
                  (title "Terminal", empty rawInput), then the whole call; runs CMD
                  without asking and, cancelled, says nothing more about it; then "done"
    late-input:CMD  as opencode: `tool_call` with rawInput {cwd} only, the command in the
                  `tool_call_update`s (in_progress, then completed); then "done"
    late-pair:CMD as opencode with two calls: the second call's command comes after the
                  first has run (each runs CMD); then "done"
    rpc-error     answers the prompt with claude-code-acp's JSON-RPC error, whose reason
                  is only in `data`
    rust-panic    exits 101 after writing a Rust panic and its backtrace to stderr
    bg            starts `sleep 300` in the background (in its process group), then replies
    crash         exits 3 mid-turn, and so at every later prompt
    crash-once    as crash, unless $FAKE_ACP_DIR/crashed exists (which it creates)
    compact-auto  compacts its context first, if the client said it takes compaction
                  updates (`clientCapabilities.session`): `compaction_update` in_progress,
                  the summary in two `compaction_summary_chunk`s, then `completed` twice
                  (as claude-agent-acp 0.101, the second a status-only patch); then
                  "You said: compact-auto". `compact-silent` reports only `completed`,
                  with no summary; `compact-failed` reports in_progress then `failed`.
    anything else a thought, an empty chunk, then "You said: <prompt>"

Every prompt that ends `end_turn` sends a `usage_update` first and answers with `usage`,
as claude-code-acp does: USAGE below, per prompt. With $FAKE_ACP_DIR/report-cost present
the `usage_update` also says the session's cumulative `cost` in USD, COST_PER_PROMPT more
each prompt (kept beside the session's file, so a `session/load` goes on from it); `slow`
charges it, and sends that `usage_update`, after its first chunk, so a `slow` cancelled
later has cost it too; its `cancelled` answer then carries USAGE as well.

A tool still running when the prompt is cancelled is killed and reported `failed`
("stopped") before the `cancelled` answer, as ACP asks.

Sessions are kept in $FAKE_ACP_DIR/sessions/, so `session/load` works across processes
(it replays the session's prompts and replies as updates). Every start and every call
goes to $FAKE_ACP_DIR/log.jsonl. Files in $FAKE_ACP_DIR change the agent's ways:

    no-load         it cannot load sessions
    load-auth       `session/load` answers auth_required (-32000)
    hold-init       `initialize` waits until the file is gone
    die-in-init     it exits 4 in `initialize`, once: the file is removed as it does
    linger          stopped (SIGTERM, or its input closed) while the file is there, it
                    takes LINGER_S to exit, as an agent saving its session does; `term`
                    and `exit` are logged
    mcp-http        it takes http MCP servers (`mcpCapabilities.http`)

`session/new` and `session/load` log their `mcpServers` as the SDK parsed them.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from acp import (
    PROTOCOL_VERSION,
    Agent,
    InitializeResponse,
    NewSessionResponse,
    PromptResponse,
    RequestError,
    run_agent,
    start_tool_call,
    text_block,
    tool_content,
    update_agent_message_text,
    update_agent_thought_text,
    update_tool_call,
    update_user_message_text,
)
from acp.interfaces import Client
from acp.schema import (
    AgentCapabilities,
    AllowedOutcome,
    Cost,
    LoadSessionResponse,
    McpCapabilities,
    PermissionOption,
    ToolCallUpdate,
    Usage,
    UsageUpdate,
)

STATE = Path(os.environ["FAKE_ACP_DIR"])
SESSIONS = STATE / "sessions"
USAGE = Usage(
    input_tokens=20,
    output_tokens=10,
    cached_read_tokens=5,
    cached_write_tokens=3,
    total_tokens=38,
)
COST_PER_PROMPT = 0.25
QUERY_CLOSED = {"details": "Query closed before response received"}
RUST_PANIC = (
    """thread 'main' panicked at codex-rs/acp/src/main.rs:42:10:
called `Result::unwrap()` on an `Err` value: the model provider refused the API key
stack backtrace:
"""
    + "".join(
        f"  {i:>2}: core::ops::function::FnOnce::call_once{{vtable.shim}}\n"
        f"             at /rustc/90b35a6239c3d8bdabc530a6a0816f7ff89a0aaf/library/core/src/ops/"
        f"function.rs:{250 + i}:5\n"
        for i in range(30)
    )
    + "note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.\n"
)


async def run_command(command: str, cancelled: asyncio.Event) -> str | None:
    """`command`'s output, or None once the prompt is cancelled (the command is killed)."""
    # No stdin, as a real agent's tool: ours is capd's socket, and bash reads ~/.bashrc
    # when its stdin is a socket.
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    wait = asyncio.ensure_future(proc.communicate())
    stop = asyncio.ensure_future(cancelled.wait())
    await asyncio.wait([wait, stop], return_when=asyncio.FIRST_COMPLETED)
    if not wait.done():
        proc.kill()
        await wait
        return None
    stop.cancel()
    return wait.result()[0].decode().strip()


def dump_servers(servers: list[Any] | None) -> list[dict[str, Any]]:
    """`mcpServers` as the SDK parsed them (so in ACP's shapes), back as JSON."""
    return [s.model_dump(by_alias=True, exclude_none=True) for s in servers or []]


def log(entry: dict[str, Any]) -> None:
    with (STATE / "log.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")


def crash(code: int = 3) -> None:
    sys.stderr.write("fake acp agent: boom, the process fell over\n")
    sys.stderr.flush()
    os._exit(code)


class TestAgent(Agent):
    def __init__(self) -> None:
        self.client: Client | None = None
        self.cancelled: dict[str, asyncio.Event] = {}
        self.compaction_updates = False
        """The client takes compaction updates (its `session` capabilities: the SDK
        predates `compaction` and drops it)."""
        self.charged: set[str] = set()
        """The sessions whose prompt in progress has been charged COST_PER_PROMPT."""

    def on_connect(self, conn: Client) -> None:
        self.client = conn

    async def initialize(
        self, protocol_version: int, client_capabilities: Any = None, **kwargs: Any
    ) -> InitializeResponse:
        caps = (
            client_capabilities.model_dump(by_alias=True, exclude_none=True)
            if client_capabilities
            else None
        )
        log({"call": "initialize", "protocolVersion": protocol_version, "capabilities": caps})
        self.compaction_updates = bool(caps) and "session" in caps
        die = STATE / "die-in-init"
        if die.exists():
            die.unlink()
            crash(4)
        while (STATE / "hold-init").exists():
            await asyncio.sleep(0.01)
        can_load = not (STATE / "no-load").exists()
        return InitializeResponse(
            protocol_version=PROTOCOL_VERSION,
            agent_capabilities=AgentCapabilities(
                load_session=can_load,
                mcp_capabilities=McpCapabilities(http=(STATE / "mcp-http").exists()),
            ),
        )

    async def new_session(
        self, cwd: str, mcp_servers: Any = None, **kwargs: Any
    ) -> NewSessionResponse:
        session_id = f"sess-{uuid.uuid4().hex[:8]}"
        servers = dump_servers(mcp_servers)
        log({"call": "new_session", "cwd": cwd, "mcpServers": servers, "id": session_id})
        self._save(session_id, [])
        return NewSessionResponse(session_id=session_id)

    async def load_session(
        self, cwd: str, session_id: str, mcp_servers: Any = None, **kwargs: Any
    ) -> LoadSessionResponse:
        servers = dump_servers(mcp_servers)
        log({"call": "load_session", "cwd": cwd, "mcpServers": servers, "id": session_id})
        if (STATE / "load-auth").exists():
            raise RequestError(-32000, "Authentication required")
        path = SESSIONS / f"{session_id}.json"
        if not path.exists():
            raise RequestError(-32002, f"no session {session_id}")
        assert self.client is not None
        for prompt, reply in json.loads(path.read_text()):
            await self.client.session_update(session_id, update_user_message_text(prompt))
            await self.client.session_update(session_id, update_agent_message_text(reply))
        return LoadSessionResponse()

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        log({"call": "cancel", "id": session_id})
        self.cancelled.setdefault(session_id, asyncio.Event()).set()

    async def prompt(self, prompt: list[Any], session_id: str, **kwargs: Any) -> PromptResponse:
        texts = [block.text for block in prompt if getattr(block, "type", "") == "text"]
        log({"call": "prompt", "id": session_id, "texts": texts})
        cancelled = self.cancelled[session_id] = asyncio.Event()
        self.charged.discard(session_id)
        text = texts[-1]
        reply, stop = await self._answer(session_id, text, cancelled)
        if stop != "end_turn":
            spent = session_id in self.charged
            return PromptResponse(stop_reason=stop, usage=USAGE if spent else None)
        path = SESSIONS / f"{session_id}.json"
        self._save(session_id, [*json.loads(path.read_text()), [text, reply]])
        await self._usage_update(session_id)
        return PromptResponse(stop_reason=stop, usage=USAGE)

    async def _usage_update(self, session_id: str) -> None:
        """A `usage_update`; with report-cost, the session's cost, this prompt charged."""
        assert self.client is not None
        context = UsageUpdate(session_update="usage_update", used=33, size=200000)
        if (STATE / "report-cost").exists():
            path = SESSIONS / f"{session_id}.cost"
            total = float(path.read_text()) if path.exists() else 0.0
            if session_id not in self.charged:
                self.charged.add(session_id)
                total += COST_PER_PROMPT
                path.write_text(repr(total))
            context.cost = Cost(amount=total, currency="USD")
        await self.client.session_update(session_id, context)

    async def _answer(self, session_id: str, text: str, cancelled: asyncio.Event) -> Any:
        if text.startswith("slow"):
            count = int(text.split(":", 1)[1]) if ":" in text else 2000
            for said in range(count):
                if cancelled.is_set():
                    return "", "cancelled"
                await self._say(session_id, "tok ")
                if said == 0 and (STATE / "report-cost").exists():
                    await self._usage_update(session_id)
                await asyncio.sleep(0.02)
            return "tok " * count, "end_turn"
        if text.startswith("tool:"):
            return await self._tool(session_id, text.removeprefix("tool:"), cancelled)
        if text.startswith("quiet-tool:"):
            return await self._quiet_tool(session_id, text.removeprefix("quiet-tool:"), cancelled)
        if text.startswith("pair:"):
            return await self._pair(session_id, text.removeprefix("pair:"), cancelled)
        if text.startswith("dup-tool:"):
            return await self._dup_tool(session_id, text.removeprefix("dup-tool:"), cancelled)
        if text.startswith("late-input:"):
            return await self._late_input(session_id, text.removeprefix("late-input:"))
        if text.startswith("late-pair:"):
            return await self._late_pair(session_id, text.removeprefix("late-pair:"))
        if text in COMPACTIONS and self.compaction_updates:
            await self._compact(session_id, text)
        if text == "rpc-error":
            raise RequestError.internal_error(QUERY_CLOSED)
        if text == "rust-panic":
            sys.stderr.write(RUST_PANIC)
            sys.stderr.flush()
            os._exit(101)
        if text == "bg":
            await asyncio.create_subprocess_exec("sleep", "300")
            await self._say(session_id, "started")
            return "started", "end_turn"
        crashed = STATE / "crashed"
        if text == "crash" or (STATE / "crash-always").exists():
            (STATE / "crash-always").touch()
            await self._say(session_id, "about to ")
            crash()
        if text == "crash-once" and not crashed.exists():
            crashed.touch()
            await self._say(session_id, "about to ")
            crash()
        assert self.client is not None
        await self.client.session_update(session_id, update_agent_thought_text("hmm"))
        reply = f"You said: {text}"
        await self._say(session_id, "")  # as claude-agent-acp, which sends empty chunks
        for i in range(0, len(reply), 5):
            await self._say(session_id, reply[i : i + 5])
        return reply, "end_turn"

    async def _tool(self, session_id: str, command: str, cancelled: asyncio.Event) -> Any:
        assert self.client is not None
        call_id = f"call-{uuid.uuid4().hex[:6]}"
        start = start_tool_call(
            call_id,
            "Run a command",
            kind="execute",
            status="pending",
            raw_input={"command": command},
        )
        await self.client.session_update(session_id, start)
        options = [
            PermissionOption(option_id="allow", name="Allow", kind="allow_once"),
            PermissionOption(option_id="reject", name="Reject", kind="reject_once"),
        ]
        asked = ToolCallUpdate(tool_call_id=call_id, title="Run a command")
        answer = await self.client.request_permission(session_id, asked, options)
        outcome = answer.outcome
        log(
            {
                "call": "permission_answer",
                "outcome": outcome.model_dump(by_alias=True, exclude_none=True),
            }
        )
        if cancelled.is_set():
            return "", "cancelled"
        if not (isinstance(outcome, AllowedOutcome) and outcome.option_id == "allow"):
            denied = update_tool_call(
                call_id, status="failed", content=[tool_content(text_block("denied"))]
            )
            await self.client.session_update(session_id, denied)
            await self._say(session_id, "not allowed")
            return "not allowed", "end_turn"
        if not await self._run_tool(session_id, call_id, command, cancelled):
            return "", "cancelled"
        await self._say(session_id, "done")
        return "done", "end_turn"

    async def _quiet_tool(self, session_id: str, command: str, cancelled: asyncio.Event) -> Any:
        assert self.client is not None
        await self._say(session_id, "Running it.")
        call_id = f"call-{uuid.uuid4().hex[:6]}"
        start = start_tool_call(
            call_id, "Run a command", kind="execute", raw_input={"command": command}
        )
        await self.client.session_update(session_id, start)
        if not await self._run_tool(session_id, call_id, command, cancelled):
            return "", "cancelled"
        return "", "end_turn"

    async def _pair(self, session_id: str, command: str, cancelled: asyncio.Event) -> Any:
        assert self.client is not None
        calls = [f"call-{uuid.uuid4().hex[:6]}" for _ in range(2)]
        for call_id in calls:
            start = start_tool_call(
                call_id, "Run a command", kind="execute", raw_input={"command": command}
            )
            await self.client.session_update(session_id, start)
        runs = [self._run_tool(session_id, call_id, command, cancelled) for call_id in calls]
        if not all(await asyncio.gather(*runs)):
            return "", "cancelled"
        await self._say(session_id, "done")
        return "done", "end_turn"

    async def _dup_tool(self, session_id: str, command: str, cancelled: asyncio.Event) -> Any:
        assert self.client is not None
        call_id = f"toolu_{uuid.uuid4().hex[:6]}"
        placeholder = start_tool_call(
            call_id, "Terminal", kind="execute", status="pending", raw_input={}, content=[]
        )
        await self.client.session_update(session_id, placeholder)
        whole = start_tool_call(
            call_id,
            f"`{command}`",
            kind="execute",
            status="pending",
            raw_input={"command": command},
        )
        await self.client.session_update(session_id, whole)
        output = await run_command(command, cancelled)
        if output is None:
            return "", "cancelled"
        done = update_tool_call(
            call_id,
            status="completed",
            raw_output=output,
            content=[tool_content(text_block(output))],
        )
        await self.client.session_update(session_id, done)
        await self._say(session_id, "done")
        return "done", "end_turn"

    async def _late_input(self, session_id: str, command: str) -> Any:
        call_id = await self._announce_bash(session_id)
        await self._bash_input(session_id, call_id, command)
        await self._run_bash(session_id, call_id, command)
        await self._say(session_id, "done")
        return "done", "end_turn"

    async def _late_pair(self, session_id: str, command: str) -> Any:
        first = await self._announce_bash(session_id)
        await self._bash_input(session_id, first, command)
        second = await self._announce_bash(session_id)
        await self._run_bash(session_id, first, command)
        await self._bash_input(session_id, second, command)
        await self._run_bash(session_id, second, command)
        await self._say(session_id, "done")
        return "done", "end_turn"

    async def _announce_bash(self, session_id: str) -> str:
        """opencode's `tool_call`: its rawInput has only the cwd."""
        assert self.client is not None
        call_id = f"call_{uuid.uuid4().hex[:6]}"
        start = start_tool_call(
            call_id, "bash", kind="execute", status="pending", raw_input={"cwd": os.getcwd()}
        )
        await self.client.session_update(session_id, start)
        return call_id

    async def _bash_input(self, session_id: str, call_id: str, command: str) -> None:
        """opencode's first `tool_call_update`, which has the command."""
        assert self.client is not None
        raw_input = {"command": command, "description": "Runs it", "cwd": os.getcwd()}
        running = update_tool_call(
            call_id, status="in_progress", kind="execute", title=command, raw_input=raw_input
        )
        await self.client.session_update(session_id, running)

    async def _run_bash(self, session_id: str, call_id: str, command: str) -> None:
        assert self.client is not None
        proc = await asyncio.create_subprocess_exec(
            "bash",
            "-c",
            command,
            stdin=subprocess.DEVNULL,  # as in run_command
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = (await proc.communicate())[0].decode()
        done = update_tool_call(
            call_id,
            status="completed",
            title=command,
            content=[tool_content(text_block(output))],
            raw_output={"output": output, "metadata": {"exit": proc.returncode}},
        )
        await self.client.session_update(session_id, done)

    async def _run_tool(
        self, session_id: str, call_id: str, command: str, cancelled: asyncio.Event
    ) -> bool:
        """Run the command for the tool call and report how it ended; False if the prompt
        was cancelled while it ran."""
        assert self.client is not None
        running = update_tool_call(call_id, status="in_progress")
        await self.client.session_update(session_id, running)
        output = await run_command(command, cancelled)
        if output is None:
            stopped = update_tool_call(
                call_id, status="failed", content=[tool_content(text_block("stopped"))]
            )
            await self.client.session_update(session_id, stopped)
            return False
        done = update_tool_call(
            call_id, status="completed", content=[tool_content(text_block(output))]
        )
        await self.client.session_update(session_id, done)
        return True

    async def _compact(self, session_id: str, how: str) -> None:
        """Report a compaction as raw `session/update`s: the SDK predates them."""
        assert self.client is not None
        conn = self.client._conn
        update = {"sessionUpdate": "compaction_update", "compactionId": "cmp_001"}
        chunk = {"sessionUpdate": "compaction_summary_chunk", "compactionId": "cmp_001"}
        updates: list[dict[str, Any]] = [{**update, "status": "in_progress"}]
        if how == "compact-auto":
            for piece in (SUMMARY[:10], SUMMARY[10:]):
                updates.append({**chunk, "content": {"type": "text", "text": piece}})
            # claude-agent-acp 0.101 repeats the terminal update, status only.
            updates += [{**update, "status": "completed"}, {**update, "status": "completed"}]
        elif how == "compact-silent":
            updates = [{**update, "status": "completed"}]
        else:
            updates.append({**update, "status": "failed", "error": "the model refused"})
        for body in updates:
            await conn.send_notification(
                "session/update", {"sessionId": session_id, "update": body}
            )

    async def _say(self, session_id: str, text: str) -> None:
        assert self.client is not None
        await self.client.session_update(session_id, update_agent_message_text(text))

    def _save(self, session_id: str, turns: list[Any]) -> None:
        SESSIONS.mkdir(exist_ok=True)
        (SESSIONS / f"{session_id}.json").write_text(json.dumps(turns))


COMPACTIONS = ("compact-auto", "compact-silent", "compact-failed")
SUMMARY = "The user said hello, then asked to compact."


LINGER_S = 1.5
"""Below capd's KILL_GRACE_S, which would cut it short."""


def linger(*_: Any) -> None:
    log({"term": os.getpid()})
    if (STATE / "linger").exists():
        time.sleep(LINGER_S)
    log({"exit": os.getpid()})
    os._exit(0)


def main() -> None:
    log({"argv": sys.argv[1:], "pid": os.getpid(), "pgid": os.getpgid(0), "cwd": os.getcwd()})
    if (STATE / "linger").exists():
        signal.signal(signal.SIGTERM, linger)
    asyncio.run(run_agent(TestAgent()))
    if (STATE / "linger").exists():
        linger()


if __name__ == "__main__":
    main()
