"""The bwrap command line a confinement builds, run for real where it matters (the order
of mounts), and the start-up probe with its one-line refusal."""

import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from capctl.render import sandbox_line
from capd.proc.leftovers import OWNER_ENV
from capd.proc.sandbox import (
    Confinement,
    PathMoved,
    SandboxRefused,
    candidates,
    confinement,
    probe,
    refusal,
)
from capd.tools.base import ToolContext, ToolOutcome
from protocol.manifest import DEFAULT_SANDBOX_ENV, Sandbox
from tests.helpers import run_tool


def _working_bwrap() -> str | None:
    with tempfile.TemporaryDirectory() as scratch:
        return probe(candidates(None), Path(scratch)).path


BWRAP = _working_bwrap()
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="no working bwrap on this host")


def _argv(conf: Confinement, command: list[str]) -> list[str]:
    """`conf.wrap(command)`'s command line, each fd it binds shown as "FD" (and closed)."""
    wrapped = conf.wrap(command)
    wrapped.close()
    fds = {str(fd) for fd in wrapped.fds}
    return [
        "FD" if arg in fds and wrapped.argv[i - 1].endswith("-fd") else arg
        for i, arg in enumerate(wrapped.argv)
    ]


def _run(
    conf: Confinement, script: str, shim: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """`script` run by sh in `conf`, as capd launches it (behind `shim`, as the limits'
    shim runs bwrap)."""
    wrapped = conf.wrap(["sh", "-c", script])
    try:
        return subprocess.run(
            [*shim, *wrapped.argv],
            cwd="/",
            env=conf.environment(),
            pass_fds=wrapped.fds,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
    finally:
        wrapped.close()


def _pairs(argv: list[str], flag: str) -> list[str]:
    """The values given to each `flag` in `argv`, in order."""
    return [argv[i + 1] for i, arg in enumerate(argv) if arg == flag]


def _index(argv: list[str], *args: str) -> int:
    """Where the sequence `args` starts in `argv`."""
    n = len(args)
    return next(i for i in range(len(argv)) if argv[i : i + n] == list(args))


def test_mounts_go_parents_first_and_hidden_dirs_go_read_only_after_their_binds(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    cwd = state / "pods" / "p" / "work"
    spill = state / "pods" / "p" / "spill"
    for path in (cwd, spill):
        path.mkdir(parents=True)
    conf = Confinement("bwrap", "workspace-write", True, cwd, hidden=(state,), shown=(spill,))
    argv = _argv(conf, ["bash", "-c", "true"])
    assert argv[:8] == ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    tmp = _index(argv, "--tmpfs", "/tmp")
    hide = _index(argv, "--tmpfs", str(state))
    bind = _index(argv, "--bind-fd", "FD", str(cwd))
    show = _index(argv, "--ro-bind-fd", "FD", str(spill))
    remount = _index(argv, "--remount-ro", str(state))
    assert tmp < hide < bind < remount
    assert hide < show < remount
    assert argv[argv.index("--chdir") + 1] == str(cwd)
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"):
        assert flag in argv
    assert _index(argv, "--cap-drop", "ALL")
    assert "--share-net" in argv
    assert "--new-session" not in argv
    assert _pairs(argv, "--unsetenv") == [OWNER_ENV]
    assert argv[argv.index("--") :] == ["--", "bash", "-c", "true"]


def test_read_only_binds_the_cwd_read_only_and_no_network_shares_none(tmp_path: Path) -> None:
    conf = Confinement("bwrap", "read-only", False, tmp_path, writable=())
    argv = _argv(conf, ["true"])
    assert "--bind-fd" not in argv
    assert _index(argv, "--ro-bind-fd", "FD", str(tmp_path))
    assert "--share-net" not in argv
    assert conf.writable_paths() == []


def test_a_hidden_file_is_covered_with_dev_null_and_a_missing_path_is_left_out(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "netrc"
    secret.write_text("password")
    missing = tmp_path / "nothing-here"
    conf = Confinement("bwrap", "workspace-write", True, tmp_path, hidden=(secret, missing))
    argv = _argv(conf, ["true"])
    assert _index(argv, "--ro-bind", "/dev/null", str(secret))
    assert str(missing) not in argv


def test_the_environment_holds_only_allowed_variables_and_home_moves_when_hidden(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SOME_API_KEY", "secret")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    conf = Confinement("bwrap", "workspace-write", True, tmp_path / "w")
    env = conf.environment({"SERVER_TOKEN": "t"})
    assert set(env) <= {*DEFAULT_SANDBOX_ENV, "TMPDIR", "SERVER_TOKEN"}
    assert env["HOME"] == str(tmp_path / "home")
    assert (env["TMPDIR"], env["SERVER_TOKEN"], env["PATH"]) == ("/tmp", "t", "/usr/bin:/bin")
    hidden = Confinement("bwrap", "workspace-write", True, tmp_path / "w", hidden=(tmp_path,))
    assert hidden.environment()["HOME"] == "/tmp"
    monkeypatch.delenv("HOME")
    assert conf.environment()["HOME"] == "/tmp"


@needs_bwrap
def test_a_cwd_inside_a_hidden_dir_under_tmp_is_shown_again_and_writable(tmp_path: Path) -> None:
    """Real runs: `--tmpfs /tmp` after the binds would hide a cwd under /tmp; the hidden
    state dir around the cwd shows nothing else and takes no writes."""
    assert BWRAP is not None
    state = tmp_path / "state"
    cwd = state / "pods" / "p" / "work"
    cwd.mkdir(parents=True)
    (state / "capd.db").write_text("secret")
    conf = Confinement(BWRAP, "workspace-write", False, cwd, hidden=(state,))
    script = (
        "touch made && ls -A ../../.. && "
        "(cat ../../../capd.db 2>&1; mkdir ../../../x 2>&1; touch /etc/x 2>&1) | sort"
    )
    done = _run(conf, script)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "pods"
    assert "No such file or directory" in lines[1]
    assert all("Read-only file system" in line for line in lines[2:]), lines
    assert (cwd / "made").exists()
    assert not (state / "x").exists()


def test_a_bwrap_that_fails_gives_its_first_line_and_a_fix(tmp_path: Path) -> None:
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: setting up uid map: Permission denied' >&2\nexit 1\n")
    fake.chmod(0o755)
    state = tmp_path / "state"
    state.mkdir()
    backend = probe([str(fake), str(tmp_path / "missing")], state)
    assert backend.path is None
    assert backend.failures == [
        f"{fake}: setting up uid map: Permission denied",
        f"{tmp_path / 'missing'}: cannot run {tmp_path / 'missing'}: No such file or directory",
    ]
    assert backend.refusal.startswith(
        "sandbox: bwrap cannot start here: setting up uid map: Permission denied; AppArmor"
    )
    assert backend.refusal.endswith("or set sandbox.mode: off")
    assert "\n" not in backend.refusal
    assert list(state.iterdir()) == []  # the probe's directory is gone


@pytest.mark.parametrize(
    ("line", "hint"),
    [
        ("No permission to create new namespace: Operation not permitted", "user namespaces"),
        (
            "Creating new namespace failed: nesting depth or /proc/sys/user/max_*_namespaces "
            "exceeded (ENOSPC)",
            "user.max_user_namespaces",
        ),
        ("Can't mount proc on /newroot/proc: Operation not permitted", "ProtectKernelTunables"),
        ("Unknown option --bind-fd", "bubblewrap 0.8 or later"),
        ("something else", "README's Sandbox section"),
    ],
)
def test_each_known_failure_has_its_own_fix(line: str, hint: str) -> None:
    assert hint in refusal(line)


@needs_bwrap
def test_a_working_candidate_after_a_failing_one_is_kept(tmp_path: Path) -> None:
    assert BWRAP is not None
    backend = probe([str(tmp_path / "missing"), BWRAP], tmp_path)
    assert backend.path == BWRAP
    assert backend.version is not None
    assert backend.version.startswith("bubblewrap")
    assert len(backend.failures) == 1


def test_capctl_status_shows_the_sandbox_in_a_line() -> None:
    box = {"mode": "workspace-write", "network": True, "backend": "bwrap", "limits": "none"}
    assert sandbox_line(box) == "workspace-write, network on, bwrap"
    box = {**box, "mode": "read-only", "network": False, "limits": "cgroup1"}
    assert sandbox_line(box) == "read-only, network off, bwrap, limits cgroup1"
    assert sandbox_line({"mode": "off", "backend": "none"}) == "off (not confined)"


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """capd's state dir, holding a secret, and a pod's cwd beside it."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "secret").write_text("API_KEY=xyz\n")
    cwd = tmp_path / "pod"
    cwd.mkdir()
    return state, cwd


def _confine(cwd: Path, state: Path, **sandbox: object) -> Confinement:
    assert BWRAP is not None
    return confinement(Sandbox.model_validate(sandbox), bwrap=BWRAP, cwd=cwd, capd_dirs=[state])


@needs_bwrap
def test_paths_a_manifest_names_are_resolved_anew_where_capds_own_are_not(
    tmp_path: Path,
) -> None:
    """capd's own directories are resolved once (`fixed_real_path`): a spawn needs them and
    they do not move. A hidden or writable path a manifest names is resolved at each
    confinement, so a symlink swapped between two spawns is followed where it points now."""
    state, cwd = _tree(tmp_path)
    first, second, link = tmp_path / "first", tmp_path / "second", tmp_path / "link"
    first.mkdir()
    second.mkdir()
    link.symlink_to(first)
    before = _confine(cwd, state, hidden=[str(link)])
    link.unlink()
    link.symlink_to(second)
    after = _confine(cwd, state, hidden=[str(link)])
    assert (first in before.hidden, second in after.hidden) == (True, True)
    assert first not in after.hidden
    assert (state in before.hidden, state in after.hidden) == (True, True)


@needs_bwrap
def test_a_writable_path_under_the_cwd_swapped_for_a_symlink_binds_nothing(
    tmp_path: Path,
) -> None:
    """Review 19 #1: `writable: [<cwd>/build]`, missing at spawn, made a relative symlink
    to capd's state dir by one call, must not bind the state dir writable in the next."""
    state, cwd = _tree(tmp_path)
    conf = _confine(cwd, state, writable=[str(cwd / "build")])
    assert conf.writable_paths() == [cwd]  # inside the cwd: adds nothing
    assert _run(conf, "ln -s ../state build").returncode == 0
    done = _run(conf, f"cat {state}/secret; echo pwned > build/written")
    assert "API_KEY" not in done.stdout
    assert sorted(os.listdir(state)) == ["secret"]


@needs_bwrap
def test_a_nested_writable_path_whose_parent_was_renamed_binds_nothing(tmp_path: Path) -> None:
    """#1, existing at spawn under another writable path: `mv out out.old && mkdir out &&
    ln -s ../../state out/build`."""
    state, cwd = _tree(tmp_path)
    shared = tmp_path / "shared"
    (shared / "out" / "build").mkdir(parents=True)
    conf = _confine(cwd, state, writable=[str(shared / "out" / "build"), str(shared)])
    assert conf.writable_paths() == [cwd, shared]
    swap = f"cd {shared} && mv out out.old && mkdir out && ln -s ../../state out/build"
    assert _run(conf, swap).returncode == 0
    done = _run(conf, f"cat {state}/secret; echo pwned > {shared}/out/build/written")
    assert "API_KEY" not in done.stdout
    assert sorted(os.listdir(state)) == ["secret"]


@needs_bwrap
@pytest.mark.parametrize("swapped", ["cwd", "writable"])
def test_a_bound_path_renamed_from_outside_refuses_the_call(tmp_path: Path, swapped: str) -> None:
    """#1 and #13: another pod (a parent whose cwd holds this pod's cwd or writable path)
    swaps it for a relative symlink to a hidden dir: the call is refused in one line, and
    nothing was bound through the link."""
    state, _ = _tree(tmp_path)
    boss = tmp_path / "boss"
    (boss / "sub").mkdir(parents=True)
    (boss / "out").mkdir()
    if swapped == "cwd":
        conf, path = _confine(boss / "sub", state), boss / "sub"
    else:
        conf, path = _confine(tmp_path / "pod", state, writable=[str(boss / "out")]), boss / "out"
    assert _run(conf, "true").returncode == 0
    path.rename(path.with_name("old"))
    path.symlink_to("../state")
    with pytest.raises(PathMoved) as refused:
        conf.wrap(["true"])
    assert str(refused.value).startswith(f"sandbox: {path} is now a symlink or not a directory")
    assert "\n" not in str(refused.value)
    path.unlink()  # gone: a missing cwd refuses the call, a missing writable path is not bound
    if swapped == "cwd":
        with pytest.raises(PathMoved, match=re.escape(f"sandbox: {path} is gone")):
            conf.wrap(["true"])
    else:
        assert str(path) not in _argv(conf, ["true"])
    assert sorted(os.listdir(state)) == ["secret"]


@pytest.mark.parametrize("where", ["cwd", "writable"])
def test_a_hidden_path_inside_a_writable_one_is_refused(tmp_path: Path, where: str) -> None:
    """Review 19 #2: the pod could rename its parent and so unhide it."""
    root = tmp_path / "pod" if where == "cwd" else tmp_path / "out"
    writable = [] if where == "cwd" else [str(root)]
    secret = root / "a" / "secrets"
    with pytest.raises(SandboxRefused) as refused:
        _confine(tmp_path / "pod", tmp_path / "state", writable=writable, hidden=[str(secret)])
    what = "writable cwd" if where == "cwd" else "writable"
    assert str(refused.value) == (
        f"sandbox.hidden {secret} lies inside the {what} {root}, where the pod could rename "
        f"it into view; move it out of {root}"
    )
    read_only = _confine(
        tmp_path / "pod", tmp_path / "state", mode="read-only", hidden=[str(secret)]
    )
    assert read_only.hidden[-1] == secret  # nothing of a read-only cwd can be renamed


def test_writable_paths_with_mode_read_only_are_refused(tmp_path: Path) -> None:
    """Review 19 #19."""
    with pytest.raises(
        SandboxRefused, match=r"sandbox\.writable has no effect with mode read-only"
    ):
        _confine(tmp_path, tmp_path / "state", mode="read-only", writable=[str(tmp_path / "o")])


@needs_bwrap
def test_a_hidden_unix_socket_cannot_be_reached(tmp_path: Path) -> None:
    """Review 19 #9: a hidden path that is neither a directory nor a file is covered too."""
    sock_path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen()
    cwd = tmp_path / "pod"
    cwd.mkdir()
    conf = _confine(cwd, tmp_path / "state", network=False, hidden=[str(sock_path)])
    connect = f"import socket; socket.socket(socket.AF_UNIX).connect('{sock_path}'); print('in')"
    try:
        # The interpreter itself, not the venv's link to it: a checkout under /tmp is hidden.
        done = _run(conf, f'{os.path.realpath(sys.executable)} -c "{connect}"')
    finally:
        server.close()
    assert (done.returncode, done.stdout) == (1, ""), done
    assert "ConnectionRefusedError" in done.stderr


@needs_bwrap
def test_bound_fds_survive_the_limits_shim(tmp_path: Path) -> None:
    """The fds `wrap` opens reach bwrap through `sh -c '...; exec "$@"'` (the limits
    shim), and capabilities are dropped even when capd runs as root (#18)."""
    _, cwd = _tree(tmp_path)
    conf = _confine(cwd, tmp_path / "state")
    shim = ["sh", "-c", 'ulimit -v unlimited && exec "$@"', "shim"]
    done = _run(conf, "touch made; grep CapEff /proc/self/status", shim)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CapEff:", "0000000000000000"]
    assert (cwd / "made").exists()


async def test_a_bwrap_gone_since_start_is_named_with_the_fix(tmp_path: Path) -> None:
    """Review 19 #4: the bash tool says what is missing and what to do, not that bash
    could not run in the cwd."""
    gone = tmp_path / "bwrap"
    ctx = ToolContext(
        cwd=tmp_path, pod="p", sandbox=Confinement(str(gone), "workspace-write", True, tmp_path)
    )
    outcome = await run_tool("bash", {"command": "echo hi"}, ctx)
    assert outcome == ToolOutcome(
        f"sandbox: bwrap {gone} is gone since capd started; reinstall it or restart capd",
        is_error=True,
    )
