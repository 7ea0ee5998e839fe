"""Node links: the TCP connections nodes of a fleet use to reach each other's pods.

A link speaks the daemon socket's protocol (JSON lines, pod methods with `pod`) once both
ends have proved they hold the fleet key (capd.fleet.auth): the listener sends a hello with
a challenge, the dialler answers `node_auth` with its proof and its own challenge, and the
listener's ack carries its proof. What a link serves is answered by this node alone (a
`DaemonEndpoint` that never relays), so a request can never travel in a loop.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from capd.config import host_port
from capd.fleet import auth
from protocol import SERVER_NAME
from protocol.errors import ProtocolError
from protocol.events import Error
from protocol.framing import encode

log = logging.getLogger(__name__)

AUTH_TIMEOUT_S = 5.0
"""How long either end waits for the other's half of the handshake."""


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


class LinkError(ConnectionError):
    """A link could not be opened or was refused; the message says which node and why."""


class LinkServer:
    """Listens for links from the other nodes and serves each once it has authenticated."""

    def __init__(self, node: str, key: bytes | None, serve: Serve, max_frame_bytes: int) -> None:
        """`serve(reader, writer, hello)` serves a link once authenticated
        (`capd.server.Endpoint.serve_stream` of an endpoint that never relays)."""
        self._node = node
        self._key = key
        self._serve_link = serve
        self._limit = max_frame_bytes + 1
        self._server: asyncio.Server | None = None

    async def listen(self, where: HostPort) -> HostPort:
        """Bind `where` (port 0: any free port) and return what was bound."""
        self._server = await asyncio.start_server(
            self._serve, where.host or None, where.port, limit=self._limit
        )
        port = self._server.sockets[0].getsockname()[1]
        return HostPort(where.host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            welcome = await asyncio.wait_for(self._authenticate(reader, writer), AUTH_TIMEOUT_S)
        except (TimeoutError, ConnectionError, ValueError, ProtocolError) as exc:
            peer = writer.get_extra_info("peername")
            log.warning("refused a node link from %s: %s", peer, exc)
            if isinstance(exc, ProtocolError):
                writer.write(encode(Error(id=0, code=exc.code, message=exc.message)))
            writer.close()
            return
        await self._serve_link(reader, writer, welcome)

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        """Check the dialler's `node_auth`; the ack that answers it (the link's first
        frame once served)."""
        challenge = auth.new_challenge() if self._key is not None else None
        writer.write(
            encode(
                {
                    "event": "hello",
                    "server": SERVER_NAME,
                    "pod": None,
                    "node": self._node,
                    "challenge": challenge,
                }
            )
        )
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed before authenticating")
        frame = orjson.loads(line)
        if not isinstance(frame, dict) or frame.get("method") != "node_auth":
            raise ProtocolError("forbidden", "a node link starts with node_auth")
        peer = frame.get("node")
        if not isinstance(peer, str):
            raise ProtocolError("forbidden", "node_auth: node must be a node name")
        result: dict[str, Any] = {"node": self._node, "proof": None}
        if self._key is not None:
            assert challenge is not None
            if not auth.same(
                auth.client_proof(self._key, challenge, peer, self._node), frame.get("proof")
            ):
                raise ProtocolError(
                    "forbidden",
                    f"node {peer}: wrong fleet key (its proof does not match node "
                    f"{self._node}'s --fleet-key-file; every node needs the same key)",
                )
            theirs = frame.get("challenge")
            if not isinstance(theirs, str) or len(theirs) < 32:
                raise ProtocolError("forbidden", "node_auth: challenge missing")
            result["proof"] = auth.server_proof(self._key, theirs, self._node, peer)
        return encode({"event": "ack", "id": frame.get("id"), "result": result})


class Link:
    """An authenticated link to node `peer`: JSON frames out, JSON frames in."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.peer = peer

    def send(self, frame: dict[str, Any]) -> None:
        self._writer.write(encode(frame))

    async def frames(self) -> AsyncIterator[tuple[bytes, dict[str, Any]]]:
        """Every frame the peer sends (its line and its value), until the link closes."""
        while line := await self._reader.readline():
            yield line, orjson.loads(line)

    def close(self) -> None:
        self._writer.close()


async def open_link(address: str, me: str, key: bytes | None, limit: int, node: str = "?") -> Link:
    """Dial `address` (node `node`'s `--node-address`) and authenticate both ways."""
    if (where := host_port(address)) is None:  # as `--node-address` was checked
        raise LinkError(f"node {node}'s address {address!r} is not HOST:PORT")
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(*where, limit=limit), AUTH_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        raise LinkError(f"node {node} unreachable at {address}: {exc}") from exc
    try:
        peer = await asyncio.wait_for(_dial_handshake(reader, writer, me, key), AUTH_TIMEOUT_S)
    except (OSError, TimeoutError, ValueError) as exc:
        writer.close()
        raise LinkError(f"node {node} at {address}: link handshake failed: {exc}") from exc
    except LinkError:
        writer.close()
        raise
    return Link(reader, writer, peer)


async def _dial_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, me: str, key: bytes | None
) -> str:
    hello = orjson.loads(await reader.readline() or b"null")
    if not isinstance(hello, dict) or "node" not in hello:
        raise LinkError("not a capd node link (no node in its hello)")
    peer = str(hello["node"])
    theirs = hello.get("challenge")
    if key is not None and theirs is None:
        raise LinkError(
            f"node {peer} has no --fleet-key-file and node {me} has one: "
            "give every node the same key"
        )
    if key is None and theirs is not None:
        raise LinkError(
            f"node {peer} requires the fleet key and node {me} has no "
            "--fleet-key-file: give every node the same key"
        )
    mine = auth.new_challenge() if key is not None else None
    request: dict[str, Any] = {"id": 0, "method": "node_auth", "node": me, "challenge": mine}
    if key is not None:
        request["proof"] = auth.client_proof(key, theirs, me, peer)
    writer.write(encode(request))
    reply = orjson.loads(await reader.readline() or b"null")
    if not isinstance(reply, dict):
        raise LinkError(f"node {peer} closed the link while authenticating")
    if reply.get("event") == "error":
        raise LinkError(f"node {peer} refused the link: {reply.get('message')}")
    if key is not None:
        assert mine is not None
        proof = (reply.get("result") or {}).get("proof")
        if not auth.same(auth.server_proof(key, mine, peer, me), proof):
            raise LinkError(
                f"node {peer} failed to prove it holds the fleet key: wrong --fleet-key-file"
            )
    return peer
