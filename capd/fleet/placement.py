"""Where a daemon `spawn` goes: the node it names when that node is live, else the live,
non-draining node with the fewest pods (ties by name). Two nodes placing at once can only
unbalance the fleet by a pod."""

from capd.fleet.control import Control, NodeInfo
from protocol.errors import ProtocolError


async def place(control: Control, node: str | None, ttl_s: float) -> NodeInfo | None:
    """The chosen node, as one query found it (its link's address with it); None when no
    live node can be chosen (this node places the pod itself)."""
    if node is None:
        return await control.least_loaded(ttl_s)
    live = await control.live_nodes(ttl_s)
    for info in live:
        if info.name == node:
            return info
    names = ", ".join(info.name for info in live)
    raise ProtocolError("not_found", f"node {node} is not a live node of the fleet (live: {names})")
