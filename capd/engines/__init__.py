"""Engines run a pod's turns: the builtin agent loop, or an external agent process."""

from pathlib import Path

from capd.engines.base import Engine
from capd.engines.process import check_command
from capd.engines.slots import EngineSlot
from capd.proc.limits import PodLimits
from capd.proc.sandbox import Confinement
from protocol.manifest import AcpEngine, BuiltinEngine, ClaudeCodeEngine, Manifest


def make_engine(
    manifest: Manifest,
    sandbox: Confinement | None,
    pod_limits: PodLimits | None = None,
    slot: EngineSlot | None = None,
) -> Engine:
    """The pod's engine; an external one's process is confined by `sandbox`, runs in
    `pod_limits`' leaves and holds `slot` while it runs."""
    match manifest.engine:
        case BuiltinEngine():
            from capd.engines.builtin import BuiltinEngine as Builtin

            assert manifest.model is not None
            return Builtin(manifest.model, manifest.permissions)
        case ClaudeCodeEngine() as config:
            from capd.engines.claude_code import ClaudeCodeEngine as ClaudeCode

            return ClaudeCode(config, manifest, sandbox, pod_limits, slot)
        case AcpEngine() as config:
            from capd.engines.acp import AcpEngine as Acp

            return Acp(config, manifest, sandbox, pod_limits, slot)
    raise AssertionError(f"unknown engine {manifest.engine.kind}")


def check_engine(manifest: Manifest, sandbox: Confinement | None) -> None:
    """Refuse (invalid_request) an external engine whose command names no executable."""
    engine = manifest.engine
    if isinstance(engine, AcpEngine | ClaudeCodeEngine):
        assert manifest.cwd is not None
        check_command(engine.kind, engine.command, engine.env, Path(manifest.cwd), sandbox)


def model_label(manifest: Manifest) -> str:
    """What `status` shows as the pod's model."""
    match manifest.engine:
        case ClaudeCodeEngine(model=str(name)):
            return f"claude-code/{name}"
        case ClaudeCodeEngine():
            return "claude-code"
        case AcpEngine(command=command):
            return f"acp/{Path(command[0]).name}"
    model = manifest.model
    assert model is not None
    return f"{model.provider}/{model.name}" if model.name else model.provider
