"""The operations guide's examples are valid and its links lead somewhere."""

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from deploy.files import DEPLOY, KUBERNETES_VERSIONS, OPERATIONS, ROOT


def test_operations_examples_are_valid_kubernetes() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", OPERATIONS.read_text(), re.S)
    examples = [
        doc
        for block in blocks
        for doc in yaml.safe_load_all(block)
        if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc
    ]
    assert examples, "the queue-age autoscaler example"
    for doc in examples:
        for version in KUBERNETES_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("document", [OPERATIONS, DEPLOY / "README.md"], ids=lambda p: p.name)
def test_relative_links_lead_to_files(document: Path) -> None:
    targets = re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", document.read_text())
    assert targets
    missing = [t for t in targets if not (document.parent / t).exists()]
    assert missing == []


def test_readme_links_the_operations_guide() -> None:
    assert "(docs/operations.md)" in (ROOT / "README.md").read_text()
    assert "(../docs/operations.md)" in (DEPLOY / "README.md").read_text()
