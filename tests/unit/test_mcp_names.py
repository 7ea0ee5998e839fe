"""The names MCP tools are offered under: `mcp__<server>__<tool>`, mended to fit model APIs."""

import hashlib
import re

import pytest

from capd.tools.mcp.names import MAX_LENGTH, exposed_names
from protocol.names import mcp_server_of

MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _hex(tool: str) -> str:
    return hashlib.sha256(tool.encode()).hexdigest()[:6]


def test_a_plain_name_is_kept() -> None:
    assert exposed_names("time", ["get_current_time", "convert-time"]) == {
        "mcp__time__get_current_time": "get_current_time",
        "mcp__time__convert-time": "convert-time",
    }


def test_a_mended_name_ends_in_a_hash_of_the_tools_own_name() -> None:
    assert exposed_names("s", ["files.read", "a b/c"]) == {
        f"mcp__s__files_read_{_hex('files.read')}": "files.read",
        f"mcp__s__a_b_c_{_hex('a b/c')}": "a b/c",
    }


def test_a_long_name_is_cut_and_ends_in_a_hash_of_the_tools_own_name() -> None:
    tool = "x" * 128
    [(name, own)] = exposed_names("server", [tool]).items()
    assert own == tool
    assert len(name) == MAX_LENGTH
    assert name.endswith("_" + _hex(tool))
    assert name.startswith("mcp__server__xxx")
    assert MODEL_NAME.match(name)


def test_a_tool_added_later_renames_no_other() -> None:
    before = exposed_names("fs", ["read_file", "write_file", "x" * 100])
    after = exposed_names("fs", ["read_file", "write_file", "x" * 100, "read.file", "x" * 101])
    assert after.items() >= before.items()
    assert after[f"mcp__fs__read_file_{_hex('read.file')}"] == "read.file"


def test_a_literal_name_equal_to_a_mended_one_wins_and_the_other_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    literal = f"read_file_{_hex('read.file')}"
    for tools in (["read.file", literal, "c"], [literal, "c", "read.file"]):
        assert exposed_names("fs", tools) == {f"mcp__fs__{literal}": literal, "mcp__fs__c": "c"}
    assert "'read.file' is left out" in caplog.text


def test_the_names_are_the_same_on_every_start_whatever_the_order() -> None:
    tools = ["a.b", "a_b", "y" * 100, "plain", f"a_b_{_hex('a.b')}"]
    assert exposed_names("s", tools) == exposed_names("s", list(reversed(tools)))


def test_every_name_fits_model_apis_with_the_longest_server_name() -> None:
    server = "s" * 32
    for tool in ["é" * 40, "a.b.c" * 25, "-", "_x", "t" * 128]:
        [name] = exposed_names(server, [tool])
        assert MODEL_NAME.match(name), name


def test_the_server_is_read_back_from_an_exposed_name() -> None:
    assert mcp_server_of("mcp__git__git_status") == "git"
    assert mcp_server_of("mcp__a-b__c__d") == "a-b"
    assert mcp_server_of("mcp__s___private") == "s"
    assert mcp_server_of("bash") is None
    assert mcp_server_of("mcp__nosep") is None
    assert mcp_server_of("mcp____x") is None
