"""Node link authentication: the proofs (pure functions), the key file, and a real
handshake over TCP between a link listener and a dialler in this process."""

import asyncio
from pathlib import Path

import orjson
import pytest

from capd.config import Config
from capd.fleet import auth
from capd.fleet.links import HostPort, LinkError, LinkServer, open_link

KEY = b"k" * 32
OTHER = b"o" * 32


def test_a_proof_needs_the_key_the_challenge_and_both_names() -> None:
    challenge = auth.new_challenge()
    proof = auth.client_proof(KEY, challenge, "a", "b")
    assert auth.same(proof, auth.client_proof(KEY, challenge, "a", "b"))
    assert not auth.same(proof, auth.client_proof(OTHER, challenge, "a", "b"))
    assert not auth.same(proof, auth.client_proof(KEY, auth.new_challenge(), "a", "b"))
    assert not auth.same(proof, auth.client_proof(KEY, challenge, "c", "b"))
    assert not auth.same(proof, auth.client_proof(KEY, challenge, "b", "a"))


def test_a_client_proof_is_no_server_proof() -> None:
    """Distinct labels: a node cannot answer a challenge by reflecting the peer's proof."""
    challenge = auth.new_challenge()
    assert auth.client_proof(KEY, challenge, "a", "b") != auth.server_proof(
        KEY, challenge, "a", "b"
    )
    assert not auth.same("x" * 64, None)


def test_the_key_file_must_be_private_and_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "fleet.key"
    path.write_bytes(b"0123456789abcdef" * 4 + b"\n")
    path.chmod(0o600)
    assert auth.load_key(path) == b"0123456789abcdef" * 4
    path.chmod(0o644)
    with pytest.raises(auth.FleetKeyError, match="readable by others"):
        auth.load_key(path)
    path.write_bytes(b"short")
    path.chmod(0o600)
    with pytest.raises(auth.FleetKeyError, match="fewer than 32"):
        auth.load_key(path)
    with pytest.raises(auth.FleetKeyError, match="No such file"):
        auth.load_key(tmp_path / "missing")


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hello: bytes) -> None:
    """What an authenticated link gets here: the welcome, then each line echoed."""
    writer.write(hello)
    while line := await reader.readline():
        writer.write(line)
    writer.close()


async def _listener(key: bytes | None) -> tuple[LinkServer, str]:
    server = LinkServer("b", key, _echo, 1 << 20)
    bound = await server.listen(HostPort("127.0.0.1", 0))
    return server, str(bound)


async def test_nodes_with_the_same_key_link_up_and_talk() -> None:
    server, address = await _listener(KEY)
    try:
        link = await open_link(address, "a", KEY, 1 << 20, "b")
        assert link.peer == "b"
        link.send({"method": "ping"})
        line, frame = await anext(link.frames())
        assert frame == {"method": "ping"}
        assert orjson.loads(line) == frame
        link.close()
    finally:
        await server.close()


async def test_a_wrong_key_is_refused_with_a_clear_error() -> None:
    server, address = await _listener(KEY)
    try:
        with pytest.raises(LinkError, match="refused the link: node a: wrong fleet key"):
            await open_link(address, "a", OTHER, 1 << 20, "b")
    finally:
        await server.close()


async def test_a_node_without_the_key_is_refused_both_ways() -> None:
    server, address = await _listener(KEY)
    try:
        with pytest.raises(LinkError, match="requires the fleet key and node a has no"):
            await open_link(address, "a", None, 1 << 20, "b")
    finally:
        await server.close()
    server, address = await _listener(None)
    try:
        with pytest.raises(LinkError, match="node b has no --fleet-key-file and node a has"):
            await open_link(address, "a", KEY, 1 << 20, "b")
    finally:
        await server.close()


async def test_requests_before_node_auth_and_replayed_proofs_are_forbidden() -> None:
    server, address = await _listener(KEY)
    host, port = address.rsplit(":", 1)
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        hello = orjson.loads(await reader.readline())
        writer.write(b'{"id":1,"method":"list"}\n')
        refusal = orjson.loads(await reader.readline())
        assert refusal["code"] == "forbidden"
        assert "starts with node_auth" in refusal["message"]
        assert await reader.readline() == b""  # closed
        # A proof made for one challenge does not open the next link.
        stale = auth.client_proof(KEY, hello["challenge"], "a", "b")
        reader, writer = await asyncio.open_connection(host, int(port))
        await reader.readline()
        request = {
            "id": 0,
            "method": "node_auth",
            "node": "a",
            "proof": stale,
            "challenge": auth.new_challenge(),
        }
        writer.write(orjson.dumps(request) + b"\n")
        refusal = orjson.loads(await reader.readline())
        assert refusal["code"] == "forbidden"
        assert "wrong fleet key" in refusal["message"]
        writer.close()
    finally:
        await server.close()


STORE = ["--store", "postgresql:///capd"]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (
            ["--node-listen", "10.0.0.5:7420", *STORE],
            "reachable from other machines: give --fleet-key-file",
        ),
        (["--node-listen", "127.0.0.1:7420"], "needs --store postgresql://"),
        (["--node-listen", "7420", *STORE], "expected HOST:PORT"),
        (["--node-address", "b:7420", *STORE], "--node-address needs --node-listen"),
    ],
)
def test_link_options_refused(
    args: list[str], why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as refused:
        Config.from_args(args)
    assert refused.value.code == 2
    assert why in capsys.readouterr().err


def test_a_wildcard_listen_address_needs_the_address_to_dial(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "key"
    key.write_bytes(KEY)
    key.chmod(0o600)
    listen = ["--node-listen", "0.0.0.0:7420", "--fleet-key-file", str(key), *STORE]
    with pytest.raises(SystemExit):
        Config.from_args(listen)
    assert "is a wildcard: give --node-address" in capsys.readouterr().err
    config = Config.from_args([*listen, "--node-address", "b.internal:7420"])
    assert (config.node_listen, config.node_address, config.fleet_key) == (
        ("0.0.0.0", 7420),
        "b.internal:7420",
        KEY,
    )
    assert Config.from_args(["--node-listen", "127.0.0.1:0", *STORE]).fleet_key is None
