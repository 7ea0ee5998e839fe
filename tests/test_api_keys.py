"""Where an API key may go (issue 14, finding 4): only where the manifest names its
variable (`model.api_key_env`), or to the provider's own server. A pod aimed at any other
`base_url` must not carry OPENAI_API_KEY or ANTHROPIC_API_KEY from capd's environment.

The stand-in servers record each request's headers; capd runs with both usual keys set."""

from collections.abc import AsyncIterator
from typing import Any

import pytest

from capd.providers import anthropic, openai
from capd.providers.http import key_variable
from protocol.manifest import ModelConfig
from tests.conftest import CapdProcess
from tests.fakes.anthropic_server import AnthropicTestServer
from tests.fakes.openai_server import ErrorReply, OpenAITestServer
from tests.fakes.sse_server import SseTestServer
from tests.helpers import connect_pod, run_turn, spawn

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
