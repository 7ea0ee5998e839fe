"""A pod connection that streams events, for `send`, `watch` and `log` (asyncio).

One-request commands use `oneshot.py`, which loads neither asyncio nor pydantic.
"""

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from capctl.errors import CapctlError
from capctl.oneshot import why_no_pod
from protocol import paths
from protocol.client import Client
from protocol.errors import ProtocolError
from protocol.methods import Subscribe

CONNECT_TIMEOUT_S = 5.0


async def connect_pod(runtime: Path, name: str) -> Client:
    path = paths.pod_socket(runtime, name)
    try:
        return await Client.connect(path, timeout=CONNECT_TIMEOUT_S)
    except TimeoutError:
        raise CapctlError(f"{path} did not greet within {CONNECT_TIMEOUT_S:g} s") from None
    except (ProtocolError, ValidationError):
        raise CapctlError(f"{path} did not greet like capd (protocol 1)") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise CapctlError(why_no_pod(runtime, name)) from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CapctlError(f"cannot reach pod {name} at {path}: {reason}") from None


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
