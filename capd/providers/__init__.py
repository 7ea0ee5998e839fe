"""Model providers, one module per API, behind the seam in `base.py`."""

import os

from capd.providers.base import Provider
from protocol.manifest import ModelConfig


def make_provider(config: ModelConfig) -> Provider:
    if config.provider == "scripted":
        from capd.providers.scripted import ScriptedProvider

        return ScriptedProvider(config)
    if config.provider == "anthropic":
        from capd.providers.anthropic import AnthropicProvider

        return AnthropicProvider(config)
    from capd.providers.openai import OpenAIProvider

    return OpenAIProvider(config)


def _own_server(config: ModelConfig) -> tuple[str, str] | None:
    """The provider's own base URL and the variable its key usually comes from."""
    if config.provider == "openai":
        from capd.providers import openai as api
    elif config.provider == "anthropic":
        from capd.providers import anthropic as api  # type: ignore[no-redef]
    else:
        return None
    return api.DEFAULT_BASE_URL, api.DEFAULT_KEY_ENV


def key_needed(config: ModelConfig) -> str | None:
    """The environment variable whose key the model's requests carry, read where capd runs:
    the one `api_key_env` names, else the provider's usual one when its requests go to the
    provider's own server (`http.key_variable`); None when they carry no key."""
    own = _own_server(config)
    if own is None:
        return config.api_key_env
    from capd.providers.http import key_variable

    return key_variable(config, config.base_url or own[0], *own)


def missing_key(config: ModelConfig) -> str | None:
    """Why a pod with this model could not call it, the key it needs being empty in capd's
    environment: the one line a spawn is refused with. None when nothing is missing."""
    variable = key_needed(config)
    if variable is None or os.environ.get(variable):
        return None
    if config.api_key_env:
        what, local = f"model.api_key_env names {variable}", ""
    else:
        own = _own_server(config)
        assert own is not None  # a usual variable goes only to the provider's own server
        url = config.base_url or own[0]
        what = f"model.provider {config.provider} sends its requests to {url} with the key "
        what += f"in {variable}"
        local = ", or give model.base_url for a local server"
    return (
        f"{what}, which is not set in capd's environment (capd reads its own, not the "
        "client's); set it where capd runs (the unit's EnvironmentFile, or `systemctl "
        f"--user set-environment`){local}"
    )
