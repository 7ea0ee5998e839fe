"""Arguments of the built-in tools (PROTOCOL.md §8); their JSON Schemas are what the model sees."""

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
    name: str
    task: str
    system_prompt: str | None = None
    tools: list[str] | None = None
    cwd: str | None = None
    model: dict[str, Any] | None = None


class SendToPodArgs(ToolArgs):
    name: str
    text: str


class PodNameArgs(ToolArgs):
    name: str


class NoArgs(ToolArgs):
    pass
