"""A team file (§16): the pods `capctl apply -f` makes the fleet match."""

from collections.abc import Sequence

from pydantic import Field, model_validator

from protocol.manifest import Manifest, _Strict
from protocol.paths import POD_NAME_PATTERN

PLAN_SYMBOLS = {
    "spawn": "+",
    "start": ">",
    "reconfigure": "~",
    "deferred": "…",
    "delete": "-",
    "unchanged": "=",
}
"""How `capctl apply` marks each step of a plan."""


class TeamPod(Manifest):
    """A manifest plus the pod's place in the team."""

    parent: str | None = Field(default=None, pattern=POD_NAME_PATTERN)
    """The name of another pod of the same file; null: a top-level pod."""

    def manifest(self) -> Manifest:
        return Manifest.model_validate(self.model_dump(exclude={"parent"}, exclude_unset=True))


class TeamFile(_Strict):
    team: str = Field(pattern=POD_NAME_PATTERN)
    pods: list[TeamPod] = Field(min_length=1)

    @model_validator(mode="after")
    def _a_tree(self) -> "TeamFile":
        check_tree(self.pods)
        return self


def check_tree(pods: Sequence[TeamPod]) -> None:
    """Refuse (ValueError, naming the pod and the field) pods that do not make a tree
    their limits allow: a name listed twice, a `parent` not in the file, a cycle, a pod
    deeper than its root's `limits.max_depth`, a parent with more children in the file
    than its `limits.max_children`."""
    by_name: dict[str, TeamPod] = {}
    for pod in pods:
        if pod.name in by_name:
            raise ValueError(f"pod {pod.name}: name: listed twice")
        by_name[pod.name] = pod
    for pod in pods:
        if pod.parent is not None and pod.parent not in by_name:
            raise ValueError(f"pod {pod.name}: parent: {pod.parent} is not a pod of the file")
    for pod in pods:
        chain = [pod.name]
        parent = pod.parent
        while parent is not None:
            if parent in chain:
                cycle = " → ".join([*chain[chain.index(parent) :], parent])
                raise ValueError(f"pod {pod.name}: parent: the parents make a cycle ({cycle})")
            chain.append(parent)
            parent = by_name[parent].parent
        root = by_name[chain[-1]]
        if len(chain) - 1 > root.limits.max_depth:
            raise ValueError(
                f"pod {pod.name}: parent: it would be {len(chain) - 1} levels below pod "
                f"{root.name}, more than its limits.max_depth={root.limits.max_depth}"
            )
    for parent in by_name.values():
        children = [pod.name for pod in pods if pod.parent == parent.name]
        if len(children) > parent.limits.max_children:
            raise ValueError(
                f"pod {parent.name}: limits.max_children: it has {len(children)} children in "
                f"the file ({', '.join(children)}), more than its "
                f"limits.max_children={parent.limits.max_children}"
            )


def in_tree_order(pods: Sequence[TeamPod]) -> list[TeamPod]:
    """Parents before their children, siblings in the file's order (a checked tree)."""
    placed: list[TeamPod] = []

    def place(parent: str | None) -> None:
        for pod in pods:
            if pod.parent == parent:
                placed.append(pod)
                place(pod.name)

    place(None)
    return placed
