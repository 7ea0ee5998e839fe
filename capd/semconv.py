"""The span and attribute names capd's traces use (capd.otel makes the spans).

They are the GenAI semantic conventions' (semantic-conventions-genai, Development status),
written here rather than imported: the Python semconv package marks them all deprecated
(moved), and capd never emits the replaced `gen_ai.system`.
"""

from protocol.manifest import AcpEngine, ClaudeCodeEngine, Manifest, ModelConfig

CAPTURE_CONTENT_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
"""Set to `true`, tool call arguments and results go into the `execute_tool` spans."""

OPERATION = "gen_ai.operation.name"
PROVIDER = "gen_ai.provider.name"
AGENT_NAME = "gen_ai.agent.name"
AGENT_ID = "gen_ai.agent.id"
CONVERSATION_ID = "gen_ai.conversation.id"
REQUEST_MODEL = "gen_ai.request.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
REQUEST_TEMPERATURE = "gen_ai.request.temperature"
REQUEST_STREAM = "gen_ai.request.stream"
FINISH_REASONS = "gen_ai.response.finish_reasons"
INPUT_TOKENS = "gen_ai.usage.input_tokens"
OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
TOOL_NAME = "gen_ai.tool.name"
TOOL_TYPE = "gen_ai.tool.type"
TOOL_CALL_ID = "gen_ai.tool.call.id"
TOOL_DESCRIPTION = "gen_ai.tool.description"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
TURN_ID = "capd.turn.id"
TURN_INVOKE = "capd.turn.invoke"
TURN_RESULT = "capd.turn.result"
TURN_PAUSED = "capd.turn.paused"
LINK_KIND = "capd.link"
"""On a link of an `invoke_agent` span: `run` (the `traceparent` that asked for the turn)
or `resumed` (the turn's previous running segment)."""


def provider_name(manifest: Manifest) -> str:
    """`gen_ai.provider.name` of a pod: its model's provider, or its external engine's."""
    match manifest.engine:
        case ClaudeCodeEngine():
            return "anthropic"
        case AcpEngine():
            return "acp"
    assert manifest.model is not None
    return model_provider(manifest.model)


def model_provider(model: ModelConfig) -> str:
    return "capd.scripted" if model.provider == "scripted" else model.provider
