"""capd's side of the MCP protocol, through the official SDK (`mcp`), the one module that
imports it: loading it takes seconds, so `server.py` imports this module in a thread the
first time a pod with `mcp_servers` comes up, never at capd's start.

`connect` opens a session over a stdio server's process (`stdio_streams`: our own
transport, on the launcher) or Streamable HTTP (`http_streams`), negotiating as the SDK
does by default (`mode="auto"`: 2026-07-28 with servers that take it, else the
`initialize` handshake, 2024-11-05 to 2025-11-25). `Connection` lists tools (every page),
calls one with a timeout, probes, and reports list changes in either era. A call's result
becomes the text the model reads (`result_text`), cut and saved as bash output is.
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import ListenNotSupportedError
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types.jsonrpc import CONNECTION_CLOSED, REQUEST_TIMEOUT
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError

from capd.tools.base import ToolContext, ToolOutcome
from capd.tools.mcp.remote import CallTimedOut, ConnectionLost, RemoteTool, ServerError
from capd.tools.mcp.transport import ServerProcess
from capd.tools.shell import clip_output

log = logging.getLogger(__name__)

CLIENT_NAME = "capd"
PAGES_LIMIT = 1000
"""Pages of a tool list read at most (a server whose cursor never ends)."""
CALL_SLACK_S = 5.0
"""How long past its timeout a call is awaited before capd gives up on the SDK's own."""
HTTP_TIMEOUT = httpx2.Timeout(30.0, read=300.0)
"""The SDK's own HTTP timeouts: a server may hold a response stream open for a long call
(capd's call timeout bounds it)."""
GOODBYE_TIMEOUT = httpx2.Timeout(2.0)
"""For the DELETE that ends an HTTP session when capd leaves it: a hung server must not
hold up a restart or the pod's stop."""
MESSAGE_SHOWN = 300
"""Characters of an exception's message kept in a one-line reason."""


@asynccontextmanager
async def stdio_streams(
    process: ServerProcess, on_junk: Callable[[bytes], None]
) -> AsyncIterator[Any]:
    """The SDK's (read, write) streams over a stdio server's process. A stdout line that is
    no JSON-RPC message goes to `on_junk` and on to the session as an exception, and the
    session goes on, as the SDK's own transport does."""
    read_w, read_r = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_w, write_r = anyio.create_memory_object_stream[SessionMessage](0)

    async def reader() -> None:
        async with read_w:
            while True:
                line = await process.readline()
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    message: SessionMessage | Exception = SessionMessage(
                        types.jsonrpc_message_adapter.validate_json(line, by_name=False)
                    )
                except ValueError as exc:
                    on_junk(line)
                    message = exc
                await read_w.send(message)

    async def writer() -> None:
        async with write_r:
            async for message in write_r:
                data = message.message.model_dump_json(by_alias=True, exclude_unset=True)
                try:
                    await process.write(data.encode() + b"\n")
                except OSError:
                    return  # it exited: the reader sees its output end

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    try:
        yield read_r, write_w
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in (read_r, write_w, read_w, write_r):
            stream.close()


@asynccontextmanager
async def http_streams(
    url: str, headers: Mapping[str, str], on_error_status: Callable[[int], None]
) -> AsyncIterator[Any]:
    """The SDK's streams to a Streamable HTTP server, every request carrying `headers`.
    An HTTP error status goes to `on_error_status` (the SDK's error does not name it)."""

    async def note_status(response: httpx2.Response) -> None:
        if response.status_code >= 400:
            on_error_status(response.status_code)

    async def bound_goodbye(request: httpx2.Request) -> None:
        if request.method == "DELETE":
            request.extensions["timeout"] = GOODBYE_TIMEOUT.as_dict()

    async with (
        httpx2.AsyncClient(
            headers=dict(headers),
            timeout=HTTP_TIMEOUT,
            event_hooks={"request": [bound_goodbye], "response": [note_status]},
        ) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


@asynccontextmanager
async def connect(
    transport: Any, on_tools_changed: Callable[[], None]
) -> AsyncIterator["Connection"]:
    """A session over `transport` (`stdio_streams`, `http_streams`), negotiated and ready
    to list and call tools. Enter and leave it in one task (the SDK's task groups belong to
    it), and make calls from others."""

    async def on_message(message: object) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            on_tools_changed()

    client = Client(
        transport,
        mode="auto",
        cache=None,
        message_handler=on_message,
        client_info=types.Implementation(name=CLIENT_NAME, version=_version()),
    )
    async with client:
        conn = Connection(client)
        try:
            yield conn
        finally:
            conn.closed = True


class Connection:
    def __init__(self, client: Client) -> None:
        self._client = client
        self.closed = False
        """Set once the session is left; a call made then finds no session."""
        _hand_back_results_that_break_their_schema(client)

    @property
    def protocol_version(self) -> str:
        return self._client.protocol_version

    async def list_tools(self) -> list[RemoteTool]:
        """Every tool the server offers, page after page."""
        tools: list[RemoteTool] = []
        cursor: str | None = None
        seen: set[str] = set()
        for _ in range(PAGES_LIMIT):
            page = await self._client.list_tools(cursor=cursor)
            tools += (
                RemoteTool(tool.name, tool.description or tool.title or "", tool.input_schema)
                for tool in page.tools
            )
            cursor = page.next_cursor
            if cursor is None or cursor in seen:
                break
            seen.add(cursor)
        return tools

    async def call(
        self, name: str, arguments: dict[str, Any], timeout_s: float, ctx: ToolContext
    ) -> ToolOutcome:
        """Call tool `name`. CallTimedOut after `timeout_s` (the SDK tells the server to
        stop), ConnectionLost when the connection closes under it, ServerError for a
        JSON-RPC error."""
        try:
            async with asyncio.timeout(timeout_s + CALL_SLACK_S):
                result = await self._client.call_tool(
                    name, arguments, read_timeout_seconds=timeout_s
                )
        except _BrokeItsSchema as exc:
            text = result_text(exc.result)
            return ToolOutcome(clip_output(f"{text}\n[{exc}]".encode(), ctx, "mcp"), True)
        except TimeoutError:
            raise CallTimedOut from None
        except MCPError as exc:
            if exc.code == REQUEST_TIMEOUT:
                raise CallTimedOut from None
            if exc.code == CONNECTION_CLOSED:
                raise ConnectionLost(exc.message) from None
            raise ServerError(exc.message) from None
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
            raise ConnectionLost("the connection is closed") from None
        except ValidationError as exc:
            raise ServerError(f"its result is not MCP: {_one_line(exc)}") from None
        except RuntimeError as exc:
            if self.closed:
                raise ConnectionLost("the connection is closed") from None
            raise ServerError(_one_line(exc)) from None
        return ToolOutcome(clip_output(result_text(result).encode(), ctx, "mcp"), result.is_error)

    async def probe(self, timeout_s: float) -> bool:
        """Whether the server answers a ping within `timeout_s`: any answer counts, an
        error too (2026-07-28 dropped ping). The ping runs in a task of its own, left to
        wind down by itself: cancelling it waits for the SDK's cancellation notice, which
        a hung HTTP server can hold up for seconds."""
        ping = asyncio.create_task(self._client.session.send_ping())
        ping.add_done_callback(_retrieve)
        await asyncio.wait([ping], timeout=timeout_s)
        if not ping.done():
            ping.cancel()
            return False
        exc = ping.exception()
        if isinstance(exc, MCPError):
            return exc.code not in (CONNECTION_CLOSED, REQUEST_TIMEOUT)
        return exc is None

    @asynccontextmanager
    async def watching_tools(self, on_change: Callable[[], None]) -> AsyncIterator[None]:
        """While inside, `on_change` is called when a 2026-07-28 server says its tools
        changed (`subscriptions/listen`; handshake-era servers notify through the session,
        see `connect`). Enter and leave it in the connection's own task."""
        caps = self._client.server_capabilities.tools
        async with contextlib.AsyncExitStack() as stack:
            if (
                self.protocol_version in MODERN_PROTOCOL_VERSIONS
                and caps is not None
                and caps.list_changed
            ):
                try:
                    sub = await stack.enter_async_context(
                        self._client.listen(tools_list_changed=True)
                    )
                except (ListenNotSupportedError, MCPError, TimeoutError) as exc:
                    log.warning("MCP tool-list changes not followed: %s", _one_line(exc))
                else:

                    async def pump() -> None:
                        with contextlib.suppress(Exception):
                            async for _ in sub:
                                on_change()
                        on_change()  # the subscription ended: whatever changed, read again

                    task = asyncio.create_task(pump())
                    stack.callback(task.cancel)
            yield


def _retrieve(task: "asyncio.Task[Any]") -> None:
    """Mark a task's exception seen (its outcome was read another way, or not needed)."""
    if not task.cancelled():
        task.exception()


class _BrokeItsSchema(RuntimeError):
    """A result whose structured content breaks the tool's output schema, kept so the
    model can still read its text."""

    def __init__(self, result: types.CallToolResult, message: str) -> None:
        super().__init__(message)
        self.result = result


def _hand_back_results_that_break_their_schema(client: Client) -> None:
    """The SDK raises a bare RuntimeError for such a result and drops it; keep it."""
    session = client.session
    validate = session.validate_tool_result

    async def validate_or_hand_back(name: str, result: types.CallToolResult) -> None:
        try:
            await validate(name, result)
        except RuntimeError as exc:
            raise _BrokeItsSchema(result, str(exc)) from None

    session.validate_tool_result = validate_or_hand_back  # type: ignore[method-assign]


def result_text(result: types.CallToolResult) -> str:
    """What the model reads of a tool's result: text as it is, structured content as JSON
    when no text holds it, a one-line note for what it cannot read (images, audio, binary
    resources), resource links as their name and URI."""
    parts: list[str] = []
    texts: list[str] = []
    for block in result.content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
            texts.append(block.text)
        elif isinstance(block, types.ImageContent | types.AudioContent):
            kind = "image" if isinstance(block, types.ImageContent) else "audio"
            parts.append(f"[{kind} {block.mime_type}, {_decoded_size(block.data)}, not shown]")
        elif isinstance(block, types.ResourceLink):
            mime = f" ({block.mime_type})" if block.mime_type else ""
            parts.append(f"[resource {block.name}: {block.uri}{mime}]")
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, types.TextResourceContents):
                parts.append(f"[resource {resource.uri}]\n{resource.text}")
                texts.append(resource.text)
            else:
                mime = f"{resource.mime_type}, " if resource.mime_type else ""
                size = _decoded_size(resource.blob)
                parts.append(f"[resource {resource.uri}, {mime}{size}, not shown]")
        else:
            parts.append(f"[{getattr(block, 'type', 'unknown')} content, not shown]")
    structured = result.structured_content
    if structured is not None and not any(_holds(text, structured) for text in texts):
        parts.append(json.dumps(structured, ensure_ascii=False))
    if parts:
        return "\n\n".join(parts)
    return "[the tool failed and said nothing]" if result.is_error else "[no output]"


def describe(exc: BaseException) -> str:
    """One line saying why a connection failed, from the innermost exceptions the SDK's
    task groups wrap it in."""
    leaves = _leaves(exc)
    return "; ".join(dict.fromkeys(_reason(leaf) for leaf in leaves))[:MESSAGE_SHOWN]


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MCPError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = _one_line(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:MESSAGE_SHOWN] if lines else ""


def _holds(text: str, structured: object) -> bool:
    """Whether `text` says what `structured` says: the same JSON, or the value a server
    wrapped as `{"result": value}` (the SDK's servers do, for a tool returning a plain value)."""
    try:
        said: object = json.loads(text)
    except ValueError:
        said = text
    return said == structured or structured == {"result": said}


def _decoded_size(data: str) -> str:
    size = len(data) * 3 // 4 - data[-2:].count("=")
    return f"{size} bytes" if size < 1024 else f"{size / 1024:.1f} KiB"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("capd")
    except PackageNotFoundError:
        return "0"
