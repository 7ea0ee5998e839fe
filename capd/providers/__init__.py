"""Model providers, one module per API, behind the seam in `base.py`."""

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
