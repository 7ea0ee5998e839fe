"""One MCP server of a pod, supervised, and the tools it offers.

Each server has an owner task, started when the pod comes up: it starts the server (a
stdio process in the pod's cwd, or a Streamable HTTP connection), lists its tools, and
then only waits, until the server exits, stops answering, or the pod stops. The SDK's
task groups belong to the task that entered them, so that task does nothing else; calls
are made from the turn's task (`call`). A server that fails is `failed` in `status.mcp`
and is started again after a backoff (1 s, doubling to 60 s, back to 1 s once it had
stayed up 30 s); its tools stay offered meanwhile and answer "unavailable". After a call
that was cancelled (pause, cancel) or timed out, the server is probed; one that does not
answer within PROBE_TIMEOUT_S is killed and restarted. A tool list the server says
changed is read again by the owner, so the next model call sees it (`specs` never waits).

`${VAR}`s in `env` and `headers` are expanded only when the server starts; the values
stay in the process's environment or the HTTP client, and are scrubbed from the server's
stderr and from every reason capd records, logs or shows.
"""

import asyncio
import contextlib
import importlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from capd.backoff import backoff_s
from capd.chat import ToolSpec
from capd.proc.limits import PodLimits
from capd.proc.sandbox import Confinement
from capd.tokens import spec_tokens
from capd.tools.base import ToolContext, ToolOutcome
from capd.tools.mcp.names import exposed_names
from capd.tools.mcp.remote import CallTimedOut, ConnectionLost, RemoteTool, ServerError
from capd.tools.mcp.secrets import MissingVariable, expand_all, referenced
from capd.tools.mcp.transport import CannotStart, ServerProcess, resolve_command
from protocol.manifest import Limits, McpHttpServer, McpServerConfig, McpStdioServer
from protocol.results import McpServerState

if TYPE_CHECKING:
    from capd.tools.mcp.client import Connection

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
"""How long a server has to answer the probe after a cancelled or timed-out call."""
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
STEADY_S = 30.0
"""A server that stayed ready this long starts its backoff over."""
STOP_WAIT_S = 3.0
"""How long the pod's stop waits for a server's owner task."""
RELIST_WAIT_S = 2.0
"""How long a call that made the server announce new tools waits for the new list, so the
next model call is offered it."""
DOWN_WAIT_S = 2.0
"""How long a call whose connection closed waits for the owner to say why."""
SECRET_MIN_CHARS = 4
"""Shorter `${VAR}` values are not scrubbed from text (they would garble it)."""
JUNK_LOGGED = 3
"""Lines of stdout noise logged per server start."""

State = Literal["starting", "ready", "failed"]

_client_module: ModuleType | None = None


async def load_client() -> ModuleType:
    """`capd.tools.mcp.client` (and so the SDK), imported in a thread the first time."""
    global _client_module
    if _client_module is None:
        _client_module = await asyncio.to_thread(importlib.import_module, "capd.tools.mcp.client")
    return _client_module


class McpServer:
    def __init__(
        self,
        name: str,
        config: McpServerConfig,
        *,
        pod: str,
        cwd: Path,
        state_dir: Path | None,
        limits: Limits,
        sandbox: Confinement | None = None,
        pod_limits: PodLimits | None = None,
    ) -> None:
        self.name = name
        self._sandbox = sandbox
        self._pod_limits = pod_limits
        self.config = config
        self._pod = pod
        self._cwd = cwd
        self._stderr_path = state_dir / f"mcp-{name}.stderr" if state_dir is not None else None
        self._limits = limits
        self.transport: Literal["stdio", "http"] = (
            "http" if isinstance(config, McpHttpServer) else "stdio"
        )
        self.state: State = "starting"
        self.error: str | None = None
        """Why it is down, or why it was last restarted (scrubbed)."""
        self.restarts = 0
        self.specs: list[ToolSpec] = []
        """What the model is offered of it now: the latest list, kept while it is down."""
        self.spec_tokens = 0
        self._tools: dict[str, RemoteTool] = {}
        self._conn: Connection | None = None
        self._process: ServerProcess | None = None
        self._generation = 0
        self._secrets: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._settled = asyncio.Event()
        """Set once the server was first ready or first failed."""
        self._down = asyncio.Event()
        self._stale = False
        self._listed = asyncio.Event()
        """Clear while a list the server said changed is being read again."""
        self._listed.set()
        self._dead: str | None = None
        self._startup: asyncio.Timeout | None = None
        self._startup_cut = False
        self._junk = 0
        self._http_status: int | None = None
        self._owner: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()

    # -- the pod's side ------------------------------------------------------------------

    def start(self) -> None:
        if self._owner is None:
            self._owner = asyncio.create_task(self._run(), name=f"pod {self._pod} mcp {self.name}")

    def offers(self, exposed: str) -> bool:
        return exposed in self._tools

    def status(self) -> dict[str, Any]:
        process = self._process
        running = process is not None and not process.exited.done()
        state, error = self.state, self.error
        if state == "ready" and process is not None and not running:
            state, error = "failed", process.exit_status()  # before `_exited` runs
        return McpServerState(
            name=self.name,
            state=state,
            tools=len(self._tools),
            error=error,
            transport=self.transport,
            pid=process.pid if running and process is not None else None,
            restarts=self.restarts,
        ).model_dump(mode="json")

    async def first_start(self) -> None:
        """Wait until the server was first ready or first failed since the pod came up
        (at most limits.mcp_startup_timeout_s); at once after that."""
        if not self._settled.is_set() and self._owner is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._limits.mcp_startup_timeout_s):
                    await self._settled.wait()

    def refusal(self, exposed: str) -> ToolOutcome | None:
        """Why a call of the tool offered as `exposed` cannot run now (the server is not
        ready, or does not list it), as its error result; None when it can."""
        if self.state != "ready" or self._conn is None:
            return self._unavailable()
        if exposed not in self._tools:
            offered = ", ".join(self._tools) or "none"
            return ToolOutcome(
                f"tool {exposed} is not offered now: MCP server {self.name} does not list it "
                f"(it offers: {offered})",
                is_error=True,
            )
        return None

    async def call(self, exposed: str, arguments: dict[str, Any], ctx: ToolContext) -> ToolOutcome:
        """Call the tool offered as `exposed`. Never raises but CancelledError."""
        await self.first_start()  # the first turn after the pod came up
        if (refused := self.refusal(exposed)) is not None:
            return refused
        tool, conn = self._tools[exposed], self._conn
        assert conn is not None
        generation = self._generation
        timeout_s = self._limits.mcp_call_timeout_s
        try:
            outcome = await conn.call(tool.name, arguments, timeout_s, ctx)
        except CallTimedOut:
            self._probe_later(conn, generation, "a call timed out")
            return ToolOutcome(
                f"{exposed} did not answer within {timeout_s:g} s "
                "(limits.mcp_call_timeout_s); the call was cancelled",
                is_error=True,
            )
        except ConnectionLost as exc:
            process = self._process
            if process is not None:  # it exited, most likely: its exit says more
                await asyncio.wait([process.exited], timeout=DOWN_WAIT_S / 2)
            if process is None or not process.exited.done():
                self._lose(generation, f"the connection closed ({exc})")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(DOWN_WAIT_S):
                    await self._down.wait()
            return self._unavailable()
        except ServerError as exc:
            return ToolOutcome(f"MCP server {self.name}: {self._scrub(str(exc))}", is_error=True)
        except asyncio.CancelledError:
            self._probe_later(conn, generation, "a call was cancelled")
            raise
        if not self._listed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RELIST_WAIT_S):
                    await self._listed.wait()
        return outcome

    async def aclose(self) -> None:
        """Stop the server: its process group is killed, its owner task waited for
        (bounded). The tools are no longer offered."""
        self._stopping()
        owner = self._owner
        if owner is not None and not owner.done():
            await asyncio.wait([owner], timeout=STOP_WAIT_S)
            if not owner.done() and not self._startup_cut:
                owner.cancel()
                await asyncio.wait([owner], timeout=1.0)
            if not owner.done():
                log.error("pod %s: MCP server %s did not stop; left behind", self._pod, self.name)
        for probe in list(self._probes):
            probe.cancel()
        self.specs, self.spec_tokens, self._tools = [], 0, {}
        self.error = "stopped"
        self._set_state("failed")  # never `starting` (nor `ready`) once stopped

    def _stopping(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._process is not None:
            self._process.stop()
        startup = self._startup
        if startup is not None and not startup.expired():
            # Cut a start under way short: one cancel of the owner, by its own deadline.
            self._startup_cut = True
            startup.reschedule(asyncio.get_running_loop().time())

    def _unavailable(self) -> ToolOutcome:
        reason = self.error or "it is still starting"
        return ToolOutcome(
            f"MCP server {self.name} is unavailable: {reason}; capd is starting it again",
            is_error=True,
        )

    # -- the owner task ------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._supervise()
        except Exception as exc:  # a bug: say so rather than leave the server "starting"
            log.exception("pod %s: MCP server %s: supervision failed", self._pod, self.name)
            self.error = f"capd stopped supervising it: {type(exc).__name__}: {exc}"
            self._set_state("failed")

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            self._set_state("starting")
            reason, ready_at = await self._connect_once()
            if self._stop.is_set():
                return
            steady = ready_at is not None and loop.time() - ready_at >= STEADY_S
            attempt = 1 if steady else attempt + 1
            delay = backoff_s(attempt, BACKOFF_BASE_S, BACKOFF_CAP_S)
            self.error = reason
            self._set_state("failed")
            log.warning(
                "pod %s: MCP server %s failed: %s; starting it again in %.1f s",
                self._pod,
                self.name,
                reason,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            if self._stop.is_set():
                return
            self.restarts += 1

    async def _connect_once(self) -> tuple[str, float | None]:
        """Start the server and serve it until it ends: why it ended, and when it became
        ready (None if it never did)."""
        self._generation += 1
        self._dead, self._stale, self._junk, self._http_status = None, False, 0, None
        self._wake.clear()
        ready_at: float | None = None
        reason: str | None = None
        process: ServerProcess | None = None
        client: ModuleType | None = None
        startup: asyncio.Timeout | None = None
        try:
            client = await load_client()
            async with asyncio.timeout(self._limits.mcp_startup_timeout_s) as startup:
                self._startup = startup
                if self._stop.is_set():
                    return "stopped", None
                if isinstance(self.config, McpStdioServer):
                    process = await self._start_process(self.config)
                    transport = client.stdio_streams(process, self._on_junk)
                else:
                    headers = self._expand(self.config.headers)
                    transport = client.http_streams(self.config.url, headers, self._note_status)
                async with (
                    client.connect(transport, self._tools_changed) as conn,
                    conn.watching_tools(self._tools_changed),
                ):
                    tools = await conn.list_tools()  # after subscribing: changes are not replayed
                    self._startup = None
                    startup.reschedule(None)
                    self._publish(tools)
                    self._conn = conn
                    ready_at = asyncio.get_running_loop().time()
                    log.info(
                        "pod %s: MCP server %s ready (%s, protocol %s, %d tools)",
                        self._pod,
                        self.name,
                        self.transport,
                        conn.protocol_version,
                        len(tools),
                    )
                    self._set_state("ready")
                    reason = await self._serve(conn, process)
        except (MissingVariable, CannotStart) as exc:
            reason = str(exc)
        except asyncio.CancelledError:
            if self._stop.is_set():
                raise
            reason = reason or "its connection was cancelled"
        except (Exception, BaseExceptionGroup) as exc:
            self._startup = None  # finished: a stop meanwhile must not reschedule it
            if reason is None:
                reason = await self._failure(exc, process, client, startup)
        finally:
            self._startup = None
            self._conn = None
            self._listed.set()
            if process is not None:
                await process.aclose()
                self._process = None  # its group is gone: never signal that number again
        return self._scrub(reason or "stopped"), ready_at

    async def _start_process(self, config: McpStdioServer) -> ServerProcess:
        env = self._expand(config.env)
        argv = [resolve_command(config.command, self._cwd, env, self._sandbox), *config.args]
        process = await ServerProcess.start(
            argv,
            cwd=self._cwd,
            confine=self._sandbox,
            env=env,
            leaf=self._pod_limits.leaf(f"mcp-{self.name}") if self._pod_limits else None,
            stderr_path=self._stderr_path,
            scrub=self._scrub,
            secret_chars=max(map(len, self._secrets), default=0),
        )
        self._process = process
        process.exited.add_done_callback(lambda _: self._exited(process))
        return process

    def _exited(self, process: ServerProcess) -> None:
        """A ready server's process is gone: say so at once, as `status` shows it; the
        owner records why in full (with what stderr said) right after."""
        self._wake.set()
        if process is self._process and self.state == "ready" and not self._stop.is_set():
            self.state = "failed"
            self.error = process.exit_status()

    async def _serve(self, conn: "Connection", process: ServerProcess | None) -> str:
        """Wait until the server must be left: why. Reads its tools again when it says
        they changed."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return "stopped"
            if self._dead is not None:
                return self._dead
            if process is not None and process.exited.done():
                return await process.exit_reason()
            if self._stale:
                self._stale = False
                try:
                    async with asyncio.timeout(self._limits.mcp_startup_timeout_s):
                        self._publish(await conn.list_tools())
                    if not self._stale:
                        self._listed.set()
                except TimeoutError:
                    return (
                        f"it did not list its tools within "
                        f"{self._limits.mcp_startup_timeout_s:g} s after saying they changed"
                    )

    async def _failure(
        self,
        exc: BaseException,
        process: ServerProcess | None,
        client: ModuleType | None,
        startup: asyncio.Timeout | None,
    ) -> str:
        if startup is not None and startup.expired() and not self._stop.is_set():
            limit = self._limits.mcp_startup_timeout_s
            said = process.stderr_said() if process is not None else ""
            tail = f"; stderr: {said}" if said else ""
            return f"did not start within {limit:g} s (limits.mcp_startup_timeout_s){tail}"
        if process is not None:
            await asyncio.wait([process.exited], timeout=1.0)
            if process.exited.done():
                return await process.exit_reason()
        if client is None:
            return f"{type(exc).__name__}: {exc}"
        if isinstance(self.config, McpHttpServer):
            status = f"HTTP {self._http_status} from " if self._http_status else ""
            return f"{client.describe(exc)} ({status}{self.config.url})"
        return client.describe(exc)

    def _publish(self, tools: list[RemoteTool]) -> None:
        by_name = {tool.name: tool for tool in tools}
        exposed = exposed_names(self.name, by_name)
        self._tools = {name: by_name[own] for name, own in exposed.items()}
        self.specs = [self._spec(name, tool) for name, tool in self._tools.items()]
        self.spec_tokens = sum(spec_tokens(spec) for spec in self.specs)

    def _spec(self, exposed: str, tool: RemoteTool) -> ToolSpec:
        schema = {k: v for k, v in tool.input_schema.items() if k != "$schema"}
        schema.setdefault("type", "object")
        description = tool.description
        if not exposed.endswith(f"__{tool.name}"):
            description = f"(MCP tool {tool.name!r} of server {self.name}) {description}"
        return ToolSpec(exposed, description, schema)

    def _set_state(self, state: State) -> None:
        self.state = state
        if state == "starting":
            self._down.clear()
        else:
            self._settled.set()
            if state == "failed":
                self._down.set()

    def _note_status(self, status: int) -> None:
        self._http_status = status

    def _tools_changed(self) -> None:
        self._stale = True
        self._listed.clear()
        self._wake.set()

    def _lose(self, generation: int, reason: str) -> None:
        """The connection `generation` is broken: leave it and start again."""
        if generation != self._generation or self._dead is not None:
            return
        self._dead = reason
        if self._process is not None:
            self._process.kill()
        # Say so now: leaving the session can take a while with a hung HTTP server.
        self.state, self.error = "failed", self._scrub(reason)
        self._wake.set()

    def _probe_later(self, conn: "Connection", generation: int, after: str) -> None:
        async def probe() -> None:
            if not await conn.probe(PROBE_TIMEOUT_S):
                self._lose(
                    generation,
                    f"it did not answer within {PROBE_TIMEOUT_S:g} s after {after}; restarted",
                )

        task = asyncio.create_task(probe(), name=f"pod {self._pod} mcp {self.name} probe")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    def _on_junk(self, line: bytes) -> None:
        self._junk += 1
        if self._junk <= JUNK_LOGGED:
            text = self._scrub(line.decode("utf-8", errors="replace"))
            log.warning(
                "pod %s: MCP server %s wrote a line that is no JSON-RPC message: %.200r",
                self._pod,
                self.name,
                text,
            )

    def _expand(self, values: dict[str, str]) -> dict[str, str]:
        expanded = expand_all(values, os.environ)
        for var in referenced(values):
            value = os.environ.get(var, "")
            if len(value) >= SECRET_MIN_CHARS:
                self._secrets[value] = var
        return expanded

    def _scrub(self, text: str) -> str:
        for value in sorted(self._secrets, key=len, reverse=True):
            text = text.replace(value, f"${{{self._secrets[value]}}}")
        return text


def pod_servers(
    servers: dict[str, McpServerConfig],
    *,
    pod: str,
    cwd: Path,
    state_dir: Path | None,
    limits: Limits,
    sandbox: Confinement | None,
    pod_limits: PodLimits | None = None,
) -> list[McpServer]:
    """A pod's servers in the manifest's order, not started yet."""
    return [
        McpServer(
            name,
            config,
            pod=pod,
            cwd=cwd,
            state_dir=state_dir,
            limits=limits,
            sandbox=sandbox,
            pod_limits=pod_limits,
        )
        for name, config in servers.items()
    ]
