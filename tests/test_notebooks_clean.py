"""The tutorials in docs/tutorials are stored clean: the five notebooks the README lists,
no outputs, no execution counts, a python3 kernel. CI executes them
(`python -m pytest --nbmake docs/tutorials`); this test only reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "docs" / "tutorials"
NAMES = [
    "01_attention_over_token_ranges.ipynb",
    "02_nodes_and_the_router.ipynb",
    "03_hugging_face_on_attention_nodes.ipynb",
    "04_the_captured_step.ipynb",
    "05_what_disaggregation_saves.ipynb",
]


def test_exactly_the_five_tutorials():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == NAMES


def test_readme_links_every_tutorial():
    readme = (ROOT / "README.md").read_text()
    for name in NAMES:
        assert f"docs/tutorials/{name}" in readme, f"README does not link {name}"


@pytest.mark.parametrize("name", NAMES)
def test_stored_without_outputs(name):
    nb = json.loads((TUTORIALS / name).read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.get("outputs") == [], f"{name}: code cell {i} has outputs"
        assert cell.get("execution_count") is None, f"{name}: code cell {i} has a count"
