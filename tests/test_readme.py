"""The YAML in README.md and docs/*.md can be copied: each block is one document, and a
block with a top-level `name` is a whole manifest that validates (fragments are skipped)."""

import re
from pathlib import Path

import pytest
import yaml

from protocol.manifest import Manifest

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


def test_the_docs_have_yaml_blocks_and_manifests() -> None:
    """Guards the pattern: a change to how blocks are fenced must not empty the test."""
    manifests = [where for where, text in BLOCKS if "name" in (yaml.safe_load(text) or {})]
    assert len(BLOCKS) >= 8
    assert len(manifests) >= 3


@pytest.mark.parametrize(("where", "text"), BLOCKS, ids=[where for where, _ in BLOCKS])
def test_a_yaml_block_is_one_document_and_a_whole_manifest_validates(where: str, text: str) -> None:
    documents = list(yaml.safe_load_all(text))
    assert len(documents) == 1, f"{where}: {len(documents)} YAML documents in one block"
    (document,) = documents
    if isinstance(document, dict) and "name" in document:
        Manifest.model_validate(document)
