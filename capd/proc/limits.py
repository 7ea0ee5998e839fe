"""`limits.memory_mb` and `limits.pids`: one group per pod, one leaf per process.

`Limiter.detect` picks the backend once per daemon: cgroup v2 when capd's own cgroup is
writable and offers the memory and pids controllers (capd first moves itself into a
`daemon` leaf: a v2 group with controllers enabled for its children may hold no process);
else cgroup v1 when the memory and pids hierarchies are mounted and capd may make groups
in its own there; else rlimits. Each capd names its groups after its state directory
(`capd-<tag>`), so the next capd on that directory removes what a killed one left.

A pod with a limit gets `<own>/capd-<tag>/pod-<pod>` (holding the limits) and each bash call,
MCP server or engine process a leaf below it, so a memory kill takes only that leaf's
processes and its counters tell the call what happened. A process enters its leaf
race-free: the launcher runs it through an `sh` shim that writes `0` (itself) to the
leaf's `cgroup.procs` and then execs it, so everything it starts is born inside. The
rlimit fallback is the same shim doing `ulimit -v` and NPROC instead (`ulimit -u`, or `-p`
where /bin/sh is dash: in bash `-p` is the pipe size): per process, address space rather
than memory, and NPROC counts the whole user (root is exempt).
"""

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from capd.proc.groups import KILL_GRACE_S

log = logging.getLogger(__name__)

Kind = Literal["cgroup2", "cgroup1", "rlimit", "none"]
Backend = Literal["auto", "cgroup2", "cgroup1", "rlimit"]
BACKENDS: tuple[Backend, ...] = ("auto", "cgroup2", "cgroup1", "rlimit")
MIB = 1024 * 1024
EMPTY_TIMEOUT_S = 5.0
"""How long closing a group waits for its killed processes to be gone."""
SH = "/bin/sh"


class LimitsUnavailable(Exception):
    """A backend asked for with `--limits` cannot be used here; the message says why."""


@dataclass(frozen=True, slots=True)
class Hierarchy:
    """Where one cgroup hierarchy keeps capd's groups: `base` is `<own>/capd-<tag>`."""

    base: Path
    controller: Literal["memory", "pids", "both"]
    """`both` on v2, where one tree has every controller."""
    forks_counted_where_made: bool = True
    """`pids.events` of a group counts the forks its own processes were refused (v1; v2
    on kernels before `pids.events.local`, or mounted with `pids_localevents`). False:
    it counts how often the group's own limit, or a descendant's, was hit, so a leaf
    (which has none) never sees the pod's limit refuse it."""


class Limiter:
    """The daemon's backend; `pod` gives each pod its `PodLimits`."""

    def __init__(self, kind: Kind, hierarchies: Sequence[Hierarchy] = ()) -> None:
        self.kind = kind
        self.hierarchies = tuple(hierarchies)

    @classmethod
    def detect(
        cls,
        state_dir: Path,
        backend: Backend = "auto",
        *,
        proc: Path = Path("/proc/self"),
    ) -> "Limiter":
        """Pick the backend (`backend` forces one: LimitsUnavailable when it cannot be
        used) and remove the groups an earlier capd on `state_dir` left."""
        tag = group_name(state_dir)
        mounts = _mounts(proc / "mountinfo")
        own = _own_groups(proc / "cgroup")
        reasons = []
        for kind, setup in (("cgroup2", _setup_v2), ("cgroup1", _setup_v1)):
            if backend not in ("auto", kind):
                continue
            try:
                hierarchies = setup(mounts, own, tag)
            except LimitsUnavailable as exc:
                reasons.append(f"{kind}: {exc}")
                continue
            for hierarchy in hierarchies:  # made again by the first pod with limits
                _remove_tree(hierarchy, hierarchy.base)
            return cls(kind, hierarchies)  # type: ignore[arg-type]
        if backend not in ("auto", "rlimit"):
            raise LimitsUnavailable("; ".join(reasons))
        if reasons:
            log.info("limits fall back to rlimits (%s)", "; ".join(reasons))
        return cls("rlimit")

    def close(self) -> None:
        """Remove capd's groups once every pod is down (best effort)."""
        for hierarchy in self.hierarchies:
            Group(hierarchy.base, hierarchy).remove()

    def pod(self, name: str, memory_mb: int | None, pids: int | None) -> "PodLimits":
        """The pod's limits; no group, no shim when neither is set."""
        if memory_mb is None and pids is None:
            return PodLimits("none", memory_mb, pids, ())
        if self.kind == "rlimit":
            return PodLimits("rlimit", memory_mb, pids, ())
        groups = tuple(Group(h.base / pod_group(name), h) for h in self.hierarchies)
        for group in groups:
            _remove_tree(group.hierarchy, group.path)  # a stale one
            group.make_pod(memory_mb, pids)
        return PodLimits(self.kind, memory_mb, pids, groups)


def pod_group(pod: str) -> str:
    """The name of a pod's group: prefixed, as a pod name may be a control file's of the
    group it is made in (`tasks`, `cgroup.procs`, `memory.max`...). Leaves are safe as they
    are: their names end in `-<n>`, which no control file's does."""
    return f"pod-{pod}"


def group_name(state_dir: Path) -> str:
    """The name of the group that holds the pods of the capd on `state_dir`."""
    return "capd-" + hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]


class Group:
    """A pod's group, or a leaf of one, in one hierarchy."""

    def __init__(self, path: Path, hierarchy: Hierarchy) -> None:
        self.path = path
        self.hierarchy = hierarchy

    @property
    def v2(self) -> bool:
        return self.hierarchy.controller == "both"

    def has(self, controller: str) -> bool:
        return self.hierarchy.controller in (controller, "both")

    def make_pod(self, memory_mb: int | None, pids: int | None) -> None:
        """Make the pod's group, and capd's group around it if it is the first."""
        self.path.parent.mkdir(exist_ok=True)
        if self.v2:
            Group(self.path.parent, self.hierarchy).write("cgroup.subtree_control", "+memory +pids")
        self.path.mkdir()
        if self.has("memory") and memory_mb is not None:
            size = str(memory_mb * MIB)
            if self.v2:
                self.write("memory.max", size)
                self.write("memory.swap.max", "0", optional=True)  # else it swaps, not OOMs
            else:
                self.write("memory.limit_in_bytes", size)
                self.write("memory.memsw.limit_in_bytes", size, optional=True)
        if self.has("pids") and pids is not None:
            self.write("pids.max", str(pids))
        if self.v2:
            self.write("cgroup.subtree_control", "+memory +pids")

    def make_leaf(self, name: str) -> "Group":
        leaf = Group(self.path / name, self.hierarchy)
        leaf.path.mkdir()
        if self.v2:
            leaf.write("memory.oom.group", "1", optional=True)  # an OOM kill takes it all
        return leaf

    def write(self, name: str, value: str, *, optional: bool = False) -> None:
        """Write a control file; an `optional` one this kernel lacks is skipped (cgroupfs
        refuses to create a file, with EACCES)."""
        path = self.path / name
        try:
            path.write_text(value)
        except OSError:
            if not optional or path.exists():
                raise

    def counter(self, file: str, key: str) -> int:
        """The `key` line of a flat-keyed file (`memory.events`, `pids.events`,
        `memory.oom_control`); 0 when the file or the line is missing."""
        try:
            text = (self.path / file).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
        return 0

    def oom_kills(self) -> int:
        return self.counter("memory.events" if self.v2 else "memory.oom_control", "oom_kill")

    def pids_refused(self) -> int:
        return self.counter("pids.events", "max")

    def procs(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def kill(self) -> None:
        """SIGKILL every process in the group (v2: `cgroup.kill`, its subtree too)."""
        if self.v2 and (self.path / "cgroup.kill").exists():
            self.write("cgroup.kill", "1")
            return
        for pid in self.procs():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def remove(self) -> bool:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


class PodLimits:
    """A pod's limits: `leaf` gives each process its own leaf (None when the pod has no
    limits); `close` kills what is left and removes the pod's group."""

    def __init__(
        self, kind: Kind, memory_mb: int | None, pids: int | None, groups: tuple[Group, ...]
    ) -> None:
        self.kind = kind
        self.memory_mb = memory_mb
        self.pids = pids
        self._groups = groups
        self._leaves: dict[Leaf, None] = {}
        """As dict keys: an empty dict is a quarter of an empty set's memory."""
        self._count = 0

    def leaf(self, label: str) -> "Leaf | None":
        """A new leaf named after `label` (OSError when cgroupfs refuses it)."""
        if self.kind == "none":
            return None
        self._count += 1
        name = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', label)[:64]}-{self._count}"
        made: list[Group] = []
        try:
            for group in self._groups:
                made.append(group.make_leaf(name))
        except OSError:
            for group in made:  # v1: the memory leaf, when the pids one cannot be made
                group.remove()
            raise
        leaf = Leaf(self, tuple(made))
        if leaf.groups:  # an rlimit leaf holds nothing to close
            self._leaves[leaf] = None
        return leaf

    def _pids_refused(self) -> int:
        return sum(group.pids_refused() for group in self._groups if group.has("pids"))

    def _forget(self, leaf: "Leaf") -> None:
        self._leaves.pop(leaf, None)

    async def close(self) -> None:
        """The pod is down: its processes have KILL_GRACE_S (counted from the SIGTERM its
        take-down sent them) to exit, then what is left is killed."""
        leaves = [group for leaf in self._leaves for group in leaf.groups]
        await _empty([*self._groups, *leaves], grace=KILL_GRACE_S)
        await asyncio.gather(*(leaf.close() for leaf in list(self._leaves)))
        for group in self._groups:
            if not group.remove():
                log.warning("cannot remove %s: it still holds processes", group.path)
            Group(group.path.parent, group.hierarchy).remove()  # capd's, once no pod has one


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the limits did to a leaf's processes: the lines a tool result ends with, and
    whether they make it an error (False when the limit may have refused another process
    of the pod instead)."""

    text: str
    failed: bool


class Leaf:
    """One process's leaf: `wrap` its argv, read `outcome` once it ended, `close`."""

    def __init__(self, pod: PodLimits, groups: tuple[Group, ...]) -> None:
        self._pod = pod
        self.groups = groups
        self._pids_before = pod._pids_refused()
        self._outcome: Outcome | None = None
        self._closing: asyncio.Future[None] | None = None
        self._watch: asyncio.Task[None] | None = None

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """`argv` run by the shim that puts it in this leaf (or sets its rlimits)."""
        if not self.groups:
            limits = []
            if self._pod.memory_mb is not None:
                limits.append(f"ulimit -v {self._pod.memory_mb * 1024}")
            if (pids := self._pod.pids) is not None:  # NPROC: -u in bash, busybox; -p in dash
                limits.append(f"{{ ulimit -u {pids} 2>/dev/null || ulimit -p {pids}; }}")
            return [SH, "-c", " && ".join([*limits, 'exec "$@"']), "sh", *argv]
        moves = [f'echo 0 > "${n}"' for n in range(1, len(self.groups) + 1)]
        script = " && ".join([*moves, f"shift {len(self.groups)}", 'exec "$@"'])
        return [
            SH,
            "-c",
            script,
            "sh",
            *(str(g.path / "cgroup.procs") for g in self.groups),
            *argv,
        ]

    def outcome(self) -> Outcome | None:
        """What the limits did to the leaf's processes; None when nothing (always, with
        rlimits: they leave no trace)."""
        if self._closing is None:
            self._outcome = self._read_outcome()
        return self._outcome

    def _read_outcome(self) -> Outcome | None:
        lines: list[str] = []
        failed = False
        if any(g.oom_kills() for g in self.groups if g.has("memory")):
            lines.append(f"[killed: out of memory (limits.memory_mb={self._pod.memory_mb})]")
            failed = True
        pids = [g for g in self.groups if g.has("pids")]
        blind = not all(g.hierarchy.forks_counted_where_made for g in pids)
        if any(g.pids_refused() for g in pids):  # v1, older v2: counted where it forked
            lines.append(f"[limits.pids={self._pod.pids} reached: some processes could not start]")
            failed = True
        elif blind and self._pod._pids_refused() > self._pids_before:
            # Newer v2 kernels count a refused fork only where the limit was hit, the pod's
            # group, so the leaf cannot tell: any process of the pod (an MCP server) may
            # have been refused. Say so, without making the call an error.
            lines.append(
                f"[limits.pids={self._pod.pids} reached while this ran: some process of the "
                "pod, maybe of this call, could not start]"
            )
        return Outcome("\n".join(lines), failed) if lines else None

    async def start(
        self, starting: Coroutine[Any, Any, asyncio.subprocess.Process]
    ) -> asyncio.subprocess.Process:
        """Await `starting`, the start of the process `wrap`ped for this leaf, and close the
        leaf once that process has exited, or at once when it could not start."""
        try:
            process = await starting
        except BaseException:
            if all(group.remove() for group in self.groups):
                self._pod._forget(self)
            else:  # cancelled once the process had started in it
                self._watch = asyncio.ensure_future(self.close())
            raise
        if self.groups and self._watch is None:
            self._watch = asyncio.create_task(self._close_after(process))
        return process

    async def _close_after(self, process: asyncio.subprocess.Process) -> None:
        await process.wait()
        await self.close()

    async def close(self) -> None:
        """Read the outcome, kill what is left in the leaf and remove it."""
        if self._closing is None:
            self._outcome = self._read_outcome()
            self._closing = asyncio.ensure_future(self._close())
        await asyncio.shield(self._closing)

    async def _close(self) -> None:
        await _empty(self.groups, grace=0)
        for group in self.groups:
            if not group.remove():
                log.warning("cannot remove %s: it still holds processes", group.path)
        self._pod._forget(self)


async def _empty(groups: Sequence[Group], *, grace: float) -> None:
    """Give the groups' processes `grace` seconds to exit, then kill them until none is
    left (for at most EMPTY_TIMEOUT_S more). cgroupfs has no event for this on v1, so it
    polls."""
    kill_at = time.monotonic() + grace
    deadline = kill_at + EMPTY_TIMEOUT_S
    while (busy := [group for group in groups if group.procs()]) and time.monotonic() < deadline:
        if time.monotonic() >= kill_at:
            for group in busy:
                group.kill()
        await asyncio.sleep(0.01)


def _remove_tree(hierarchy: Hierarchy, path: Path) -> None:
    """Kill every process in the groups under `path` and remove them, deepest first; at
    start-up and before a pod's group is made, so a plain wait."""
    if not path.is_dir():
        return
    for sub, _, _ in sorted(os.walk(path), key=lambda entry: -len(entry[0])):
        group_path = Path(sub)
        deadline = time.monotonic() + EMPTY_TIMEOUT_S
        group = Group(group_path, hierarchy)
        while group.procs() and time.monotonic() < deadline:
            group.kill()
            time.sleep(0.01)
        if not group.remove():
            log.warning("cannot remove %s, which an earlier capd left", group_path)


# -- detection ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Mount:
    point: Path
    root: str
    fstype: str
    options: frozenset[str]


def _mounts(mountinfo: Path) -> list[_Mount]:
    mounts = []
    for line in mountinfo.read_text().splitlines():
        head, _, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if len(fields) >= 5 and len(rest) >= 3 and rest[0] in ("cgroup", "cgroup2"):
            point = Path(fields[4].replace("\\040", " "))
            mounts.append(_Mount(point, fields[3], rest[0], frozenset(rest[2].split(","))))
    return mounts


def _own_groups(cgroup: Path) -> dict[str, str]:
    """capd's cgroup per controller (`` for v2) from /proc/self/cgroup."""
    own = {}
    for line in cgroup.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            own[controller] = path
    return own


def _group_dir(mount: _Mount, path: str) -> Path:
    """The directory of cgroup `path` under `mount` (whose root may not be `/`)."""
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        path = path[len(root) :]
    return mount.point / path.lstrip("/")


def _setup_v2(mounts: list[_Mount], own: dict[str, str], tag: str) -> list[Hierarchy]:
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if mount is None or "" not in own:
        raise LimitsUnavailable("no cgroup2 mount")
    own_dir = _group_dir(mount, own[""])
    try:
        controllers = set((own_dir / "cgroup.controllers").read_text().split())
    except OSError as exc:
        raise LimitsUnavailable(f"cannot read {own_dir}/cgroup.controllers: {exc}") from None
    if not {"memory", "pids"} <= controllers:
        raise LimitsUnavailable(f"{own_dir} offers no memory and pids controllers")
    if not os.access(own_dir, os.W_OK) or not os.access(own_dir / "cgroup.procs", os.W_OK):
        raise LimitsUnavailable(f"{own_dir} is not writable (systemd: Delegate=yes)")
    _move_into_daemon_leaf(own_dir)
    base = own_dir / tag
    try:
        base.mkdir(exist_ok=True)
    except OSError as exc:
        raise LimitsUnavailable(f"cannot set up {base}: {exc}") from None
    legacy = "pids_localevents" in mount.options or not (own_dir / "pids.events.local").exists()
    return [Hierarchy(base, "both", forks_counted_where_made=legacy)]


def _move_into_daemon_leaf(own_dir: Path) -> None:
    """Move capd into `<own>/daemon` and enable memory and pids for `<own>`'s children:
    a v2 group whose children have controllers holds no process itself."""
    daemon = own_dir / "daemon"
    try:
        daemon.mkdir(exist_ok=True)
        (daemon / "cgroup.procs").write_text("0")
    except OSError as exc:
        raise LimitsUnavailable(f"cannot move capd into {daemon}: {exc}") from None
    try:
        (own_dir / "cgroup.subtree_control").write_text("+memory +pids")
    except OSError as exc:
        with contextlib.suppress(OSError):
            (own_dir / "cgroup.procs").write_text("0")
            daemon.rmdir()
        raise LimitsUnavailable(
            f"cannot enable memory and pids in {own_dir} ({exc.strerror}): other processes "
            "share capd's cgroup; run capd in its own (systemd: Delegate=yes)"
        ) from None


def _setup_v1(mounts: list[_Mount], own: dict[str, str], tag: str) -> list[Hierarchy]:
    bases = []
    for controller in ("memory", "pids"):
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
        if mount is None or controller not in own:
            raise LimitsUnavailable(f"no cgroup v1 {controller} hierarchy")
        bases.append(_group_dir(mount, own[controller]) / tag)
    for base in bases:
        if not os.access(base.parent, os.W_OK):
            raise LimitsUnavailable(f"{base.parent} is not writable")
    try:
        for base in bases:
            base.mkdir(exist_ok=True)
    except OSError as exc:
        raise LimitsUnavailable(f"cannot make {exc.filename}: {exc.strerror}") from None
    return [Hierarchy(bases[0], "memory"), Hierarchy(bases[1], "pids")]
