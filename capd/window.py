"""The model's context window: what the manifest says, what well-known model names have,
or what the provider named in its first overflow error."""

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


def known_window(model_name: str) -> int | None:
    """The window of a well-known model, by the start of its name; None for others."""
    name = model_name.rsplit("/", 1)[-1].lower()
    return next((window for prefix, window in KNOWN_WINDOWS if name.startswith(prefix)), None)


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
