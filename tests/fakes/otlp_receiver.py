"""An OTLP/HTTP trace receiver on 127.0.0.1: decodes each `POST /v1/traces` as the real
`ExportTraceServiceRequest` (opentelemetry-proto) and keeps its spans.

It runs on the test's event loop, so the test must await, not block. Connections are kept
alive (the exporter's requests session reuses them); gzip bodies are inflated. A request it
cannot take (another path, content type, a body that does not decode) is kept as `error`,
and `wait_for_spans` raises it rather than time out.
"""

import asyncio
import gzip
from typing import Any, Self

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


class OtlpReceiver:
    def __init__(self) -> None:
        self.endpoint = ""
        self.requests: list[ExportTraceServiceRequest] = []
        self._changed = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.error: Exception | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    def spans(self) -> list[Span]:
        return [
            span
            for request in self.requests
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]

    async def wait_for_spans(self, done: Any, timeout: float = 10.0) -> list[Span]:
        """Wait until `done(spans)` holds; the spans then. A request the receiver could
        not take fails it at once."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.error is not None or done(self.spans()))
        if self.error is not None:
            raise AssertionError(f"the OTLP receiver failed: {self.error!r}") from self.error
        return self.spans()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line, *fields = head.decode().split("\r\n")
                headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                if headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                assert line.startswith("POST /v1/traces "), line
                assert headers["content-type"] == "application/x-protobuf"
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                async with self._changed:
                    self.requests.append(request)
                    self._changed.notify_all()
                reply = ExportTraceServiceResponse().SerializeToString()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client closed the connection, or the receiver closes
        except Exception as exc:
            async with self._changed:
                self.error = self.error or exc
                self._changed.notify_all()
        finally:
            self._connections.discard(task)
            writer.close()


def attributes(items: Any) -> dict[str, Any]:
    """OTLP `KeyValue`s as a dict; an array value as a list."""
    return {kv.key: _value(kv.value) for kv in items if isinstance(kv, KeyValue)}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    return getattr(value, kind)
