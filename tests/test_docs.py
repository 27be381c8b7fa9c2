"""The project's docs are true to the code: generated references are current, links resolve."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", ROOT / "docs" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["arguments.md", "trainer_arguments.md"])
def test_generated_references_are_current(name):
    current = (ROOT / "docs" / name).read_text()
    assert current == _generator().FILES[name](), f"docs/{name} is out of date: run python docs/generate.py"


@pytest.mark.parametrize("doc", ["README.md", "docs/methods.md", "docs/arguments.md", "docs/trainer_arguments.md"])
def test_links_stay_inside_the_repository_and_resolve(doc):
    path = ROOT / doc
    for target in re.findall(r"\]\(([^)#\s]+)\)", path.read_text()):
        if target.startswith(("http://", "https://")):
            continue
        resolved = (path.parent / target).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc} links outside the repository: {target}"
        assert resolved.exists(), f"{doc} links a missing file: {target}"


def test_every_method_is_documented():
    from hf_distill.methods import METHODS

    text = (ROOT / "docs" / "methods.md").read_text()
    for name in METHODS:
        assert f"## `{name}`" in text, name
