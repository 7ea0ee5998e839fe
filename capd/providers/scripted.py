"""The `scripted` provider: canned responses with delays, for demos and tests (no network).

Each model call plays the manifest's `script` step whose index is the number of complete
assistant messages already in the context, so a restarted daemon picks up where the script
was; a step that a pause interrupted continues after the text already streamed. Past the
end of the script (or with no script) it echoes the last user or notification text.
"""

import asyncio
import itertools
from collections.abc import AsyncIterator

import orjson

from capd.providers.base import (
    ModelReply,
    ModelRequest,
    ProviderError,
    StreamItem,
    TextChunk,
    ThinkingChunk,
    ToolCallArgs,
    ToolCallBegin,
)
from protocol.events import ToolCall, Usage
from protocol.manifest import ModelConfig, ScriptedStep


class ScriptedProvider:
    def __init__(self, config: ModelConfig) -> None:
        self._script = config.script
        self._call_ids = itertools.count(1)

    async def stream(self, request: ModelRequest) -> AsyncIterator[StreamItem]:
        step, streamed = self._step_for(request)
        delay = step.delay_ms / 1000
        if not streamed:
            for piece in _pieces(step.thinking, step.chunk_chars):
                yield ThinkingChunk(piece)
                await asyncio.sleep(delay)
        if step.error is not None:
            raise ProviderError(f"scripted: {step.error}", retryable=step.retryable)
        text = step.text[streamed:]
        for piece in _pieces(text, step.chunk_chars):
            yield TextChunk(piece)
            await asyncio.sleep(delay)
        calls = []
        for scripted in step.tool_calls:
            call = ToolCall(
                id=f"call_{next(self._call_ids)}", name=scripted.name, arguments=scripted.arguments
            )
            yield ToolCallBegin(call.id, call.name)
            yield ToolCallArgs(call.id, orjson.dumps(call.arguments).decode())
            calls.append(call)
        words = sum(len(m.text.split()) for m in request.messages)
        usage = Usage(input_tokens=words, output_tokens=len(text.split()))
        yield ModelReply(text, calls, usage)

    def _step_for(self, request: ModelRequest) -> tuple[ScriptedStep, int]:
        """The step to play and how many of its characters an interrupted call streamed."""
        done = streamed = 0
        for msg in request.messages:
            if msg.role == "assistant" and msg.interrupted:
                streamed += len(msg.text)
            elif msg.role == "assistant":
                done += 1
                streamed = 0
            elif msg.role == "user":
                streamed = 0
        if done < len(self._script):
            return self._script[done], streamed
        last = next((m.text for m in reversed(request.messages) if m.role == "user"), "")
        return ScriptedStep(text=f"You said: {last}"), 0

    async def aclose(self) -> None:
        return None


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]
