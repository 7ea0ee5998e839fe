"""Where an API key may go (issue 14, finding 4): only where the manifest names its
variable (`model.api_key_env`), or to the provider's own server. A pod aimed at any other
`base_url` must not carry OPENAI_API_KEY or ANTHROPIC_API_KEY from capd's environment.

The stand-in servers record each request's headers; capd runs with both usual keys set."""

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from capd.providers import anthropic, key_needed, openai
from capd.providers.http import key_variable
from protocol.errors import ProtocolError
from protocol.manifest import ModelConfig
from tests.conftest import CapdProcess
from tests.fakes.anthropic_server import AnthropicTestServer
from tests.fakes.openai_server import ErrorReply, OpenAITestServer
from tests.fakes.sse_server import SseTestServer
from tests.helpers import connect_pod, daemon_request, run_turn, spawn

NAMED = "CAPD_TEST_NAMED_KEY"
ENV = {"OPENAI_API_KEY": "sk-usual-openai", "ANTHROPIC_API_KEY": "sk-usual-anthropic"}


@pytest.fixture
def capd(capd_dirs: CapdProcess) -> CapdProcess:
    capd_dirs.env.update({**ENV, NAMED: "sk-named"})
    capd_dirs.start()
    return capd_dirs


HEADER = {"openai": ("authorization", "Bearer sk-named"), "anthropic": ("x-api-key", "sk-named")}


@pytest.fixture(params=["openai", "anthropic"])
async def server(request: pytest.FixtureRequest) -> AsyncIterator[SseTestServer[Any]]:
    stand_in = OpenAITestServer() if request.param == "openai" else AnthropicTestServer()
    async with stand_in as running:
        yield running


async def _one_turn(capd: CapdProcess, name: str, model: dict[str, object]) -> None:
    await spawn(capd, name, model)
    async with await connect_pod(capd, name) as pod:
        end, _ = await run_turn(pod, "hi")
    assert end["result"] == "finished", end


async def test_the_usual_key_stays_home_and_a_named_key_goes(
    capd: CapdProcess, server: SseTestServer[Any]
) -> None:
    provider = "openai" if isinstance(server, OpenAITestServer) else "anthropic"
    model = {"provider": provider, "name": "m", "base_url": server.base_url}
    await _one_turn(capd, "bare", model)
    await _one_turn(capd, "named", {**model, "api_key_env": NAMED})

    header, named_value = HEADER[provider]
    bare, named = server.headers
    assert not {"authorization", "x-api-key"} & set(bare), f"{provider}: a key nobody named"
    assert named[header] == named_value


OWN = {
    "openai": (openai.DEFAULT_BASE_URL, openai.DEFAULT_KEY_ENV),
    "anthropic": (anthropic.DEFAULT_BASE_URL, anthropic.DEFAULT_KEY_ENV),
}


@pytest.mark.parametrize(
    ("provider", "base_url", "api_key_env", "sent"),
    [
        ("openai", None, None, "OPENAI_API_KEY"),
        ("openai", "https://api.openai.com/v1", None, "OPENAI_API_KEY"),
        ("openai", "https://API.openai.com:443/v1/", None, "OPENAI_API_KEY"),
        ("openai", "http://api.openai.com/v1", None, None),
        ("openai", "https://api.openai.com:8443/v1", None, None),
        ("openai", "https://api.openai.com.evil.example/v1", None, None),
        ("openai", "https://api.openai.com@evil.example/v1", None, None),
        ("openai", "http://127.0.0.1:8080/v1", None, None),
        ("openai", "http://127.0.0.1:8080/v1", NAMED, NAMED),
        ("anthropic", None, None, "ANTHROPIC_API_KEY"),
        ("anthropic", "https://api.anthropic.com", None, "ANTHROPIC_API_KEY"),
        ("anthropic", "https://api.openai.com", None, None),
        ("anthropic", "https://proxy.example", NAMED, NAMED),
    ],
)
def test_which_variable_goes_where(
    provider: str, base_url: str | None, api_key_env: str | None, sent: str | None
) -> None:
    """The providers' own hosts cannot be stood in for locally: the rule is checked on
    the URL a provider sends to, built as the providers build it."""
    config = ModelConfig.model_validate(
        {"provider": provider, "name": "m", "base_url": base_url, "api_key_env": api_key_env}
    )
    own_url, usual = OWN[provider]
    url = f"{(base_url or own_url).rstrip('/')}/path"
    assert key_variable(config, url, own_url, usual) == sent


async def test_a_refusal_for_want_of_a_key_says_how_to_send_one(capd: CapdProcess) -> None:
    """Who relied on OPENAI_API_KEY reaching a custom base_url now gets the server's 401:
    the error says why no key went and what to set."""
    async with OpenAITestServer() as server:
        server.enqueue(ErrorReply(401, "Incorrect API key provided", "invalid_api_key"))
        await spawn(capd, "nokey", {"provider": "openai", "name": "m", "base_url": server.base_url})
        async with await connect_pod(capd, "nokey") as pod:
            end, _ = await run_turn(pod, "hi")
    assert end["result"] == "errored"
    assert "HTTP 401" in end["error"]
    assert "capd sent no API key" in end["error"]
    assert "model.api_key_env" in end["error"]


NO_KEYS = {"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", NAMED: ""}


@pytest.fixture
def keyless(capd_dirs: CapdProcess) -> CapdProcess:
    """A capd whose environment has neither usual key (set empty, whatever the suite's)."""
    capd_dirs.env.update(NO_KEYS)
    capd_dirs.start()
    return capd_dirs


async def _refusal(capd: CapdProcess, manifest: dict[str, Any], parent: str | None = None) -> str:
    with pytest.raises(ProtocolError) as refused:
        await daemon_request(capd, {"method": "spawn", "manifest": manifest, "parent": parent})
    assert refused.value.code == "invalid_request"
    return refused.value.message


async def test_a_spawn_whose_key_capd_lacks_is_refused_at_once(keyless: CapdProcess) -> None:
    for provider, api in (("openai", openai), ("anthropic", anthropic)):
        message = await _refusal(keyless, {"name": "w1", "model": {"provider": provider}})
        assert message == (
            f"model.provider {provider} sends its requests to {api.DEFAULT_BASE_URL} with the "
            f"key in {api.DEFAULT_KEY_ENV}, which is not set in capd's environment (capd reads "
            "its own, not the client's); set it where capd runs (the unit's EnvironmentFile, "
            "or `systemctl --user set-environment`), or give model.base_url for a local server"
        )
        named = {"name": "w1", "model": {"provider": provider, "api_key_env": NAMED}}
        assert (await _refusal(keyless, named)).startswith(
            f"model.api_key_env names {NAMED}, which is not set in capd's environment"
        )
        local = {"provider": provider, "base_url": "http://127.0.0.1:9/v1"}
        await spawn(keyless, provider, local)  # a server of one's own needs no key
    pods = (await daemon_request(keyless, {"method": "list"}))["pods"]
    assert [pod["name"] for pod in pods] == ["openai", "anthropic"]

    # capctl: only a refusal for a key its own shell has gets the hint.
    command = [sys.executable, "-m", "capctl", "--runtime-dir", str(keyless.runtime_dir)]
    hint = "(OPENAI_API_KEY is set in this shell, but capd reads its own environment)"
    for shell_key in ("sk-in-this-shell", ""):
        done = await asyncio.to_thread(
            subprocess.run,
            [*command, "spawn", "w1", "--provider", "openai"],
            env={**os.environ, "OPENAI_API_KEY": shell_key},
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.returncode == 1
        (line,) = done.stderr.splitlines()
        assert line.startswith("capctl: invalid_request: model.provider openai sends")
        assert line.endswith(hint) == bool(shell_key)


def test_which_variable_a_model_needs() -> None:
    def needed(**model: str) -> str | None:
        return key_needed(ModelConfig.model_validate(model))

    assert needed(provider="openai") == "OPENAI_API_KEY"
    assert needed(provider="anthropic", base_url="https://api.anthropic.com/") == (
        "ANTHROPIC_API_KEY"
    )
    assert needed(provider="openai", base_url="http://127.0.0.1:8080/v1") is None
    assert needed(provider="openai", base_url="http://127.0.0.1:8080/v1", api_key_env=NAMED) == (
        NAMED
    )
    assert needed(provider="scripted") is None


async def test_a_stored_pod_comes_back_without_its_key_but_its_children_are_refused(
    capd_dirs: CapdProcess, tmp_path: Path
) -> None:
    """Restore never checks the key; a new child of the pod (spawn_pod, or a client's
    spawn naming it as parent: the same check) is refused like any spawn."""
    capd_dirs.env.update(ENV)
    capd_dirs.start()
    cwd = str(tmp_path)
    boss = await spawn(capd_dirs, "boss", {"provider": "openai", "name": "gpt-4.1"}, cwd=cwd)
    capd_dirs.stop()
    capd_dirs.env.update(NO_KEYS)
    capd_dirs.start()

    (pod,) = (await daemon_request(capd_dirs, {"method": "list"}))["pods"]
    assert (pod["name"], pod["status"], pod["error"]) == ("boss", "idle", None)
    child = {"name": "kid", "model": {"provider": "openai", "name": "gpt-4.1-mini"}, "cwd": cwd}
    assert "OPENAI_API_KEY, which is not set" in await _refusal(capd_dirs, child, str(boss))
