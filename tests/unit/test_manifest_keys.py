"""`sandbox.env` never lists the variable the pod's model key is read from: the one
`model.api_key_env` names, else the provider's own (OPENAI_API_KEY, ANTHROPIC_API_KEY)."""

from typing import Any

import pytest
from pydantic import ValidationError

from protocol.manifest import Manifest


def manifest(model: dict[str, Any], env: list[str]) -> Manifest:
    return Manifest.model_validate({"name": "a", "model": model, "sandbox": {"env": env}})


@pytest.mark.parametrize(
    ("provider", "key"), [("openai", "OPENAI_API_KEY"), ("anthropic", "ANTHROPIC_API_KEY")]
)
def test_the_providers_own_key_variable_is_refused(provider: str, key: str) -> None:
    with pytest.raises(ValidationError) as refused:
        manifest({"provider": provider, "name": "m"}, ["PATH", key])
    assert f"sandbox.env lists {key}, {provider}'s key;" in str(refused.value)


def test_the_named_api_key_env_is_refused() -> None:
    with pytest.raises(ValidationError) as refused:
        manifest({"provider": "openai", "name": "m", "api_key_env": "MY_KEY"}, ["MY_KEY"])
    assert "sandbox.env lists MY_KEY, the model's api_key_env" in str(refused.value)


def test_another_variable_and_a_named_key_elsewhere_are_accepted() -> None:
    # with api_key_env set, the provider reads that one, not its own default
    named = {"provider": "openai", "name": "m", "api_key_env": "MY_KEY"}
    assert manifest(named, ["PATH", "OPENAI_API_KEY"]).sandbox.env == ["PATH", "OPENAI_API_KEY"]
    assert manifest({"provider": "scripted"}, ["PATH", "HOME"]).sandbox.env == ["PATH", "HOME"]
