"""Node links authenticate both ways with a shared key (`--fleet-key-file`).

Each side sends a fresh random challenge and proves it holds the key by an HMAC-SHA256 over
the other side's challenge and both node names. The two proofs carry distinct labels, so a
proof cannot be reflected back to the side that asked for it, and fresh challenges make a
recorded proof useless on the next link.
"""

import hashlib
import hmac
import secrets
import stat
from pathlib import Path

MIN_KEY_BYTES = 32
"""What `openssl rand -hex 32` writes (64 characters); shorter keys are refused."""
CLIENT_LABEL = "capd-link/1 client"
SERVER_LABEL = "capd-link/1 server"


class FleetKeyError(ValueError):
    """The key file cannot be used; the message says why and how to fix it."""


def load_key(path: Path) -> bytes:
    """The fleet key in `path`: at least MIN_KEY_BYTES after stripping whitespace, and
    readable by its owner only (it lets anyone who has it act as a node)."""
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except OSError as exc:
        raise FleetKeyError(f"--fleet-key-file {path}: {exc.strerror}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise FleetKeyError(
            f"--fleet-key-file {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            "chmod 600 it"
        )
    if len(key) < MIN_KEY_BYTES:
        raise FleetKeyError(
            f"--fleet-key-file {path} holds {len(key)} bytes, fewer than {MIN_KEY_BYTES}; "
            "write one with `openssl rand -hex 32 > FILE`"
        )
    return key


def new_challenge() -> str:
    return secrets.token_hex(32)


def client_proof(key: bytes, server_challenge: str, client: str, server: str) -> str:
    """What the dialling node `client` sends to prove it holds `key`."""
    return _mac(key, CLIENT_LABEL, server_challenge, client, server)


def server_proof(key: bytes, client_challenge: str, server: str, client: str) -> str:
    """What the listening node `server` answers to prove it holds `key` too."""
    return _mac(key, SERVER_LABEL, client_challenge, server, client)


def same(expected: str, given: object) -> bool:
    """Constant-time comparison of a proof with what the peer sent (any JSON value)."""
    return isinstance(given, str) and hmac.compare_digest(expected, given)


def _mac(key: bytes, label: str, challenge: str, first: str, second: str) -> str:
    message = f"{label}|{challenge}|{first}|{second}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()
