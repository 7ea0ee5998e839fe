"""The model's context window: what the manifest says, what well-known model names have,
or what the provider named in its first overflow error; and how each server says that a
request does not fit it (the one list of their wordings)."""

import functools
import re

KNOWN_WINDOWS: tuple[tuple[str, int], ...] = (
    # Claude 3 and 4 models take 200k tokens; some newer ones accept 1M, for which
    # model.context_window says so (200k only compacts them early).
    ("claude-", 200_000),
    ("gpt-4o", 128_000),
    ("gpt-4.1", 1_047_576),
    ("o3", 200_000),
    ("o4-mini", 200_000),
    ("gpt-5", 400_000),
)
"""(model name prefix, window in tokens) for well-known models; the first match counts.
A name's provider prefix ("openai/gpt-4o") is dropped before matching."""

_OVERFLOW_CODES = frozenset({"context_length_exceeded", "exceed_context_size_error"})
"""`error.code` of OpenAI and llama-cpp-python, `error.type` of llama.cpp's llama-server."""

_OVERFLOW_WORDS = re.compile(
    "|".join(
        [
            # OpenAI, vLLM, llama-cpp-python, OpenRouter: "This model's maximum context
            # length is 2048 tokens. However, you requested 2499 tokens (...)"
            r"maximum context length",
            # llama-cpp-python's own: "Requested tokens (2300) exceed context window of 2048";
            # llama-server: "request (4476 tokens) exceeds the available context size (4096
            # tokens), try increasing it"; OpenAI: "Your input exceeds the context window";
            # Ollama: "the input length exceeds the context length"
            r"exceeds? (the )?(available )?context (size|window|length)",
            # llama-server, for a task it cannot split
            r"larger than the max context size",
            # vLLM V1: "The decoder prompt (length 8825) is longer than the maximum model length"
            r"longer than the maximum model length",
            # Anthropic: "prompt is too long: 208310 tokens > 200000 maximum"
            r"prompt is too long",
            # LM Studio: "The number of tokens to keep from the initial prompt is greater than
            # the context length", "... loaded with context length of only 4096 tokens, which
            # is not enough", "Input does not fit in context length."
            r"greater than the context length",
            r"context length of only",
            r"does not fit in context length",
        ]
    ),
    re.IGNORECASE,
)

_WINDOW_IN_ERROR = re.compile(
    "|".join(
        [
            # OpenAI, vLLM, llama-cpp-python: "maximum context length is 2048 tokens"
            r"maximum context length is (?P<a>\d+) tokens",
            # llama-server: "exceeds the available context size (4096 tokens)"
            r"exceeds the available context size \((?P<b>\d+) tokens\)",
            # llama-cpp-python's own: "exceed context window of 2048"
            r"exceed context window of (?P<c>\d+)",
            # Anthropic: "prompt is too long: 208310 tokens > 200000 maximum"
            r"\d+ tokens > (?P<d>\d+) maximum",
        ]
    )
)


@functools.lru_cache(maxsize=256)
def known_window(model_name: str) -> int | None:
    """The window of a well-known model, by the start of its name; None for others
    (cached: `status` asks at every poll, and a daemon's pods use a few models)."""
    name = model_name.rsplit("/", 1)[-1].lower()
    return next((window for prefix, window in KNOWN_WINDOWS if name.startswith(prefix)), None)


def says_overflow(text: str, error_type: str = "", code: str = "") -> bool:
    """Whether a server's error (its words, `error.type`, `error.code`) says the request
    does not fit the model's context window."""
    return bool({error_type, code} & _OVERFLOW_CODES or _OVERFLOW_WORDS.search(text))


def window_in_error(text: str) -> int | None:
    """The window an overflow error names, in the wordings of the servers above."""
    match = _WINDOW_IN_ERROR.search(text)
    if match is None:
        return None
    return int(next(group for group in match.groups() if group is not None))


def context_window(configured: int | None, learned: int | None, model_name: str) -> int | None:
    """The window a pod's context is measured against: the manifest's, else the one the
    provider named in an overflow error (the server's word beats a guess from the name),
    else a well-known model's; None while unknown."""
    return configured or learned or known_window(model_name)
