"""Fakes: stand-ins for the programs capd talks to, so the tests run offline and fast.

A fake here is a real peer, not a mock of capd's classes: it speaks the real program's
wire (HTTP and SSE, stream-json, ACP over stdio, capd's parent reports) in a server or a
subprocess, shaped after what the real program was seen to send. An optional suite,
skipped unless its variable names the real program, checks the same behaviour against it:

- `claude.py`, a stand-in `claude` CLI: `tests/test_engine_claude_code_real.py`.
- `acp_agent.py`, an ACP agent on the official SDK: `tests/test_engine_acp_real.py` and
  `tests/test_engine_acp_npm.py`.
- `anthropic_server.py`, the Anthropic Messages API: the real Claude Code CLI and
  claude-agent-acp call it in those suites.
- `openai_server.py` with `openai_flavors.py`, OpenAI-compatible chat completions as
  each server people run answers: `tests/test_real_llama.py` runs the llama.cpp
  flavors' servers; vibe-acp and opencode call it in the ACP suites.
- `sse_server.py`, what the two model servers share.
- `parent_socket.py`, a parent that is not a capd pod; its real counterpart is a capd
  pod's socket, which `tests/test_children.py` uses as a parent too.
- `engine.py`, the one fake inside capd's own seams: an engine a test scripts, to drive a
  pod's controller in process (`tests/unit/`, `tests/test_hostile.py`); the real engines
  are tested black-box.
"""
