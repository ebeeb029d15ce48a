"""Every shipped example configuration is valid and keeps its secrets in the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from openai_forward.config import load, read_file

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.yaml"))
ENV = {"OPENAI_API_KEY": "sk-a", "DEEPSEEK_API_KEY": "sk-b", "AZURE_OPENAI_API_KEY": "az-c"}


def test_there_are_examples_for_the_common_setups():
    names = {p.stem for p in EXAMPLES}
    assert {"full", "openai", "openai-deepseek-ollama", "azure"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_is_valid_and_takes_keys_from_the_environment(path: Path):
    text = path.read_text()
    assert "sk-" not in text  # no literal key in a file meant to be copied
    cfg = load(ENV, file=read_file(str(path)))
    assert cfg.routes
    for up in cfg.routes:
        assert all(key in ENV.values() for key in up.all_keys)
