"""What the HTTP providers share: one streaming POST endpoint, its SSE events and its errors.

Uses httpx because it streams response bodies, closes them cleanly on cancellation and
pools connections; none of which we would want to write ourselves.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress
from math import isfinite
from typing import Any

import httpx
import orjson

from capd.providers.base import ProviderError

CONNECT_TIMEOUT_S = 10.0
EXCERPT_CHARS = 200
TAIL_TIMEOUT_S = 1.0
"""How long to wait for the body to end after the last event before dropping the connection."""


class SseEndpoint:
    """A model API's streaming endpoint: one pooled client, and errors that name `api` and `url`."""

    def __init__(self, api: str, url: str, timeout_s: float) -> None:
        self.api = api
        self.url = url
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    @asynccontextmanager
    async def events(
        self, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[AsyncIterator[str]]:
        """POSTs `body` and yields the `data` of each event of a 200 response.

        An error status, a transport failure or a bad URL raises ProviderError, also from
        inside the `async with` block. Leaving the block early closes the connection.
        """
        try:
            http = self._http()
            async with http.stream("POST", self.url, content=body, headers=headers) as response:
                if response.status_code >= 400:
                    raise await self._status_error(response)
                async with aclosing(sse_data(response.aiter_lines())) as events:
                    yield events
        except httpx.RequestError as exc:
            raise self._transport_error(exc) from exc
        except httpx.InvalidURL as exc:
            raise ProviderError(f"{self.api}: invalid base_url {self.url}: {exc}") from exc

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            timeout = httpx.Timeout(
                self._timeout_s, connect=min(CONNECT_TIMEOUT_S, self._timeout_s)
            )
            self._client = httpx.AsyncClient(timeout=timeout)
        return self._client

    async def _status_error(self, response: httpx.Response) -> ProviderError:
        body = await response.aread()
        status = response.status_code
        detail = error_message(body) or response.reason_phrase or "no details"
        return ProviderError(
            f"{self.api}: HTTP {status} from {self.url}: {detail}",
            retryable=is_retryable_status(status),
            status=status,
            retry_after_s=_retry_after(response.headers),
        )

    def _transport_error(self, exc: httpx.RequestError) -> ProviderError:
        if isinstance(exc, httpx.UnsupportedProtocol | httpx.LocalProtocolError):
            return ProviderError(f"{self.api}: cannot send request to {self.url}: {exc}")
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            what = f"cannot connect to {self.url}"
        elif isinstance(exc, httpx.ReadTimeout):
            what = f"no data from {self.url} for {self._timeout_s:g} s (model.request_timeout_s)"
        elif isinstance(exc, httpx.RemoteProtocolError):
            what = f"connection to {self.url} broke"
        else:
            what = f"request to {self.url} failed"
        detail = " ".join(str(exc).split()) or type(exc).__name__
        return ProviderError(f"{self.api}: {what}: {detail}", retryable=True)


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The `data` of each server-sent event; comments and other fields are skipped."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


async def read_to_end(events: AsyncIterator[str]) -> None:
    """Reads what follows the last event so httpx can reuse the connection; never fails."""
    with suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(TAIL_TIMEOUT_S):
            async for _ in events:
                pass


def error_message(body: bytes) -> str:
    """The server's own words from an error body: `error.message` when JSON, else an excerpt."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        return excerpt(body.decode(errors="replace"))
    if isinstance(payload, dict):
        for key in ("error", "message", "detail"):
            if payload.get(key):
                return error_text(payload[key])
    return excerpt(body.decode(errors="replace"))


def error_text(error: Any) -> str:
    if isinstance(error, dict) and error.get("message"):
        return excerpt(str(error["message"]))
    if isinstance(error, str):
        return excerpt(error)
    return excerpt(orjson.dumps(error).decode())


def is_retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def excerpt(text: str) -> str:
    """One line of at most EXCERPT_CHARS characters."""
    line = " ".join(text.split())
    return line if len(line) <= EXCERPT_CHARS else f"{line[: EXCERPT_CHARS - 1]}…"


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return max(seconds, 0.0) if isfinite(seconds) else None
