"""The context window: the manifest's, else one an overflow error named, else a known model's."""

import pytest

from capd.window import context_window, known_window, window_in_error


@pytest.mark.parametrize(
    ("text", "window"),
    [
        (
            "This model's maximum context length is 2048 tokens. However, you requested "
            "2499 tokens (2299 in the messages, 200 in the completion).",
            2048,
        ),
        (
            "request (4476 tokens) exceeds the available context size (4096 tokens), "
            "try increasing it",
            4096,
        ),
        ("Requested tokens (2300) exceed context window of 2048", 2048),
        ("prompt is too long: 208310 tokens > 200000 maximum", 200000),
        (
            "the conversation no longer fits ...; the server said: HTTP 400: maximum "
            "context length is 8192 tokens",
            8192,
        ),
        ("the input length exceeds the context length", None),
        ("model 'x' does not exist", None),
    ],
)
def test_the_window_an_overflow_error_names(text: str, window: int | None) -> None:
    assert window_in_error(text) == window


@pytest.mark.parametrize(
    ("name", "window"),
    [
        ("claude-sonnet-4-5", 200_000),
        ("gpt-4o-mini", 128_000),
        ("openai/gpt-4.1", 1_047_576),
        ("o3", 200_000),
        ("o4-mini", 200_000),
        ("gpt-5-mini", 400_000),
        ("qwen2.5-coder", None),
        ("", None),
    ],
)
def test_known_model_windows(name: str, window: int | None) -> None:
    assert known_window(name) == window


def test_the_manifest_beats_a_learned_window_which_beats_a_known_one() -> None:
    assert context_window(32768, 4096, "gpt-4o") == 32768
    assert context_window(None, 4096, "gpt-4o") == 4096
    assert context_window(None, None, "gpt-4o") == 128_000
    assert context_window(None, None, "local") is None
