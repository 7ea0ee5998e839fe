"""What the HTTP providers share: one streaming POST endpoint, its SSE events and its errors.

Uses httpx because it streams response bodies, closes them cleanly on cancellation and
pools connections; none of which we would want to write ourselves.
"""

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager, suppress
from dataclasses import dataclass
from math import isfinite
from typing import Any

import httpx
import orjson

from capd.providers.base import ProviderError
from capd.window import says_overflow
from protocol.manifest import ModelConfig

CONNECT_TIMEOUT_S = 10.0
EXCERPT_CHARS = 200
"""How much of a malformed stream event an error quotes."""
REASON_CHARS = 4000
"""How much of a server's reason for an error is kept: all of it in practice (a pydantic
validation error runs to 2000 characters), on one line."""
TAIL_TIMEOUT_S = 1.0
"""How long to wait for the body to end after the last event before dropping the connection."""


def key_variable(config: ModelConfig, url: str, own_url: str, own_variable: str) -> str | None:
    """The environment variable whose key goes with a request to `url`: the one the
    manifest names (`api_key_env`), else the provider's usual `own_variable`, but only to
    the provider's own server (the scheme, host and port of `own_url`). A key never goes
    to a server nobody named it for."""
    if config.api_key_env:
        return config.api_key_env
    return own_variable if _origin(url) == _origin(own_url) else None


def _origin(url: str) -> tuple[str, str, int | None] | None:
    """Scheme, host and port as httpx, which sends the request, reads them."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    return parsed.scheme, parsed.host, parsed.port


NO_KEY_HINT = (
    "capd sent no API key: to this base_url a key goes only from the variable "
    "model.api_key_env names"
)


def _sends_key(headers: dict[str, str]) -> bool:
    return any(name.lower() in ("authorization", "x-api-key") for name in headers)


class SseEndpoint:
    """A model API's streaming endpoint: one pooled client, and errors that name `api` and `url`."""

    def __init__(self, api: str, url: str, timeout_s: float) -> None:
        self.api = api
        self.url = url
        self._timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @asynccontextmanager
    async def events(
        self, body: bytes, headers: dict[str, str]
    ) -> AsyncIterator[AsyncIterator[str]]:
        """POSTs `body` and yields the `data` of each event of a 200 response.

        An error status, a transport failure or a bad URL raises ProviderError, also from
        inside the `async with` block. Leaving the block early closes the connection; a
        stream cancelled mid-body (a pause) drops the whole pool, since the cancelled close
        can leave that connection pooled half-read, and the next request (the resume) would
        go out on it and fail ("Server disconnected", seen with llama.cpp's llama-server).
        """
        try:
            http = self._http()
            async with http.stream("POST", self.url, content=body, headers=headers) as response:
                if response.status_code >= 400:
                    raise await self._status_error(response, _sends_key(headers))
                async with aclosing(sse_data(response.aiter_lines())) as events:
                    yield events
        except asyncio.CancelledError:
            self._drop_pool()
            raise
        except httpx.RequestError as exc:
            raise self._transport_error(exc) from exc
        except httpx.InvalidURL as exc:
            raise ProviderError(f"{self.api}: invalid base_url {self.url}: {exc}") from exc

    def _drop_pool(self) -> None:
        """Forget the pooled client now and close it in the background."""
        client, self._client = self._client, None
        if client is not None:
            task = asyncio.get_running_loop().create_task(client.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

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

    async def _status_error(self, response: httpx.Response, sent_key: bool) -> ProviderError:
        body = await response.aread()
        status = response.status_code
        reason = body_reason(body) or Reason(response.reason_phrase or "no details")
        hint = "" if sent_key or status not in (401, 403) else f"; {NO_KEY_HINT}"
        return ProviderError(
            f"{self.api}: HTTP {status} from {self.url}: {reason.text}{hint}",
            retryable=is_retryable(status, reason),
            status=status,
            retry_after_s=_retry_after(response.headers),
            overflow=reason.overflow,
            specific=reason.specific,
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
    """The `data` of each server-sent event; comments and other fields are skipped, but
    for `error`, which llama.cpp's server used for a failure mid-stream until late 2025
    (`error: {...}`, then `data: [DONE]`): it comes out as `{"error": ...}` data."""
    data: list[str] = []
    error: list[str] = []
    async for line in lines:
        if not line:
            if error:
                yield _error_event("\n".join(error))
            elif data:
                yield "\n".join(data)
            data, error = [], []
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value.removeprefix(" "))
        elif name == "error":
            error.append(value.removeprefix(" "))
    if error:
        yield _error_event("\n".join(error))
    elif data:
        yield "\n".join(data)


def _error_event(value: str) -> str:
    try:
        error = orjson.loads(value)
    except orjson.JSONDecodeError:
        error = value
    return orjson.dumps({"error": error}).decode()


async def read_to_end(events: AsyncIterator[str]) -> None:
    """Reads what follows the last event so httpx can reuse the connection; never fails."""
    with suppress(TimeoutError, httpx.HTTPError):
        async with asyncio.timeout(TAIL_TIMEOUT_S):
            async for _ in events:
                pass


_INVALID_TYPES = frozenset({"invalid_request_error", "BadRequestError"})
"""`error.type`s that call the request itself bad (OpenAI, Anthropic; vLLM)."""

_GENERIC_TYPES = frozenset({"api_error", "overloaded_error"})
"""Anthropic's `error.type`s for its own passing faults, whose words never change."""

_GENERIC_WORDS = re.compile(
    r"internal server error|server had an error|try again|temporarily|overloaded|^$",
    re.IGNORECASE,
)
"""Words of a passing fault that says nothing of the request: OpenAI's "The server had an
error while processing your request. Sorry about that!", a proxy's "Internal Server Error"."""


@dataclass(frozen=True, slots=True)
class Reason:
    """A server's own account of an error: its words, and the type and code it names."""

    text: str
    type: str = ""
    code: str = ""

    @property
    def overflow(self) -> bool:
        """The request does not fit the model's context window."""
        return says_overflow(self.text, self.type, self.code)

    @property
    def specific(self) -> bool:
        """The reason names what went wrong, so the same words twice mean the same failure."""
        return self.type not in _GENERIC_TYPES and not _GENERIC_WORDS.search(self.text)

    @property
    def deterministic(self) -> bool:
        """Sending the same request again gets the same answer: the server calls the request
        invalid (even with a 5xx, as llama-cpp-python does for a body it cannot validate)
        or too long."""
        return (
            self.overflow or self.type in _INVALID_TYPES or "validation error" in self.text.lower()
        )


def body_reason(body: bytes) -> Reason | None:
    """The reason an error body gives: its `error` object (or string), a top-level
    `message` or `detail`, else the body as text; None for an empty body."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = one_line(body.decode(errors="replace"))
        return Reason(text) if text else None
    if isinstance(payload, dict):
        if payload.get("error"):
            return error_reason(payload["error"])
        if payload.get("message") or payload.get("detail"):
            return error_reason(payload)
    return error_reason(payload)


def error_reason(error: Any) -> Reason:
    """The reason an error object gives (an `error` field, in a body or a stream event)."""
    if isinstance(error, str):
        return Reason(one_line(error))
    if not isinstance(error, dict):
        return Reason(one_line(orjson.dumps(error).decode()))
    words = error.get("message") or error.get("detail")
    text = words if isinstance(words, str) else orjson.dumps(words or error).decode()
    return Reason(one_line(text), _field(error.get("type")), _field(error.get("code")))


def _field(value: Any) -> str:
    return "" if value is None else str(value)


def is_retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def is_retryable(status: int, reason: Reason) -> bool:
    """408, 409 and 429 ask for another try; a 5xx gets one unless it calls the request bad."""
    return status in (408, 409, 429) or (status >= 500 and not reason.deterministic)


def one_line(text: str, limit: int = REASON_CHARS) -> str:
    """`text` on one line (whitespace collapsed), at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else f"{line[: limit - 1]}…"


def excerpt(text: str) -> str:
    return one_line(text, EXCERPT_CHARS)


def _retry_after(headers: httpx.Headers) -> float | None:
    try:
        seconds = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return max(seconds, 0.0) if isfinite(seconds) else None
