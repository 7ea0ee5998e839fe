"""What an external engine's death is summed up as: the line of its stderr that says why."""

import pytest

from capd.proc.stderr import stderr_summary

RUST_PANIC = """\
2026-05-01T10:00:00.000Z  INFO codex_acp: starting
thread 'main' panicked at codex-rs/acp/src/main.rs:42:10:
called `Result::unwrap()` on an `Err` value: Os { code: 2, kind: NotFound }
stack backtrace:
   0: rust_begin_unwind
             at /rustc/90b35a62/library/std/src/panicking.rs:652:5
   1: core::panicking::panic_fmt
             at /rustc/90b35a62/library/core/src/panicking.rs:72:14
note: Some details are omitted, run with `RUST_BACKTRACE=full` for a verbose backtrace.
"""
RUST_OLD_PANIC = "thread 'main' panicked at 'no config', src/main.rs:3:5\nnote: run with ...\n"
RUST_ERROR = """\
Error: failed to load the configuration

Caused by:
    0: reading /root/.codex/config.toml
    1: No such file or directory (os error 2)
"""
PYTHON = """\
Traceback (most recent call last):
  File "/usr/lib/agent.py", line 10, in <module>
    main()
  File "/usr/lib/agent.py", line 7, in main
    raise ValueError("the model name is not set")
ValueError: the model name is not set
"""
NODE = """\
file:///opt/agent/dist/index.js:12
    throw new Error("ANTHROPIC_API_KEY is not set");
    ^

Error: ANTHROPIC_API_KEY is not set
    at start (file:///opt/agent/dist/index.js:12:11)
    at file:///opt/agent/dist/index.js:20:1

Node.js v20.20.2
"""


@pytest.mark.parametrize(
    ("stderr", "summary"),
    [
        (
            RUST_PANIC,
            "thread 'main' panicked at codex-rs/acp/src/main.rs:42:10: called "
            "`Result::unwrap()` on an `Err` value: Os { code: 2, kind: NotFound }",
        ),
        (RUST_OLD_PANIC, "thread 'main' panicked at 'no config', src/main.rs:3:5"),
        (RUST_ERROR, "Error: failed to load the configuration"),
        (PYTHON, "ValueError: the model name is not set"),
        (NODE, "Error: ANTHROPIC_API_KEY is not set"),
        ("starting\nsomething went sideways\n", "starting | something went sideways"),
        ("", ""),
    ],
)
def test_the_line_that_says_why_is_picked(stderr: str, summary: str) -> None:
    assert stderr_summary(stderr) == summary


def test_a_long_unrecognised_stderr_keeps_its_end_without_stack_frames() -> None:
    stderr = "".join(f"log line {i}\n    at frame {i}\n" for i in range(200))
    summary = stderr_summary(stderr)
    assert summary.endswith("log line 198 | log line 199")
    assert "frame" not in summary
    assert len(summary) <= 500
