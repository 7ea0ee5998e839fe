"""Connections to capd and its pods, with every failure turned into a one-line capctl error."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import click
from pydantic import ValidationError

from protocol import paths
from protocol.client import Client
from protocol.errors import ProtocolError
from protocol.methods import Info, ListPods, Subscribe
from protocol.results import ListResult

CONNECT_TIMEOUT_S = 5.0
READY_POLL_S = 0.05


class CapctlError(click.ClickException):
    """A failure shown as the single line `capctl: <message>`, exit status 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"capctl: {self.format_message()}", err=True)


def _is_absent(exc: OSError) -> bool:
    """No socket file, or a file nobody listens on: the server is not there."""
    return isinstance(exc, FileNotFoundError | ConnectionRefusedError)


async def _connect(path: Path) -> Client:
    try:
        return await Client.connect(path, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise CapctlError(f"{path} did not greet within {CONNECT_TIMEOUT_S:g} s") from None
    except (ProtocolError, ValidationError):
        raise CapctlError(f"{path} did not greet like capd (protocol 1)") from None


async def connect_daemon(runtime: Path) -> Client:
    path = paths.daemon_socket(runtime)
    try:
        return await _connect(path)
    except OSError as exc:
        reason = "is capd running?" if _is_absent(exc) else exc.strerror or str(exc)
        raise CapctlError(f"cannot reach capd at {path}: {reason}") from None


async def wait_ready(runtime: Path, timeout_s: float) -> dict[str, Any]:
    """Poll the daemon socket until capd answers `info`; its result, or a CapctlError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            async with await connect_daemon(runtime) as daemon:
                return await daemon.request(Info())
        except CapctlError:
            if loop.time() >= deadline:
                raise CapctlError(
                    f"capd did not answer at {paths.daemon_socket(runtime)} within {timeout_s:g} s"
                ) from None
        await asyncio.sleep(READY_POLL_S)


async def connect_pod(runtime: Path, name: str) -> Client:
    path = paths.pod_socket(runtime, name)
    try:
        return await _connect(path)
    except OSError as exc:
        if not _is_absent(exc):
            reason = exc.strerror or str(exc)
            raise CapctlError(f"cannot reach pod {name} at {path}: {reason}") from None
    raise CapctlError(await _why_no_pod(runtime, name, path))


async def _why_no_pod(runtime: Path, name: str, path: Path) -> str:
    """Ask the daemon why a pod's socket is missing: a stopped pod deserves a hint."""
    async with await connect_daemon(runtime) as daemon:
        pods = ListResult.model_validate(await daemon.request(ListPods())).pods
    for pod in pods:
        if pod.name == name and pod.status == "stopped":
            return f"pod {name} is stopped (capctl start {name} brings it back)"
        if pod.name == name:
            return f"pod {name} is {pod.status} but nothing answers at {path}"
    return f"no pod named {name} (no socket at {path})"


async def daemon_request(runtime: Path, request: Any) -> dict[str, Any]:
    """One request on the daemon socket; returns the ack's result."""
    async with await connect_daemon(runtime) as daemon:
        return await daemon.request(request)


async def pod_request(runtime: Path, name: str, request: Any) -> dict[str, Any]:
    """One request on a pod's socket; returns the ack's result."""
    async with await connect_pod(runtime, name) as pod:
        return await pod.request(request)


STREAMED_EVENTS = frozenset({"text_delta", "thinking_delta", "tool_call_start", "tool_call_delta"})
"""Ephemeral pieces of a step in progress; its durable assistant_message holds them whole."""


class Subscription:
    """A pod's events after `subscribe`, re-subscribing by itself when told it `lagged`.

    Durable events at or below the highest seq already seen are dropped, so a resync neither
    repeats nor skips a durable event. Deltas lost in a lag cannot be recovered, and a step
    still streaming when the resync lands would show only its tail; so after a lag, deltas
    are dropped until the first live `assistant_message` or `turn_end`, and the printers
    complete each step's text from its assistant_message. The `lagged` event itself is
    passed on so the caller can say so.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._last_seq: int | None = None
        self._resync_until_after: int | None = None

    async def start(self, after_seq: int | None = None) -> dict[str, Any]:
        """Subscribe: replay from after `after_seq`, or live events only when it is None."""
        if after_seq is not None:
            after_seq = max(after_seq, self._last_seq or 0)
            self._last_seq = after_seq
        return await self._client.request(Subscribe(after_seq=after_seq))

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        async for event in self._client.events():
            kind = event.get("event")
            seq = event.get("seq")
            if isinstance(seq, int):
                if self._last_seq is not None and seq <= self._last_seq:
                    continue
                self._last_seq = seq
            resyncing = self._resync_until_after is not None
            if resyncing and kind in STREAMED_EVENTS:
                continue
            if (
                resyncing
                and kind in ("assistant_message", "turn_end")
                and isinstance(seq, int)
                and seq > (self._resync_until_after or 0)
            ):
                self._resync_until_after = None
            yield event
            if kind == "lagged":
                resume_from = event.get("resume_from")
                ack = await self.start(resume_from if isinstance(resume_from, int) else 0)
                live_after = ack.get("last_seq")
                self._resync_until_after = live_after if isinstance(live_after, int) else 0
