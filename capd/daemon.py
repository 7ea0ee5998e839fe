"""capd's process: start-up, signals, the restore it triggers, and shutdown.

`Daemon.serve()` is `startup()`, `main_loop()` and `shutdown()` in that order. The pods
themselves are the `Supervisor`'s (supervisor.py); the store remembers every pod, running
or stopped.
"""

import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import resource
import signal
import sys
import time
from pathlib import Path
from typing import IO

from capd import tracing
from capd.config import Config
from capd.outbox import Outbox
from capd.proc import leftovers
from capd.proc.groups import stop_all_groups
from capd.proc.limits import LimitsUnavailable
from capd.proc.sandbox import Backend, candidates, probe
from capd.registry import PodRegistry
from capd.server import DaemonEndpoint
from capd.store import Store
from capd.supervisor import Supervisor
from capd.systemd import Notifier, activated_socket
from protocol import VERSION
from protocol.results import InfoResult, SandboxBackend

log = logging.getLogger("capd")

RESTORE_REPORT_S = 1.0
"""How often a restore under way tells systemd its progress."""
RESTORE_EXTEND_USEC = 30_000_000
"""How long each progress report extends systemd's start-up timeout."""


class DaemonLocked(Exception):
    """Another capd holds the lock on this state or runtime directory."""


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._store: Store | None = None
        self._outbox: Outbox | None = None
        self._supervisor: Supervisor | None = None
        self._endpoint: DaemonEndpoint | None = None
        self._locks: list[IO[str]] = []
        self._should_exit = asyncio.Event()
        self._started = time.monotonic()
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
        self._locks = [_lock(cfg.state_dir / "capd.lock"), _lock(cfg.runtime_dir / "capd.lock")]
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
        self._store = store = Store(cfg.state_dir / "capd.db")
        self._outbox = outbox = Outbox(store)
        registry = PodRegistry(store, cfg.runtime_dir)
        self._supervisor = Supervisor(
            cfg, store, outbox, registry, self._pod_status_changed, sandbox
        )
        self._endpoint = DaemonEndpoint(self.supervisor, self, cfg)
        await self._restore_pods()
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

    async def _restore_pods(self) -> None:
        """Bring up the pods that were not stopped. A long restore tells systemd how far it
        is and extends the start-up timeout, so a big state directory never trips it."""
        records = self.supervisor.to_restore()
        reported = -RESTORE_REPORT_S
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
        self._should_exit.set()

    async def shutdown(self) -> None:
        """Refuse new work, let spawns and stops under way finish, pause the pods' turns,
        give their tools' process groups KILL_GRACE_S to exit after SIGTERM (then SIGKILL),
        then stop delivering reports; what is undelivered waits in the store."""
        log.info("shutting down: pausing in-flight turns")
        self._notifier.stopping("stopping: pausing running turns")
        if self._supervisor is not None:
            self._supervisor.refuse_new_work()
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._supervisor is not None:
            await self._supervisor.take_down_all()
        await stop_all_groups()
        await tracing.shutdown()  # after the pods paused: their spans ended
        if self._locks:
            leftovers.release(self.config.state_dir)
        if self._outbox is not None:
            await self._outbox.close()
        if self._store is not None:
            self._store.close()
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
            sandbox=SandboxBackend(
                path=self._sandbox.path,
                version=self._sandbox.version,
                error=self._sandbox.refusal or None,
                failures=self._sandbox.failures,
            ),
        )

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


def _lock(path: Path) -> IO[str]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.fchmod(fd, 0o600)  # one an older capd made 0644
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise DaemonLocked(
            f"{path.parent} is in use by capd (pid {owner}); stop it first "
            "or give this one other --runtime-dir/--state-dir"
        ) from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _raise_fd_limit() -> None:
    """Every pod listens on a socket: allow as many descriptors as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _install_loop() -> None:
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed; using the default asyncio loop")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> None:
    config = Config.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s capd[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _install_loop()
    try:
        asyncio.run(Daemon(config).serve())
    except (DaemonLocked, LimitsUnavailable) as exc:
        print(f"capd: {exc}", file=sys.stderr)
        sys.exit(1)
    except OSError as exc:
        print(f"capd: {exc}", file=sys.stderr)
        sys.exit(1)
