"""Every pod this daemon knows, running or stopped: the store's `pods` table, mirrored.

`status` lists a pod's children and `list` every pod; with thousands of pods a query per
request would dominate both. The registry answers from memory and writes through to the
store, so the table and the mirror change together.
"""

import dataclasses
import time

from capd.store import OwedReport, PodRecord, Store


class PodRegistry:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._records: dict[str, PodRecord] = {record.name: record for record in store.pods()}
        """In creation order, as the table lists them."""
        self._children: dict[str, list[str]] = {}
        """Parent socket → names of the pods that name it as parent, in creation order."""
        for record in self._records.values():
            self._index(record)

    def get(self, name: str) -> PodRecord | None:
        return self._records.get(name)

    def all(self) -> list[PodRecord]:
        return list(self._records.values())

    def children(self, parent_socket: str) -> list[str]:
        return list(self._children.get(parent_socket, ()))

    def add(self, name: str, manifest: str, parent: str | None) -> None:
        self._store.add_pod(name, manifest, parent, time.time())
        record = PodRecord(name, manifest, parent, stopped=False)
        self._records[name] = record
        self._index(record)

    def set_stopped(self, name: str, stopped: bool, report: OwedReport | None = None) -> None:
        """Mark the pod stopped or not, with the `shut_down` report a stop owes its parent."""
        self._store.set_stopped(name, stopped, report)
        self._records[name] = dataclasses.replace(self._records[name], stopped=stopped)

    def delete(self, name: str, socket: str) -> None:
        """Remove the pod and its state; its children become top-level pods."""
        self._store.delete_pod(name, socket)
        record = self._records.pop(name)
        if record.parent is not None:
            self._children[record.parent].remove(name)
        for child in self._children.pop(socket, ()):
            self._records[child] = dataclasses.replace(self._records[child], parent=None)

    def _index(self, record: PodRecord) -> None:
        if record.parent is not None:
            self._children.setdefault(record.parent, []).append(record.name)
