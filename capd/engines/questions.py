"""Permission questions put to a pod's clients: a durable `permission_request`, answered by
the `permission` method or closed with no answer (null) by a pause, cancel or the end of
what asked; either way a durable `permission_resolved`. The ACP engine asks for its agent,
the builtin engine for its own tool calls (`capd.permissions`)."""

import asyncio
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from capd.engines.base import TurnHost
from capd.permissions import ALLOW_ALWAYS
from protocol.errors import ProtocolError
from protocol.events import PermissionGrant, PermissionRequest, PermissionResolved


@dataclass
class _Open:
    host: TurnHost
    turn_id: str
    options: list[str]
    on_answer: Callable[[str | None], None]
    """Told the chosen option (None: none) before `permission_resolved` is recorded."""
    grant: PermissionGrant | None
    """Recorded with an `allow_always` answer."""


class Questions:
    def __init__(self) -> None:
        self._open: dict[str, _Open] = {}

    def ask(
        self,
        host: TurnHost,
        turn_id: str,
        tool_call: dict[str, Any],
        options: list[dict[str, Any]],
        on_answer: Callable[[str | None], None],
        grant: PermissionGrant | None = None,
    ) -> str:
        """Record the question; returns its request id. `on_answer` hears the answer."""
        request_id = f"perm-{secrets.token_hex(6)}"
        ids = [str(option.get("optionId")) for option in options]
        self._open[request_id] = _Open(host, turn_id, ids, on_answer, grant)
        host.emit(
            PermissionRequest(
                turn_id=turn_id, request_id=request_id, tool_call=tool_call, options=options
            )
        )
        return request_id

    async def wait(
        self,
        host: TurnHost,
        turn_id: str,
        tool_call: dict[str, Any],
        options: list[dict[str, Any]],
        grant: PermissionGrant | None = None,
    ) -> str | None:
        """Ask and wait for the answer. Cancelled (a pause, a cancel, the turn's timeout),
        the question is closed with no answer."""
        answer: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

        def answered(option_id: str | None) -> None:
            if not answer.done():
                answer.set_result(option_id)

        request_id = self.ask(host, turn_id, tool_call, options, answered, grant)
        try:
            return await answer
        finally:
            if request_id in self._open:
                self.resolve(request_id, None)

    def answer(self, request_id: str, option_id: str | None) -> None:
        """A client's `permission`."""
        asked = self._open.get(request_id)
        if asked is None:
            raise ProtocolError(
                "not_found", f"no permission request {request_id} is waiting for an answer"
            )
        if option_id is not None and option_id not in asked.options:
            raise ProtocolError(
                "invalid_request",
                f"option_id {option_id} is not one of {', '.join(asked.options)}",
            )
        self.resolve(request_id, option_id)

    def resolve(self, request_id: str, option_id: str | None) -> None:
        asked = self._open.pop(request_id)
        asked.on_answer(option_id)
        grant = asked.grant if option_id == ALLOW_ALWAYS else None
        asked.host.emit(
            PermissionResolved(
                turn_id=asked.turn_id, request_id=request_id, option_id=option_id, grant=grant
            )
        )

    def cancel_all(self) -> None:
        """Close every open question with no answer."""
        for request_id in list(self._open):
            self.resolve(request_id, None)
