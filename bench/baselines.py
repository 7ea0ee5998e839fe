"""Baseline servers: the floor a Python daemon on this socket type can reach.

    python -m bench.baselines echo PATH        # JSON lines in, an ack per line out
    python -m bench.baselines fanout PATH      # `subscribe`, then `run` fans frames out
    python -m bench.baselines listeners PATH   # `listen {count}` binds that many sockets

Each is as small as a uvloop server can be: asyncio streams, orjson, no validation. They
answer any other request with an ack, so the bench can check they are up the same way it
checks capd.
"""

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import uvloop

LINE_LIMIT = 64 * 1024 * 1024
Reply = Callable[[dict[str, Any], asyncio.StreamWriter], Awaitable[None]]


def _ack(frame: dict[str, Any], result: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {"event": "ack", "id": frame.get("id"), "result": result},
        option=orjson.OPT_APPEND_NEWLINE,
    )


async def _serve_lines(path: str, reply: Reply) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b'{"event":"hello","protocol":1,"server":"baseline","pod":null}\n')
        try:
            while line := await reader.readline():
                await reply(orjson.loads(line), writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(connection, path=path, limit=LINE_LIMIT)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    async with server:
        await stop.wait()


async def echo(path: str) -> None:
    async def reply(frame: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(_ack(frame, frame))

    await _serve_lines(path, reply)


async def fanout(path: str) -> None:
    """Writes each frame to every subscriber, yielding to the loop between frames as an
    event source producing over time does."""
    subscribers: list[asyncio.StreamWriter] = []

    async def reply(frame: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        writer.write(_ack(frame, {"last_seq": 0}))
        if frame.get("method") == "subscribe":
            subscribers.append(writer)
        elif frame.get("method") == "run":
            text = frame["text"]
            size = frame["chunk_chars"]
            for start in range(0, len(text), size):
                delta = {"event": "text_delta", "pod": "fan", "turn_id": "t", "text": ""}
                delta["text"] = text[start : start + size]
                data = orjson.dumps(delta, option=orjson.OPT_APPEND_NEWLINE)
                for subscriber in subscribers:
                    subscriber.write(data)
                await asyncio.sleep(0)
            end = {"event": "turn_end", "pod": "fan", "turn_id": "t", "result": "finished"}
            data = orjson.dumps(end, option=orjson.OPT_APPEND_NEWLINE)
            for subscriber in subscribers:
                subscriber.write(data)

    await _serve_lines(path, reply)


async def listeners(path: str) -> None:
    """Holds as many listening Unix sockets as asked: the floor of a pod's memory."""
    servers: list[asyncio.Server] = []
    directory = Path(path).parent / "listeners"
    directory.mkdir(exist_ok=True)

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def reply(frame: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        for _ in range(frame.get("count", 0)):
            where = directory / f"{len(servers)}.sock"
            servers.append(await asyncio.start_unix_server(accept, path=str(where)))
        writer.write(_ack(frame, {"listening": len(servers)}))

    await _serve_lines(path, reply)


SERVERS = {"echo": echo, "fanout": fanout, "listeners": listeners}


def main() -> None:
    kind, path = sys.argv[1], sys.argv[2]
    if os.path.exists(path):
        os.unlink(path)
    uvloop.run(SERVERS[kind](path))


if __name__ == "__main__":
    main()
