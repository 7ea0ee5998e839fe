"""The bwrap command line a confinement builds, run for real where it matters (the order
of mounts), and the start-up probe with its one-line refusal."""

import subprocess
import tempfile
from pathlib import Path

import pytest

from capctl.render import sandbox_line
from capd.proc.leftovers import OWNER_ENV
from capd.proc.sandbox import Confinement, candidates, probe, refusal
from protocol.manifest import DEFAULT_SANDBOX_ENV


def _working_bwrap() -> str | None:
    with tempfile.TemporaryDirectory() as scratch:
        return probe(candidates(None), Path(scratch)).path


BWRAP = _working_bwrap()
needs_bwrap = pytest.mark.skipif(BWRAP is None, reason="no working bwrap on this host")


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
    argv = conf.wrap(["bash", "-c", "true"])
    assert argv[:8] == ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    tmp = _index(argv, "--tmpfs", "/tmp")
    hide = _index(argv, "--tmpfs", str(state))
    bind = _index(argv, "--bind", str(cwd), str(cwd))
    show = _index(argv, "--ro-bind", str(spill), str(spill))
    remount = _index(argv, "--remount-ro", str(state))
    assert tmp < hide < bind < remount
    assert hide < show < remount
    assert argv[argv.index("--chdir") + 1] == str(cwd)
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent"):
        assert flag in argv
    assert "--share-net" in argv
    assert "--new-session" not in argv
    assert _pairs(argv, "--unsetenv") == [OWNER_ENV]
    assert argv[argv.index("--") :] == ["--", "bash", "-c", "true"]


def test_read_only_binds_the_cwd_read_only_and_no_network_shares_none(tmp_path: Path) -> None:
    conf = Confinement("bwrap", "read-only", False, tmp_path, writable=())
    argv = conf.wrap(["true"])
    assert "--bind" not in argv
    assert _pairs(argv, "--ro-bind")[-1] == str(tmp_path)
    assert "--share-net" not in argv
    assert conf.writable_paths() == []


def test_a_hidden_file_is_covered_with_dev_null_and_a_missing_path_is_left_out(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "netrc"
    secret.write_text("password")
    missing = tmp_path / "nothing-here"
    conf = Confinement("bwrap", "workspace-write", True, tmp_path, hidden=(secret, missing))
    argv = conf.wrap(["true"])
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
    done = subprocess.run(
        conf.wrap(["sh", "-c", script]),
        cwd=cwd,
        env=conf.environment(),
        capture_output=True,
        text=True,
        check=False,
    )
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
