"""Every pod this daemon knows, running or stopped: the store's `pods` table, mirrored,
and the tree its `parent` column makes (children, descendants, depth).

`status` lists a pod's children and `list` every pod; with thousands of pods a query per
request would dominate both. The registry answers from memory and writes through to the
store, so the table and the mirror change together. A pod names its parent by socket
path, so the tree queries map names to sockets and back.
"""

import dataclasses
import os
import time
from pathlib import Path

from capd.store import Carried, OwedReport, PodRecord, Store
from protocol.paths import pods_dir


class PodRegistry:
    def __init__(self, store: Store, runtime_dir: Path) -> None:
        self._store = store
        self.pods_dir = pods_dir(runtime_dir)
        """Where the pods' sockets are (made once: a restore asks for every pod's)."""
        self._records: dict[str, PodRecord] = {record.name: record for record in store.pods()}
        """In creation order, as the table lists them."""
        self._children: dict[str, list[str]] = {}
        """Parent socket → names of the pods that name it as parent, in creation order."""
        self._sockets: dict[str, str] = {}
        """Name → socket path of each known pod; `status` asks for children on every call."""
        self._worktrees: dict[str, None] = {}
        """Names of the pods with a work tree, which every spawn checks, in creation order."""
        for record in self._records.values():
            self._index(record)

    def get(self, name: str) -> PodRecord | None:
        return self._records.get(name)

    def all(self) -> list[PodRecord]:
        return list(self._records.values())

    def with_worktree(self) -> list[PodRecord]:
        """The pods with a work tree (`all` that have one, without walking every pod)."""
        return [self._records[name] for name in self._worktrees]

    def add(
        self,
        name: str,
        manifest: str,
        parent: str | None,
        team: str | None = None,
        worktree: str | None = None,
    ) -> None:
        self._store.add_pod(name, manifest, parent, time.time(), team, worktree)
        self.learn(PodRecord(name, manifest, parent, False, team, worktree))

    def learn(self, record: PodRecord) -> None:
        """A pod this daemon did not know, already in the store: one just added, or one
        another fleet node held until it was adopted here."""
        self._records[record.name] = record
        self._index(record)

    def set_manifest(self, name: str, manifest: str) -> None:
        """Replace the pod's stored manifest (a `set_budget` changed it)."""
        self._store.set_manifest(name, manifest)
        self._records[name] = dataclasses.replace(self._records[name], manifest=manifest)

    def manifest_committed(self, name: str, manifest: str) -> None:
        """The pod's manifest changed in the store, committed with its `reconfigured` (which
        also clears a pending manifest)."""
        self._records[name] = dataclasses.replace(
            self._records[name], manifest=manifest, pending_manifest=None
        )

    def set_pending_manifest(self, name: str, manifest: str | None) -> None:
        """Keep (or drop) a manifest to apply when the pod's running turn ends."""
        self._store.set_pending_manifest(name, manifest)
        self._records[name] = dataclasses.replace(self._records[name], pending_manifest=manifest)

    def parent_of(self, name: str) -> str | None:
        """The name of the pod's local parent; None for a top-level pod."""
        record = self._records.get(name)
        return self.name_at(record.parent) if record is not None else None

    def set_stopped(self, name: str, stopped: bool, report: OwedReport | None = None) -> None:
        """Mark the pod stopped or not, with the `shut_down` report a stop owes its parent."""
        self._store.set_stopped(name, stopped, report)
        self._records[name] = dataclasses.replace(self._records[name], stopped=stopped)

    def delete(self, name: str, carried: Carried | None = None) -> None:
        """Remove the pod and its state; its children become top-level pods. `carried`:
        see `Store.delete_pod`."""
        socket = self._sockets.pop(name)
        self._store.delete_pod(name, socket, carried)
        record = self._records.pop(name)
        self._worktrees.pop(name, None)
        if record.parent is not None:
            self._children[record.parent].remove(name)
        for child in self._children.pop(socket, ()):
            self._records[child] = dataclasses.replace(self._records[child], parent=None)

    # -- the tree -----------------------------------------------------------------------

    def socket(self, name: str) -> Path:
        """Where the pod named `name` listens (or would): `protocol.paths.pod_socket`."""
        return self.pods_dir / f"{name}.sock"

    def children_of(self, name: str) -> list[str]:
        socket = self._sockets.get(name) or str(self.socket(name))
        return list(self._children.get(socket, ()))

    def descendants(self, name: str) -> list[tuple[PodRecord, int]]:
        """The pod's children, their children and so on, depth first, each with its depth."""
        found: list[tuple[PodRecord, int]] = []
        seen = {name}

        def walk(pod: str, depth: int) -> None:
            for child in self.children_of(pod):
                record = self._records.get(child)
                if record is not None and child not in seen:
                    seen.add(child)
                    found.append((record, depth))
                    walk(child, depth + 1)

        walk(name, 1)
        return found

    def depth(self, name: str) -> int:
        """How many local ancestors the pod has (0 for a top-level pod)."""
        depth, seen = 0, {name}
        record = self._records.get(name)
        while record is not None and (parent := self.name_at(record.parent)) not in seen:
            if parent is None:
                break
            depth += 1
            seen.add(parent)
            record = self._records.get(parent)
        return depth

    def name_at(self, socket: str | None) -> str | None:
        """The name of a known pod (running or stopped) whose socket is `socket`."""
        name = self.pods_dir_name(socket)
        return name if name is not None and name in self._records else None

    def pods_dir_name(self, socket: str | None) -> str | None:
        """The pod name a socket path in this daemon's pods directory stands for, however
        it is spelled (`..`, a symlink to the runtime dir or to the socket); None for a
        path elsewhere. Whether such a pod exists is the caller's question."""
        if socket is None:
            return None
        path = Path(socket)
        if path != self.socket(path.stem):
            path = Path(os.path.realpath(path))
            real_dir = Path(os.path.realpath(self.pods_dir))
            if path.parent != real_dir or path.suffix != ".sock":
                return None
        return path.stem

    def _index(self, record: PodRecord) -> None:
        self._sockets[record.name] = str(self.socket(record.name))
        if record.worktree is not None:
            self._worktrees[record.name] = None
        if record.parent is not None:
            self._children.setdefault(record.parent, []).append(record.name)
