"""cgroup v2 limits against a FAKE cgroupfs: a plain directory tree standing in for a
delegated cgroup2 mount. It checks only which directories capd makes and what it writes
and reads there; the kernel's behaviour (moves, limits, OOM kills, cgroup.kill) is not
exercised. No real cgroup v2 host was available: the v2 backend is untested on one."""

from pathlib import Path

import pytest

from capd.proc.limits import MIB, SH, Limiter, LimitsUnavailable, Outcome, group_name

OWN = "system.slice/capd.service"


def fake_host(tmp_path: Path, controllers: str = "cpu io memory pids") -> tuple[Path, Path]:
    """A cgroup2 mount at `tmp_path/cg` with capd in OWN; returns (proc dir, own dir)."""
    mount = tmp_path / "cg"
    own = mount / OWN
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text(controllers + "\n")
    (own / "cgroup.subtree_control").write_text("")
    (own / "cgroup.procs").write_text("")
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "mountinfo").write_text(
        "25 1 8:1 / / rw,relatime - ext4 /dev/vda1 rw\n"
        f"30 25 0:26 / {mount} rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw,nsdelegate\n"
    )
    (proc / "cgroup").write_text(f"0::/{OWN}\n")
    return proc, own


def test_capd_moves_into_a_daemon_leaf_and_enables_the_controllers(tmp_path: Path) -> None:
    proc, own = fake_host(tmp_path)
    limiter = Limiter.detect(tmp_path / "state", proc=proc)
    assert limiter.kind == "cgroup2"
    assert (own / "daemon" / "cgroup.procs").read_text() == "0"
    assert (own / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert not (own / group_name(tmp_path / "state")).exists()  # until a pod has limits


def test_a_pod_group_holds_the_limits_and_a_leaf_the_oom_group(tmp_path: Path) -> None:
    proc, own = fake_host(tmp_path)
    pod = Limiter.detect(tmp_path / "state", proc=proc).pod("w1", 64, 32)
    base = own / group_name(tmp_path / "state")
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids"
    group = base / "pod-w1"
    assert (group / "memory.max").read_text() == str(64 * MIB)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "pids.max").read_text() == "32"
    assert (group / "cgroup.subtree_control").read_text() == "+memory +pids"
    leaf = pod.leaf("mcp git")
    assert leaf is not None
    assert (group / "mcp_git-1" / "memory.oom.group").read_text() == "1"
    assert leaf.wrap(["bwrap", "--", "bash"]) == [
        SH,
        "-c",
        'echo 0 > "$1" && shift 1 && exec "$@"',
        "sh",
        str(group / "mcp_git-1" / "cgroup.procs"),
        "bwrap",
        "--",
        "bash",
    ]


def test_the_outcome_reads_the_leafs_events(tmp_path: Path) -> None:
    """Kernels without pids.events.local count a refused fork in the leaf that forked: the
    pod's counter moving is another leaf's doing."""
    proc, own = fake_host(tmp_path)
    pod = Limiter.detect(tmp_path / "state", proc=proc).pod("w1", 64, 32)
    group = own / group_name(tmp_path / "state") / "pod-w1"
    quiet, killed, refused = pod.leaf("bash"), pod.leaf("bash"), pod.leaf("bash")
    assert quiet is not None
    assert killed is not None
    assert refused is not None
    (group / "bash-2" / "memory.events").write_text("low 0\nhigh 0\nmax 9\noom 1\noom_kill 1\n")
    assert killed.outcome() == Outcome("[killed: out of memory (limits.memory_mb=64)]", True)
    (group / "pids.events").write_text("max 5\n")  # not the leaf's: it counts its own
    assert quiet.outcome() is None
    (group / "bash-3" / "pids.events").write_text("max 1\n")
    assert refused.outcome() == Outcome(
        "[limits.pids=32 reached: some processes could not start]", True
    )


def test_where_the_leaf_cannot_tell_the_pods_counter_is_a_note_not_an_error(
    tmp_path: Path,
) -> None:
    """Kernels with pids.events.local count a refused fork where the limit was hit (the
    pod's group), hierarchically: the leaf's counter never moves."""
    proc, own = fake_host(tmp_path)
    (own / "pids.events.local").write_text("max 0\n")
    pod = Limiter.detect(tmp_path / "state", proc=proc).pod("w1", 64, 32)
    group = own / group_name(tmp_path / "state") / "pod-w1"
    (group / "pids.events").write_text("max 4\n")  # before this leaf: not its doing
    earlier, during = pod.leaf("bash"), pod.leaf("bash")
    assert earlier is not None
    assert during is not None
    assert during.outcome() is None
    (group / "pids.events").write_text("max 5\n")  # an MCP server's fork, or this call's
    note = "[limits.pids=32 reached while this ran: some process of the pod, maybe of this call"
    outcome = during.outcome()
    assert outcome is not None
    assert outcome.text.startswith(note)
    assert not outcome.failed


def test_mounted_with_pids_localevents_the_leaf_tells(tmp_path: Path) -> None:
    proc, own = fake_host(tmp_path)
    (own / "pids.events.local").write_text("max 0\n")
    mountinfo = proc / "mountinfo"
    mountinfo.write_text(mountinfo.read_text().replace("nsdelegate", "nsdelegate,pids_localevents"))
    pod = Limiter.detect(tmp_path / "state", proc=proc).pod("w1", 64, 32)
    leaf = pod.leaf("bash")
    assert leaf is not None
    (own / group_name(tmp_path / "state") / "pod-w1" / "pids.events").write_text("max 5\n")
    assert leaf.outcome() is None


def test_no_memory_controller_falls_back_or_refuses_a_forced_cgroup2(tmp_path: Path) -> None:
    proc, _ = fake_host(tmp_path, controllers="cpu io pids")
    assert Limiter.detect(tmp_path / "state", proc=proc).kind == "rlimit"
    with pytest.raises(LimitsUnavailable, match="offers no memory and pids controllers"):
        Limiter.detect(tmp_path / "state", "cgroup2", proc=proc)


def test_a_pod_without_limits_makes_no_group(tmp_path: Path) -> None:
    proc, own = fake_host(tmp_path)
    pod = Limiter.detect(tmp_path / "state", proc=proc).pod("w1", None, None)
    assert pod.kind == "none"
    assert pod.leaf("bash") is None
    assert not (own / group_name(tmp_path / "state") / "pod-w1").exists()
