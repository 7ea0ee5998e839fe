"""Rewind (§11) through a real capd and the local OpenAI-compatible server: what the model
reads after a rewind, an undone rewind, a rewind across a compaction and a restart, a
paused turn rewound, and the refusals."""

import asyncio
import hashlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.engine_scaffold import (
    STAND_IN_ACP_AGENT,
    STAND_IN_CLAUDE,
    StandIn,
    engine_starts,
    spawn_on_engine,
    stand_in_log,
)
from tests.fakes.openai_server import OpenAITestServer, TextReply
from tests.fakes.sse_server import HeldReply
from tests.helpers import (
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    pause_turn,
    run_turn,
    scripted,
    sleeper,
    spawn,
    until,
    wait_for,
)
from tests.test_capctl import capctl, ok

pytestmark = pytest.mark.shared_capd


@pytest.fixture
async def server() -> AsyncIterator[OpenAITestServer]:
    async with OpenAITestServer() as srv:
        yield srv


def _model(server: OpenAITestServer) -> dict[str, object]:
    return {"provider": "openai", "name": "test-model", "base_url": server.base_url}


def _said(request: dict[str, Any]) -> list[str]:
    """What the model was given, message by message, the system prompt left out."""
    return [str(m.get("content") or "") for m in request["messages"] if m["role"] != "system"]


async def _turns(pod: Any, server: OpenAITestServer, *tags: str) -> list[str]:
    """One finished turn per tag (`ALPHA` → the model answers `alpha done`); their ids."""
    ids = []
    for tag in tags:
        server.enqueue(TextReply(f"{tag.lower()} done"))
        end, _ = await run_turn(pod, tag)
        assert end["result"] == "finished"
        ids.append(end["turn_id"])
    return ids


async def _rewind(pod: Any, turn_id: str, **fields: Any) -> dict[str, Any]:
    await pod.request({"method": "rewind", "turn_id": turn_id, **fields})
    event, _ = await wait_for(pod, is_event("rewound"))
    return event


async def test_after_a_rewind_the_model_reads_only_what_came_before_that_turn(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        _, bravo, _ = await _turns(pod, server, "ALPHA", "BRAVO", "CHARLIE")
        rewound = await _rewind(pod, bravo)
        assert rewound["to_turn_id"] == bravo
        assert (rewound["files_restored"], rewound["new_session"]) == (False, False)
        await _turns(pod, server, "DELTA")
        history = await full_history(pod)
    assert _said(server.requests[-1]) == ["ALPHA", "alpha done", "DELTA"]
    # Nothing left the history: the rewound turns are still there, in order.
    texts = [e["text"] for e in history if e["event"] == "user_message"]
    assert texts == ["ALPHA", "BRAVO", "CHARLIE", "DELTA"]
    starts = {e["turn_id"]: e["seq"] for e in history if e["event"] == "turn_start"}
    assert rewound["to_seq"] == starts[bravo]


async def test_a_rewind_is_undone_by_rewinding_to_a_later_turn(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        alpha, _, charlie = await _turns(pod, server, "ALPHA", "BRAVO", "CHARLIE")
        await _rewind(pod, alpha)
        (delta,) = await _turns(pod, server, "DELTA")
        assert _said(server.requests[-1]) == ["DELTA"]
        # Back to before CHARLIE: ALPHA and BRAVO again, DELTA (after the first rewind) gone.
        await _rewind(pod, charlie)
        await _turns(pod, server, "ECHO")
        assert _said(server.requests[-1]) == ["ALPHA", "alpha done", "BRAVO", "bravo done", "ECHO"]
        # And to a turn made after a rewind: its context had the first rewind in it.
        await _rewind(pod, delta)
        await _turns(pod, server, "FOXTROT")
    assert _said(server.requests[-1]) == ["FOXTROT"]


@pytest.mark.own_capd
async def test_a_restart_keeps_the_rewound_context_also_across_a_compaction(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    """The compaction after BRAVO summarises ALPHA and BRAVO; rewinding to before BRAVO
    takes the context back past it, and a restart (which reads from the compaction on)
    rebuilds the same context."""
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        _, bravo = await _turns(pod, server, "ALPHA", "BRAVO")
        server.enqueue(TextReply("SUMMARY of alpha and bravo"))
        await pod.request({"method": "compact"})
        await _turns(pod, server, "CHARLIE")
        assert _said(server.requests[-1])[1:] == ["CHARLIE"]
        await _rewind(pod, bravo)
    capd.stop()
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "w1") as pod:
        status = await pod.request({"method": "status"})
        assert status["status"] == "idle"
        await _turns(pod, server, "DELTA")
    assert _said(server.requests[-1]) == ["ALPHA", "alpha done", "DELTA"]


async def test_rewinding_a_paused_turn_cancels_it_first(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        await _turns(pod, server, "ALPHA")
        server.enqueue(HeldReply(TextReply("never sent"), asyncio.Event()))
        started = await pod.request({"method": "run", "text": "BRAVO"})
        await until(lambda: len(server.requests) == 2)
        await pause_turn(pod)
        await pod.request({"method": "rewind", "turn_id": started["turn_id"]})
        end, seen = await wait_for(pod, is_event("rewound"))
        ended = [e for e in seen if e["event"] == "turn_end"]
        assert [(e["turn_id"], e["result"]) for e in ended] == [(started["turn_id"], "cancelled")]
        assert (await pod.request({"method": "status"}))["status"] == "idle"
        await _turns(pod, server, "CHARLIE")
    assert _said(server.requests[-1]) == ["ALPHA", "alpha done", "CHARLIE"]
    assert end["to_turn_id"] == started["turn_id"]


async def test_rewind_refuses_a_running_pod_an_unknown_turn_and_files_without_a_checkpoint(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server), workspace={"checkpoints": False})
    async with await connect_pod(capd, "w1") as pod:
        (alpha,) = await _turns(pod, server, "ALPHA")
        with pytest.raises(ProtocolError) as unknown:
            await pod.request({"method": "rewind", "turn_id": "t-nosuchturn"})
        assert unknown.value.code == "not_found"
        assert "capctl log w1" in unknown.value.message
        with pytest.raises(ProtocolError) as no_files:
            await pod.request({"method": "rewind", "turn_id": alpha, "files": True})
        assert no_files.value.code == "invalid_request"
        server.enqueue(HeldReply(TextReply("never sent"), asyncio.Event()))
        await pod.request({"method": "run", "text": "BRAVO"})
        await until(lambda: len(server.requests) == 2)
        with pytest.raises(ProtocolError) as running:
            await pod.request({"method": "rewind", "turn_id": alpha})
        assert running.value.code == "already_running"
        await pod.request({"method": "cancel"})
        await wait_for(pod, is_event("turn_end"))
        history = await full_history(pod)
    assert "rewound" not in [e["event"] for e in history]


@pytest.mark.parametrize("stand_in", [STAND_IN_CLAUDE, STAND_IN_ACP_AGENT], ids=lambda s: s.kind)
async def test_an_external_engine_goes_on_in_a_new_session_primed_with_the_kept_turns(
    capd: CapdProcess, tmp_path: Path, stand_in: StandIn
) -> None:
    await spawn_on_engine(capd, "ext", stand_in.engine(tmp_path))
    async with await connect_pod(capd, "ext") as pod:
        await run_turn(pod, "ALPHA")
        second, _ = await run_turn(pod, "BRAVO")
        rewound = await _rewind(pod, second["turn_id"])
        end, _ = await run_turn(pod, "CHARLIE")
        history = await full_history(pod)
    assert rewound["new_session"] is True
    assert end["result"] == "finished"
    first, after = [e["session_id"] for e in history if e["event"] == "engine_session"]
    assert first != after
    starts = engine_starts(tmp_path)
    assert len(starts) == 2
    assert "--resume" not in starts[1]["argv"]
    prompt = _last_prompt(tmp_path)
    assert prompt.startswith("[capd: this conversation was rewound")
    assert "ALPHA" in prompt
    assert prompt.endswith("CHARLIE")
    assert "BRAVO" not in prompt


async def test_a_rewind_to_the_first_turn_starts_the_new_session_with_the_prompt_alone(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn_on_engine(capd, "ext", STAND_IN_CLAUDE.engine(tmp_path))
    async with await connect_pod(capd, "ext") as pod:
        first, _ = await run_turn(pod, "ALPHA")
        await _rewind(pod, first["turn_id"])
        await run_turn(pod, "BRAVO")
    assert _last_prompt(tmp_path) == "BRAVO"


@pytest.mark.own_capd
async def test_a_restart_between_the_rewind_and_the_next_turn_still_primes_the_session(
    capd: CapdProcess, tmp_path: Path
) -> None:
    await spawn_on_engine(capd, "ext", STAND_IN_CLAUDE.engine(tmp_path))
    async with await connect_pod(capd, "ext") as pod:
        await run_turn(pod, "ALPHA")
        second, _ = await run_turn(pod, "BRAVO")
        await _rewind(pod, second["turn_id"])
    capd.stop()
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "ext") as pod:
        end, _ = await run_turn(pod, "CHARLIE")
    assert end["result"] == "finished"
    prompt = _last_prompt(tmp_path)
    assert prompt.startswith("[capd: this conversation was rewound")
    assert "ALPHA" in prompt
    assert "BRAVO" not in prompt


def _last_prompt(state: Path) -> str:
    """The text of the last prompt a stand-in read (Claude Code's user message, the ACP
    agent's prompt blocks)."""
    for entry in reversed(stand_in_log(state)):
        read = entry.get("read") or {}
        if read.get("type") == "user":
            return str(read["message"]["content"])
        if entry.get("call") == "prompt":
            return "\n\n".join(entry["texts"])
    raise AssertionError("the stand-in read no prompt")


async def test_capctl_log_shows_the_turn_ids_capctl_rewind_takes(
    capd: CapdProcess, server: OpenAITestServer
) -> None:
    await spawn(capd, "w1", _model(server))
    async with await connect_pod(capd, "w1") as pod:
        alpha, bravo = await _turns(pod, server, "ALPHA", "BRAVO")
    log = await asyncio.to_thread(ok, capd.runtime_dir, "log", "w1")
    assert f"── turn {alpha} (run)" in log
    assert f"── turn {bravo} (run)" in log
    said = await asyncio.to_thread(ok, capd.runtime_dir, "rewind", "w1", bravo)
    assert said == f"rewound w1 to before turn {bravo}\n"
    log = await asyncio.to_thread(ok, capd.runtime_dir, "log", "w1")
    assert log.rstrip().endswith(f"── rewound context to before turn {bravo}")
    refused = await asyncio.to_thread(capctl, capd.runtime_dir, "rewind", "w1", "t-none")
    assert refused.returncode == 1
    assert (
        refused.stderr
        == "capctl: not_found: pod w1 has no turn t-none; `capctl log w1` shows its turns\n"
    )


# -- files ------------------------------------------------------------------------------


def _bash(command: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}


def _write(path: str, content: str) -> dict[str, Any]:
    return {"tool_calls": [{"name": "write_file", "arguments": {"path": path, "content": content}}]}


def _files(root: Path) -> dict[str, str]:
    """Every file under `root` but the user's .git, with its text."""
    return {
        str(path.relative_to(root)): path.read_text()
        for path in sorted(root.rglob("*"))
        if path.is_file() and ".git" not in path.relative_to(root).parts
    }


async def _checkpointed_turn(pod: Any, text: str) -> str:
    """Run a turn; its id, once it finished and its files were checkpointed."""
    end, seen = await run_turn(pod, text)
    assert end["result"] == "finished"
    assert [e["event"] for e in seen].count("checkpoint") == 1
    return str(end["turn_id"])


async def test_rewind_with_files_undoes_file_tools_bash_and_a_child(
    capd: CapdProcess, tmp_path: Path
) -> None:
    cwd = tmp_path / "work"
    (cwd / "sub").mkdir(parents=True)
    (cwd / "keep.txt").write_text("kept\n")
    (cwd / "gone.txt").write_text("deleted by bash\n")
    before = _files(cwd)
    model = scripted(
        _write("keep.txt", "changed by write_file"),
        {"text": "wrote"},
        _bash("rm gone.txt && echo new > new.txt && mkdir -p deep/er && echo x > deep/er/x"),
        {"text": "bashed"},
    )
    await spawn(capd, "w1", model, cwd=str(cwd), tools=["bash", "write_file"])
    child = scripted(_write("child.txt", "by the child"), {"text": "child done"})
    async with await connect_pod(capd, "w1") as pod:
        first = await _checkpointed_turn(pod, "write")
        await _checkpointed_turn(pod, "bash")
        await spawn(capd, "kid", child, cwd=str(cwd / "sub"), tools=["write_file"])
        await daemon_request(
            capd,
            {
                "method": "spawn",
                "manifest": {"name": "kid2", "model": child, "cwd": str(cwd / "sub")},
                "parent": str(capd.pod_socket("w1")),
            },
        )
        async with await connect_pod(capd, "kid") as kid:
            await run_turn(kid, "write")
        assert (cwd / "sub" / "child.txt").exists()
        rewound = await _rewind(pod, first, files=True)
    assert rewound["files_restored"] is True
    assert _files(cwd) == before
    assert not (cwd / "deep").exists()


async def test_rewind_with_files_leaves_the_users_repository_as_it_was(
    capd: CapdProcess, tmp_path: Path
) -> None:
    cwd = tmp_path / "repo"
    cwd.mkdir()
    git = _git_in(cwd)
    git("init", "-q", "-b", "main")
    (cwd / ".gitignore").write_text("build/\n")
    (cwd / "src.py").write_text("print(1)\n")
    git("add", ".")
    git("commit", "-qm", "first")
    (cwd / "src.py").write_text("print(2)\n")
    git("stash", "-q")
    (cwd / "staged.py").write_text("staged\n")
    git("add", "staged.py")
    (cwd / "build").mkdir()
    (cwd / "build" / "out.o").write_text("built\n")
    repo_before = _repository(cwd)
    files_before = _files(cwd)
    model = scripted(
        _bash(
            "echo broken > src.py && rm staged.py && echo junk > junk.txt && echo re > build/out.o"
        ),
        {"text": "broke it"},
    )
    await spawn(capd, "w1", model, cwd=str(cwd), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        turn = await _checkpointed_turn(pod, "break things")
        await _rewind(pod, turn, files=True)
    assert _repository(cwd) == repo_before
    # The ignored build output is not the checkpoint's: the rewind leaves it as it is.
    assert _files(cwd) == {**files_before, "build/out.o": "re\n"}


@pytest.mark.own_capd
async def test_a_paused_turn_is_rewound_with_its_files_also_after_a_restart(
    capd: CapdProcess, tmp_path: Path
) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "a.txt").write_text("before\n")
    model = scripted(_bash("echo during > a.txt && echo b > b.txt && sleep 30"))
    await spawn(capd, "w1", model, cwd=str(cwd), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        started = await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, is_event("checkpoint"))
        await until(lambda: (cwd / "b.txt").exists())
        await pause_turn(pod)
    capd.stop()
    await asyncio.to_thread(capd.start)
    async with await connect_pod(capd, "w1") as pod:
        assert (await pod.request({"method": "status"}))["status"] == "paused"
        await _rewind(pod, started["turn_id"], files=True)
        history = await full_history(pod)
    assert _files(cwd) == {"a.txt": "before\n"}
    ends = [e["result"] for e in history if e["event"] == "turn_end"]
    assert ends == ["cancelled"]


@pytest.mark.parametrize("busy", ["child", "parent"])
async def test_rewinding_files_is_refused_while_another_pod_runs_in_the_tree(
    capd: CapdProcess, tmp_path: Path, busy: str
) -> None:
    """A child of the rewinding pod, or the parent of a rewinding child: either works in
    the same files."""
    cwd = tmp_path / "work"
    cwd.mkdir()
    models = {"boss": scripted({"text": "hi"}), "kid": scripted({"text": "hi"})}
    models["kid" if busy == "child" else "boss"] = sleeper()
    await spawn(capd, "boss", models["boss"], cwd=str(cwd), tools=["bash"])
    await daemon_request(
        capd,
        {
            "method": "spawn",
            "manifest": {"name": "kid", "model": models["kid"], "cwd": str(cwd), "tools": ["bash"]},
            "parent": str(capd.pod_socket("boss")),
        },
    )
    rewinding, running = ("boss", "kid") if busy == "child" else ("kid", "boss")
    async with (
        await connect_pod(capd, rewinding) as pod,
        await connect_pod(capd, running) as other,
    ):
        turn = await _checkpointed_turn(pod, "hello")
        (cwd / "theirs.txt").write_text("written by the running pod\n")
        # The kid's finished turn may already have woken the boss with its report.
        await other.request({"method": "run", "text": "sleep", "if_busy": "queue"})
        await wait_for(other, is_event("tool_call_start"))
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "rewind", "turn_id": turn, "files": True})
        await other.request({"method": "cancel"})
    assert refused.value.code == "invalid_request"
    assert f"pod {running} is running in the files of pod {rewinding}" in refused.value.message
    assert (cwd / "theirs.txt").exists()


def _git_in(cwd: Path) -> Callable[..., str]:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd.parent),
        "GIT_AUTHOR_NAME": "u",
        "GIT_AUTHOR_EMAIL": "u@example.com",
        "GIT_COMMITTER_NAME": "u",
        "GIT_COMMITTER_EMAIL": "u@example.com",
    }

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, check=True)
        return done.stdout.decode()

    return git


def _repository(cwd: Path) -> dict[str, str]:
    """What a user sees of their repository: HEAD, refs, stash, index, status."""
    git = _git_in(cwd)
    return {
        "head": git("rev-parse", "HEAD"),
        "refs": git("for-each-ref"),
        "stash": git("stash", "list"),
        "index": hashlib.sha256((cwd / ".git" / "index").read_bytes()).hexdigest(),
        "status": git("status", "--porcelain", "--ignored"),
    }


async def test_a_checkpoint_past_its_bounds_is_skipped_and_the_turn_runs(
    capd: CapdProcess, tmp_path: Path
) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    for name in ("a", "b", "c"):
        (cwd / name).write_text(name)
    workspace = {"checkpoint_max_files": 2}
    model = scripted(_bash("echo hi"), {"text": "done"})
    await spawn(capd, "w1", model, cwd=str(cwd), tools=["bash"], workspace=workspace)
    async with await connect_pod(capd, "w1") as pod:
        end, seen = await run_turn(pod, "go")
        with pytest.raises(ProtocolError) as refused:
            await pod.request({"method": "rewind", "turn_id": end["turn_id"], "files": True})
    [skipped] = [e for e in seen if e["event"] == "checkpoint_skipped"]
    assert "workspace.checkpoint_max_files" in skipped["reason"]
    assert end["result"] == "finished"
    assert "checkpoint_skipped event" in refused.value.message


async def test_deleting_a_pod_deletes_its_checkpoints_and_leaves_its_files(
    capd: CapdProcess, tmp_path: Path
) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "a.txt").write_text("a\n")
    await spawn(capd, "w1", scripted({"text": "hi"}), cwd=str(cwd), tools=["bash"])
    async with await connect_pod(capd, "w1") as pod:
        await _checkpointed_turn(pod, "hello")
    store = capd.state_dir / "pods" / "w1" / "checkpoints"
    assert (store / "ck.git" / "HEAD").is_file()
    await daemon_request(capd, {"method": "delete", "name": "w1"})
    assert not store.exists()
    assert _files(cwd) == {"a.txt": "a\n"}
