"""Who may talk to capd: the peer credentials (SO_PEERCRED) of every connection.

The runtime dir (0700) and the sockets (0600) already keep other users out; this check
holds even when those modes are loosened by mistake. Allowed: capd's own uid, root, and
with `--allow-group` the members of that group (primary or supplementary), for whom the
runtime dir becomes 0710 and the sockets 0660, owned by the group.
"""

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int

    def groups(self) -> set[int]:
        """The peer's primary and supplementary groups (from /proc, while it lives)."""
        groups = {self.gid}
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return groups
        for line in status.splitlines():
            if line.startswith("Groups:"):
                groups.update(int(g) for g in line.split()[1:])
        return groups


def peer_of(sock: socket.socket) -> Peer:
    return Peer(*_UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)))


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    uid: int
    group: int | None = None

    def refusal(self, peer: Peer) -> str | None:
        """Why `peer` may not connect, or None when it may."""
        if peer.uid in (self.uid, 0):
            return None
        if self.group is not None and self.group in peer.groups():
            return None
        allowed = f"uid {self.uid} or root" + (
            f", or members of group {self.group}" if self.group is not None else ""
        )
        return f"uid {peer.uid} may not use this capd; it serves {allowed} (capd --allow-group)"


def current_policy(group: int | None) -> AccessPolicy:
    return AccessPolicy(uid=os.geteuid(), group=group)
