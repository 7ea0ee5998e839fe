"""capctl: the command that drives capd.

It speaks only the wire protocol (the `protocol` package), never imports capd, and turns
every failure into one line on stderr: `capctl: <what went wrong>`, exit status 1
(2 for usage errors).

asyncio and the pydantic models are imported only by the commands that need them, so the
one-request commands (`oneshot.py`) start fast; see README: Performance.
"""

import math
import os
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import click
import orjson

from capctl.errors import CapctlError
from capctl.manifest import (
    DEFAULT_MODELS,
    DEFAULT_TOOLS,
    manifest_from_file,
    manifest_from_options,
    mcp_servers_from_options,
)
from capctl.oneshot import daemon_call, pod_call, wait_ready
from capctl.render import (
    EventPrinter,
    TurnPrinter,
    duration,
    key_values,
    pod_status,
    pod_table,
    spent_and_budget,
    turn_failure,
)
from protocol import paths
from protocol.names import IfBusy, ToolName

T = TypeVar("T")

HISTORY_PAGE = 1000
STATUS_ORDER = (
    "name",
    "status",
    "permissions",
    "turn_id",
    "queued",
    "model",
    "cwd",
    "workspace",
    "tools",
    "mcp",
    "sandbox",
    "parent",
    "children",
    "last_seq",
    "usage",
    "budget",
    "spent",
    "context",
    "socket",
)
INFO_ORDER = ("version", "pid", "uptime", "pods", "node", "fleet", "runtime_dir", "state_dir")


@dataclass
class Settings:
    runtime: Path
    json: bool = False
    via_daemon: bool = False
    """Pod commands go through the daemon socket, naming the pod (`--via-daemon`)."""

    def pod_call(self, pod: str, frame: dict[str, Any]) -> dict[str, Any]:
        """One request to `pod` (see `oneshot.pod_call`)."""
        return pod_call(self.runtime, pod, frame, self.via_daemon)


pass_settings = click.make_pass_decorator(Settings)


def _enable_json(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    settings = ctx.find_object(Settings)
    if value and settings is not None:
        settings.json = True


json_option = click.option(
    "--json",
    is_flag=True,
    expose_value=False,
    callback=_enable_json,
    help="Print protocol objects, one JSON object per line, and nothing else.",
)


def _check_pod_name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not paths.POD_NAME_RE.match(value):
        raise click.BadParameter(
            f"{value!r} is not a pod name: use 1-48 of a-z 0-9 _ . - starting with a-z or 0-9"
        )
    return value


def _check_optional_pod_name(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    return None if value is None else _check_pod_name(ctx, param, value)


pod_argument = click.argument("pod", callback=_check_pod_name)


def echo_json(obj: dict[str, Any]) -> None:
    click.echo(orjson.dumps(obj).decode())


def report(settings: Settings, result: dict[str, Any], line: str) -> None:
    """Print an ack: its result as JSON, or a line for people."""
    if settings.json:
        echo_json(result)
    else:
        click.echo(line)


def run(
    coro: Coroutine[Any, Any, T], interrupt_note: str | None = None, interrupt_exit: int = 130
) -> T:
    """Run one streaming conversation with capd; failures become one-line errors."""
    import asyncio

    from protocol.client import ConnectionClosed
    from protocol.errors import ProtocolError

    try:
        return asyncio.run(coro)
    except ProtocolError as exc:
        raise CapctlError(f"{exc.code}: {exc.message}") from None
    except ConnectionClosed:
        raise CapctlError("capd closed the connection before answering") from None
    except (ConnectionResetError, ConnectionAbortedError) as exc:
        raise CapctlError(f"lost the connection to capd: {exc.strerror or exc}") from None
    except TimeoutError:
        raise CapctlError("timed out waiting for capd to answer") from None
    except KeyboardInterrupt:
        if interrupt_note:
            click.echo(f"capctl: {interrupt_note}", err=True)
        raise click.exceptions.Exit(interrupt_exit) from None


def read_text(words: tuple[str, ...]) -> str:
    """The message: the words joined by spaces, or stdin when the only word is `-`."""
    text = click.get_text_stream("stdin").read() if words == ("-",) else " ".join(words)
    if not text.strip():
        raise click.UsageError("the text is empty")
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, no_args_is_help=True)
@click.option(
    "--runtime-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="capd's runtime directory (default: like capd: $CAPD_RUNTIME_DIR, "
    "$RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/capd, /tmp/capd-<uid>).",
)
@click.option(
    "--json",
    "json_output",
    is_flag=True,
    help="Print protocol objects, one JSON object per line, and nothing else.",
)
@click.option(
    "--via-daemon",
    is_flag=True,
    envvar="CAPCTL_VIA_DAEMON",
    help="Send pod commands through the daemon socket, naming the pod, instead of the "
    "pod's own socket (what capctl does by itself for a pod another node hosts); "
    "also $CAPCTL_VIA_DAEMON=1.",
)
@click.version_option(package_name="capd", prog_name="capctl")
@click.pass_context
def cli(ctx: click.Context, runtime_dir: Path | None, json_output: bool, via_daemon: bool) -> None:
    """Drive capd, the daemon that hosts AI agent pods."""
    ctx.obj = Settings(
        runtime=paths.runtime_dir(runtime_dir), json=json_output, via_daemon=via_daemon
    )


# -- pods on the daemon socket --------------------------------------------------------------


@cli.command()
@click.argument("name", required=False, callback=_check_optional_pod_name)
@click.option(
    "-f",
    "--file",
    "manifest_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A YAML manifest; NAME, when given too, overrides its name.",
)
@click.option(
    "--provider",
    type=click.Choice(["auto", "openai", "anthropic", "scripted"]),
    help="Model provider; auto (the default) is openai when OPENAI_API_KEY is set, else "
    "anthropic when ANTHROPIC_API_KEY is, else scripted.",
)
@click.option(
    "--model",
    "model_name",
    help="Model name (default: "
    + ", ".join(f"{provider} {name}" for provider, name in DEFAULT_MODELS.items())
    + ").",
)
@click.option("--base-url", help="Base URL of the provider's API (another compatible server).")
@click.option("--api-key-env", help="Name of the variable, in capd's environment, with the key.")
@click.option("--system-prompt", help="The pod's system prompt.")
@click.option(
    "--cwd",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory the pod's tools act in (default: the current directory).",
)
@click.option(
    "--tool",
    "tools",
    multiple=True,
    type=click.Choice(get_args(ToolName)),
    help=f"A tool the pod may use; repeat for more (default: {', '.join(DEFAULT_TOOLS)}).",
)
@click.option(
    "--mcp",
    "mcp",
    multiple=True,
    metavar="NAME=COMMAND",
    help="An MCP server whose tools the pod uses, as mcp__NAME__<tool>; repeat for more. "
    "COMMAND is split as a shell would (no expansion); NAME=http(s)://... is an HTTP server.",
)
@click.option(
    "--parent",
    help="Report to this parent: a pod name, or the path of any pod socket.",
)
@json_option
@pass_settings
def spawn(
    settings: Settings,
    name: str | None,
    manifest_file: Path | None,
    provider: str | None,
    model_name: str | None,
    base_url: str | None,
    api_key_env: str | None,
    system_prompt: str | None,
    cwd: Path | None,
    tools: tuple[str, ...],
    mcp: tuple[str, ...],
    parent: str | None,
) -> None:
    """Start a pod: `spawn NAME [options]` or `spawn -f MANIFEST.yaml`.

    With --parent the pod reports the end of each turn it is sent, and its own stop, to
    that pod, which wakes up to react (a child pod, as if spawned with the spawn_pod tool).
    """
    if manifest_file is not None:
        given = [
            flag
            for flag, value in (
                ("--provider", provider),
                ("--model", model_name),
                ("--base-url", base_url),
                ("--api-key-env", api_key_env),
                ("--system-prompt", system_prompt),
                ("--cwd", cwd),
                ("--tool", tools),
                ("--mcp", mcp),
            )
            if value
        ]
        if given:
            raise click.UsageError(f"{', '.join(given)}: put these in the manifest with -f")
        manifest = manifest_from_file(manifest_file, name)
    elif name is None:
        raise click.UsageError("give a pod NAME or -f MANIFEST.yaml")
    else:
        manifest = manifest_from_options(
            name,
            provider or "auto",
            model_name,
            base_url,
            api_key_env,
            system_prompt,
            cwd,
            tools,
            mcp_servers_from_options(mcp),
        )
    from protocol.methods import Spawn

    request = Spawn(manifest=manifest, parent=_parent_socket(settings.runtime, parent))
    try:
        result = daemon_call(settings.runtime, request.model_dump(mode="json", exclude_none=True))
    except CapctlError as exc:
        raise _with_key_hint(exc) from None
    line = f"spawned {result.get('name')} in {result.get('cwd')} (socket {result.get('socket')})"
    report(settings, result, line)


def _with_key_hint(exc: CapctlError) -> CapctlError:
    """A refusal for want of a key that this shell has: say that capd reads its own."""
    import re

    found = re.search(r"(\w+), which is not set in capd's environment", exc.message)
    if found and os.environ.get(found.group(1)):
        exc.message += (
            f" ({found.group(1)} is set in this shell, but capd reads its own environment)"
        )
    return exc


def _parent_socket(runtime: Path, parent: str | None) -> str | None:
    if parent is None:
        return None
    if "/" in parent:
        return os.path.abspath(parent)
    if not paths.POD_NAME_RE.match(parent):
        raise click.BadParameter(f"{parent!r} is neither a pod name nor a socket path")
    return str(paths.pod_socket(runtime, parent))


team_file_option = click.option(
    "-f",
    "--file",
    "team_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The team file (YAML): `team` and its `pods`.",
)


@cli.command()
@team_file_option
@click.option("--prune", is_flag=True, help="Delete the team's pods the file does not list.")
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@json_option
@pass_settings
def apply(settings: Settings, team_file: Path, prune: bool, dry_run: bool) -> None:
    """Make the team's pods match a team file: spawn, start and reconfigure them, parents
    first (a running pod's change applies when its turn ends); --prune deletes the pods
    of the team the file no longer lists. Nothing changes when the file is invalid."""
    from capctl.team import plan_lines, read_team, send

    team = read_team(team_file)
    request = {
        "method": "apply",
        "team": team.team,
        "pods": [pod.model_dump(mode="json", exclude_unset=True) for pod in team.pods],
        "prune": prune,
        "dry_run": dry_run,
    }
    note = None if dry_run else f"capd goes on applying {team_file}"
    result = run(send(settings.runtime, team_file, request), interrupt_note=note)
    lines = plan_lines(result.get("plan") or [])
    if dry_run:
        lines.append("dry run: nothing was changed")
    report(settings, result, "\n".join(lines))


@cli.command()
@team_file_option
@click.option(
    "--drain-timeout",
    type=click.FloatRange(0, 86400),
    default=30.0,
    show_default=True,
    metavar="S",
    help="Seconds running turns may go on before they are paused.",
)
@json_option
@pass_settings
def down(settings: Settings, team_file: Path, drain_timeout: float) -> None:
    """Bring a team down: its running turns may finish within --drain-timeout, what still
    runs is paused, then its pods stop, children first, keeping their paused turns
    (`capctl apply` brings them back). Meanwhile they start no turn of their own."""
    from capctl.team import send, team_name

    team = team_name(team_file)
    request = {"method": "down", "team": team, "drain_timeout_s": drain_timeout}
    result = run(
        send(settings.runtime, team_file, request),
        interrupt_note=f"capd goes on bringing team {team} down",
    )
    lines = [f"{pod.get('pod')}: {pod.get('outcome')}" for pod in result.get("pods") or []]
    report(settings, result, "\n".join(lines))


@cli.command()
@pod_argument
@click.option(
    "--keep-turn",
    is_flag=True,
    help="Pause its (and its descendants') turn instead of cancelling it: `start` brings "
    "it back paused.",
)
@json_option
@pass_settings
def stop(settings: Settings, pod: str, keep_turn: bool) -> None:
    """Stop a pod and its descendants, keeping their state (start brings each back)."""
    request: dict[str, Any] = {"method": "stop", "name": pod}
    if keep_turn:
        request["keep_turn"] = True
    report(settings, daemon_call(settings.runtime, request), f"stopped {pod}")


@cli.command()
@pod_argument
@json_option
@pass_settings
def restart(settings: Settings, pod: str) -> None:
    """Stop a pod and its descendants, then start it and those of them that were up.

    A running or paused turn is cancelled; queued messages are kept and run after.
    """
    result = daemon_call(settings.runtime, {"method": "restart", "name": pod})
    if settings.json:
        echo_json(result)
        return
    pods = daemon_call(settings.runtime, {"method": "list"}).get("pods") or []
    up = len(_descendants_up(pods, result.get("socket")))
    more = f" (and {up} descendant{'s' if up > 1 else ''})" if up else ""
    click.echo(f"restarted {pod}{more}")


def _descendants_up(pods: list[dict[str, Any]], socket: str | None) -> list[str]:
    """The names of the pods under the one at `socket` that are not stopped."""
    found: list[str] = []
    parents = {socket}
    while below := [
        pod for pod in pods if pod.get("parent") in parents and pod["name"] not in found
    ]:
        found += [pod["name"] for pod in below]
        parents = {pod.get("socket") for pod in below}
    statuses = {pod["name"]: pod.get("status") for pod in pods}
    return [name for name in found if statuses[name] != "stopped"]


@cli.command()
@json_option
@pass_settings
def ps(settings: Settings) -> None:
    """List pods, children under their parents."""
    result = daemon_call(settings.runtime, {"method": "list"})
    pods = result.get("pods") or []
    report(settings, result, pod_table(pods) if pods else "no pods")


@cli.command()
@click.option("--once", is_flag=True, help="Print the table once, as plain text, and exit.")
@json_option
@pass_settings
def top(settings: Settings, once: bool) -> None:
    """Watch every pod live: status, turn and step, running tool, context, spend; keys
    pause, resume, cancel, answer and attach to the pod on the cursor row (q quits)."""
    if once or settings.json:
        import time

        from capctl.tui.rows import once as table

        result = daemon_call(settings.runtime, {"method": "overview"})
        pods = {pod["pod"]: pod for pod in result.get("pods") or []}
        report(settings, result, table(pods, time.time()) if pods else "no pods")
        return
    daemon_call(settings.runtime, {"method": "info"})  # fail here, not in a full screen
    from capctl.tui.top import run_top

    daemon = paths.daemon_socket(settings.runtime)
    raise SystemExit(run_top(settings.runtime, daemon, settings.via_daemon))


@cli.command()
@json_option
@pass_settings
def info(settings: Settings) -> None:
    """Show the daemon's version, pid, uptime and directories."""
    result = daemon_call(settings.runtime, {"method": "info"})
    if settings.json:
        echo_json(result)
        return
    shown = dict(result)
    uptime = shown.pop("uptime_s", None)
    if isinstance(uptime, int | float):
        shown["uptime"] = duration(uptime)
    if isinstance(fleet := shown.get("fleet"), list):
        nodes = [node for node in fleet if isinstance(node, dict)]
        shown["fleet"] = ", ".join(f"{n.get('node')} ({n.get('pods')} pods)" for n in nodes)
    click.echo(key_values(shown, INFO_ORDER))


@cli.command()
@json_option
@pass_settings
def metrics(settings: Settings) -> None:
    """Print the daemon's metrics (Prometheus text format)."""
    result = daemon_call(settings.runtime, {"method": "metrics"})
    if settings.json:
        echo_json(result)
        return
    click.echo(result["text"], nl=False)


@cli.command()
@click.option(
    "--timeout", "timeout_s", type=float, default=10.0, show_default=True, help="Seconds to wait."
)
@json_option
@pass_settings
def ready(settings: Settings, timeout_s: float) -> None:
    """Wait until capd answers (for scripts that just started it); exit 1 on timeout."""
    result = wait_ready(settings.runtime, timeout_s)
    report(settings, result, f"capd {result.get('version', '')} is ready (pid {result.get('pid')})")


@cli.command()
@json_option
@pass_settings
def shutdown(settings: Settings) -> None:
    """Ask capd to drain and exit."""
    result = daemon_call(settings.runtime, {"method": "shutdown"})
    report(settings, result, "capd is shutting down")


# -- one pod, on its own socket --------------------------------------------------------------


@cli.command()
@pod_argument
@json_option
@pass_settings
def status(settings: Settings, pod: str) -> None:
    """Show a pod's status."""
    result = settings.pod_call(pod, {"method": "status"})
    report(settings, result, pod_status(result, STATUS_ORDER))


def _limit(kind: type[int] | type[float]) -> Callable[..., int | float | str | None]:
    """A budget limit option: a number, or `none` to remove the limit."""

    def parse(_ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        if value.lower() == "none":
            return "none"
        try:
            number = kind(value)
        except ValueError:
            number = -1
        if not 0 <= number < math.inf:  # also nan
            raise click.BadParameter(f"{value!r} is not a number >= 0 or `none`")
        return number

    return parse


@cli.command()
@pod_argument
@click.option(
    "--tokens", callback=_limit(int), help="Limit in tokens (input plus output); `none` removes it."
)
@click.option("--usd", callback=_limit(float), help="Limit in dollars; `none` removes it.")
@json_option
@pass_settings
def budget(settings: Settings, pod: str, tokens: Any, usd: Any) -> None:
    """Show what the pod and its descendants spent against its budget; with --tokens or
    --usd, set the budget first (an option left out keeps its limit)."""
    limits = {key: value for key, value in (("tokens", tokens), ("usd", usd)) if value is not None}
    if limits:
        request = {k: None if v == "none" else v for k, v in limits.items()}
        settings.pod_call(pod, {"method": "set_budget", **request})
    status = settings.pod_call(pod, {"method": "status"})
    result = {"budget": status.get("budget"), "spent": status.get("spent")}
    report(settings, result, f"{pod}: {spent_and_budget(result['spent'], result['budget'])}")


@cli.command()
@pod_argument
@click.option("--all", "cancel_all", is_flag=True, help="Also drop the queued turns.")
@json_option
@pass_settings
def cancel(settings: Settings, pod: str, cancel_all: bool) -> None:
    """Cancel the pod's turn; the next queued turn starts unless --all."""
    result = settings.pod_call(pod, {"method": "cancel", "all": cancel_all})
    dropped = f" and dropped {result.get('cleared', 0)} queued turns" if cancel_all else ""
    report(settings, result, f"cancelled the turn of {pod}{dropped}")


@cli.command()
@pod_argument
@click.argument("text", nargs=-1, required=True)
@click.option("--source", help="Who the notification is from.")
@json_option
@pass_settings
def notify(settings: Settings, pod: str, text: tuple[str, ...], source: str | None) -> None:
    """Give the pod a notification (TEXT, or - for stdin); an idle pod starts a turn."""
    request: dict[str, Any] = {"method": "notify", "text": read_text(text)}
    if source is not None:
        request["source"] = source
    result = settings.pod_call(pod, request)
    turn = f"; current turn {result['turn_id']}" if result.get("turn_id") else ""
    report(settings, result, f"notified {pod} ({result.get('buffered', 0)} buffered{turn})")


@cli.command()
@pod_argument
@click.argument("request_id")
@click.argument("option_id", required=False)
@json_option
@pass_settings
def permission(settings: Settings, pod: str, request_id: str, option_id: str | None) -> None:
    """Answer a permission request of the pod with OPTION_ID (omit it to cancel).

    `status`, `watch` and `send` show the requests, each with its options.
    """
    request = {"method": "permission", "request_id": request_id, "option_id": option_id}
    result = settings.pod_call(pod, request)
    report(settings, result, f"answered {request_id}: {option_id or 'cancelled'}")


@cli.command()
@pod_argument
@click.argument("turn_id")
@click.option("--files", is_flag=True, help="Also restore the cwd's files from the checkpoint.")
@json_option
@pass_settings
def rewind(settings: Settings, pod: str, turn_id: str, files: bool) -> None:
    """Take the pod's context back to just before turn TURN_ID started (a paused turn is
    cancelled first); with --files, the cwd's files too.

    `capctl log POD` shows the turns' ids. The history keeps everything: rewinding to a
    later turn undoes a rewind.
    """
    request = {"method": "rewind", "turn_id": turn_id, "files": files}
    result = settings.pod_call(pod, request)
    restored = " and its files" if files else ""
    report(settings, result, f"rewound {pod}{restored} to before turn {turn_id}")


@cli.command()
@pod_argument
@click.option(
    "-f",
    "--file",
    "manifest_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The pod's new YAML manifest; its name is POD, and without a cwd it keeps its own.",
)
@json_option
@pass_settings
def update(settings: Settings, pod: str, manifest_file: Path) -> None:
    """Give an idle or paused pod a new manifest (`reconfigure`): it keeps its history,
    and a paused turn resumes under the new one. Its name, cwd, workspace and engine
    kind stay."""
    manifest = manifest_from_file(manifest_file, pod)
    request = {
        "method": "reconfigure",
        "manifest": manifest.model_dump(mode="json", exclude_none=True),
    }
    result = settings.pod_call(pod, request)
    changed = result.get("changed") or []
    line = f"updated {pod}: {', '.join(changed)} changed" if changed else f"{pod}: nothing changed"
    report(settings, result, line)


async def _compact(settings: Settings, pod: str, instructions: str | None, wait: bool) -> None:
    """Subscribe from the pod's last seq (so its status is known), ask, and follow the
    request to its outcome (see `compacting.py`)."""
    from capctl.compacting import COMPACT_ID, CompactionWatch
    from capctl.session import Subscription, connect_pod
    from protocol.framing import encode
    from protocol.methods import Compact

    async with await connect_pod(settings.runtime, pod, settings.via_daemon) as client:
        found = client.pod
        watch = CompactionWatch(pod, found.status if found else None, wait=wait, json=settings.json)
        events = Subscription(client)
        await events.start(found.last_seq if found else None)
        request = Compact(instructions=instructions).model_dump(mode="json", exclude_none=True)
        await client.send_raw(encode(client.frame({**request, "id": COMPACT_ID})))
        async for event in events:
            if watch.see(event):
                return
    raise CapctlError(f"pod {pod} closed the connection before it compacted")


@cli.command()
@pod_argument
@click.option(
    "--instructions",
    metavar="TEXT",
    help="What the summary must keep or focus on; added to the summary prompt "
    "(at most 10,000 characters).",
)
@click.option(
    "--no-wait",
    "no_wait",
    is_flag=True,
    help="Return once capd has taken the request, without waiting for a running pod to "
    "reach its next step boundary.",
)
@json_option
@pass_settings
def compact(settings: Settings, pod: str, instructions: str | None, no_wait: bool) -> None:
    """Compact the pod's model context: its model summarises the older part of it.

    An idle or paused pod compacts at once; a running one at its next step boundary, and
    capctl waits for that. Prints the context's size before and after. Exits 0 once
    compacted; 1 on an error: nothing to compact, the summary's model call failed, a
    pause or cancel stopped it, or the engine manages its own context. Ctrl-C detaches:
    the compaction still happens.
    """
    from protocol.methods import MAX_INSTRUCTIONS

    if instructions is not None and len(instructions) > MAX_INSTRUCTIONS:
        raise click.BadParameter(
            f"{len(instructions):,} characters; at most {MAX_INSTRUCTIONS:,}",
            param_hint="'--instructions'",
        )
    note = f"detached from {pod}; the compaction still happens"
    run(_compact(settings, pod, instructions, not no_wait), interrupt_note=note)


def _traceparent(value: str | None) -> str | None:
    """$TRACEPARENT as `run` takes it (version 00; a later version's first four fields).
    One that does not parse is ignored with a warning, as W3C trace context says: CI
    systems set it, and the turn runs without the link."""
    if not value:
        return None
    found = re.fullmatch(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", value)
    if (
        found is not None
        and found[1] != "ff"
        and not (found[1] == "00" and found[5])
        and found[2].strip("0")
        and found[3].strip("0")
    ):
        return f"00-{found[2]}-{found[3]}-{found[4]}"
    click.echo(
        f"capctl: ignoring TRACEPARENT={value}: not a W3C traceparent "
        "(00-<32 hex>-<16 hex>-<2 hex>)",
        err=True,
    )
    return None


async def _send(settings: Settings, pod: str, text: str, if_busy: IfBusy) -> int:
    from capctl.session import Subscription, connect_pod
    from protocol.methods import Run

    traceparent = _traceparent(os.environ.get("TRACEPARENT"))  # the caller's span, linked to
    async with await connect_pod(settings.runtime, pod, settings.via_daemon) as client:
        events = Subscription(client)
        await events.start()
        ack = await client.request(Run(text=text, if_busy=if_busy, traceparent=traceparent))
        turn_id = ack.get("turn_id")
        printer = TurnPrinter(pod)
        if settings.json:
            echo_json(ack)
        elif ack.get("queued"):
            click.echo(f"[queued: starts when the current turn of {pod} ends]", err=True)
        async for event in events:
            if event.get("turn_id") != turn_id and event.get("event") != "lagged":
                continue
            if settings.json:
                echo_json(event)
            else:
                printer.show(event)
            if event.get("event") != "turn_end":
                continue
            if not settings.json:
                return printer.finish(event)
            failure = turn_failure(event)
            if failure:
                click.echo(failure, err=True)
            return 1 if failure else 0
    raise CapctlError(f"pod {pod} closed the connection before turn {turn_id} ended")


@cli.command()
@pod_argument
@click.argument("text", nargs=-1, required=True)
@click.option("--queue", "if_busy", flag_value="queue", help="If busy, run after the current turn.")
@click.option(
    "--interrupt", "if_busy", flag_value="interrupt", help="If busy, cancel the current turn."
)
@json_option
@pass_settings
@click.pass_context
def send(
    ctx: click.Context,
    settings: Settings,
    pod: str,
    text: tuple[str, ...],
    if_busy: IfBusy | None,
) -> None:
    """Run a turn with TEXT (or - for stdin) and stream the reply.

    Exits 0 when the turn finishes, 1 when it is cancelled or fails. Ctrl-C detaches
    without cancelling the turn. With $TRACEPARENT set (W3C trace context), the turn's
    trace links to that span.
    """
    message = read_text(text)
    note = f"detached from {pod}; its turn goes on (capctl cancel {pod} stops it)"
    ctx.exit(run(_send(settings, pod, message, if_busy or "reject"), interrupt_note=note))


async def _watch(settings: Settings, pod: str, from_seq: int | None) -> None:
    from capctl.session import Subscription, connect_pod

    show: Callable[[dict[str, Any]], None] = echo_json if settings.json else EventPrinter().show
    async with await connect_pod(settings.runtime, pod, settings.via_daemon) as client:
        events = Subscription(client)
        await events.start(from_seq)
        async for event in events:
            show(event)
    click.echo(f"capctl: {pod} closed the connection (stopped?)", err=True)


@cli.command()
@pod_argument
@click.option(
    "--from-seq",
    type=click.IntRange(min=0),
    help="First replay the events after this seq (0: the whole history).",
)
@json_option
@pass_settings
def watch(settings: Settings, pod: str, from_seq: int | None) -> None:
    """Print the pod's events as they happen, until Ctrl-C or the pod stops."""
    run(_watch(settings, pod, from_seq), interrupt_exit=0)


async def _log(
    settings: Settings,
    pod: str,
    from_seq: int,
    limit: int | None,
    tail: int | None = None,
    tail_events: int | None = None,
) -> None:
    """Page `history` forward from `from_seq`; `tail` starts at the last this-many turns,
    `tail_events` at the last this-many events (seqs are gapless)."""
    from capctl.session import connect_pod
    from protocol.methods import History

    show: Callable[[dict[str, Any]], None] = echo_json if settings.json else EventPrinter().show
    async with await connect_pod(settings.runtime, pod, settings.via_daemon) as client:
        after = from_seq
        remaining = limit
        if tail_events is not None:
            last_seq = client.pod.last_seq if client.pod else 0
            after = max(0, last_seq - tail_events)
            remaining = tail_events if limit is None else min(limit, tail_events)
        last_turns = tail
        while remaining is None or remaining > 0:
            page = HISTORY_PAGE if remaining is None else min(HISTORY_PAGE, remaining)
            request = History(after_seq=after, limit=page, last_turns=last_turns)
            last_turns = None
            result = await client.request(request)
            events: list[dict[str, Any]] = result.get("events") or []
            for event in events:
                show(event)
            last = events[-1].get("seq") if events else None
            if len(events) < page or not isinstance(last, int) or last <= after:
                return
            after = last
            if remaining is not None:
                remaining -= len(events)


@cli.command()
@pod_argument
@click.option(
    "--from-seq",
    type=click.IntRange(min=0),
    help="Only the events after this seq.",
)
@click.option(
    "--tail",
    type=click.IntRange(1, 10000),
    metavar="N",
    help="Only the last N turns (all of them when there are fewer).",
)
@click.option(
    "--tail-events", type=click.IntRange(min=1), metavar="N", help="Only the last N events."
)
@click.option("--limit", type=click.IntRange(min=1), help="Print at most this many events.")
@json_option
@pass_settings
def log(
    settings: Settings,
    pod: str,
    from_seq: int | None,
    tail: int | None,
    tail_events: int | None,
    limit: int | None,
) -> None:
    """Print the pod's durable history: messages, tool calls and results, turns."""
    starts = [
        flag
        for flag, value in (
            ("--from-seq", from_seq),
            ("--tail", tail),
            ("--tail-events", tail_events),
        )
        if value is not None
    ]
    if len(starts) > 1:
        raise click.UsageError(f"{' and '.join(starts)} exclude each other: give one")
    run(_log(settings, pod, from_seq or 0, limit, tail, tail_events))


@cli.command()
@pod_argument
@click.option(
    "--turns",
    type=click.IntRange(1, 10000),
    default=3,
    show_default=True,
    help="Start the transcript this many turns back.",
)
@pass_settings
def attach(settings: Settings, pod: str, turns: int) -> None:
    """Follow the pod live, full screen, and type messages into it.

    The last turns come first, then events as they happen. Enter runs the line (queued
    while a turn runs); Esc or F2 pauses and resumes the turn; y/n (with the line empty)
    answer a permission question. Ctrl-C detaches and never cancels: the turn goes on.
    """
    import sys
    from functools import partial

    from capctl.oneshot import why_no_pod

    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CapctlError(f"attach needs a terminal; capctl watch {pod} follows it as lines")
    socket = paths.pod_socket(settings.runtime, pod)
    gone = not settings.via_daemon and not socket.exists()
    if gone and (why := why_no_pod(settings.runtime, pod)) is not None:
        raise CapctlError(why)
    try:
        from capctl.session import connect_pod
        from capctl.tui.attach import AttachApp

        # A pod up with no socket here is on another node: through the daemon at once.
        connect = partial(connect_pod, settings.runtime, pod, settings.via_daemon or gone)
        app = AttachApp(pod, connect, turns)
        failure = app.run()
    except KeyboardInterrupt:  # before textual took the terminal (it reads Ctrl-C as a key)
        click.echo(f"detached from {pod}")
        return
    if app.return_code:
        raise click.exceptions.Exit(app.return_code)
    if failure:
        raise CapctlError(failure)
    goes_on = app.attached.state.status in ("running", "paused")
    click.echo(f"detached from {pod}" + ("; its turn goes on" if goes_on else ""))


@cli.command()
@pod_argument
@click.option(
    "--delete-branch",
    is_flag=True,
    help="Also delete the branch of the pod's workspace.git work tree from its repository.",
)
@json_option
@pass_settings
def rm(settings: Settings, pod: str, delete_branch: bool) -> None:
    """Stop a pod and delete its state.

    A workspace.git work tree is removed too; its branch stays in the repository unless
    --delete-branch.
    """
    request: dict[str, Any] = {"method": "delete", "name": pod}
    if delete_branch:
        request["delete_branch"] = True
    result = daemon_call(settings.runtime, request)
    report(settings, result, f"removed {pod}" + (" and its branch" if delete_branch else ""))


@cli.command()
@pod_argument
@click.option("--stat", is_flag=True, help="A summary of the changed files instead of the patch.")
@json_option
@pass_settings
def diff(settings: Settings, pod: str, stat: bool) -> None:
    """Show a workspace.git pod's work, committed and not, against its base.

    capd renders it with git hardened against the work tree (running git there yourself
    runs the pod's code). On a terminal it goes through $PAGER.
    """
    result = daemon_call(settings.runtime, {"method": "diff", "name": pod, "stat": stat})
    if settings.json:
        echo_json(result)
    elif text := result.get("text"):
        # Pages only when stdin and stdout are terminals; it ends the text with a newline.
        click.echo_via_pager(text.removesuffix("\n"))


# -- one request about a pod, one line -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PodCommand:
    """`capctl NAME POD`: one request about POD, then one line (with --json, the result)."""

    name: str
    method: str
    socket: Literal["daemon", "pod"]
    """Where the request goes: the daemon's socket (naming the pod), or the pod's own."""
    done: str
    """The line printed on success; `{pod}` is the pod's name."""
    help: str


POD_COMMANDS = (
    PodCommand("start", "start", "daemon", "started {pod}", "Start a stopped pod again."),
    PodCommand(
        "pause",
        "pause",
        "pod",
        "paused {pod}",
        "Pause the pod's turn at once; resume continues it.",
    ),
    PodCommand("resume", "resume", "pod", "resumed {pod}", "Continue a paused turn."),
)


def _pod_command(spec: PodCommand) -> click.Command:
    @pod_argument
    @json_option
    @pass_settings
    def command(settings: Settings, pod: str) -> None:
        if spec.socket == "daemon":
            result = daemon_call(settings.runtime, {"method": spec.method, "name": pod})
        else:
            result = settings.pod_call(pod, {"method": spec.method})
        report(settings, result, spec.done.format(pod=pod))

    return click.command(spec.name, help=spec.help)(command)


for spec in POD_COMMANDS:
    cli.add_command(_pod_command(spec))


def main() -> None:
    try:
        cli.main(prog_name="capctl")
    except Exception as exc:
        message = " ".join(str(exc).split())
        click.echo(f"capctl: unexpected error: {type(exc).__name__}: {message}", err=True)
        raise SystemExit(1) from None
