"""Reports a child pod sends to its parent's socket as `pod_event` (docs/protocol.md,
Parent reports).

The parent accepts any object with a `kind` (other clients may send their own); these are
the three kinds capd sends. `event_id` is fixed when the report is created and survives
retries and restarts, so the parent can drop the duplicates that at-least-once delivery
produces.
"""

from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from protocol.events import TurnResult

REPORT_TEXT_BYTES = 64 * 1024
"""Largest JSON encoding of a child's output or error message in a report, so a report
stays far below any parent's inbound frame limit."""


class Report(BaseModel):
    model_config = ConfigDict(extra="ignore")
    pod: str
    event_id: str


class TurnEnded(Report):
    kind: Literal["turn_ended"] = "turn_ended"
    turn_id: str
    result: TurnResult
    output: str = ""
    truncated: bool = False
    """`output` was cut to fit REPORT_TEXT_BYTES; the child's history has all of it."""


class Errored(Report):
    kind: Literal["errored"] = "errored"
    turn_id: str
    message: str


class ShutDown(Report):
    kind: Literal["shut_down"] = "shut_down"


AnyReport = Annotated[TurnEnded | Errored | ShutDown, Field(discriminator="kind")]
_REPORT_ADAPTER: TypeAdapter[Any] = TypeAdapter(AnyReport)


def parse_report(payload: dict[str, Any]) -> TurnEnded | Errored | ShutDown | None:
    """The typed report, or None for a kind (or shape) capd does not send."""
    try:
        return _REPORT_ADAPTER.validate_python(payload)
    except ValidationError:
        return None


def clip(text: str) -> tuple[str, bool]:
    """`text` cut so its JSON encoding fits REPORT_TEXT_BYTES, and whether it was cut."""
    if len(orjson.dumps(text)) <= REPORT_TEXT_BYTES:
        return text, False
    cut = text.encode()[:REPORT_TEXT_BYTES].decode(errors="ignore")
    while len(orjson.dumps(cut)) > REPORT_TEXT_BYTES:
        cut = cut[: len(cut) * 3 // 4]
    return cut, True
