"""capd's metrics against a real capd: the `metrics` method, `capd --metrics-listen`'s HTTP
endpoint and `capctl metrics`; every text strictly 0.0.4 (tests/promcheck.py), and the
values move as the pods do."""

import asyncio
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from capd.config import Config
from capd.metrics import CONTENT_TYPE
from protocol.client import Client
from tests.conftest import CapdProcess
from tests.helpers import (
    EVENT_TIMEOUT_S,
    connect_pod,
    daemon_request,
    is_event,
    run_turn,
    scripted,
    spawn,
    wait_for,
)
from tests.promcheck import Samples, samples, value

pytestmark = pytest.mark.shared_capd

MODEL = {"provider": "scripted", "model": "s1", "outcome": "ok"}


async def scrape(capd: CapdProcess) -> Samples:
    return samples((await daemon_request(capd, {"method": "metrics"}))["text"])


def pod_series(found: Samples, pod: str) -> list[str]:
    return [name for name, labels in found if ("pod", pod) in labels]


async def test_values_follow_turns_and_calls(capd: CapdProcess) -> None:
    calls = [{"name": "bash", "arguments": {"command": "true"}}, {"name": "nope"}]
    model = {**scripted({"tool_calls": calls}, {"text": "done"}), "name": "s1"}
    await spawn(capd, "m1", model, tools=["bash"])
    before = await scrape(capd)
    async with await connect_pod(capd, "m1") as pod:
        end, _ = await run_turn(pod, "go")
        assert end["result"] == "finished"
        status = await pod.request({"method": "status"})
    after = await scrape(capd)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("capd_turns_total", pod="m1", result="finished") == 1
    assert grew("capd_model_call_duration_seconds_count", **MODEL) == 2
    assert grew("capd_model_call_duration_seconds_bucket", **MODEL, le="+Inf") == 2
    assert grew("capd_tool_call_duration_seconds_count", tool="bash", outcome="ok") == 1
    # A tool the pod does not offer is labelled `unknown`: models make names up.
    assert grew("capd_tool_call_duration_seconds_count", tool="unknown", outcome="error") == 1
    assert not [labels for name, labels in after if ("tool", "nope") in labels]
    usage = status["usage"]
    assert value(after, "capd_tokens_total", pod="m1", type="input") == usage["input_tokens"]
    assert value(after, "capd_tokens_total", pod="m1", type="output") == usage["output_tokens"]
    assert value(after, "capd_subtree_spent_tokens", pod="m1") == status["spent"]["tokens"] > 0
    assert value(after, "capd_context_tokens", pod="m1") == status["context"]["tokens"]
    assert value(after, "capd_queued_runs", pod="m1") == 0
    assert value(after, "capd_pods", status="idle") == 1

    # A call that fails, retried once (model.max_retries), then given up: the turn errors.
    failing = scripted({"error": "overloaded", "retryable": True})
    await spawn(capd, "m2", {**failing, "name": "s1", "max_retries": 1})
    async with await connect_pod(capd, "m2") as pod:
        end, _ = await run_turn(pod, "go")
        assert end["result"] == "errored"
    failed = await scrape(capd)
    assert value(failed, "capd_turns_total", pod="m2", result="errored") == 1
    retries = "capd_model_call_retries_total"
    assert (
        value(failed, retries, provider="scripted") - value(after, retries, provider="scripted")
        == 1
    )
    errors = "capd_model_call_duration_seconds_count"
    error = {**MODEL, "outcome": "error"}
    assert value(failed, errors, **error) - value(after, errors, **error) == 1

    # A stopped pod keeps its totals; a deleted one has no series left.
    await daemon_request(capd, {"method": "stop", "name": "m1"})
    stopped = await scrape(capd)
    assert value(stopped, "capd_pods", status="stopped") == 1
    assert value(stopped, "capd_tokens_total", pod="m1", type="input") == usage["input_tokens"]
    assert "capd_context_tokens" not in pod_series(stopped, "m1")
    await daemon_request(capd, {"method": "delete", "name": "m1"})
    deleted = await scrape(capd)
    assert pod_series(deleted, "m1") == []
    assert pod_series(deleted, "m2") != []


def priced(i: int) -> dict[str, object]:
    """Two turns, a compaction and two more, at odd prices: the dollars of a sum in another
    order than the journal's differ in the last bits for some of these (pods 1 and 3)."""
    steps = [
        {"text": "a b c " * (i + 1)},
        {"text": "d e " * (i + 3)},
        {"text": "SUMMARY x"},
        {"text": "f g h " * (i + 2)},
        {"text": "i j"},
    ]
    price = {"input_per_mtok": 0.15 + i * 0.37, "output_per_mtok": 0.6 + i * 1.13}
    return {"provider": "scripted", "script": steps, "price": price}


def totals(found: Samples, pod: str) -> tuple[float, float, float]:
    return (
        value(found, "capd_tokens_total", pod=pod, type="input"),
        value(found, "capd_tokens_total", pod=pod, type="output"),
        value(found, "capd_cost_usd_total", pod=pod),
    )


@pytest.mark.own_capd
async def test_a_stopped_pods_totals_are_the_same_before_and_after_restart_and_start(
    capd: CapdProcess,
) -> None:
    """The totals of a stopped pod come from its journal at stop, from the store after a
    capd restart, and from its journal again once started: the same numbers, to the last
    bit, or Prometheus sees a counter reset."""
    names = ["p1", "p3"]
    for name in names:
        await spawn(capd, name, priced(int(name[1:])))
        async with await connect_pod(capd, name) as pod:
            await run_turn(pod, "one two three four five")
            await run_turn(pod, "six seven")
            await pod.request({"method": "compact"})
            await wait_for(pod, is_event("context_compacted"))
            await run_turn(pod, "eight nine ten")
            await run_turn(pod, "eleven")
        await daemon_request(capd, {"method": "stop", "name": name})
    at_stop = await scrape(capd)
    capd.stop()
    capd.start()
    restarted = await scrape(capd)
    assert value(restarted, "capd_pods", status="stopped") == len(names)
    for name in names:
        await daemon_request(capd, {"method": "start", "name": name})
    started = await scrape(capd)
    for name in names:
        assert totals(at_stop, name)[2] > 0
        assert totals(at_stop, name) == totals(restarted, name) == totals(started, name), name


async def test_reports_owed_to_an_absent_parent_are_counted(
    capd: CapdProcess, tmp_path: Path
) -> None:
    parent = str(tmp_path / "absent-parent.sock")
    async with await Client.connect(capd.socket) as daemon:
        await daemon.request(
            {
                "method": "spawn",
                "manifest": {"name": "kid", "model": scripted({"text": "hi"})},
                "parent": parent,
            }
        )
    async with await connect_pod(capd, "kid") as pod:
        await run_turn(pod, "go")
        await run_turn(pod, "again")
    found = await scrape(capd)
    assert value(found, "capd_outbox_reports") == 2
    assert value(found, "capd_outbox_targets") == 1


async def http(address: str, request: bytes) -> tuple[str, dict[str, str], bytes]:
    """Send `request`, read the reply until capd closes the connection."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    async with asyncio.timeout(EVENT_TIMEOUT_S):
        data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


async def test_http_endpoint_and_lagged_subscribers(capd_dirs: CapdProcess) -> None:
    capd_dirs.extra_args = ["--metrics-listen", "127.0.0.1:0", "--max-queued-bytes", "1024"]
    capd_dirs.start()
    address = (await daemon_request(capd_dirs, {"method": "info"}))["metrics_listen"]
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"
    assert int(port) > 0

    status, headers, body = await http(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["Connection"] == "close"
    assert int(headers["Content-Length"]) == len(body)
    assert value(samples(body.decode()), "capd_connections", socket="daemon") == 0
    status, headers, body = await http(address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert (status, headers["Content-Type"], body) == ("HTTP/1.1 200 OK", CONTENT_TYPE, b"")
    assert int(headers["Content-Length"]) > 0
    status, _, body = await http(address, b"GET /metrics HTTP/1.0\n\n")  # LF line ends
    assert (status, body.count(b"\n# TYPE capd_pods gauge\n")) == ("HTTP/1.1 200 OK", 1)
    status, _, _ = await http(address, b"GET /other HTTP/1.1\r\n\r\n")
    assert status == "HTTP/1.1 404 Not Found"
    status, headers, _ = await http(address, b"POST /metrics HTTP/1.1\r\n\r\n")
    assert (status, headers["Allow"]) == ("HTTP/1.1 405 Method Not Allowed", "GET, HEAD")

    # A subscriber that never reads lags once the kernel's buffer and 1 KiB of queue fill.
    await spawn(capd_dirs, "w", scripted({"text": "y" * 6000, "chunk_chars": 1}))
    before = await scrape(capd_dirs)
    reader, writer = await asyncio.open_unix_connection(str(capd_dirs.pod_socket("w")))
    await reader.readline()
    writer.write(b'{"method":"subscribe","id":1}\n')
    async with await Client.connect(capd_dirs.socket) as daemon:
        await daemon.request({"method": "subscribe"})
        found = await scrape(capd_dirs)
        assert value(found, "capd_subscribers", socket="daemon") == 1
        assert value(found, "capd_connections", socket="pod") == 1
        async with await connect_pod(capd_dirs, "w", subscribe=False) as pod:
            await pod.request({"method": "run", "text": "go"})
            await wait_for(daemon, is_event("pod_status", pod="w", status="idle"))
    after = await scrape(capd_dirs)
    writer.close()
    lagged = "capd_subscriptions_lagged_total"
    assert value(after, lagged) - value(before, lagged) == 1

    capctl = [sys.executable, "-m", "capctl", "--runtime-dir", str(capd_dirs.runtime_dir)]
    done = await asyncio.to_thread(
        subprocess.run, [*capctl, "metrics"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert value(samples(done.stdout), lagged) == value(after, lagged)

    # capd stops with an exchange under way: it ends it, and asyncio logs no traceback.
    _, idle = await asyncio.open_connection(host, int(port))
    idle.write(b"GET /metrics HTTP/1.1\r\n")
    await idle.drain()
    await asyncio.to_thread(capd_dirs.stop)
    idle.close()
    logged = capd_dirs.output()
    assert "capd stopped" in logged
    assert "Traceback" not in logged


def test_a_metrics_address_in_use_stops_capd_at_start(capd_dirs: CapdProcess) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        capd_dirs.extra_args = ["--metrics-listen", f"127.0.0.1:{port}"]
        with pytest.raises(RuntimeError, match="exited with 1") as failed:
            capd_dirs.start()
    last = str(failed.value).strip().splitlines()[-1]
    assert last.startswith(f"capd: --metrics-listen 127.0.0.1:{port}: "), last
    assert "choose another address or port" in last


@pytest.mark.parametrize("given", ["9464", "localhost:", "[::1]:99999", "host:port"])
def test_a_bad_metrics_address_is_refused(given: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as refused:
        Config.from_args(["--metrics-listen", given])
    assert refused.value.code == 2
    assert f"--metrics-listen {given}: expected HOST:PORT" in capsys.readouterr().err


def test_a_metrics_address_is_host_and_port() -> None:
    assert Config.from_args(["--metrics-listen", "[::1]:0"]).metrics_listen == ("::1", 0)
    assert Config.from_args(["--metrics-listen", "localhost:9464"]).metrics_listen == (
        "localhost",
        9464,
    )
