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

_UCRED = struct.Struct("3i")


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux >= 4.13: the peer's supplementary groups, as they were at connect()."""
MAX_GROUPS = 65536


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]
    """Primary and supplementary groups at connect() time."""


def peer_of(sock: socket.socket) -> Peer:
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * MAX_GROUPS)
    except OSError:
        raw = b""
    supplementary = struct.unpack(f"{len(raw) // 4}I", raw)
    return Peer(pid, uid, gid, frozenset({gid, *supplementary}))


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    uid: int
    group: int | None = None

    def refusal(self, peer: Peer) -> str | None:
        """Why `peer` may not connect, or None when it may."""
        if peer.uid in (self.uid, 0):
            return None
        if self.group is not None and self.group in peer.groups:
            return None
        allowed = f"uid {self.uid} or root" + (
            f", or members of group {self.group}" if self.group is not None else ""
        )
        return f"uid {peer.uid} may not use this capd; it serves {allowed} (capd --allow-group)"


def current_policy(group: int | None) -> AccessPolicy:
    return AccessPolicy(uid=os.geteuid(), group=group)
