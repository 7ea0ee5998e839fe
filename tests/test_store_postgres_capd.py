"""capd on PostgreSQL from outside: the start-up log names the store without its
password, and a store capd cannot reach is one line on stderr and exit status 1."""

import subprocess
import sys
from pathlib import Path

from tests.conftest import SHOW_CHECKOUT, CapdProcess


def test_the_start_up_log_names_the_store_without_its_password(
    capd_dirs: CapdProcess, pg_url: str
) -> None:
    # The test server trusts local connections: any password opens it.
    capd_dirs.store = pg_url.replace("postgresql://capd@", "postgresql://capd:s3cret@")
    capd_dirs.start()
    capd_dirs.stop()
    output = capd_dirs.output()
    shown = pg_url.replace("postgresql://capd@", "postgresql://capd:***@")
    assert f"store: {shown} (PostgreSQL " in output, output
    assert "s3cret" not in output


def test_a_store_capd_cannot_reach_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"postgresql://capd:s3cret@/capd?host={tmp_path}/nothing&connect_timeout=2"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "capd",
            "--runtime-dir",
            str(tmp_path / "run"),
            "--state-dir",
            str(tmp_path / "state"),
            "--log-file",
            str(tmp_path / "capd.log"),
            "--store",
            url,
            *SHOW_CHECKOUT,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    [line] = done.stderr.splitlines()
    assert line.startswith(
        f"capd: cannot connect to the store at postgresql://capd:***@/capd?host={tmp_path}/nothing"
    ), line
    assert "is PostgreSQL running" in line
