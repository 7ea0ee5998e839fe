"""The daemon's pods' work trees (`workspace.git`): what the supervisor asks at spawn,
start, delete and after each turn, and what `status.workspace` and `diff` show.

A pod's `Worktree` (capd/worktrees.py) is stored with its record (`pods.worktree`). Work
trees are made one at a time, so two spawns never take one branch; the syncs of one pod
run one at a time.
"""

import asyncio
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from capd import worktrees
from capd.gitenv import GitFailed
from capd.proc.sandbox import Confinement
from capd.registry import PodRegistry
from capd.worktrees import Worktree
from protocol.errors import ProtocolError
from protocol.manifest import Manifest, stored_field
from protocol.results import DiffResult

log = logging.getLogger("capd")

IN_FLEET = (
    "workspace.git is refused on a fleet node (capd --store postgresql://…): a work tree "
    "lives on one node's disk and could not move with its pod; give the pod a cwd on "
    "storage every node mounts, and make its branch there yourself"
)


class PodWorktrees:
    def __init__(
        self,
        registry: PodRegistry,
        state_dir: Path,
        protected: Sequence[Path],
        in_background: Callable[[Awaitable[Any]], "asyncio.Task[Any]"],
        fleet: bool = False,
    ) -> None:
        """`protected`: capd's own directories, where no repository may lie;
        `in_background`: runs the sync after a turn (the supervisor's); `fleet`: pods may
        move to another node (a PostgreSQL store), so none may have a work tree."""
        self._registry = registry
        self._fleet = fleet
        self._state_dir = state_dir.resolve()
        self._protected = protected
        self._in_background = in_background
        self._making = asyncio.Lock()
        self._syncing: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._sync_errors: dict[str, str | None] = {}

    async def sweep(self) -> None:
        """Remove the work trees no pod has, and the branches capd was making for them:
        left by a capd that died while it made or removed one (at start-up, before any
        spawn)."""
        root = self._state_dir / "worktrees"
        if not root.is_dir():
            return
        for found in sorted(root.iterdir()):
            record = self._registry.get(found.name)
            if record is None or record.worktree is None:
                log.warning("removing %s, a work tree no pod has", found)
                await worktrees.sweep(found)

    def cwd(self, manifest: Manifest) -> Path | None:
        """The cwd of a pod with `workspace.git` (its work tree, made later by `make`);
        None without. invalid_request when the manifest names a cwd too."""
        if manifest.workspace.git is None:
            return None
        if self._fleet:
            raise ProtocolError("invalid_request", IN_FLEET)
        if manifest.cwd is not None:
            raise ProtocolError(
                "invalid_request",
                "cwd and workspace.git are both set: a pod with workspace.git works in a "
                "work tree of its own; leave cwd out",
            )
        return worktrees.root_of(self._state_dir, manifest.name) / "work"

    async def make(self, manifest: Manifest) -> Worktree | None:
        """Make the work tree of a pod being spawned (None without `workspace.git`); the
        caller adds the pod's record before its next await, or `undo`es it."""
        spec = manifest.workspace.git
        if spec is None:
            return None
        name = manifest.name
        async with self._making:
            self._refuse_taken_name(name)  # before make clears <state>/worktrees/<name>
            writers = [(name, path) for path in writable(manifest)] + self._writers()
            tree = await worktrees.make(
                spec, name, self._state_dir, self._protected, self._in_use(), writers
            )
            if self._registry.get(name) is not None:  # spawned meanwhile under that name
                await worktrees.undo(tree)
                self._refuse_taken_name(name)
        return tree

    async def check(
        self, manifest: Manifest, planned: Sequence[Manifest] = ()
    ) -> tuple[Path, str] | None:
        """What `make` would refuse, without making anything; the repository's common
        git directory and the branch (None without `workspace.git`). `planned`: pods not
        spawned yet whose writable paths count as the running pods' do."""
        spec = manifest.workspace.git
        if spec is None:
            return None
        writers = [(other.name, path) for other in planned for path in writable(other)]
        writers += [(manifest.name, path) for path in writable(manifest)] + self._writers()
        return await worktrees.check(spec, manifest.name, self._protected, self._in_use(), writers)

    async def undo(self, tree: Worktree | None) -> None:
        """Undo `make` for a spawn that failed after it (its record gone): the branch is
        left to a pod spawned meanwhile that took it."""
        if tree is None:
            return
        worktrees.discard(tree)
        async with self._making:
            if self._taken(tree) is None:
                await worktrees.undo_branch(tree)

    def of(self, name: str) -> Worktree | None:
        record = self._registry.get(name)
        if record is None or record.worktree is None:
            return None
        return Worktree.from_json(record.worktree)

    def confine(self, name: str, confine: Confinement) -> Confinement:
        """The pod's confinement with its work tree: its git directory writable (with mode
        workspace-write, as the work tree; else read-only), the pins read-only (none
        without one).

        A directory holding a mount point can be renamed, and a new one made in its
        place: so `objects` and `objects/info` are bound (writable) on their own too, and
        the way to the `alternates` pin is made of mount points, which cannot be."""
        tree = self.of(name)
        if tree is None:
            return self._sharing(confine)
        confine = dataclasses.replace(confine, shown=(*confine.shown, *tree.pins()))
        if confine.mode != "workspace-write":  # git reads its git directory, under hidden state
            return dataclasses.replace(confine, shown=(*confine.shown, Path(tree.gitdir)))
        objects = Path(tree.gitdir) / "objects"
        confine = confine.widened([Path(tree.gitdir)])
        return dataclasses.replace(confine, writable=(*confine.writable, objects, objects / "info"))

    def _sharing(self, confine: Confinement) -> Confinement:
        """A pod whose cwd lies in another pod's work tree (a team's plain child takes
        its parent's cwd): that tree's git directory is shown read-only, so git reads it,
        and its pins hold, so the pod cannot repoint the owner's `.git` file."""
        for _, tree in self._in_use():
            if confine.cwd.is_relative_to(tree.path):
                shown = (*tree.pins(), Path(tree.gitdir))
                return dataclasses.replace(confine, shown=(*confine.shown, *shown))
        return confine

    def status(self, name: str) -> dict[str, object] | None:
        """`status.workspace`."""
        tree = self.of(name)
        return None if tree is None else tree.status(self._sync_errors.get(name))

    def exclude(self, name: str) -> Path | None:
        """The work tree's `info/exclude` (a copy of the repository's), for checkpoints."""
        tree = self.of(name)
        return None if tree is None else Path(tree.gitdir) / "info" / "exclude"

    def sync_soon(self, name: str) -> None:
        """Sync the pod's branch into its repository in the background (after a turn)."""
        if self.of(name) is not None:
            self._in_background(self.sync(name))

    async def sync(self, name: str) -> None:
        """Bring the repository's branch up to the work tree's (fast-forward only); why
        it could not goes to `status.workspace.sync_error` and the log."""
        async with self._syncing[name]:
            tree = self.of(name)
            if tree is None:
                return
            error = await worktrees.sync(tree)
            if error is not None and error != self._sync_errors.get(name):
                log.warning("pod %s: %s", name, error)
            self._sync_errors[name] = error

    async def from_parent(self, parent: str, child: Manifest) -> Manifest:
        """A `spawn_pod {worktree: true}` child's manifest, its `workspace.git.base` the
        parent's current commit (brought into the repository, the parent's branch synced
        first)."""
        tree = self.of(parent)
        spec = child.workspace.git
        if tree is None or spec is None:
            raise ProtocolError(
                "invalid_request",
                f"pod {parent} has no workspace.git work tree, so its child cannot have one "
                "of the same repository; leave worktree out",
            )
        await self.sync(parent)
        base = await worktrees.head_into_repo(tree)
        git = spec.model_copy(update={"base": base})
        workspace = child.workspace.model_copy(update={"git": git})
        return child.model_copy(update={"workspace": workspace})

    async def check_delete(self, name: str, delete_branch: bool) -> None:
        """Refuse, before anything is deleted, a delete that would remove the cwd of
        another pod working in the pod's work tree, and a `delete_branch` that could not
        be done."""
        tree = self.of(name)
        if tree is not None:
            self._refuse_tenants(name, tree)
        if not delete_branch:
            return
        if tree is None:
            raise ProtocolError(
                "invalid_request",
                f"pod {name} has no workspace.git work tree, so no branch of its own to "
                "delete; delete it without delete_branch",
            )
        await worktrees.check_deletable(tree)

    async def remove(self, tree: Worktree | None, name: str, delete_branch: bool) -> None:
        """Remove a deleted pod's work tree (and its branch with `delete_branch`)."""
        self._sync_errors.pop(name, None)
        self._syncing.pop(name, None)
        if tree is None:
            return
        worktrees.discard(tree)
        if not delete_branch:
            return
        async with self._making:
            if (taker := self._taken(tree)) is not None:  # spawned since the record went
                log.warning("pod %s: branch %s is kept, pod %s has it", name, tree.branch, taker)
                return
            try:
                await worktrees.delete_branch(tree)
            except GitFailed as exc:
                raise ProtocolError(
                    "internal",
                    f"pod {name} was deleted, but its branch {tree.branch} could not be "
                    f"deleted from {tree.repo}: {exc}",
                ) from None

    async def diff(self, name: str, stat: bool) -> DiffResult:
        """The daemon's `diff`: synced first, then rendered by capd's hardened git."""
        if self._registry.get(name) is None:
            raise ProtocolError("not_found", f"no pod named {name}; `capctl ps` lists them")
        tree = self.of(name)
        if tree is None:
            raise ProtocolError(
                "invalid_request", f"pod {name} has no workspace.git work tree to diff"
            )
        await self.sync(name)
        merge_base, text = await worktrees.diff(tree, stat)
        return DiffResult(
            repo=tree.repo, branch=tree.branch, base=tree.base, merge_base=merge_base, text=text
        )

    def check_writer(self, manifest: Manifest) -> None:
        """Refuse (invalid_request) a pod being spawned that could write a repository
        another pod has a work tree of (see `worktrees.check_unwritable`)."""
        trees = self._in_use()  # most often none: then nothing to check
        for path in writable(manifest) if trees else ():
            for _, tree in trees:
                worktrees.check_unwritable(
                    Path(tree.repo), Path(tree.common_dir), manifest.name, path
                )

    def _refuse_tenants(self, name: str, tree: Worktree) -> None:
        """Another pod whose cwd lies in the work tree (a plain child in its parent's)."""
        path = Path(tree.path)
        for record in self._registry.all():
            if record.name == name:
                continue
            cwd = _stored_cwd(record.manifest)
            if cwd is not None and Path(cwd).is_relative_to(path):
                raise ProtocolError(
                    "invalid_request",
                    f"pod {record.name} works in pod {name}'s work tree ({cwd}), which a "
                    f"delete removes; delete pod {record.name} first",
                )

    def _writers(self) -> list[tuple[str, Path]]:
        """What the pods' confined processes can write, each with the pod's name."""
        found = []
        for record in self._registry.all():
            try:
                manifest = Manifest.model_validate_json(record.manifest)
            except ValueError:  # a stored manifest that does not parse: it cannot start
                continue
            found += [(record.name, path) for path in writable(manifest)]
        return found

    def _refuse_taken_name(self, name: str) -> None:
        """A spawn of that name made its work tree while this one waited, or one without
        a work tree was spawned meanwhile."""
        if self._registry.get(name) is not None:
            raise ProtocolError("already_exists", f"a pod named {name} already exists")

    def _taken(self, tree: Worktree) -> str | None:
        """The pod whose work tree is on `tree`'s branch of its repository now, if any."""
        for name, theirs in self._in_use():
            if theirs.common_dir == tree.common_dir and theirs.branch == tree.branch:
                return name
        return None

    def _in_use(self) -> list[tuple[str, Worktree]]:
        """The pods' work trees, whose branches are taken."""
        found = []
        for record in self._registry.with_worktree():
            assert record.worktree is not None
            found.append((record.name, Worktree.from_json(record.worktree)))
        return found


def writable(manifest: Manifest) -> list[Path]:
    """What a confined pod's processes can write: its cwd and `sandbox.writable` with mode
    workspace-write, nothing with read-only (with mode off it is not confined: it could
    run anything itself)."""
    if manifest.sandbox.mode != "workspace-write":
        return []
    return [Path(path) for path in (manifest.cwd, *manifest.sandbox.writable) if path]


def _stored_cwd(manifest: str) -> str | None:
    """The cwd of a stored manifest, without validating all of it (a delete reads every
    pod's); None when it has none or it does not parse (such a pod cannot start, so it
    works nowhere)."""
    cwd = stored_field(manifest, "cwd")
    return cwd if isinstance(cwd, str) else None
