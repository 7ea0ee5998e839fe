"""A pod's controller in-process: a real store, a `FakeEngine` at the engine seam, and an
outbox that records which parents it was asked to deliver to instead of connecting."""

import asyncio
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from capd.budgets import Ledger
from capd.controller import PodController
from capd.outbox import Outbox
from capd.registry import PodRegistry
from capd.store import Store
from capd.tools.base import ToolContext
from capd.tools.toolbox import Toolbox
from protocol.events import PodStatusName
from protocol.manifest import Manifest
from tests.fakes.engine import WAIT_S, FakeEngine

PARENT = "/run/capd/pods/parent.sock"
"""The parent socket of the `child` fixture's pod; nothing listens on it."""


async def not_reconfigured(pod: PodController, manifest: Manifest) -> list[str]:
    """The supervisor's `reconfigure`, which these controllers without one never reach."""
    raise AssertionError(f"pod {pod.name} was reconfigured in a test without a supervisor")


class RecordingOutbox(Outbox):
    """Records each `poke`; the reports stay in the store for the test to read."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.poked: list[str] = []

    def poke(self, target: str) -> None:
        self.poked.append(target)


@dataclass
class StatusLog:
    """The pod's `on_status` callback: every status it took, and a way to wait for one."""

    seen: list[PodStatusName] = field(default_factory=list)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __call__(self, name: str, status: PodStatusName) -> None:
        self.seen.append(status)
        self._changed.set()

    async def until(self, pod: PodController, status: PodStatusName) -> None:
        async with asyncio.timeout(WAIT_S):
            while pod.status != status:
                self._changed.clear()
                await self._changed.wait()


@dataclass
class Rig:
    pod: PodController
    engine: FakeEngine
    store: Store
    outbox: RecordingOutbox
    statuses: StatusLog
    actor: "asyncio.Task[None] | None" = None

    @classmethod
    def build(
        cls,
        tmp_path: Path,
        store: Store,
        engine: FakeEngine | None = None,
        *,
        name: str = "p",
        parent: str | None = None,
    ) -> "Rig":
        manifest = Manifest.model_validate(
            {"name": name, "cwd": str(tmp_path), "model": {"provider": "scripted"}}
        )
        engine = engine or FakeEngine()
        outbox = RecordingOutbox(store)
        statuses = StatusLog()
        pod = PodController(
            manifest,
            engine=engine,
            toolbox=Toolbox.builtin(manifest.tools, ToolContext(tmp_path, name)),
            parent=parent,
            socket_path=tmp_path / f"{name}.sock",
            store=store,
            outbox=outbox,
            ledger=Ledger(PodRegistry(store, tmp_path), store),
            on_status=statuses,
            reconfigure=not_reconfigured,
        )
        return cls(pod, engine, store, outbox, statuses)

    def start(self) -> "Rig":
        self.actor = asyncio.create_task(self.pod.run())
        return self

    def restore(self) -> "Rig":
        """Restore from what the store holds, as the supervisor does before `start`."""
        self.pod.restore(data for _, data in self.store.events_after(self.pod.name, 0, 10**6))
        return self

    async def call(self, request: Any) -> dict[str, Any]:
        async with asyncio.timeout(WAIT_S):
            return await self.pod.call(request)

    async def until(self, status: PodStatusName) -> None:
        await self.statuses.until(self.pod, status)

    def events(self, *kinds: str) -> list[dict[str, Any]]:
        """The pod's stored events, of `kinds` only if given."""
        rows = self.store.events_after(self.pod.name, 0, 10**6)
        events = [orjson.loads(data) for _, data in rows]
        return [e for e in events if not kinds or e["event"] in kinds]

    def kinds(self, after_seq: int = 0) -> list[str]:
        return [e["event"] for e in self.events() if e["seq"] > after_seq]

    async def crash(self) -> None:
        """End the actor and the turn without a word to the store, as SIGKILL would."""
        assert self.actor is not None
        self.actor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.actor
        await self.engine.abandon()

    async def close(self) -> None:
        if self.actor is not None and not self.actor.done():
            async with asyncio.timeout(WAIT_S):
                await self.pod.stop("cancel")
                await self.actor
