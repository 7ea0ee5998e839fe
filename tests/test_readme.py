"""The YAML in README.md and docs/*.md can be copied: each block is one document, and a
block of manifest fields validates as a manifest: a whole one with its `name`, a file for
`capctl spawn NAME -f` or `capctl update POD -f` without one, or a fragment (its fields
with a name and a scripted model), and a team file validates as one. Other YAML (a
Prometheus config) is skipped."""

import re
from pathlib import Path

import pytest
import yaml

from protocol.manifest import Manifest
from protocol.team import TeamFile

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```yaml\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def _blocks() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(REPO)}:{line}", match.group(1)))
    return found


BLOCKS = _blocks()


FILLED = {"name": "x", "model": {"provider": "scripted"}}
"""What a block that is not a whole manifest is validated with."""


def _manifest_fields(document: object) -> bool:
    return isinstance(document, dict) and bool(document.keys() & Manifest.model_fields.keys())


def test_the_docs_have_yaml_blocks_and_manifests() -> None:
    """Guards the pattern: a change to how blocks are fenced must not empty the test."""
    documents = [yaml.safe_load(text) for _, text in BLOCKS]
    manifests = [document for document in documents if _manifest_fields(document)]
    assert len(BLOCKS) >= 8
    assert len([document for document in manifests if "name" in document]) >= 3
    assert len([document for document in manifests if "name" not in document]) >= 3


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_a_yaml_block_is_one_document_and_a_whole_manifest_validates(where: str, text: str) -> None:
    documents = list(yaml.safe_load_all(text))
    assert len(documents) == 1, f"{where}: {len(documents)} YAML documents in one block"
    (document,) = documents
    if isinstance(document, dict) and document.keys() == {"team", "pods"}:
        TeamFile.model_validate(document)
    elif _manifest_fields(document):
        assert isinstance(document, dict)
        filled = document if "name" in document else FILLED | document
        Manifest.model_validate(filled)
