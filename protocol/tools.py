"""Arguments of the built-in tools (docs/protocol.md, Built-in tools); their JSON Schemas
are what the model sees."""

import functools
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field


class ToolArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """The schema, made once per class (pydantic takes milliseconds to make it, which
        every spawn and restore paid) and shared by every pod: read-only, so one pod's
        change cannot reach another's; `copy.deepcopy` gives a plain one to change."""
        return _schema_of(cls)


@functools.cache
def _schema_of(model: type[ToolArgs]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return _frozen(schema)


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return ReadOnlyDict({key: _frozen(item) for key, item in value.items()})
    if isinstance(value, list):
        return ReadOnlyList(_frozen(item) for item in value)
    return value


def _thawed(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _thawed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_thawed(item) for item in value]
    return value


def _refuse(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise TypeError("a built-in tool's schema is shared by every pod: change a deepcopy of it")


class ReadOnlyDict(dict[str, Any]):
    """A dict (orjson and json encode it as one) whose changes raise TypeError."""

    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __deepcopy__(self, _memo: dict[int, Any]) -> dict[str, Any]:
        return _thawed(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (_thawed(self),))


class ReadOnlyList(list[Any]):
    """A list (orjson and json encode it as one) whose changes raise TypeError."""

    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = clear = extend = insert = pop = remove = reverse = sort = _refuse

    def __deepcopy__(self, _memo: dict[int, Any]) -> list[Any]:
        return _thawed(self)

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (_thawed(self),))


class BashArgs(ToolArgs):
    command: str = Field(description="Shell command, run by bash in the working directory.")
    timeout_s: float | None = Field(
        default=None, gt=0, le=3600, description="Seconds before the command is killed."
    )


class ReadFileArgs(ToolArgs):
    path: str = Field(description="File path, relative to the working directory.")
    offset: int = Field(default=1, ge=1, description="First line to read, counting from 1.")
    limit: int = Field(default=2000, ge=1, description="Largest number of lines to read.")


class WriteFileArgs(ToolArgs):
    path: str = Field(description="File path, relative to the working directory.")
    content: str = Field(description="The whole new content of the file.")


class EditFileArgs(ToolArgs):
    path: str = Field(description="File path, relative to the working directory.")
    old_text: str = Field(description="Exact text to replace; it must occur exactly once.")
    new_text: str = Field(description="Replacement text.")


class SpawnPodArgs(ToolArgs):
    name: str = Field(description="Name of the new pod: lower-case letters, digits, '_.-'.")
    task: str = Field(description="What the child should do; sent as its first message.")
    system_prompt: str | None = Field(
        default=None, description="The child's system prompt; yours when omitted."
    )
    tools: list[str] | None = Field(
        default=None, description="The child's tools, a subset of yours; all of yours if omitted."
    )
    cwd: str | None = Field(
        default=None,
        description="The child's working directory, inside yours (relative to it or absolute); "
        "created if missing; yours when omitted.",
    )
    model: dict[str, Any] | None = Field(
        default=None,
        description='Model settings that differ from yours, e.g. {"name": "..."}; '
        "the provider, base_url and api_key_env are always yours.",
    )
    mcp_servers: list[str] | None = Field(
        default=None,
        description="Names of your MCP servers the child may use (the middle part of "
        "mcp__<server>__<tool>); all of yours if omitted.",
    )
    sandbox: dict[str, Any] | None = Field(
        default=None,
        description='Sandbox settings for the child, no wider than yours, e.g. {"network": '
        'false} or {"mode": "read-only"}; yours when omitted.',
    )
    worktree: bool = Field(
        default=False,
        description="Give the child its own git work tree of your repository, on a new branch "
        "from your current commit (only when your cwd is such a work tree); cwd must be omitted.",
    )


class SendToPodArgs(ToolArgs):
    name: str = Field(description="One of your child pods (or their descendants).")
    text: str = Field(description="The message.")


class PodNameArgs(ToolArgs):
    name: str = Field(description="One of your child pods (or their descendants).")


class NoArgs(ToolArgs):
    pass
