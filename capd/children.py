"""Child pods as the pod tools see them: what a pod may spawn, and whom it may reach.

A child is an ordinary pod whose `parent` is the spawner's socket. It works inside the
parent's directory, with a subset of its tools, its provider credentials and its limits,
and the parent may have at most `limits.max_children` running children. The other tools
reach only the caller's descendants. Every refusal is a ToolFailed the model can read.
"""

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import ValidationError

from capd.controller import PodController
from capd.tools.base import ToolFailed
from capd.tools.files import resolve_inside
from protocol.errors import ProtocolError
from protocol.events import AssistantMessage
from protocol.manifest import Manifest, ModelConfig
from protocol.methods import Notify, Run, describe_validation_error
from protocol.tools import SpawnPodArgs

if TYPE_CHECKING:
    from capd.daemon import Daemon

INHERITED_MODEL_FIELDS = ("provider", "base_url", "api_key_env")
"""A child cannot choose where its model calls go, nor which credential they carry."""


class ChildPods:
    """The pod tools' view of the daemon, for the pod named `pod`."""

    def __init__(self, daemon: "Daemon", pod: str) -> None:
        self._daemon = daemon
        self._pod = pod

    @property
    def _me(self) -> PodController:
        return self._daemon.pods[self._pod].controller

    async def spawn(self, args: SpawnPodArgs) -> str:
        me = self._me
        manifest = self._child_manifest(me.manifest, args)
        running = [r.name for r, depth in self._daemon.descendants(self._pod) if depth == 1]
        running = [name for name in running if name in self._daemon.pods]
        limit = me.manifest.limits.max_children
        if len(running) >= limit:
            raise ToolFailed(
                f"you already have {len(running)} running child pods ({', '.join(running)}), "
                f"the most limits.max_children={limit} allows; stop one with stop_pod first"
            )
        # Shielded: a pause or stop of this pod must not leave a child half made.
        turn_id = await asyncio.shield(self._start_child(manifest, args.task))
        return (
            f"spawned pod {args.name} (cwd {manifest.cwd}, tools: {_names(manifest.tools)}); "
            f"it is working on your task as turn {turn_id}. Its report reaches you as a "
            "notification when that turn ends."
        )

    async def _start_child(self, manifest: Manifest, task: str) -> str:
        """Spawn the child and send it its task; the child's turn_id."""
        try:
            spawned = await self._daemon.spawn(manifest, str(self._me.socket_path))
            if self._pod not in self._daemon.pods:
                await self._daemon.stop_pod(spawned.name)
                raise ToolFailed(f"pod {self._pod} stopped while pod {spawned.name} came up")
            child = self._daemon.pods[spawned.name].controller
            started = await child.call(Run(text=task))
        except ProtocolError as exc:
            raise ToolFailed(f"cannot spawn pod {manifest.name}: {exc.message}") from None
        return str(started["turn_id"])

    async def send(self, name: str, text: str) -> str:
        child = self._reachable(name)
        try:
            if child.status == "paused":
                await child.call(Notify(text=text, source=f"pod {self._pod}"))
                return f"pod {name} is paused; it reads your message when it is resumed"
            result = await child.call(Run(text=text, if_busy="queue"))
        except ProtocolError as exc:
            raise ToolFailed(f"cannot send to pod {name}: {exc.message}") from None
        if result.get("queued"):
            return (
                f"pod {name} is busy; your message is queued as its next turn "
                f"{result['turn_id']}. You get a report when that turn ends."
            )
        return f"pod {name} started turn {result['turn_id']}. You get a report when it ends."

    def read_output(self, name: str, limit: int) -> str:
        self._check_descendant(name)
        store = self._daemon.store
        after = store.read_cursor(self._pod, name)
        rows = store.events_of_kind_after(name, after, "assistant_message")
        status = self._status(name)
        text = _assistant_text(data for _, data in rows)
        if rows:
            store.set_read_cursor(self._pod, name, rows[-1][0])
        if not text:
            return f"pod {name} is {status}; it has written nothing new since your last read"
        if len(text) > limit:
            text = (
                f"[earlier output cut: the last {limit} of {len(text)} characters follow]\n"
                + text[-limit:]
            )
        return f"pod {name} is {status}; its output since your last read:\n{text}"

    async def stop(self, name: str) -> str:
        self._check_descendant(name)
        if name not in self._daemon.pods:
            return f"pod {name} is already stopped"
        stopped = await self._daemon.stop_pod(name)
        others = [pod for pod in stopped if pod != name]
        also = f" and its descendants {_names(others)}" if others else ""
        return f"stopped pod {name}{also}; a running turn was cancelled"

    def list(self) -> str:
        family = self._daemon.descendants(self._pod)
        if not family:
            return "you have no child pods"
        lines = []
        for record, depth in family:
            running = self._daemon.pods.get(record.name)
            detail = self._status(record.name)
            if running and running.controller.turn:
                detail += f", turn {running.controller.turn.turn_id}"
            lines.append(f"{'  ' * (depth - 1)}- {record.name} ({detail})")
        return "\n".join(lines)

    # -- checks -------------------------------------------------------------------------

    def _check_descendant(self, name: str) -> None:
        if name not in {record.name for record, _ in self._daemon.descendants(self._pod)}:
            raise ToolFailed(
                f"{name} is not one of your child pods; list_pods shows the ones you can reach"
            )

    def _reachable(self, name: str) -> PodController:
        self._check_descendant(name)
        running = self._daemon.pods.get(name)
        if running is None:
            raise ToolFailed(f"pod {name} is stopped; it cannot take messages")
        return running.controller

    def _status(self, name: str) -> str:
        running = self._daemon.pods.get(name)
        return running.controller.status if running else "stopped"

    def _child_manifest(self, parent: Manifest, args: SpawnPodArgs) -> Manifest:
        tools = list(parent.tools) if args.tools is None else args.tools
        extra = [tool for tool in tools if tool not in parent.tools]
        if extra:
            raise ToolFailed(
                f"cannot give a child tools you do not have: {_names(extra)} "
                f"(a child's tools are a subset of yours: {_names(parent.tools)})"
            )
        candidate: dict[str, Any] = {
            "name": args.name,
            "model": _child_model(parent.model, args.model or {}),
            "system_prompt": parent.system_prompt
            if args.system_prompt is None
            else args.system_prompt,
            "cwd": str(_child_cwd(parent, args.cwd)),
            "tools": tools,
            "limits": parent.limits.model_dump(),
        }
        try:
            return Manifest.model_validate(candidate)
        except ValidationError as exc:
            raise ToolFailed(
                f"cannot spawn pod {args.name}: {describe_validation_error(exc)}"
            ) from None


def _child_model(parent: ModelConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    inherited = parent.model_dump()
    for key in INHERITED_MODEL_FIELDS:
        if key in overrides and overrides[key] != inherited[key]:
            raise ToolFailed(
                f"a child uses your model's {', '.join(INHERITED_MODEL_FIELDS)}; "
                f"leave {key} out of model"
            )
    return {**inherited, **overrides}


def _child_cwd(parent: Manifest, cwd: str | None) -> Path:
    assert parent.cwd is not None
    root = Path(parent.cwd)
    if cwd is None:
        return root.resolve()
    target = resolve_inside(cwd, root)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolFailed(f"cannot use {cwd} as the child's cwd: {exc.strerror or exc}") from None
    return target


def _assistant_text(stored: Iterable[bytes]) -> str:
    """The assistant text of stored assistant_message events; a step a pause interrupted
    runs straight on into its continuation, other steps are separated by a blank line."""
    parts: list[str] = []
    glue = ""
    for data in stored:
        message = AssistantMessage.model_validate(orjson.loads(data))
        if message.text:
            parts.append(glue + message.text if parts else message.text)
        glue = "" if message.interrupted else "\n\n"
    return "".join(parts)


def _names(names: Iterable[str]) -> str:
    return ", ".join(names) or "none"
