"""`capctl compact`: one `compact` request followed to its outcome among the pod's events.

The request is sent with no reply awaited, so its ack (or error) arrives among the events in
the order capd sent them. That order tells what happened: an idle or paused pod commits the
`context_compacted` before it acks; a running pod acks at once and compacts at its next step
boundary, or after the turn; the `status` events before the ack say which it was. A
request a running pod does not make after all (nothing to compact, its summary call failed,
the turn was cancelled) ends in `compaction_skipped`; a pause only puts it off.
"""

from typing import Any

import click
import orjson

from capctl.errors import CapctlError
from capctl.render import compacted_line, compaction_started_line

COMPACT_ID = "compact"
"""The `id` of the request, by which its reply is told from the events."""


class CompactionWatch:
    """Sees the pod's events after the request; `see` is True once capctl is done."""

    def __init__(self, pod: str, status: str | None, *, wait: bool, json: bool) -> None:
        self._pod = pod
        self._status = status
        self._wait = wait
        self._json = json
        self._acked = False
        self._compacted = False

    def see(self, event: dict[str, Any]) -> bool:
        kind = event.get("event")
        if kind in ("ack", "error") and event.get("id") == COMPACT_ID:
            return self._reply(event)
        if kind == "status":
            self._status = event.get("status")
        ours = event.get("trigger") == "request"
        if kind == "compaction_started" and ours:
            self._note(f"[{self._pod}: {compaction_started_line(event)}]")
        elif kind == "context_compacted" and ours:
            self._compacted = True
            self._show(event, compacted_line(self._pod, event))
            return self._acked
        elif kind == "compaction_skipped" and ours and self._acked:
            raise CapctlError(f"{self._pod} did not compact: {event.get('reason')}")
        return False

    def _reply(self, reply: dict[str, Any]) -> bool:
        if reply.get("event") == "error":
            raise CapctlError(f"{reply.get('code')}: {reply.get('message')}")
        self._acked = True
        if self._json:
            self._echo_json(reply.get("result") or {})
        if self._compacted:
            return True
        if self._status != "running":
            self._show(None, f"{self._pod}: nothing to compact")
            return True
        later = f"{self._pod} is running: it compacts at its next step boundary"
        if not self._wait:
            self._show(None, later)
            return True
        self._note(f"[{later}; waiting, Ctrl-C detaches]")
        return False

    def _show(self, event: dict[str, Any] | None, line: str) -> None:
        """The outcome: `line` for people; with --json, the event (if any) as it came."""
        if not self._json:
            click.echo(line)
        elif event is not None:
            self._echo_json(event)

    def _note(self, line: str) -> None:
        if not self._json:
            click.echo(line, err=True)

    def _echo_json(self, obj: dict[str, Any]) -> None:
        click.echo(orjson.dumps(obj).decode())
