"""`reconfigure` (§14): what a pod's new manifest changes, and what it may not change.

The supervisor checks a new manifest as a spawn's and builds the parts it replaces
(`Parts`); the pod's actor commits it with its `reconfigured` event and swaps them in.
"""

from dataclasses import dataclass

from pydantic import BaseModel

from capd.checkpoints import CheckpointStore
from capd.engines.base import Engine
from capd.tools.toolbox import Toolbox
from protocol.errors import ProtocolError
from protocol.manifest import Manifest

KEPT = {
    "name": "a pod keeps its name",
    "cwd": "a pod keeps its cwd: leave cwd out",
    "workspace": "a pod keeps its workspace settings",
}
"""The fields a running pod cannot change, and why; spawn a new pod for another one."""


@dataclass(frozen=True, slots=True)
class Parts:
    """What a pod runs with that a new manifest replaces."""

    engine: Engine
    toolbox: Toolbox
    checkpoints: CheckpointStore | None


def changed_fields(old: Manifest, new: Manifest) -> list[str]:
    """The top-level fields of `new` (its paths resolved, as `old`'s) that differ from
    `old`, in manifest order; a field a pod keeps, or another engine kind, is refused
    (invalid_request)."""
    changed = [
        field for field in Manifest.model_fields if getattr(old, field) != getattr(new, field)
    ]
    if old.engine.kind != new.engine.kind:
        raise _kept(
            old.name,
            f"engine kind {new.engine.kind} is not its {old.engine.kind}",
            "a pod keeps its engine's kind",
        )
    for field in changed:
        if field in KEPT:
            theirs, mine = getattr(new, field), getattr(old, field)
            raise _kept(
                old.name, f"{field} {_shown(theirs)} is not its {_shown(mine)}", KEPT[field]
            )
    return changed


def _shown(value: object) -> str:
    return value.model_dump_json() if isinstance(value, BaseModel) else str(value)


def _kept(pod: str, what: str, why: str) -> ProtocolError:
    return ProtocolError(
        "invalid_request", f"cannot reconfigure pod {pod}: {what}; {why} (spawn a new pod instead)"
    )
