"""The pod tools: spawn_pod, send_to_pod, read_pod_output, stop_pod, list_pods.

They parse arguments and hand the work to `ToolContext.pods` (capd/children.py), which
knows the daemon, enforces what a child may be and reaches only the caller's descendants.
All return at once; a child's result arrives later as a report (docs/protocol.md, Parent reports).
"""

from capd.tools.base import ChildPodOps, Tool, ToolContext, ToolFailed, ToolOutcome
from protocol.tools import NoArgs, PodNameArgs, SendToPodArgs, SpawnPodArgs


def _ops(ctx: ToolContext) -> ChildPodOps:
    if ctx.pods is None:
        raise ToolFailed("pod tools work only in a pod hosted by capd")
    return ctx.pods


class SpawnPodTool(Tool[SpawnPodArgs]):
    name = "spawn_pod"
    description = (
        "Start a child pod that works on `task` on its own, in your working directory or a "
        "directory inside it (or, with worktree, in a git work tree of its own of your "
        "repository), with your tools or fewer and a sandbox no wider than yours. "
        "Returns at once; when the child's turn ends its report reaches you as a notification, "
        "so do not poll."
    )
    args_model = SpawnPodArgs

    async def run(self, args: SpawnPodArgs, ctx: ToolContext) -> ToolOutcome:
        return ToolOutcome(await _ops(ctx).spawn(args))


class SendToPodTool(Tool[SendToPodArgs]):
    name = "send_to_pod"
    description = (
        "Send a message to one of your child pods. An idle child starts working on it; a "
        "busy one takes it up when its current turn ends; a paused one reads it on resume. "
        "You get a report when the turn it starts ends."
    )
    args_model = SendToPodArgs

    async def run(self, args: SendToPodArgs, ctx: ToolContext) -> ToolOutcome:
        return ToolOutcome(await _ops(ctx).send(args.name, args.text))


class ReadPodOutputTool(Tool[PodNameArgs]):
    name = "read_pod_output"
    description = (
        "Read what one of your child pods has written (its assistant text) since you last "
        "read it, with its current status."
    )
    args_model = PodNameArgs

    async def run(self, args: PodNameArgs, ctx: ToolContext) -> ToolOutcome:
        return ToolOutcome(_ops(ctx).read_output(args.name, ctx.output_limit))


class StopPodTool(Tool[PodNameArgs]):
    name = "stop_pod"
    description = (
        "Stop one of your child pods, and its own children: a running turn is cancelled. "
        "Its state is kept; a person can start it again."
    )
    args_model = PodNameArgs

    async def run(self, args: PodNameArgs, ctx: ToolContext) -> ToolOutcome:
        return ToolOutcome(await _ops(ctx).stop(args.name))


class ListPodsTool(Tool[NoArgs]):
    name = "list_pods"
    description = "List your child pods and their descendants with their status."
    args_model = NoArgs

    async def run(self, args: NoArgs, ctx: ToolContext) -> ToolOutcome:
        return ToolOutcome(_ops(ctx).tree())
