"""capd's process: start-up, signals, the restore it triggers, and shutdown.

`Daemon.serve()` is `startup()`, `main_loop()` and `shutdown()` in that order. The pods
themselves are the `Supervisor`'s (supervisor.py); the store remembers every pod, running
or stopped.
"""

import asyncio
import contextlib
import errno
import fcntl
import gc
import logging
import logging.handlers
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING

from capd import tracing
from capd.config import Config
from capd.fleet.lease import FleetRefused, store_failed
from capd.fleet.links import HostPort, LinkServer
from capd.fleet.relay import Relay
from capd.metrics_http import Cached, MetricsHttp
from capd.metrics_scrape import scrape
from capd.outbox import Outbox
from capd.proc import leftovers
from capd.proc.groups import stop_all_groups
from capd.proc.limits import LimitsUnavailable
from capd.proc.sandbox import Backend, candidates, probe
from capd.registry import PodRegistry
from capd.server import DaemonEndpoint
from capd.store import PodRecord, Store, StoreUnavailable, open_store
from capd.supervisor import Supervisor
from capd.systemd import Notifier, activated_socket
from capd.teams import Teams
from protocol import VERSION
from protocol.results import InfoResult, SandboxBackend

if TYPE_CHECKING:
    from capd.fleet.membership import Fleet

log = logging.getLogger("capd")

RESTORE_REPORT_S = 1.0
"""How often a restore under way tells systemd its progress."""
RESTORE_EXTEND_USEC = 30_000_000
"""How long each progress report extends systemd's start-up timeout."""
LOCK_POLL_S = 0.05
"""How often a capd waiting for one that is shutting down tries its lock again."""
STOPPING = "stopping"
"""What a capd that is shutting down adds to its pid in its lock files."""
FULL_COLLECTION_EVERY = 100
"""Middle-generation collections between two full ones, at least (Python's default: 10).
A full collection walks every pod's objects; while pods were being spawned the default let
one run each time the old objects grew by a quarter, and those took a fifth of a spawn's
CPU (5,000 spawns: 1.6 s in 6 full collections, 0.3 s with 100). Garbage in cycles that
lived through two young collections waits longer to be freed: up to about 700,000 net
allocations, against a quarter of every live object by the rule Python keeps as well."""


class DaemonLocked(Exception):
    """Another capd holds the lock on this state or runtime directory."""


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._store: Store | None = None
        self.fleet: Fleet | None = None
        """This node's fleet membership (a PostgreSQL store); None on SQLite."""
        self._outbox: Outbox | None = None
        self._supervisor: Supervisor | None = None
        self._endpoint: DaemonEndpoint | None = None
        self._relay: Relay | None = None
        self._links: LinkServer | None = None
        self._link_endpoint: DaemonEndpoint | None = None
        self._locks: list[IO[str]] = []
        self._should_exit = asyncio.Event()
        self.stopping = False
        """Shutting down: the pods stop because capd does."""
        self._started = time.monotonic()
        self._started_at = time.time()
        self._metrics = Cached(self._scrape)
        self._metrics_http: MetricsHttp | None = None
        self._metrics_listen: str | None = None
        self._notifier = Notifier({})
        self._sandbox = Backend()

    @property
    def supervisor(self) -> Supervisor:
        assert self._supervisor is not None
        return self._supervisor

    # -- lifecycle ----------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            await self.startup()
            await self.main_loop()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        self._notifier = Notifier()
        activated = activated_socket()
        _make_private_dir(cfg.runtime_dir, cfg.allow_gid)
        _make_private_dir(cfg.runtime_dir / "pods", cfg.allow_gid)
        _make_private_dir(cfg.state_dir, None)
        self._locks = await self._take_locks(
            [cfg.state_dir / "capd.lock", cfg.runtime_dir / "capd.lock"]
        )
        if left := leftovers.claim(cfg.state_dir):
            log.warning(
                "stopping %d process groups the last capd left running (%s)",
                len(left),
                " ".join(map(str, left)),
            )
        _raise_fd_limit()
        tracing.setup(debug=cfg.log_level == "debug")
        self._sandbox = sandbox = probe(candidates(cfg.bwrap), cfg.state_dir.resolve())
        if sandbox.path is None:
            log.warning("%s (pods with a sandbox are refused)", sandbox.refusal)
        else:
            log.info("sandbox: %s (%s)", sandbox.path, sandbox.version or "version unknown")
        on_failure = None if cfg.store is None else store_failed
        self._store, shown = open_store(cfg.store, cfg.state_dir, on_failure)
        store = self._store
        log.info("store: %s", shown)
        if cfg.store is not None:  # before anything reads the store: it then sees our pods
            from capd.fleet.membership import Fleet  # psycopg only for a PostgreSQL store

            self.fleet = await Fleet.join(
                cfg.store,
                store,  # type: ignore[arg-type]
                cfg.node,
                cfg.state_dir,
                cfg.lease_ttl_s,
            )
        self._outbox = outbox = Outbox(store)
        registry = PodRegistry(store, cfg.runtime_dir)
        self._supervisor = Supervisor(
            cfg, store, outbox, registry, self._pod_status_changed, sandbox, Teams
        )
        await self.supervisor.worktrees.sweep()
        if self.fleet is not None:
            self._relay = Relay(self.fleet, cfg.fleet_key, self.supervisor.registry.socket)
            outbox.deliver_in_fleet(self._relay.deliver_report)
        self._endpoint = DaemonEndpoint(self.supervisor, self, cfg, self._relay)
        if cfg.metrics_listen is not None:
            self._metrics_http = MetricsHttp(self._metrics.get)
            self._metrics_listen = await self._metrics_http.bind(*cfg.metrics_listen)
        await self._restore_pods()
        if self.fleet is not None:
            self.fleet.adopt_with(self._adopt, str(self.supervisor.registry.pods_dir))
        if self._metrics_http is not None:  # once restored: no scrape sees pods not up yet
            await self._metrics_http.serve()
            log.info("metrics at http://%s/metrics", self._metrics_listen)
        if cfg.node_listen is not None and self.fleet is not None:
            await self._listen_for_nodes(self.fleet, *cfg.node_listen)
        await self._endpoint.listen(activated)
        outbox.start()
        log.info(
            "capd %s listening on %s%s (%d pods restored)",
            VERSION,
            self._endpoint.path,
            " (socket-activated)" if activated else "",
            len(self.supervisor.pods),
        )
        # What start-up built (modules, pydantic schemas, restored pods) lives as long as the
        # daemon: keep the collector from walking it again on every full collection.
        gc.freeze()
        self._notifier.ready(self.supervisor.summary())

    async def _listen_for_nodes(self, fleet: "Fleet", host: str, port: int) -> None:
        """Accept the other nodes' links (once this node's pods are up) and tell the fleet
        where to dial. What comes over a link is answered for this node alone."""
        cfg = self.config
        self._link_endpoint = local = DaemonEndpoint(self.supervisor, self, cfg, for_links=True)
        self._links = LinkServer(cfg.node, cfg.fleet_key, local.serve_stream, cfg.max_frame_bytes)
        bound = await self._links.listen(HostPort(host, port))
        address = cfg.node_address or str(bound)
        await fleet.set_address(address)
        log.info("node links on %s (the fleet dials %s)", bound, address)

    async def _restore_pods(self) -> None:
        """Bring up the pods that were not stopped. A long restore tells systemd how far it
        is and extends the start-up timeout, so a big state directory never trips it.

        The cyclic collector is off meanwhile: what a restore builds lives as long as its
        pod, and the collections its allocations set off walked the pods already up again
        and again (a quarter of a restore's time). At the end it is all frozen, as start-up
        freezes what it built: a collection then would walk it all once more (0.4 s for
        2,000 pods), to free the few hundred objects a restore leaves in cycles."""
        records = self.supervisor.to_restore()
        reported = -RESTORE_REPORT_S
        collecting = gc.isenabled()
        gc.disable()
        try:
            for done, record in enumerate(records):
                if self._should_exit.is_set():
                    return  # SIGTERM during restore: stop here, shutdown() takes down what is up
                if time.monotonic() - reported >= RESTORE_REPORT_S:
                    reported = time.monotonic()
                    self._notifier.send(
                        EXTEND_TIMEOUT_USEC=str(RESTORE_EXTEND_USEC),
                        STATUS=f"restoring pods: {done} of {len(records)} up",
                    )
                await self.supervisor.restore(record)
        finally:
            gc.freeze()
            if collecting:
                gc.enable()

    async def _adopt(self, records: list[PodRecord]) -> None:
        """Bring up pods adopted from a node that left or died, and deliver what they owe."""
        assert self.fleet is not None
        assert self._outbox is not None
        await self.supervisor.adopt(records)
        for target in await self.fleet.report_targets([record.name for record in records]):
            self._outbox.poke(target)

    async def main_loop(self) -> None:
        if self._notifier.watchdog_s is None:
            await self._should_exit.wait()
            return
        # Pinged from the event loop itself: a loop that stops turning stops the pings.
        interval = self._notifier.watchdog_s / 2
        while not self._should_exit.is_set():
            self._notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._should_exit.wait()

    def request_shutdown(self) -> None:
        self._mark_stopping()
        self._should_exit.set()

    async def _take_locks(self, paths: list[Path]) -> list[IO[str]]:
        """Lock each of capd's directories. One held by a capd that is shutting down is
        waited for, all of them within one --lock-wait-s; one held by a capd that is not
        (or a shutdown that lasts longer) fails this one at once (DaemonLocked)."""
        deadline = time.monotonic() + self.config.lock_wait_s
        taken: list[IO[str]] = []
        told = False
        try:
            for path in paths:
                while (handle := _lock(path, deadline, self._should_exit.is_set())) is None:
                    if not told:
                        told = True
                        log.info(
                            "capd pid %s is shutting down; waiting up to %g s for it",
                            _lock_owner(path)[0],
                            self.config.lock_wait_s,
                        )
                    await asyncio.sleep(LOCK_POLL_S)
                taken.append(handle)
        except BaseException:
            for handle in taken:
                handle.close()
            raise
        return taken

    def _mark_stopping(self) -> None:
        """Tell a capd starting on these directories that this one is on its way out, so
        it waits for the locks instead of failing."""
        for lock in self._locks:
            _write_owner(lock, f"{os.getpid()} {STOPPING}")

    async def shutdown(self) -> None:
        """Refuse new work, let spawns and stops under way finish, pause the pods' turns,
        give their tools' process groups KILL_GRACE_S to exit after SIGTERM (then SIGKILL),
        then stop delivering reports; what is undelivered waits in the store."""
        self.stopping = True
        self._mark_stopping()
        log.info("shutting down: pausing in-flight turns")
        self._notifier.stopping("stopping: pausing running turns")
        if self._supervisor is not None:
            self._supervisor.refuse_new_work()
        if self.fleet is not None:
            await self.fleet.begin_leaving()
        if self._metrics_http is not None:
            await self._metrics_http.close()
        if self._links is not None:
            await self._links.close()
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._relay is not None:
            await self._relay.close()
        if self._link_endpoint is not None:
            await self._link_endpoint.close()
        if self._supervisor is not None:
            await self._supervisor.take_down_all()
        await stop_all_groups()
        await tracing.shutdown()  # after the pods paused: their spans ended
        if self._locks:
            leftovers.release(self.config.state_dir)
        if self._outbox is not None:
            await self._outbox.close()
        if self._store is not None:
            await self._store.flush()  # what the pods wrote as they stopped
            if self.fleet is not None:
                await self.fleet.stop_renewing()
            self._store.close()
        if self.fleet is not None:  # hand the pods over: no TTL to wait for
            await self.fleet.leave()
        for lock in self._locks:
            lock.close()
        log.info("capd stopped")

    def info(self) -> InfoResult:
        return InfoResult(
            version=VERSION,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            pods=len(self.supervisor.pods),
            runtime_dir=str(self.config.runtime_dir),
            state_dir=str(self.config.state_dir),
            metrics_listen=self._metrics_listen,
            node=self.supervisor.node,
            fleet=self.supervisor.fleet(),
            sandbox=SandboxBackend(
                path=self._sandbox.path,
                version=self._sandbox.version,
                error=self._sandbox.refusal or None,
                failures=self._sandbox.failures,
            ),
        )

    def metrics(self) -> str:
        """Rendered now: the daemon socket's clients are trusted (they can spawn pods), and
        they see what they just did. The HTTP listener serves it cached."""
        return self._metrics.fresh()

    def _scrape(self) -> str:
        assert self._endpoint is not None
        return scrape(self.supervisor, self._endpoint, self._started_at)

    def _pod_status_changed(self) -> None:
        if self._notifier.enabled:
            self._notifier.status(self.supervisor.summary())


def _make_private_dir(path: Path, group: int | None) -> None:
    """Mode 0700, or 0710 owned by `group`, whose members may then reach the sockets."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid == os.getuid():
        if group is not None:
            os.chown(path, -1, group)
        os.chmod(path, 0o700 if group is None else 0o710)


def _lock(path: Path, deadline: float, give_up: bool) -> IO[str] | None:
    """The lock on `path`'s directory, or None when a capd that is shutting down holds it
    and `deadline` has not passed (the caller waits and tries again). `give_up`: this
    capd was told to stop meanwhile, so it waits no longer."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # one an older capd made 0644
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        owner, stopping = _lock_owner(path)
        if stopping and not give_up and time.monotonic() < deadline:
            return None
        if stopping:
            raise DaemonLocked(
                f"{path.parent} is in use by capd (pid {owner}), which is still shutting "
                "down; start this one once it has exited, or wait longer with --lock-wait-s"
            ) from None
        raise DaemonLocked(
            f"{path.parent} is in use by capd (pid {owner}); stop it first "
            "or give this one other --runtime-dir/--state-dir"
        ) from None
    _write_owner(handle, str(os.getpid()))
    return handle


def _lock_owner(path: Path) -> tuple[str, bool]:
    """Who holds the lock file at `path`, as it says, and whether it says it is stopping."""
    with contextlib.suppress(OSError):
        words = path.read_text().split()
        if words:
            return words[0], words[1:] == [STOPPING]
    return "another process", False


def _write_owner(handle: IO[str], text: str) -> None:
    """Overwrite the lock file in one write, then cut what is left of a longer text: a
    reader never sees it empty."""
    data = text.encode()
    os.pwrite(handle.fileno(), data, 0)
    os.ftruncate(handle.fileno(), len(data))


def _raise_fd_limit() -> None:
    """Every pod listens on a socket: allow as many descriptors as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _tune_collector() -> None:
    """Full collections at least FULL_COLLECTION_EVERY middle ones apart."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class _PrivateLogFile(logging.handlers.WatchedFileHandler):
    """A log file made 0600 (one that was there too), at start and again after logrotate
    moved it, and never a symlink's target: the log quotes what engines and servers say,
    errors and all."""

    def _open(self) -> IO[str]:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        fd = os.open(self.baseFilename, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
        except OSError:
            os.close(fd)
            raise
        return os.fdopen(fd, "a", encoding=self.encoding, errors=self.errors)


def _log_handler(path: Path | None) -> logging.Handler:
    """Where the log goes: `path`, or stderr. Start-up failures are printed to stderr
    either way, for whoever started capd."""
    if path is None:
        return logging.StreamHandler(sys.stderr)
    if not path.parent.is_dir():
        print(f"capd: --log-file {path}: {path.parent} is not a directory", file=sys.stderr)
        sys.exit(1)
    try:
        return _PrivateLogFile(path, encoding="utf-8")
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.ELOOP:
            why = "is a symbolic link; give the log file's own path"
        print(f"capd: --log-file {path}: {why}", file=sys.stderr)
        sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    config = Config.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s capd[%(process)d] %(levelname)s %(name)s: %(message)s",
        handlers=[_log_handler(config.log_file)],
    )
    _install_loop()
    _tune_collector()
    try:
        asyncio.run(Daemon(config).serve())
    except (DaemonLocked, FleetRefused, LimitsUnavailable, StoreUnavailable) as exc:
        print(f"capd: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        print(f"capd: {exc}", file=sys.stderr)
        sys.exit(1)
