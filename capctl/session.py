"""A pod connection that streams events, for `send`, `watch` and `log` (asyncio).

One-request commands use `oneshot.py`, which loads neither asyncio nor pydantic.
"""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from capctl.errors import CapctlError
from capctl.oneshot import why_no_pod
from protocol import paths
from protocol.client import Client
from protocol.errors import ProtocolError
from protocol.events import PodHello
from protocol.methods import Status, Subscribe

CONNECT_TIMEOUT_S = 5.0


class PodClient(Client):
    """A connection to one pod: on its own socket, or on the daemon's with every request
    naming the pod (`via`), where a `pod_stopped` for it ends its events as the pod's own
    socket closing would. `pod` is the pod's name, status and last seq when connected."""

    via: str | None = None
    pod: PodHello | None = None

    def frame(self, request: BaseModel | dict[str, Any]) -> dict[str, Any]:
        """The request as sent on this connection."""
        if isinstance(request, BaseModel):
            request = request.model_dump(mode="json", exclude_none=True)
        return request if self.via is None else {**request, "pod": self.via}

    async def request(
        self, req: BaseModel | dict[str, Any], timeout: float | None = 30.0
    ) -> dict[str, Any]:
        return await super().request(self.frame(req), timeout)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        async for event in super().events():
            if event.get("event") == "pod_stopped" and event.get("pod") == self.via:
                return
            yield event


async def connect_pod(runtime: Path, name: str, via_daemon: bool = False) -> PodClient:
    """Connect to pod `name`: at its socket, or through the daemon's socket when
    `via_daemon` or when the daemon lists it as up with no socket here (another node)."""
    if not via_daemon:
        path = paths.pod_socket(runtime, name)
        try:
            client = await _connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            if (why := why_no_pod(runtime, name)) is not None:
                raise CapctlError(why) from None
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise CapctlError(f"cannot reach pod {name} at {path}: {reason}") from None
        else:
            client.pod = client.hello.pod if client.hello else None
            return client
    daemon = paths.daemon_socket(runtime)
    try:
        client = await _connect(daemon)
    except OSError as exc:
        raise CapctlError(f"cannot reach capd at {daemon}: {exc.strerror or exc}") from None
    client.via = name
    try:
        status = await client.request(Status())
    except ProtocolError as exc:  # the pod is unknown, or stopped: one line, as run() says it
        await client.close()
        raise CapctlError(f"{exc.code}: {exc.message}") from None
    except BaseException:
        await client.close()
        raise
    client.pod = PodHello(name=name, status=status["status"], last_seq=status["last_seq"])
    return client


async def _connect(path: Path) -> PodClient:
    """A connection that greeted like capd; the connection's errors are the caller's."""
    try:
        return await PodClient.connect(path, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise CapctlError(f"{path} did not greet within {CONNECT_TIMEOUT_S:g} s") from None
    except (ProtocolError, ValidationError):
        raise CapctlError(f"{path} did not greet like capd (protocol 1)") from None


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

    def __init__(self, client: PodClient) -> None:
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
