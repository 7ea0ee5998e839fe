"""A real PostgreSQL server for the tests, started by the tests themselves.

`initdb` into a temporary directory (as the `postgres` user when the tests run as root:
initdb refuses root), a server on a Unix socket only (no TCP port to collide with another
run), `fsync=off` (a test's data need not survive a power cut). One server per test
session (per xdist worker); each test gets a fresh database, copied from a template that
already holds capd's schema (CREATE DATABASE ... TEMPLATE: a file copy, milliseconds).

Without the server binaries the tests that need one are skipped, saying so; under CI
(`CI=true`, where `.ci/run` installs them) they fail instead.
"""

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

BINARIES = "/usr/lib/postgresql/*/bin"
"""Where Debian's packages put initdb and pg_ctl (not on PATH)."""
USER = "capd"
"""The database superuser initdb makes: the role the tests' stores connect as."""
TEMPLATE = "capd_template"
START_TIMEOUT_S = 30


def bindir() -> Path | None:
    """The newest installed server's bin directory, else None."""
    found = sorted(
        (Path(p) for p in glob.glob(BINARIES) if Path(p, "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return found[-1] if found else None


@dataclass
class PgServer:
    root: Path
    bin: Path
    owner: str | None
    """The user the server runs as (`runuser -u`), None: as the tests' own user."""
    _names: Iterator[int] = field(default_factory=itertools.count)

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    def url(self, database: str) -> str:
        return f"postgresql://{USER}@/{database}?host={self.socket_dir}"

    def run(self, *command: str) -> None:
        prefix = ["runuser", "-u", self.owner, "--"] if self.owner else []
        done = subprocess.run(
            [*prefix, *command], capture_output=True, text=True, timeout=START_TIMEOUT_S
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")

    def sql(self, statement: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE need that)."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(statement)  # type: ignore[arg-type]

    def create_database(self, template: str = TEMPLATE) -> str:
        """A new empty database (with capd's schema when copied from TEMPLATE): its name."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.sql(f"CREATE DATABASE {name} TEMPLATE {template} STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            data = str(self.root / "data")
            self.run(str(self.bin / "pg_ctl"), "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


def start(bin: Path, fsync: bool = False) -> PgServer:
    """initdb and start a server in a new temporary directory, owned by the server's user;
    `fsync`: with PostgreSQL's default durability (a benchmark), not the tests' fsync=off."""
    owner = "postgres" if os.geteuid() == 0 else None
    root = Path(tempfile.mkdtemp(prefix="capd-pg-"))
    server = PgServer(root, bin, owner)
    try:
        server.socket_dir.mkdir()
        if owner is not None:
            user = pwd.getpwnam(owner)
            for path in (root, server.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        data = str(root / "data")
        server.run(
            str(bin / "initdb"),
            "-D",
            data,
            "-A",
            "trust",
            "-U",
            USER,
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        options = f"-k {server.socket_dir} -c listen_addresses=" + (
            "" if fsync else " -c fsync=off"
        )
        server.run(
            str(bin / "pg_ctl"),
            "-D",
            data,
            "-l",
            str(root / "log"),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "-o",
            options,
            "start",
        )
    except BaseException:
        server.stop()
        raise
    return server


def unavailable() -> str | None:
    """Why no server can start here (skip), else None; under CI a missing one fails."""
    if bindir() is not None:
        return None
    why = f"PostgreSQL server binaries not found ({BINARIES}/initdb): apt-get install postgresql"
    if os.environ.get("CI") == "true":
        pytest.fail(why, pytrace=False)
    return why


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """One PostgreSQL server for the session, its template database holding capd's schema."""
    if why := unavailable():
        pytest.skip(why)
    bin = bindir()
    assert bin is not None
    server = start(bin)
    try:
        server.sql(f"CREATE DATABASE {TEMPLATE}")
        from capd.store.postgres import PostgresStore

        PostgresStore(server.url(TEMPLATE)).close()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """A fresh database holding capd's schema and nothing else, dropped after the test."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)
