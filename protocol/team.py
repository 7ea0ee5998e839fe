"""A team file (§16): the pods `capctl apply -f` makes the fleet match."""

from pydantic import Field, model_validator

from protocol.manifest import Manifest, _Strict
from protocol.paths import POD_NAME_PATTERN


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
    def _parents_in_file(self) -> "TeamFile":
        names = [pod.name for pod in self.pods]
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise ValueError(f"pod {name} is listed twice")
            seen.add(name)
        for pod in self.pods:
            if pod.parent is not None and pod.parent not in seen:
                raise ValueError(f"pod {pod.name}: parent: {pod.parent} is not a pod of the file")
            if pod.parent == pod.name:
                raise ValueError(f"pod {pod.name}: parent: a pod cannot be its own parent")
        return self
