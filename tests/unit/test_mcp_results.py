"""What the model reads of an MCP tool's result, built from the SDK's own types."""

import base64
import json
from pathlib import Path
from typing import Any

import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError
from mcp_types.jsonrpc import CONNECTION_CLOSED, REQUEST_TIMEOUT

from capd.tools.base import ToolContext
from capd.tools.mcp.client import Connection, describe, result_text
from capd.tools.mcp.remote import CallTimedOut, ConnectionLost, ServerError


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _result(*content: Any, **fields: Any) -> types.CallToolResult:
    return types.CallToolResult(content=list(content), **fields)


def test_text_blocks_are_joined_by_blank_lines() -> None:
    assert result_text(_result(_text("one"), _text("two"))) == "one\n\ntwo"


def test_structured_content_is_shown_when_no_text_holds_it() -> None:
    data = {"temperature": 21, "city": "Zürich"}
    alone = _result(structured_content=data)
    assert json.loads(result_text(alone)) == data
    duplicated = _result(_text(json.dumps(data, indent=2)), structured_content=data)
    assert result_text(duplicated) == json.dumps(data, indent=2)
    other = _result(_text("the weather"), structured_content=data)
    assert result_text(other).startswith("the weather\n\n{")


def test_images_audio_and_blobs_are_one_line_notes() -> None:
    png = base64.b64encode(b"\x89PNG" + bytes(2044)).decode()
    image = types.ImageContent(type="image", data=png, mime_type="image/png")
    audio = types.AudioContent(
        type="audio", data=base64.b64encode(b"abc").decode(), mime_type="audio/wav"
    )
    blob = types.EmbeddedResource(
        type="resource",
        resource=types.BlobResourceContents(
            uri="demo://blob/1", mime_type="application/octet-stream", blob=png
        ),
    )
    assert result_text(_result(image, audio, blob)).splitlines() == [
        "[image image/png, 2.0 KiB, not shown]",
        "",
        "[audio audio/wav, 3 bytes, not shown]",
        "",
        "[resource demo://blob/1, application/octet-stream, 2.0 KiB, not shown]",
    ]


def test_resource_links_and_embedded_text_resources() -> None:
    link = types.ResourceLink(
        type="resource_link", name="notes", uri="file:///notes.md", mime_type="text/markdown"
    )
    embedded = types.EmbeddedResource(
        type="resource",
        resource=types.TextResourceContents(uri="demo://text/1", text="hello there"),
    )
    assert result_text(_result(link, embedded)) == (
        "[resource notes: file:///notes.md (text/markdown)]\n\n"
        "[resource demo://text/1]\nhello there"
    )


def test_an_empty_result_says_so() -> None:
    assert result_text(_result()) == "[no output]"
    assert result_text(_result(is_error=True)) == "[the tool failed and said nothing]"


class _Session:
    def __init__(self, broken: str | None) -> None:
        self.broken = broken

    async def validate_tool_result(self, name: str, result: types.CallToolResult) -> None:
        if self.broken is not None:
            raise RuntimeError(self.broken)


class _Client:
    """Stands in for mcp.Client: answers every call with `answer` (or raises it)."""

    def __init__(self, answer: types.CallToolResult | BaseException, broken: str | None = None):
        self.answer = answer
        self.session = _Session(broken)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], read_timeout_seconds: float
    ) -> types.CallToolResult:
        if isinstance(self.answer, BaseException):
            raise self.answer
        await self.session.validate_tool_result(name, self.answer)
        return self.answer


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext(cwd=tmp_path, pod="p", spill_dir=tmp_path / "spill")


async def test_an_error_result_is_an_error_with_the_servers_text(ctx: ToolContext) -> None:
    conn = Connection(_Client(_result(_text("Invalid timezone"), is_error=True)))  # type: ignore[arg-type]
    outcome = await conn.call("t", {}, 5.0, ctx)
    assert outcome.is_error
    assert outcome.output == "Invalid timezone"


async def test_a_result_that_breaks_its_output_schema_keeps_its_text(ctx: ToolContext) -> None:
    answer = _result(_text("21 degrees"), structured_content={"t": "warm"})
    broken = "Invalid structured content returned by tool t: 'warm' is not of type 'number'"
    outcome = await Connection(_Client(answer, broken)).call("t", {}, 5.0, ctx)  # type: ignore[arg-type]
    assert outcome.is_error
    assert outcome.output.startswith("21 degrees")
    assert broken in outcome.output


async def test_big_output_is_cut_and_saved_in_full(ctx: ToolContext) -> None:
    big = "x" * (ctx.output_limit + 1000)
    outcome = await Connection(_Client(_result(_text(big)))).call("t", {}, 5.0, ctx)  # type: ignore[arg-type]
    [spilled] = (ctx.spill_dir or Path()).glob("mcp-*.out")
    assert spilled.read_text() == big
    assert outcome.output.startswith("x" * ctx.output_limit + "\n[output truncated")
    assert str(spilled) in outcome.output


@pytest.mark.parametrize(
    ("error", "raised"),
    [
        (MCPError(REQUEST_TIMEOUT, "Request 'tools/call' timed out"), CallTimedOut),
        (MCPError(CONNECTION_CLOSED, "Connection closed"), ConnectionLost),
        (MCPError(-32602, "Unknown tool: nope"), ServerError),
    ],
)
async def test_mcp_errors_become_what_the_supervisor_acts_on(
    ctx: ToolContext, error: MCPError, raised: type[Exception]
) -> None:
    with pytest.raises(raised):
        await Connection(_Client(error)).call("t", {}, 5.0, ctx)  # type: ignore[arg-type]


def test_a_failure_wrapped_in_exception_groups_is_described_by_its_leaves() -> None:
    nested = ExceptionGroup(
        "outer", [ExceptionGroup("inner", [MCPError(-32000, "Connection closed")])]
    )
    assert describe(nested) == "Connection closed"
    assert (
        describe(FileNotFoundError(2, "No such file or directory")) == "No such file or directory"
    )
