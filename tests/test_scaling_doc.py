"""docs/scaling.md's Kubernetes example: capd accepts the container's arguments, and (opt-in,
`CAPD_K8S_VALIDATE=1` with `kubernetes-validate` from PyPI on PATH) every resource passes
the Kubernetes schemas."""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from capd.config import Config

DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"


def _example() -> str:
    text = DOC.read_text()
    section = text[text.index("## Kubernetes") :]
    # Fenced `yaml kubernetes`: several documents in one block, which tests/test_readme
    # (one document per `yaml` block) leaves alone.
    match = re.search(r"```yaml kubernetes\n(.*?)```", section, re.S)
    assert match is not None, "no yaml block under ## Kubernetes"
    return match.group(1)


def _container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (statefulset,) = [r for r in resources if r["kind"] == "StatefulSet"]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def test_capd_accepts_the_examples_arguments(tmp_path: Path) -> None:
    container = _container(list(yaml.safe_load_all(_example())))
    key = tmp_path / "fleet-key"
    key.write_text("0" * 64)
    key.chmod(0o400)
    values = {
        "POD_NAME": "capd-0",
        "POD_NAMESPACE": "default",
        "CAPD_STORE": "postgresql://capd@postgres.db.svc:5432/capd",
    }
    assert {env["name"] for env in container["env"]} >= set(values)
    args = [
        re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg).replace(
            "/etc/capd/fleet-key", str(key)
        )
        for arg in container["args"]
    ]
    config = Config.from_args(args)
    assert config.node == "capd-0"
    assert config.node_listen == ("0.0.0.0", 7070)
    assert config.node_address == "capd-0.capd.default.svc:7070"
    assert config.fleet_key == b"0" * 64
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["fleet-key"] == "/etc/capd"


@pytest.mark.skipif(not os.environ.get("CAPD_K8S_VALIDATE"), reason="CAPD_K8S_VALIDATE=1")
def test_the_example_passes_the_kubernetes_schemas(tmp_path: Path) -> None:
    tool = shutil.which("kubernetes-validate")
    assert tool is not None, "pip install kubernetes-validate (into a venv of its own)"
    manifest = tmp_path / "capd-fleet.yaml"
    manifest.write_text(_example())
    for version in ("1.37.0", "1.32.0"):
        done = subprocess.run(
            [tool, "--strict", "-k", version, str(manifest)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
