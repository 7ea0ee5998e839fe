"""docs/protocol.md keeps up with protocol/: every method, event, result, report, manifest
field, tool argument and error code defined there is documented, and every example line
in the doc is a frame capd would send or take.

The names are read from the pydantic models, so adding one without documenting it fails
here. Each method, event, report kind and tool has a `### \\`name\\`` heading; its fields
must appear in backticks between that heading and the next one.
"""

import re
from pathlib import Path
from typing import Any, get_args

import orjson
import pytest
from pydantic import BaseModel

from capd.tools import BUILTIN_TOOLS
from protocol import results
from protocol.errors import ErrorCode, ProtocolError
from protocol.events import AnyEvent, DurableEvent, PodEventBase, parse_event
from protocol.manifest import Manifest
from protocol.methods import DAEMON_REQUESTS, POD_REQUESTS, DaemonRequest, PodRequest
from protocol.names import ToolName
from protocol.reports import AnyReport, Report, parse_report

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"

RESULT_METHODS: dict[type[BaseModel], tuple[str, ...]] = {
    results.RunResult: ("run",),
    results.NotifyResult: ("notify", "pod_event"),
    results.PodStatus: ("status",),
    results.OpenPermission: ("status",),
    results.ContextSize: ("status",),
    results.McpServerState: ("status",),
    results.SandboxState: ("status",),
    results.SubscribeResult: ("subscribe",),
    results.HistoryResult: ("history",),
    results.SpawnResult: ("spawn", "start"),
    results.ListResult: ("list",),
    results.PodListEntry: ("list",),
    results.InfoResult: ("info",),
    results.SandboxBackend: ("info",),
    results.FleetNode: ("info",),
    results.SetBudgetResult: ("set_budget",),
    results.ReconfigureResult: ("reconfigure",),
    results.OverviewResult: ("overview",),
    results.MetricsResult: ("metrics",),
    results.WorkspaceState: ("status",),
    results.DiffResult: ("diff",),
    results.PlanStep: ("apply",),
    results.ApplyResult: ("apply",),
    results.DownOutcome: ("down",),
    results.DownResult: ("down",),
}
"""Which method's section documents each ack result."""


def _in_code(text: str) -> list[tuple[str, bool]]:
    """The doc's lines, each with whether it belongs to a fenced code block."""
    lines, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            lines.append((line, True))
        else:
            lines.append((line, fenced))
    return lines


def _blocks(text: str, level: int) -> list[tuple[str, str]]:
    """(heading, body) of every heading of `level` (2: `##`, 3: `###`); a body runs to
    the next heading of that level or higher and leaves out code blocks."""
    found: list[tuple[str, list[str]]] = []
    for line, fenced in _in_code(text):
        match = None if fenced else re.match(r"(#+) (.*)", line)
        if match and len(match[1]) <= level:
            found.append((match[2].strip(), []) if len(match[1]) == level else ("", []))
        elif found and not fenced:
            found[-1][1].append(line)
    return [(heading, "\n".join(body)) for heading, body in found if heading]


def _names_in(text: str) -> set[str]:
    """Every identifier written inside backticks."""
    return {name for span in re.findall(r"`([^`]+)`", text) for name in re.findall(r"\w+", span)}


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


@pytest.fixture(scope="module")
def items(doc: str) -> dict[str, list[str]]:
    """Backticked `### ` headings → the bodies under them (a name may head several)."""
    found: dict[str, list[str]] = {}
    for heading, body in _blocks(doc, 3):
        if match := re.fullmatch(r"`(\w+)`", heading):
            found.setdefault(match[1], []).append(body)
    return found


@pytest.fixture(scope="module")
def sections(doc: str) -> dict[str, str]:
    return dict(_blocks(doc, 2))


def _members(union: Any) -> list[type[BaseModel]]:
    """The models of an `Annotated[A | B | ..., Field(discriminator=...)]`."""
    return list(get_args(get_args(union)[0]))


def _tag(model: type[BaseModel], field: str) -> str:
    return str(model.model_fields[field].default)


def _wire_names(model: type[BaseModel], base: type[BaseModel] | None = None) -> set[str]:
    """The model's field names on the wire (aliases), without those of `base`, and the
    fields of the models nested in them (but a manifest's and an event's, which have
    their own sections)."""
    inherited = set(base.model_fields) if base else set()
    names: set[str] = set()
    for name, info in model.model_fields.items():
        if name in inherited:
            continue
        names.add(info.alias or name)
        for nested in _nested_models(info.annotation):
            if not issubclass(nested, Manifest | PodEventBase):
                names |= _wire_names(nested)
    return names


def _nested_models(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in _nested_models(arg)]


def _all_models(model: type[BaseModel]) -> list[type[BaseModel]]:
    """`model` and every model reachable through its fields."""
    found = [model]
    for info in model.model_fields.values():
        for nested in _nested_models(info.annotation):
            found += [m for m in _all_models(nested) if m not in found]
    return found


def _missing(items: dict[str, list[str]], name: str, fields: set[str]) -> set[str] | None:
    """The fields no `### name` block mentions (from the block that mentions most);
    None when there is no such heading."""
    if name not in items:
        return None
    return min((fields - _names_in(body) for body in items[name]), key=len)


def _check(items: dict[str, list[str]], what: str, name: str, fields: set[str]) -> None:
    missing = _missing(items, name, fields)
    assert missing is not None, f"docs/protocol.md has no `### \\`{name}\\`` heading ({what})"
    assert not missing, f"docs/protocol.md: {what} `{name}` does not mention {sorted(missing)}"


def _base_of(model: type[BaseModel]) -> type[BaseModel] | None:
    for base in (DurableEvent, PodEventBase, Report):
        if issubclass(model, base):
            return base
    return None


def test_every_method_is_documented_with_its_fields(items: dict[str, list[str]]) -> None:
    for union in (PodRequest, DaemonRequest):
        for model in _members(union):
            fields = _wire_names(model) - {"method", "id"}
            _check(items, "method", _tag(model, "method"), fields)


def test_every_result_is_documented_with_its_method(items: dict[str, list[str]]) -> None:
    defined = {
        model
        for model in vars(results).values()
        if isinstance(model, type) and issubclass(model, results.Result)
    } - {results.Result}
    assert defined == set(RESULT_METHODS), "map each result model to its method above"
    for model, methods in RESULT_METHODS.items():
        for method in methods:
            _check(items, f"result {model.__name__} of", method, _wire_names(model))


def test_every_event_is_documented_with_its_fields(
    items: dict[str, list[str]], sections: dict[str, str]
) -> None:
    for model in _members(AnyEvent):
        fields = _wire_names(model, _base_of(model)) - {"event"}
        _check(items, "event", _tag(model, "event"), fields)
    assert {"pod", "seq", "ts"} <= _names_in(sections["Pod events"])


def test_events_are_listed_as_durable_or_ephemeral(sections: dict[str, str]) -> None:
    table = re.search(r"\| durable \| ephemeral \|\n\|.*\|\n\|(.*)\|(.*)\|", sections["Pod events"])
    assert table, "the durable | ephemeral table is missing from Pod events"
    durable, ephemeral = _names_in(table[1]), _names_in(table[2])
    daemon_events = {heading.strip("`") for heading, _ in _blocks(sections["Daemon socket"], 3)}
    for model in _members(AnyEvent):
        tag = _tag(model, "event")
        if issubclass(model, DurableEvent):
            assert tag in durable, f"{tag} is durable; list it so"
        elif issubclass(model, PodEventBase):
            assert tag in ephemeral or tag in daemon_events, f"{tag} is ephemeral; list it so"
            assert tag not in durable, f"{tag} has no seq; it is not durable"


def test_every_report_kind_is_documented(
    items: dict[str, list[str]], sections: dict[str, str]
) -> None:
    for model in _members(AnyReport):
        fields = _wire_names(model, Report) - {"kind"}
        _check(items, "report", _tag(model, "kind"), fields)
    assert set(Report.model_fields) <= _names_in(sections["Parent reports"])


def test_every_manifest_field_is_documented(sections: dict[str, str]) -> None:
    mentioned = _names_in(sections["Manifest"])
    for model in _all_models(Manifest):
        missing = set(model.model_fields) - mentioned
        assert not missing, f"Manifest section: {model.__name__} fields {sorted(missing)}"


def test_every_tool_is_documented_with_its_arguments(items: dict[str, list[str]]) -> None:
    assert set(BUILTIN_TOOLS) == set(get_args(ToolName))
    for name, tool in BUILTIN_TOOLS.items():
        _check(items, "tool", name, _wire_names(tool.args_model))


def test_every_error_code_is_documented(sections: dict[str, str]) -> None:
    missing = set(get_args(ErrorCode)) - _names_in(sections["Error codes"])
    assert not missing, f"Error codes section does not list {sorted(missing)}"


def _example_lines(doc: str) -> list[dict[str, Any]]:
    blocks = re.findall(r"^```jsonl\n(.*?)^```", doc, flags=re.MULTILINE | re.DOTALL)
    return [orjson.loads(line) for block in blocks for line in block.splitlines() if line]


def _parse_request(frame: dict[str, Any]) -> None:
    """A request of either socket; one with `pod` is a pod method on the daemon socket."""
    errors = []
    parsers = (POD_REQUESTS, DAEMON_REQUESTS)
    if "pod" in frame:
        frame, parsers = {k: v for k, v in frame.items() if k != "pod"}, (POD_REQUESTS,)
    for parser in parsers:
        try:
            parser.parse(frame)
            return
        except ProtocolError as exc:
            errors.append(exc.message)
    pytest.fail(f"example request {frame} is refused: {errors}")


def _wire_fields(model: type[BaseModel]) -> set[str]:
    return {info.alias or name for name, info in model.model_fields.items()}


def test_examples_are_frames_capd_speaks(doc: str) -> None:
    frames = _example_lines(doc)
    assert len(frames) > 10
    for frame in frames:
        if "method" in frame:
            _parse_request(frame)
            if frame["method"] == "pod_event":
                report = parse_report(frame["event"])
                assert report is not None, f"example report {frame['event']} does not parse"
                assert set(frame["event"]) <= _wire_fields(type(report))
            continue
        event = parse_event(frame)
        assert event is not None, f"example {frame} is no event capd sends"
        unknown = set(frame) - _wire_fields(type(event))
        assert not unknown, f"example {frame['event']} has fields capd does not send: {unknown}"


def test_the_helpers_see_the_doc_structure(items: dict[str, list[str]]) -> None:
    """Guards the parsing above: a doc with no headings would pass every check vacuously."""
    assert {"run", "status", "assistant_message", "spawn", "turn_ended", "bash"} <= set(items)
