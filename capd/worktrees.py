"""A pod's git work tree (`workspace.git`, docs/protocol.md "Worktrees").

Not a linked `git worktree`: its git would have to write in the repository's own `.git`.
The pod gets a work tree (`<state>/worktrees/<pod>/work`, its cwd) with a git directory of
its own (`.../git`) that borrows the repository's objects read-only through
`objects/info/alternates`. Its branch is made in the repository at spawn and brought up
to date by capd (`sync`: a fetch from the pod's git directory, fast-forward only).

The pod's sandbox shows the repository's git directory read-only, and its own work tree
and git directory writable but for `pins`: what would let it run code in a git outside
the sandbox (its git directory's config, hooks, info, commondir, config.worktree,
modules, alternates, and the work tree's `.git` file), all made here so they can be bound.

Every git capd runs on the work tree or its git directory treats them as hostile
(capd.gitenv); the repository is the user's own, trusted.
"""

import asyncio
import dataclasses
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from capd import gitenv
from capd.gitenv import GitFailed, hostile_env, user_env
from capd.proc.sandbox import real_path
from protocol.errors import ProtocolError
from protocol.manifest import GitWorkspace

log = logging.getLogger(__name__)

DIFF_TIMEOUT_S = 25.0
"""How long rendering a `diff` may take (it hashes the work tree's changed files): less
than capctl waits for an answer."""
DIFF_MAX_BYTES = 16 * 1024 * 1024
"""A longer diff is cut there, and says so."""
INDEX_MAX_BYTES = 256 * 1024 * 1024
"""A bigger index of the pod's is not copied for `diff` (it only saves hashing files)."""
MAKING = "making.json"
"""In a work tree's directory while `make` runs: what it is making, so a capd that died
meanwhile undoes it at its next start (`sweep`)."""
FETCH_FLAGS = (
    "fetch", "--no-tags", "--no-write-fetch-head", "--no-recurse-submodules",
    "--no-auto-maintenance",
)  # fmt: skip


@dataclass(frozen=True)
class Worktree:
    """What capd made for a pod's `workspace.git`: enough to sync, diff and undo it."""

    repo: str
    """The repository's top level."""
    common_dir: str
    """The repository's git directory (the common one, for a linked worktree)."""
    branch: str
    base: str
    """`workspace.git.base` as given, or the commit HEAD was when it was unset."""
    base_commit: str
    """The commit the branch started from (its tip when it existed already)."""
    path: str
    """The work tree: the pod's cwd."""
    gitdir: str
    created_branch: bool
    """capd made the branch (a failed spawn deletes it again)."""

    @property
    def root(self) -> Path:
        return Path(self.path).parent

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Worktree":
        return cls(**json.loads(text))

    def status(self, sync_error: str | None) -> dict[str, object]:
        """`status.workspace` (a `protocol.results.WorkspaceState` as a plain dict)."""
        return {
            "repo": self.repo,
            "branch": self.branch,
            "base": self.base,
            "path": self.path,
            "base_commit": self.base_commit,
            "sync_error": sync_error,
        }

    def pins(self) -> list[Path]:
        """What the sandbox shows read-only inside the writable work tree and git
        directory, with the repository's git directory (which may lie under a path the
        sandbox hides, such as /tmp)."""
        git = Path(self.gitdir)
        own = ["config", "hooks", "info", "commondir", "config.worktree", "modules"]
        return [
            Path(self.common_dir),
            Path(self.path) / ".git",
            *(git / name for name in own),
            git / "objects" / "info" / "alternates",
        ]


def root_of(state_dir: Path, pod: str) -> Path:
    return state_dir / "worktrees" / pod


async def make(
    spec: GitWorkspace,
    pod: str,
    state_dir: Path,
    protected: Iterable[Path],
    others: Iterable[tuple[str, Worktree]],
    writers: Iterable[tuple[str, Path]] = (),  # each pod's writable paths: check_unwritable
) -> Worktree:
    """Make pod `pod`'s work tree of `spec.repo` under `state_dir`. `protected`: capd's
    own directories, which the repository may not lie in; `others`: the work trees of the
    other pods, whose branches are taken. ProtocolError when it cannot (nothing made is
    left behind)."""
    repo, common, object_format, branch, start = await _checked(spec, pod, protected, others)
    tip = await _commit(repo, f"refs/heads/{branch}")
    for writer, path in writers:  # before capd's first git that runs hooks there
        check_unwritable(repo, common, writer, path)
    base, base_commit = spec.base or start, tip or start
    root = root_of(state_dir, pod)
    tree = Worktree(
        repo=str(repo),
        common_dir=str(common),
        branch=branch,
        base=base,
        base_commit=base_commit,
        path=str(root / "work"),
        gitdir=str(root / "git"),
        created_branch=tip is None,
    )
    made_branch = False
    try:
        _make_root(root)
        (root / MAKING).write_text(tree.to_json())
        if tree.created_branch:
            await _in_repo(repo, "branch", "--no-track", "--", branch, base_commit)
            made_branch = True
        await _set_up(tree, pod, object_format)
        (root / MAKING).unlink()
    except BaseException as exc:
        await undo(dataclasses.replace(tree, created_branch=made_branch))
        if isinstance(exc, GitFailed):
            raise ProtocolError(
                "internal", f"workspace.git: making the work tree of {repo} failed: {exc}"
            ) from None
        if isinstance(exc, OSError):
            raise ProtocolError(
                "internal",
                f"workspace.git: making the work tree under {root} failed: {exc.strerror or exc}",
            ) from None
        raise
    return tree


async def check(
    spec: GitWorkspace,
    pod: str,
    protected: Iterable[Path],
    others: Iterable[tuple[str, Worktree]],
    writers: Iterable[tuple[str, Path]] = (),
) -> tuple[Path, str]:
    """What `make` refuses, found without making anything (`apply` checks a team file
    before its first change); the repository's common git directory and the branch."""
    repo, common, _, branch, _ = await _checked(spec, pod, protected, others)
    for writer, path in writers:
        check_unwritable(repo, common, writer, path)
    return common, branch


async def _checked(
    spec: GitWorkspace,
    pod: str,
    protected: Iterable[Path],
    others: Iterable[tuple[str, Worktree]],
) -> tuple[Path, Path, str, str, str]:
    """The repository's top level, common git directory and object format, the branch
    and the commit `base` names; ProtocolError as `make` refuses."""
    repo, common, object_format = await _inspect(spec.repo, protected)
    branch = spec.branch or f"capd/{pod}"
    for other, theirs in others:
        if Path(theirs.common_dir) == common and theirs.branch == branch:
            raise ProtocolError(
                "already_exists",
                f"workspace.git.branch {branch} of {repo} is pod {other}'s; "
                "name another branch, or delete that pod first",
            )
    await _refuse_checked_out(repo, branch)
    return repo, common, object_format, branch, await _base_commit(repo, spec.base)


def discard(tree: Worktree) -> None:
    """Remove the work tree and its git directory, at once: callers do it before their
    next await, so a pod spawned meanwhile under the same name is never touched."""
    _rmtree(tree.root)


async def delete_branch(tree: Worktree) -> None:
    """Delete the branch from the repository (`delete_branch`), if it is there.
    GitFailed when it cannot be deleted."""
    repo = Path(tree.repo)
    if await _commit(repo, f"refs/heads/{tree.branch}") is not None:
        await _in_repo(repo, "branch", "-D", "--", tree.branch)


async def undo(tree: Worktree) -> None:
    """Undo `make` for a spawn that failed after it: the work tree and its git directory
    go, and the branch when capd made it and nobody moved it since (`undo_branch`)."""
    discard(tree)
    await undo_branch(tree)


async def undo_branch(tree: Worktree) -> None:
    """Delete the branch `make` made, unless it has moved since. Never raises (what
    cannot be undone is logged)."""
    if not tree.created_branch:
        return
    try:
        await _in_repo(
            Path(tree.repo), "update-ref", "-d", f"refs/heads/{tree.branch}", tree.base_commit
        )
    except GitFailed as exc:
        log.warning("could not delete branch %s of %s: %s", tree.branch, tree.repo, exc)


async def check_deletable(tree: Worktree) -> None:
    """Refuse (invalid_request) deleting a branch one of the user's worktrees has
    checked out, before anything is deleted."""
    if await _checked_out_at(Path(tree.repo), tree.branch) is not None:
        raise ProtocolError(
            "invalid_request",
            f"branch {tree.branch} is checked out in {tree.repo}, so it cannot be deleted; "
            "check out another branch there, or delete without delete_branch",
        )


async def sync(tree: Worktree) -> str | None:
    """Bring the repository's branch up to the work tree's, fast-forward only (never
    forced: a branch the user moved or checked out stays as it is). Why it could not, or
    None."""
    ref = f"refs/heads/{tree.branch}"
    if not (Path(tree.gitdir) / "HEAD").is_file():
        return f"the work tree's git directory {tree.gitdir} is gone"
    try:
        await _in_repo(
            Path(tree.repo), *FETCH_FLAGS, "--end-of-options", tree.gitdir, f"{ref}:{ref}"
        )
    except GitFailed as exc:  # its line says why: "! [rejected] ... (non-fast-forward)"
        return f"branch {tree.branch} of {tree.repo} was not updated: {' '.join(str(exc).split())}"
    return None


async def head_into_repo(tree: Worktree) -> str:
    """The commit the work tree's HEAD is at, its objects fetched into the repository
    (no ref made there): a child's work tree branches from it."""
    env = hostile_env(Path(tree.gitdir), Path(tree.path))
    try:
        out = await gitenv.run(
            [*gitenv.HARDENED, "rev-parse", "--verify", "HEAD^{commit}"],
            cwd=Path(tree.path),
            env=env,
        )
        await _in_repo(Path(tree.repo), *FETCH_FLAGS, "--end-of-options", tree.gitdir, "HEAD")
    except GitFailed as exc:
        raise ProtocolError(
            "invalid_request", f"the commit of work tree {tree.path} cannot be taken: {exc}"
        ) from None
    return out.decode().strip()


async def diff(tree: Worktree, stat: bool) -> tuple[str, str]:
    """The work tree, committed and not, untracked files included, against the merge
    base of its HEAD with `base` (the branch as it is now in the repository, else the
    commit the branch started from): that merge base and the `git diff` text. The pod's
    index, objects and files are not touched: a copy of the index stages everything, its
    new objects go to a directory of capd's, removed after."""
    base = await _commit(Path(tree.repo), tree.base) or tree.base_commit
    scratch = tree.root / f"diff-{secrets.token_hex(4)}"
    objects = scratch / "objects"
    index = scratch / "index"
    try:
        objects.mkdir(mode=0o700, parents=True)
        copied = _copy_index(Path(tree.gitdir) / "index", index)
        env = {
            **hostile_env(Path(tree.gitdir), Path(tree.path)),
            "GIT_INDEX_FILE": str(index),
            "GIT_OBJECT_DIRECTORY": str(objects),
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(Path(tree.gitdir) / "objects"),
        }
        async with asyncio.timeout(DIFF_TIMEOUT_S):
            merge_base = (await _hostile(tree, env, "merge-base", base, "HEAD")).decode().strip()
            unread = await _add_all(tree, env, index, copied)
            shown = ["--stat"] if stat else []
            text = await _hostile(
                tree, env,
                "diff", "--cached", "--no-color", "--no-ext-diff", "--no-textconv",
                "--ignore-submodules=all", *shown, merge_base, "--", limit=DIFF_MAX_BYTES,
            )  # fmt: skip
    except TimeoutError:
        raise ProtocolError(
            "timeout", f"the diff of {tree.path} took longer than {DIFF_TIMEOUT_S:g} s"
        ) from None
    except (GitFailed, OSError) as exc:
        raise ProtocolError("internal", f"the diff of {tree.path} failed: {exc}") from None
    finally:
        _rmtree(scratch)
    if len(text) > DIFF_MAX_BYTES:
        text = text[:DIFF_MAX_BYTES] + b"\n[capd: the diff is cut here, at 16 MiB]\n"
    return merge_base, (text + unread).decode(errors="replace")


# -- making it ----------------------------------------------------------------------------


async def _inspect(given: str, protected: Iterable[Path]) -> tuple[Path, Path, str]:
    """The repository's top level, its common git directory and its object format.
    invalid_request when `given` is not in a work tree with a commit, or lies in capd's
    own directories."""
    path = _directory(given)
    try:
        out = await gitenv.run(
            ["rev-parse", "--path-format=absolute", "--is-bare-repository",
             "--git-common-dir", "--show-object-format"],
            cwd=path, env=user_env(),
        )  # fmt: skip
    except GitFailed as exc:
        raise _bad_repo(f"{given} is not in a git repository ({exc})") from None
    bare, common, object_format = out.decode().split("\n")[:3]
    if bare == "true":
        raise _bad_repo(f"{given} is a bare repository; give a checkout of it")
    try:
        top = await gitenv.run(["rev-parse", "--show-toplevel"], cwd=path, env=user_env())
    except GitFailed as exc:
        raise _bad_repo(f"{given} is not in a work tree of a repository ({exc})") from None
    return _outside(top.decode().strip(), protected), real_path(common), object_format


def check_unwritable(repo: Path, common: Path, pod: str, path: Path) -> None:
    """Refuse (invalid_request) a repository, or its git directory, inside `path`, or
    `path` inside the git directory, which confined pod `pod` can write: capd's own git in
    the repository runs its hooks and reads its config, so that pod could plant code capd
    runs outside any sandbox."""
    inside = next((mine for mine in (repo, common) if mine.is_relative_to(path)), None)
    if inside is not None:
        where = f"{inside} lies in {path}, which pod {pod} can write"
    elif path.is_relative_to(common):
        where = f"pod {pod} can write {path}, in {common}"
    else:
        return
    raise _bad_repo(
        f"{where}, and capd's own git there would run what that pod puts in it (hooks, "
        f"config); use a repository no confined pod can write, or keep {path} out of pod "
        f"{pod}'s writable paths"
    )


def _directory(given: str) -> Path:
    path = real_path(given)
    if "\n" in str(path):  # git prints paths one per line
        raise _bad_repo(f"{given!r} has a newline in its path; move the repository")
    if not path.is_dir():
        raise _bad_repo(f"{given} is not a directory")
    return path


def _outside(top: str, protected: Iterable[Path]) -> Path:
    """The repository's top level, resolved; refused when it lies in capd's own dirs."""
    repo = real_path(top)
    for own in map(real_path, protected):
        if repo.is_relative_to(own):
            raise _bad_repo(f"{repo} lies in capd's own {own}; use a repository outside it")
    return repo


def _bad_repo(what: str) -> ProtocolError:
    return ProtocolError("invalid_request", f"workspace.git.repo: {what}")


async def _refuse_checked_out(repo: Path, branch: str) -> None:
    where = await _checked_out_at(repo, branch)
    if where is not None:
        raise ProtocolError(
            "already_exists",
            f"workspace.git.branch {branch} is checked out at {where}; name another branch, "
            "or check out another one there",
        )


async def _checked_out_at(repo: Path, branch: str) -> str | None:
    """The user's worktree of `repo` that has `branch` checked out, if one does."""
    out = await _in_repo(repo, "worktree", "list", "--porcelain", "-z")
    where = ""
    for line in out.decode(errors="replace").split("\0"):
        if line.startswith("worktree "):
            where = line.removeprefix("worktree ")
        elif line == f"branch refs/heads/{branch}":
            return where
    return None


async def _commit(repo: Path, name: str) -> str | None:
    """The commit `name` names in `repo`, or None."""
    try:
        out = await _in_repo(
            repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{name}^{{commit}}"
        )
    except GitFailed:
        return None
    return out.decode().strip() or None


async def _base_commit(repo: Path, base: str | None) -> str:
    found = await _commit(repo, base or "HEAD")
    if found is not None:
        return found
    if base is None:
        raise _bad_repo(f"{repo} has no commit (HEAD names none); commit once first")
    raise ProtocolError(
        "invalid_request",
        f"workspace.git.base {base!r} is not a branch, tag or commit of {repo}",
    )


def _make_root(root: Path) -> None:
    """`root`, new and empty (a leftover of a capd that died part-way is removed: no pod
    has it), 0700 with its parent."""
    root.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _rmtree(root)
    root.mkdir(mode=0o700)


async def _set_up(tree: Worktree, pod: str, object_format: str) -> None:
    """The work tree and its git directory, checked out on the branch at its commit."""
    repo, work, git = Path(tree.repo), Path(tree.path), Path(tree.gitdir)
    plain = {**gitenv.NO_CONFIG}
    await gitenv.run(
        ["init", "-q", "--template=", f"--object-format={object_format}",
         f"--separate-git-dir={git}", str(work)],
        cwd=tree.root, env=plain,
    )  # fmt: skip
    (git / "objects" / "info").mkdir(parents=True, exist_ok=True)
    (git / "objects" / "info" / "alternates").write_text(f"{Path(tree.common_dir) / 'objects'}\n")
    for name in ("hooks", "info", "modules"):
        (git / name).mkdir(mode=0o700, exist_ok=True)
    (git / "commondir").write_text(".\n")
    (git / "config.worktree").touch()
    exclude = Path(tree.common_dir) / "info" / "exclude"
    if exclude.is_file():
        shutil.copyfile(exclude, git / "info" / "exclude")
    name, email = await _identity(repo, pod)
    env = hostile_env(git, work)
    for key, value in (
        ("remote.origin.url", str(repo)),
        ("remote.origin.fetch", "+refs/heads/*:refs/remotes/origin/*"),
        ("user.name", name),
        ("user.email", email),
    ):
        await gitenv.run(["config", key, value], cwd=work, env=env)
    ref = f"refs/heads/{tree.branch}"
    await gitenv.run(["update-ref", ref, tree.base_commit], cwd=work, env=env)
    await gitenv.run(["symbolic-ref", "HEAD", ref], cwd=work, env=env)
    await gitenv.run([*gitenv.HARDENED, "reset", "-q", "--hard"], cwd=work, env=env, timeout=120)


async def _identity(repo: Path, pod: str) -> tuple[str, str]:
    """The repository's effective user.name and user.email, else capd's for the pod
    (inside the sandbox HOME may be /tmp, with no ~/.gitconfig)."""
    found = []
    for key, default in (("user.name", f"capd pod {pod}"), ("user.email", f"{pod}@capd.invalid")):
        try:
            value = (await _in_repo(repo, "config", "--get", key)).decode().strip()
        except GitFailed:
            value = ""
        found.append(value or default)
    return found[0], found[1]


async def _in_repo(repo: Path, *args: str) -> bytes:
    """A git command in the user's own repository."""
    return await gitenv.run(args, cwd=repo, env=user_env())


async def _hostile(
    tree: Worktree, env: dict[str, str], *args: str, limit: int | None = None
) -> bytes:
    """A hardened git command in the pod's work tree (its stdout cut after `limit`)."""
    return await gitenv.run(
        [*gitenv.HARDENED, *args], cwd=Path(tree.path), env=env, timeout=DIFF_TIMEOUT_S,
        limit=limit,
    )  # fmt: skip


async def _add_all(tree: Worktree, env: dict[str, str], index: Path, copied: bool) -> bytes:
    """Stage the whole work tree in `index`; a line naming what could not be read (left
    out, the rest staged), or nothing. The pod's index, `copied` there, only saves hashing
    unchanged files: when git cannot use it (the pod wrote it), staging starts afresh."""
    try:
        await _hostile(tree, env, "add", "-A", "--ignore-errors", "--", ".")
    except GitFailed as exc:
        if not copied:
            return f"[capd: some files are not in this diff: {exc}]\n".encode()
        with suppress(FileNotFoundError):
            os.unlink(index)
        return await _add_all(tree, env, index, copied=False)
    return b""


def _copy_index(source: Path, target: Path) -> bool:
    """Copy the pod's index, never following a symlink the pod put there, nor reading
    one bigger than INDEX_MAX_BYTES; whether it was copied (none is fine)."""
    data = gitenv.read_regular(source, INDEX_MAX_BYTES, follow=False)
    if data is None:
        return False
    target.write_bytes(data)
    return True


async def sweep(root: Path) -> None:
    """Remove a work tree's directory (`root_of`) that no pod has, left by a capd that
    died while it made or removed it; one it was making is undone (`undo`: the branch
    too, when capd made it and nobody moved it since)."""
    try:
        tree = Worktree.from_json((root / MAKING).read_text())
    except (OSError, ValueError, TypeError):
        _rmtree(root)
        return
    await undo(dataclasses.replace(tree, path=str(root / "work")))  # where it is now


def _rmtree(path: Path) -> None:
    """Remove `path` whatever the pod did to its modes: each directory (never through a
    symlink) is made the owner's again first."""
    if not path.exists():
        return
    with suppress(OSError):
        os.chmod(path, 0o700)
    for top, dirs, _ in os.walk(path):
        for name in dirs:
            inner = os.path.join(top, name)
            if not os.path.islink(inner):
                with suppress(OSError):
                    os.chmod(inner, 0o700)
    shutil.rmtree(path, ignore_errors=True)
