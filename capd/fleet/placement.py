"""Where a daemon `spawn` goes: the node it names when that node is live, else the live,
non-draining node with the fewest pods (ties by name). Two nodes placing at once can only
unbalance the fleet by a pod."""

from capd.fleet.control import Control
from protocol.errors import ProtocolError


async def place(control: Control, me: str, node: str | None, ttl_s: float) -> str:
    if node is not None:
        live = await control.live_nodes(ttl_s)
        if node not in {info.name for info in live}:
            names = ", ".join(info.name for info in live)
            raise ProtocolError(
                "not_found", f"node {node} is not a live node of the fleet (live: {names})"
            )
        return node
    return await control.least_loaded() or me
