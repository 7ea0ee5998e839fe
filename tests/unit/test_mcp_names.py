"""The names MCP tools are offered under: `mcp__<server>__<tool>`, mended to fit model APIs."""

import hashlib
import re

from capd.tools.mcp.names import MAX_LENGTH, exposed_names, server_of

MODEL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def _hex(tool: str) -> str:
    return hashlib.sha256(tool.encode()).hexdigest()[:6]


def test_a_plain_name_is_kept() -> None:
    assert exposed_names("time", ["get_current_time", "convert-time"]) == {
        "mcp__time__get_current_time": "get_current_time",
        "mcp__time__convert-time": "convert-time",
    }


def test_other_characters_become_underscores() -> None:
    assert exposed_names("s", ["files.read", "a b/c"]) == {
        "mcp__s__files_read": "files.read",
        "mcp__s__a_b_c": "a b/c",
    }


def test_a_long_name_is_cut_and_ends_in_a_hash_of_the_tools_own_name() -> None:
    tool = "x" * 128
    [(name, own)] = exposed_names("server", [tool]).items()
    assert own == tool
    assert len(name) == MAX_LENGTH
    assert name.endswith("_" + _hex(tool))
    assert name.startswith("mcp__server__xxx")
    assert MODEL_NAME.match(name)


def test_names_that_clash_once_mended_are_both_hashed() -> None:
    names = exposed_names("s", ["a.b", "a_b", "c"])
    assert names == {
        f"mcp__s__a_b_{_hex('a.b')}": "a.b",
        f"mcp__s__a_b_{_hex('a_b')}": "a_b",
        "mcp__s__c": "c",
    }


def test_the_names_are_the_same_on_every_start_whatever_the_order() -> None:
    tools = ["a.b", "a_b", "y" * 100, "plain"]
    assert exposed_names("s", tools) == exposed_names("s", list(reversed(tools)))


def test_every_name_fits_model_apis_with_the_longest_server_name() -> None:
    server = "s" * 32
    for tool in ["é" * 40, "a.b.c" * 25, "-", "_x", "t" * 128]:
        [name] = exposed_names(server, [tool])
        assert MODEL_NAME.match(name), name


def test_the_server_is_read_back_from_an_exposed_name() -> None:
    assert server_of("mcp__git__git_status") == "git"
    assert server_of("mcp__a-b__c__d") == "a-b"
    assert server_of("mcp__s___private") == "s"
    assert server_of("bash") is None
    assert server_of("mcp__nosep") is None
    assert server_of("mcp____x") is None
