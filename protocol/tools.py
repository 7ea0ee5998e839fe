"""Arguments of the built-in tools (docs/protocol.md, Built-in tools); their JSON Schemas
are what the model sees."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ToolArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        schema = cls.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        return schema


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
