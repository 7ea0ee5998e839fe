"""Newline-delimited JSON framing (orjson) and the inbound frame limit."""

from typing import Any

import orjson
from pydantic import BaseModel

from protocol.errors import ProtocolError

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024


def encode(obj: BaseModel | dict[str, Any]) -> bytes:
    """One frame: the object as compact JSON followed by a newline."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json", by_alias=True)
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes) -> dict[str, Any]:
    """Parse one frame; anything but a JSON object is an `invalid_request`."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("invalid_request", f"frame is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(
            "invalid_request", f"frame must be a JSON object, got {type(obj).__name__}"
        )
    return obj
